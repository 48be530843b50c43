"""`edge-server worker`: llama.cpp's rpc-server, which lends this machine's devices to `edge-server serve --rpc`.

The binary (`ggml-rpc-server`) is built by `make install` from the llama.cpp vendored in the pinned
llama-cpp-python sdist, for the same backend as the wheel, and installed beside the venv's Python.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_server.settings import EXIT_CONFIG, is_loopback
from edge_server.vendored import CACHE, LLAMA_VERSION, build_program, install_copy

BINARY = "ggml-rpc-server"
DEFAULT_PORT = 50052
# Configure the tools (rpc-server lives there), build only ggml and the server: a few minutes, not llama.cpp whole.
CMAKE_OPTIONS = ["-DGGML_RPC=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_SERVER=OFF"]
WARNING = """\
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
edge-server worker: listening on {host}, not on loopback.
llama.cpp's RPC protocol has NO authentication and NO encryption: anyone who reaches this port can
run computations on this machine and read or overwrite its buffers. Use it only on a network you
trust, e.g. inside WireGuard or through an SSH tunnel (see README: Several machines).
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"""


def worker_binary() -> Path | None:
    """The rpc-server to run: $EDGE_RPC_SERVER, else the one `make install` put beside Python, else on PATH."""
    named = os.environ.get("EDGE_RPC_SERVER")
    if named:
        return Path(named)
    beside = Path(sys.executable).parent / BINARY
    if beside.is_file():
        return beside
    found = shutil.which(BINARY)
    return Path(found) if found else None


def build(cmake_args: str, key: str, dest: Path, *, version: str = LLAMA_VERSION) -> Path:
    """Build rpc-server once per version and `key` (backend and CPU variant), then install it into `dest`."""
    built = build_program(BINARY, CACHE / f"rpc-server-{version}-{key}", [*CMAKE_OPTIONS, *shlex.split(cmake_args)],
                          version=version, minutes="3-5")
    dest.mkdir(parents=True, exist_ok=True)
    return install_copy(built, dest / BINARY)


def resolve_host(host: str) -> str:
    """The IPv4 address rpc-server is to bind for `host` (a name such as localhost, or an address): it takes
    only dotted IPv4 addresses, and exits 0 without serving on anything else. ValueError with the reason."""
    try:
        found = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        reason = "llama.cpp's rpc-server listens on IPv4 only" if ":" in host else getattr(error, "strerror", None)
        raise ValueError(f"cannot resolve --host {host!r} to an IPv4 address: {reason or error}") from None
    return found[0][4][0]


def _port_free(host: str, port: int) -> str | None:
    """None when `host:port` can be bound, else why not (rpc-server itself exits 0 on that)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        return error.strerror or str(error)
    return None


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """`edge-server worker` flags (each also read from EDGE_WORKER_<FLAG>)."""
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="edge-server worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=env("EDGE_WORKER_HOST", "127.0.0.1"),
                        help="address to bind (default: 127.0.0.1; anything else is reachable by others: see the warning)")
    parser.add_argument("--port", type=int, default=int(env("EDGE_WORKER_PORT", DEFAULT_PORT)),
                        help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--threads", type=int, default=env("EDGE_WORKER_THREADS"),
                        help="CPU threads for the CPU device (default: half the cores, as llama.cpp's)")
    parser.add_argument("--cache", type=Path, default=env("EDGE_WORKER_CACHE"),
                        help="keep received weights in this folder, so a restart of the server sends only hashes")
    parser.add_argument("--device", default=env("EDGE_WORKER_DEVICE"),
                        help="comma-separated llama.cpp devices to lend, e.g. CUDA0 (default: every GPU, else the CPU)")
    return parser.parse_args(argv)


def command(args: argparse.Namespace, binary: Path) -> list[str]:
    """rpc-server's command line for these flags."""
    line = [str(binary), "--host", args.host, "--port", str(args.port)]
    if args.threads:
        line += ["--threads", str(args.threads)]
    if args.device:
        line += ["--device", args.device]
    if args.cache:
        line.append("--cache")
    return line


def main(argv: Sequence[str]) -> int:
    """Run rpc-server in this process's place (signals reach it directly); 2 when it cannot start."""
    args = parse_args(argv)
    binary = worker_binary()
    if binary is None or not os.access(binary, os.X_OK):
        print(f"edge-server worker: {BINARY} not found: run `make install` (it builds it once) or set EDGE_RPC_SERVER",
              file=sys.stderr)
        return EXIT_CONFIG
    if not 0 < args.port < 65536:
        print(f"edge-server worker: invalid --port {args.port}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        args.host = resolve_host(args.host)
    except ValueError as error:
        print(f"edge-server worker: {error}", file=sys.stderr)
        return EXIT_CONFIG
    busy = _port_free(args.host, args.port)
    if busy:
        print(f"edge-server worker: cannot listen on {args.host}:{args.port}: {busy}", file=sys.stderr)
        return EXIT_CONFIG
    if not is_loopback(args.host):
        print(WARNING.format(host=args.host), file=sys.stderr)
    env = dict(os.environ)
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
        env["LLAMA_CACHE"] = str(args.cache)  # rpc-server keeps its files in $LLAMA_CACHE/rpc
    print(f"edge-server worker: serving this machine's devices on {args.host}:{args.port} "
          f"(connect with: edge-server serve --rpc {args.host}:{args.port})", file=sys.stderr, flush=True)
    line = command(args, binary)
    line_buffered = shutil.which("stdbuf")  # rpc-server prints its banner unflushed: a log file would show nothing
    if line_buffered:
        line = [line_buffered, "-oL", "-eL", *line]
    os.execve(line[0], line, env)
    return 0  # not reached


def _build_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_server.worker build")
    parser.add_argument("action", choices=["build"])
    parser.add_argument("--cmake-args", default="", help="the backend's cmake options, as the wheel was built with")
    parser.add_argument("--key", required=True, help="cache key: backend and CPU variant")
    parser.add_argument("--dest", type=Path, default=Path(sys.executable).parent)
    args = parser.parse_args(argv)
    print(build(args.cmake_args, args.key, args.dest))
    return 0


if __name__ == "__main__":
    raise SystemExit(_build_main(sys.argv[1:]))
