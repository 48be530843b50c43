"""llama-server, built once from the llama.cpp vendored in the pinned llama-cpp-python sdist, for the bench.

`python -m edge_server.devtools.peer build` prints the path of the binary (building it the first time,
about 10-20 minutes on 2 cores); `path` prints it only if built. The build is cached in
~/.cache/edge-server/llama-server-<version>/ (or $EDGE_SERVER_CACHE/llama-server-<version>/).
Nothing is downloaded at build time but the sdist itself (through pip, if no extracted copy is given):
the web UI, OpenSSL and curl are off.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_server.vendored import CACHE, LLAMA_VERSION, build_program, cpu_options

# Only llama-server's dependencies, static, for this CPU (checked against 0.3.36's CMakeLists.txt).
CMAKE_OPTIONS = ["-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_COMMON=ON",
                 "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF"]


def home(version: str = LLAMA_VERSION) -> Path:
    """Where this version's build and binary live."""
    return CACHE / f"llama-server-{version}"


def binary(version: str = LLAMA_VERSION) -> Path:
    """The cached llama-server (it may not exist yet)."""
    return home(version) / "llama-server"


def build(version: str = LLAMA_VERSION, *, sdist: Path | None = None, jobs: int = 2, nice: int = 19) -> Path:
    """Build llama-server once (niced, `jobs` compile jobs) and return the cached binary."""
    return build_program("llama-server", home(version), [*CMAKE_OPTIONS, *cpu_options()], version=version,
                         sdist=sdist, jobs=jobs, nice=nice, minutes="10-20")


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
