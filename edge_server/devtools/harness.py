"""Driving a server process from the outside, for `make bench` and `make soak`: ports, start-up, memory."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]  # the repository (devtools/ is two levels down)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, *, port: int, log_path: Path, flags: list[str] = ()) -> subprocess.Popen:
    """`python -m edge_server` on `model` with `flags`, its output in `log_path`; returns once /health is 200."""
    return start_until_healthy([sys.executable, "-m", "edge_server", "--model", str(model), "--port", str(port),
                                *flags], port=port, log_path=log_path, name="server")


def start_until_healthy(argv: list[str], *, port: int, log_path: Path, name: str) -> subprocess.Popen:
    """Start `argv` (a server on `port`), its output in `log_path`; returns once its /health is 200."""
    log = log_path.open("wb")
    process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{name} exited; see {log_path}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    process.terminate()
    raise SystemExit(f"{name} did not become ready; see {log_path}")


def start_worker(port: int, *, log_path: Path, threads: int | None = None) -> subprocess.Popen:
    """`python -m edge_server worker` on 127.0.0.1:`port`, its output in `log_path`; returns once it listens."""
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "edge_server", "worker", "--port", str(port),
                                    *(["--threads", str(threads)] if threads else [])],
                                   cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while "transport" not in log_path.read_text(errors="replace"):  # the last line of rpc-server's banner
        if process.poll() is not None:
            raise SystemExit(f"worker exited with {process.returncode}:\n{log_path.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"worker not listening after 30 s:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.05)
    return process


def stop(processes: list[subprocess.Popen], timeout: float = 30) -> None:
    """Terminate every process, then reap each (killing one that outlives `timeout`)."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def memory_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of a process from /proc (VmRSS now, VmHWM peak), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")
