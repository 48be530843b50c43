"""llama.cpp's RPC backend: workers (`edge-server worker`) checked, then added as devices before a model loads.

llama.cpp aborts the process when an RPC server cannot be reached or answers wrongly, so every endpoint
is first greeted here, in Python, with a bounded timeout (the protocol's HELLO); only then is it
registered with ggml's backend registry, as llama.cpp's own `add_rpc_devices` does. Once registered,
the workers are devices of every model this process loads: llama.cpp puts layers and KV cache on them
in proportion to their free memory, or as `--tensor-split` says.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import re
import socket
import struct
import threading
import time
from pathlib import Path
from collections.abc import Iterator, Sequence

import llama_cpp

from edge_server.engine.types import DeviceShare, ModelLoadError

RPC_CMD_HELLO = 14
RPC_CONN_CAPS_SIZE = 24  # ggml-rpc transport.h: connection capabilities (all zero: plain TCP)
RPC_PROTO_MAJOR = 7  # ggml-rpc.h of the pinned llama.cpp
CONNECT_TIMEOUT = 5.0


class WorkerUnavailable(ModelLoadError):
    """An `--rpc` endpoint cannot be used: unreachable, not an rpc-server, or of another protocol version."""


def parse_endpoint(text: str) -> tuple[str, int]:
    """`host:port` -> (host, port); ValueError with the reason."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def greet(endpoint: str, timeout: float = CONNECT_TIMEOUT) -> tuple[int, int, int]:
    """The worker's protocol version, from one HELLO on a connection of our own (closed at once:
    rpc-server serves one client at a time). Raises `WorkerUnavailable` within about `timeout` seconds."""
    host, port = parse_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            connection.settimeout(timeout)
            connection.sendall(struct.pack("<BQ", RPC_CMD_HELLO, RPC_CONN_CAPS_SIZE) + bytes(RPC_CONN_CAPS_SIZE))
            reply = _receive(connection, 8 + 4 + RPC_CONN_CAPS_SIZE)
    except socket.timeout:
        raise WorkerUnavailable(f"RPC worker {endpoint} did not answer within {timeout:g}s (is it serving another "
                                "edge-server? an rpc-server serves one client at a time)") from None
    except OSError as error:
        raise WorkerUnavailable(f"RPC worker {endpoint} is unreachable: {error.strerror or error}") from None
    size, major, minor, patch = struct.unpack_from("<QBBB", reply)
    if size != 4 + RPC_CONN_CAPS_SIZE:
        raise WorkerUnavailable(f"{endpoint} did not answer like llama.cpp's rpc-server")
    if major != RPC_PROTO_MAJOR:
        raise WorkerUnavailable(f"RPC worker {endpoint} speaks protocol {major}.{minor}.{patch}, this server "
                                f"{RPC_PROTO_MAJOR}.x: run the worker from the same edge-server version")
    return major, minor, patch


