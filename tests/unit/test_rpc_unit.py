"""RPC pieces without workers: the greeting against stand-in servers, reading llama.cpp's load log, the flags,
/health once the backend failed. (Real workers: tests/e2e/test_rpc.py.)"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from pydantic import ValidationError

from edge_server.api.app import create_app
from edge_server.api.state import ServedModel, state_of
from edge_server.devtools.fake_engine import FakeEngine
from edge_server.engine.rpc import RPC_CONN_CAPS_SIZE, WorkerUnavailable, device_shares, greet, parse_endpoint
from edge_server.settings import Settings

# What llama.cpp 0.3.36 logs while loading a 6-layer model over two workers with 3 layers kept local
# (captured from a real load; other lines left out).
LOAD_LOG = """\
llama_prepare_model_devices: using device RPC0 (127.0.0.1:50111) (unknown id) - 24105 MiB free
llama_prepare_model_devices: using device RPC1 (127.0.0.1:50112) (unknown id) - 24105 MiB free
load_tensors: layer   0 assigned to device CPU, is_swa = 0
load_tensors: layer   1 assigned to device CPU, is_swa = 0
load_tensors: layer   2 assigned to device CPU, is_swa = 0
load_tensors: layer   3 assigned to device RPC0, is_swa = 0
load_tensors: layer   4 assigned to device RPC1, is_swa = 0
load_tensors: layer   5 assigned to device RPC1, is_swa = 0
load_tensors: layer   6 assigned to device RPC1, is_swa = 0
load_tensors: offloaded 4/7 layers to GPU
load_tensors:   CPU_Mapped model buffer size =     0.60 MiB
load_tensors: RPC0[127.0.0.1:50111] model buffer size =     0.14 MiB
load_tensors: RPC0[127.0.0.1:50112] model buffer size =     0.54 MiB
llama_kv_cache:        CPU KV buffer size =     6.00 MiB
llama_kv_cache: RPC0[127.0.0.1:50111] KV buffer size =     2.00 MiB
llama_kv_cache: RPC0[127.0.0.1:50112] KV buffer size =     4.00 MiB
sched_reserve:        CPU compute buffer size =     6.62 MiB
"""


def test_device_shares_follow_llamas_own_log():
    shares = {share.name: share.as_dict() for share in device_shares(LOAD_LOG)}
    assert list(shares) == ["RPC0", "RPC1", "CPU"]
    assert shares["RPC0"] == {"device": "RPC0", "endpoint": "127.0.0.1:50111", "layers": 1, "weights_mib": 0.1,
                              "kv_cache_mib": 2.0}
    # every worker names its own first device RPC0: buffers are matched by endpoint
    assert shares["RPC1"] == {"device": "RPC1", "endpoint": "127.0.0.1:50112", "layers": 3, "weights_mib": 0.5,
                              "kv_cache_mib": 4.0}
    assert shares["CPU"] == {"device": "CPU", "endpoint": None, "layers": 3, "weights_mib": 0.6, "kv_cache_mib": 6.0}


def test_device_shares_of_a_plain_load_is_the_cpu_alone():
    log = "load_tensors: layer   0 assigned to device CPU, is_swa = 0\nload_tensors:   CPU_Mapped model buffer " \
          "size =     1.22 MiB\nload_tensors:   CPU_REPACK model buffer size =     2.00 MiB\n"
    assert [share.as_dict() for share in device_shares(log)] == [
        {"device": "CPU", "endpoint": None, "layers": 1, "weights_mib": 3.2, "kv_cache_mib": 0.0}]


@pytest.mark.parametrize("text", ["nohost", "host:", ":50052", "host:0", "host:65536", "host:port"])
def test_endpoints_must_be_host_and_port(text):
    with pytest.raises(ValueError):
        parse_endpoint(text)
    with pytest.raises(ValidationError, match="not HOST:PORT"):
        Settings(threads=1, rpc=f"127.0.0.1:1,{text}")


def test_rpc_and_tensor_split_settings():
    settings = Settings(threads=1, rpc=" 10.0.0.2:50052, 10.0.0.3:50052 ", tensor_split="3,1")
    assert settings.rpc == ("10.0.0.2:50052", "10.0.0.3:50052") and settings.tensor_split == (3.0, 1.0)
    with pytest.raises(ValidationError, match="named twice"):
        Settings(threads=1, rpc="a:1,a:1")
    for bad in ("3,x", "-1,2", "0,0"):
        with pytest.raises(ValidationError):
            Settings(threads=1, tensor_split=bad)


class StandIn:
    """A TCP server on loopback that answers the first message of every connection with `reply` (or never)."""

    def __init__(self, reply: bytes | None):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.received: list[bytes] = []
        threading.Thread(target=self._serve, args=(reply,), daemon=True).start()

    def _serve(self, reply: bytes | None) -> None:
        connection, _ = self.listener.accept()
        with connection:
            self.received.append(connection.recv(1024))
            if reply is not None:
                connection.sendall(reply)
            else:
                time.sleep(3)

    def close(self) -> None:
        self.listener.close()


def _hello_reply(major: int, minor: int = 0, patch: int = 0) -> bytes:
    return struct.pack("<QBBBB", 4 + RPC_CONN_CAPS_SIZE, major, minor, patch, 0) + bytes(RPC_CONN_CAPS_SIZE)


def test_greeting_sends_llamas_hello_and_reads_the_version():
    server = StandIn(_hello_reply(7, 0, 0))
    assert greet(server.endpoint, timeout=2) == (7, 0, 0)
    assert server.received == [struct.pack("<BQ", 14, RPC_CONN_CAPS_SIZE) + bytes(RPC_CONN_CAPS_SIZE)]
    server.close()


@pytest.mark.parametrize("reply, words", [
    (_hello_reply(6, 1, 0), "speaks protocol 6.1.0"),
    (b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(40), "did not answer like llama.cpp's rpc-server"),
    (b"", "unreachable"),
    (None, "did not answer within 0.5s"),
])
def test_greeting_refuses_what_is_not_a_worker_of_this_version(reply, words):
    server = StandIn(reply)
    started = time.monotonic()
    with pytest.raises(WorkerUnavailable, match=words):
        greet(server.endpoint, timeout=0.5)
    assert time.monotonic() - started < 2
    server.close()


def test_greeting_a_closed_port_fails_at_once():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(WorkerUnavailable, match="unreachable"):
        greet(f"127.0.0.1:{port}", timeout=2)


def test_health_is_503_with_the_reason_once_the_backend_failed():
    app = create_app(Settings(threads=1), ServedModel.of(FakeEngine(), "fake-model"))
    client = app.test_client()
    assert client.get("/health").status_code == 200
    state_of(app).failure = "llama.cpp aborted: Remote RPC server crashed or returned malformed response"
    response = client.get("/health")
    assert response.status_code == 503
    assert response.get_json() == {"status": "failed", "error": state_of(app).failure}
