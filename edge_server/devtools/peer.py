"""llama-server, built once from the llama.cpp vendored in the pinned llama-cpp-python sdist, for the bench.

`python -m edge_server.devtools.peer build` prints the path of the binary (building it the first time,
about 10-20 minutes on 2 cores); `path` prints it only if built. The build is cached in
~/.cache/edge-server/llama-server-<version>/ (or $EDGE_SERVER_CACHE/llama-server-<version>/).
Nothing is downloaded at build time but the sdist itself (through pip, if no extracted copy is given):
the web UI, OpenSSL and curl are off.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

LLAMA_VERSION = "0.3.36"
CACHE = Path(os.environ.get("EDGE_SERVER_CACHE", Path.home() / ".cache" / "edge-server"))
# Options of the vendored llama.cpp (checked against 0.3.36's CMakeLists.txt): only llama-server's
# dependencies, static, for this CPU, and nothing that fetches from the network at configure or build time
# (LLAMA_USE_PREBUILT_UI would download the web UI; LLAMA_CURL is deprecated there and OpenSSL is not needed).
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DBUILD_SHARED_LIBS=OFF", "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF",
]


# As the Makefile does for our wheel: on CPUs that advertise AMX (which llama.cpp's AMX kernels crash on, on
# VMs that do not grant its tile state) build for the same instruction sets minus AMX instead of -march=native.
X86_FEATURES = {"sse4_2": "SSE42", "avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "bmi2": "BMI2",
                "avx512f": "AVX512", "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI",
                "avx512_bf16": "AVX512_BF16", "avx_vnni": "AVX_VNNI"}


def cpu_options() -> list[str]:
    """-DGGML_NATIVE=ON, or the explicit instruction sets minus AMX where the CPU advertises AMX."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return ["-DGGML_NATIVE=ON"]
    if "amx_int8" not in flags:
        return ["-DGGML_NATIVE=ON"]
    return ["-DGGML_NATIVE=OFF", *(f"-DGGML_{name}=ON" for flag, name in X86_FEATURES.items() if flag in flags)]


def home(version: str = LLAMA_VERSION) -> Path:
    """Where this version's build and binary live."""
    return CACHE / f"llama-server-{version}"


def binary(version: str = LLAMA_VERSION) -> Path:
    """The cached llama-server (it may not exist yet)."""
    return home(version) / "llama-server"


def sdist_source(version: str = LLAMA_VERSION, sdist: Path | None = None) -> Path:
    """The extracted sdist's directory: `sdist` if given, else /tmp/sdist/llama_cpp_python-<version> if
    present, else a copy fetched with pip and extracted under the cache."""
    for candidate in (sdist, Path(f"/tmp/sdist/llama_cpp_python-{version}"), home(version) / "sdist"
                      / f"llama_cpp_python-{version}"):
        if candidate and (candidate / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
            return candidate
    target = home(version) / "sdist"
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
                        "--no-binary", ":all:", "-d", tmp, f"llama-cpp-python=={version}"], check=True)
        archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
    return target / f"llama_cpp_python-{version}"


def build(version: str = LLAMA_VERSION, *, sdist: Path | None = None, jobs: int = 2, nice: int = 19) -> Path:
    """Build llama-server once (niced, `jobs` compile jobs) and return the cached binary."""
    out = binary(version)
    if out.is_file() and os.access(out, os.X_OK):
        return out
    if not shutil.which("cmake"):
        raise SystemExit("cmake is needed to build llama-server (apt-get install -y cmake)")
    source = sdist_source(version, sdist) / "vendor" / "llama.cpp"
    build_dir = home(version) / "build"
    prefix = ["nice", "-n", str(nice)] if nice and shutil.which("nice") else []
    started = time.monotonic()
    print(f"building llama-server from {source} (once; 10-20 minutes on 2 cores) ...", file=sys.stderr, flush=True)
    subprocess.run([*prefix, "cmake", "-S", str(source), "-B", str(build_dir), *CMAKE_OPTIONS, *cpu_options()],
                   check=True)
    subprocess.run([*prefix, "cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)],
                   check=True)
    built = build_dir / "bin" / "llama-server"
    partial = out.with_suffix(".partial")
    shutil.copy2(built, partial)
    partial.rename(out)
    print(f"built {out} in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return out


def command(model: Path, *, port: int, threads: int, parallel: int, n_ctx: int, version: str = LLAMA_VERSION,
            extra: list[str] = ()) -> list[str]:
    """llama-server's command line matching our server's settings: `parallel` slots of `n_ctx` tokens each
    (its -c is the total), `threads` threads, flash attention off, no web UI."""
    return [str(binary(version)), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-np", str(parallel), "-c", str(n_ctx * parallel), "-t", str(threads), "-tb", str(threads),
            "-fa", "off", "--no-webui", *extra]


def main(argv: list[str] | None = None) -> int:
    """CLI: `build` (once) or `path`; prints the binary's path."""
    parser = argparse.ArgumentParser(prog="python -m edge_server.devtools.peer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["build", "path"])
    parser.add_argument("--version", default=LLAMA_VERSION, help="llama-cpp-python sdist version")
    parser.add_argument("--sdist", type=Path, help="an extracted sdist directory to build from")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    if args.action == "path":
        if not binary(args.version).is_file():
            print("not built: run `python -m edge_server.devtools.peer build`", file=sys.stderr)
            return 1
        print(binary(args.version))
        return 0
    print(build(args.version, sdist=args.sdist, jobs=args.jobs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
