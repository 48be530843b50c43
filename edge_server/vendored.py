"""Programs built from the llama.cpp vendored in the pinned llama-cpp-python sdist (rpc-server, llama-server).

One build per program, version and options, cached under ~/.cache/edge-server/ (or $EDGE_SERVER_CACHE):
the sdist comes through pip (the only download), cmake from the package registry when the machine has none.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

LLAMA_VERSION = "0.3.36"
CACHE = Path(os.environ.get("EDGE_SERVER_CACHE", Path.home() / ".cache" / "edge-server"))
# Never fetch at configure or build time: the web UI, OpenSSL and tests are off.
OFFLINE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                   "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                   "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF"]

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


def sdist_source(version: str = LLAMA_VERSION, sdist: Path | None = None) -> Path:
    """The extracted sdist's directory: `sdist` if given, else /tmp/sdist/llama_cpp_python-<version> if
    present, else a copy fetched with pip and extracted under the cache (kept for later builds)."""
    shared = CACHE / f"sdist-{version}"
    for candidate in (sdist, Path(f"/tmp/sdist/llama_cpp_python-{version}"), shared / f"llama_cpp_python-{version}"):
        if candidate and (candidate / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
            return candidate
    shared.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=shared) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
                        "--no-binary", ":all:", "-d", tmp, f"llama-cpp-python=={version}"], check=True)
        archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        os.replace(Path(tmp) / f"llama_cpp_python-{version}", shared / f"llama_cpp_python-{version}")
    return shared / f"llama_cpp_python-{version}"


def cmake() -> str:
    """A cmake executable: the machine's, else the one from the package registry (installed beside Python)."""
    found = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
    if found:
        return found
    print("cmake not found: installing it from the package registry", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "cmake"], check=True)
    found = shutil.which("cmake", path=str(Path(sys.executable).parent))
    if not found:
        raise SystemExit("cmake is needed to build llama.cpp's programs and could not be installed")
    return found


def install_copy(source: Path, destination: Path) -> Path:
    """Copy `source` to `destination` atomically (a half-written binary is never found there)."""
    partial = destination.with_suffix(".partial")
    shutil.copy2(source, partial)
    partial.rename(destination)
    return destination


def build_program(target: str, home: Path, options: Sequence[str], *, version: str = LLAMA_VERSION,
                  sdist: Path | None = None, jobs: int | None = None, nice: int = 0, minutes: str = "a few") -> Path:
    """Build `target` of the vendored llama.cpp once into `home` and return the cached binary."""
    out = home / target
    if out.is_file() and os.access(out, os.X_OK):
        return out
    tool = cmake()
    source = sdist_source(version, sdist) / "vendor" / "llama.cpp"
    build_dir = home / "build"
    prefix = ["nice", "-n", str(nice)] if nice and shutil.which("nice") else []
    jobs = jobs or os.cpu_count() or 2
    started = time.monotonic()
    print(f"building {target} from {source} (once; {minutes} minutes on 2 cores) ...", file=sys.stderr, flush=True)
    subprocess.run([*prefix, tool, "-S", str(source), "-B", str(build_dir), *OFFLINE_OPTIONS, *options], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([*prefix, tool, "--build", str(build_dir), "--target", target, "-j", str(jobs)], check=True)
    install_copy(build_dir / "bin" / target, out)
    shutil.rmtree(build_dir, ignore_errors=True)  # hundreds of MB of objects; the binary is all that is used
    print(f"built {out} in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return out