def _receive(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError(104, "the connection closed before the greeting's answer")
        data += chunk
    return data


def add_workers(endpoints: Sequence[str], timeout: float = CONNECT_TIMEOUT) -> None:
    """Greet every endpoint, then register each as llama.cpp devices (once per process and endpoint)."""
    for endpoint in endpoints:
        greet(endpoint, timeout)
    LOADS.progressed()  # from here on, llama.cpp talks to the workers without a timeout of its own
    for endpoint in endpoints:
        _register(endpoint)


@functools.cache
def _register(endpoint: str) -> None:
    ggml = _ggml()
    reg = ggml.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise WorkerUnavailable("this llama-cpp-python build has no RPC backend: rebuild with `make install` "
                                "(it builds with -DGGML_RPC=ON)")
    address = ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server")
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(address)
    server_reg = add_server(endpoint.encode())
    if not server_reg:
        raise WorkerUnavailable(f"RPC worker {endpoint} offers no device")
    ggml.ggml_backend_register(ctypes.c_void_p(server_reg))


class LoadWatch:
    """When each load through RPC workers last made progress. A worker that answers the greeting and then goes
    silent leaves llama.cpp waiting forever inside the load; the server's watchdog ends such a load as it ends
    a hung step (`stalled_for`)."""

    def __init__(self) -> None:
        # loading thread -> when its load last progressed (None: still greeting, which has its own timeout)
        self._last: dict[int, float | None] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Watch the load the calling thread runs inside the block, from the workers' greeting on."""
        with self._lock:
            self._last[threading.get_ident()] = None
        try:
            yield
        finally:
            with self._lock:
                self._last.pop(threading.get_ident(), None)

    def progressed(self) -> None:
        """The calling thread's load moved on (greeted, a tensor loaded); nothing for a load not watched."""
        with self._lock:
            if threading.get_ident() in self._last:
                self._last[threading.get_ident()] = time.monotonic()

    def stalled_for(self) -> float:
        """Seconds the most stalled load in progress has gone without progress (0 when none runs)."""
        now = time.monotonic()
        with self._lock:
            return max((now - last for last in self._last.values() if last is not None), default=0.0)


LOADS = LoadWatch()


@llama_cpp.llama_progress_callback
def report_progress(progress: float, user_data: ctypes.c_void_p) -> bool:
    """llama.cpp's `progress_callback` for loads through workers: tells `LOADS` (and lets the load go on)."""
    LOADS.progressed()
    return True


def ggml_library(stem: str) -> ctypes.CDLL:
    """The copy of ggml's library `stem` (ggml, ggml-base) that libllama itself uses. A wheel holds plain copies,
    not symlinks: libggml.so and libggml.so.0 are two files, each with its own backend registry and abort hook,
    and libllama links the one named by the soname."""
    lib = Path(llama_cpp.__file__).parent / "lib"
    linked = sorted(lib.glob(f"lib{stem}.so.*"), key=lambda path: len(path.name))  # libggml.so.0 before .so.0.25.3
    linked += sorted(lib.glob(f"lib{stem}.*.dylib"), key=lambda path: len(path.name))
    for candidate in [*linked, lib / f"lib{stem}.so", lib / f"lib{stem}.dylib", lib / f"{stem}.dll"]:
        if candidate.is_file():
            return ctypes.CDLL(str(candidate))
    raise OSError(f"llama-cpp-python has no {stem} library in {lib}")


@functools.cache
def _ggml() -> ctypes.CDLL:
    libggml = ggml_library("ggml")
    libggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    libggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    libggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    libggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    libggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    libggml.ggml_backend_register.restype = None
    return libggml


_DEVICE = re.compile(r"using device (RPC\d+) \(([^)]*)\)")  # an RPC device's description is its endpoint
_LAYER = re.compile(r"load_tensors: layer +\d+ assigned to device (\S+?),")
_BUFFER = re.compile(r"^\S+: +(\S+) (model|KV) buffer size = +([\d.]+) MiB", re.MULTILINE)
_RPC_BUFFER = re.compile(r"^RPC(\d+)\[(.+)\]$")


def device_shares(load_log: str) -> list[DeviceShare]:
    """Layers, weights and KV cache per device, read from llama.cpp's own log of loading a model and its context
    (its device list, layer assignment and buffer sizes; buffers named CPU_Mapped, CPU_REPACK, ... count as the
    CPU's; an RPC buffer is named by the worker's endpoint and its device index there, e.g. RPC0[host:port])."""
    shares: dict[str, DeviceShare] = {}
    on_worker: dict[str, list[str]] = {}  # endpoint -> its devices' global names, in the worker's order
    for name, endpoint in _DEVICE.findall(load_log):
        shares[name] = DeviceShare(name, endpoint)
        on_worker.setdefault(endpoint, []).append(name)

    def share(name: str) -> DeviceShare:
        if name.startswith("CPU"):
            name = "CPU"
        elif match := _RPC_BUFFER.match(name):
            index, endpoint = int(match.group(1)), match.group(2)
            names = on_worker.get(endpoint, [])
            name = names[index] if index < len(names) else name
        return shares.setdefault(name, DeviceShare(name))

    for match in _LAYER.finditer(load_log):
        share(match.group(1)).layers += 1
    for name, kind, mib in _BUFFER.findall(load_log):
        if kind == "model":
            share(name).weights_mib += float(mib)
        else:
            share(name).kv_mib += float(mib)
    return sorted(shares.values(), key=lambda item: (item.name == "CPU", item.name))
