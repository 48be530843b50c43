"""Several machines: `edge-server worker` (llama.cpp's rpc-server) on loopback ports, `serve --rpc` splitting the
model's layers over them. Split texts equal local ones; an unreachable, killed or hung worker is handled."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from edge_server.devtools.harness import free_port, start_worker
from edge_server.devtools.synthetic import write_random_model
from edge_server.engine.fatal import EXIT_BACKEND_FAILED
from edge_server.engine.rpc import RPC_CMD_HELLO, RPC_CONN_CAPS_SIZE, RPC_PROTO_MAJOR, greet
from edge_server.worker import worker_binary
from tests.conftest import ROOT
from tests.e2e.conftest import chat, stream_chat, streamed_text

N_LAYER = 6
PROMPTS = ["Hello", "Tell me about the sea", "1 2 3 4", "Why is the sky blue?"]


class Worker:
    """`python -m edge_server worker` on a free loopback port, until stopped."""

    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.process = start_worker(self.port, log_path=log_dir / f"worker-{self.port}.log", threads=1)

    def stop(self) -> None:
        """Kill and reap the worker (it may be stopped with SIGSTOP)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def layered_model(tmp_path_factory) -> Path:
    """A random model with enough layers to split."""
    return write_random_model(tmp_path_factory.mktemp("rpc-model") / "layered.gguf", seed=7, n_layer=N_LAYER)


@pytest.fixture
def workers(tmp_path):
    """Factory of workers, all stopped at the end of the test."""
    assert worker_binary() is not None, "ggml-rpc-server missing: `make install` builds it"
    started: list[Worker] = []

    def start() -> Worker:
        started.append(Worker(tmp_path))
        return started[-1]

    yield start
    for worker in started:
        worker.stop()


def _answers(base_url: str) -> list[str]:
    return [chat(base_url, prompt, temperature=0, max_tokens=24).json()["choices"][0]["message"]["content"]
            for prompt in PROMPTS]


def test_split_over_two_workers_answers_exactly_as_served_locally(start_server, workers, layered_model):
    local = start_server("--model", str(layered_model), "--parallel", "4")
    first, second = workers(), workers()
    split = start_server("--model", str(layered_model), "--parallel", "4", "--rpc",
                         f"{first.endpoint},{second.endpoint}")
    devices = {share["device"]: share for share in split.health()["devices"]}
    assert devices["RPC0"]["endpoint"] == first.endpoint and devices["RPC1"]["endpoint"] == second.endpoint
    assert devices["RPC0"]["layers"] > 0 and devices["RPC1"]["layers"] > 0
    assert devices["RPC0"]["layers"] + devices["RPC1"]["layers"] == N_LAYER + 1  # the output layer counts as one
    assert devices["RPC0"]["weights_mib"] > 0 and devices["RPC1"]["kv_cache_mib"] > 0
    assert devices.get("CPU", {"layers": 0})["layers"] == 0
    assert split.health()["backend"] == "RPC"
    meta = requests.get(split.base_url + "/v1/models", timeout=10).json()["data"][0]["meta"]
    assert [share["device"] for share in meta["devices"]][:2] == ["RPC0", "RPC1"]
    assert "split: RPC0 (" in split.log()

    expected = _answers(local.base_url)
    assert _answers(split.base_url) == expected
    streamed = [streamed_text(stream_chat(split.base_url, prompt, temperature=0, max_tokens=24)) for prompt in PROMPTS]
    assert streamed == expected
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # four at once: one batch, every slot on the workers
        together = list(pool.map(lambda p: chat(split.base_url, p, temperature=0, max_tokens=24).json(), PROMPTS))
    assert [answer["choices"][0]["message"]["content"] for answer in together] == expected


def test_tensor_split_and_layers_kept_local(start_server, workers, layered_model):
    first, second = workers(), workers()
    server = start_server("--model", str(layered_model), "--rpc", f"{first.endpoint},{second.endpoint}",
                          "--tensor-split", "1,3", "--n-gpu-layers", "4")
    devices = {share["device"]: share for share in server.health()["devices"]}
    assert devices["CPU"]["layers"] == N_LAYER + 1 - 4  # the first layers stay on this machine
    assert devices["RPC0"]["layers"] + devices["RPC1"]["layers"] == 4
    assert devices["RPC1"]["layers"] > devices["RPC0"]["layers"]
    assert chat(server.base_url, temperature=0, max_tokens=8).status_code == 200


def _run_to_exit(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "edge_server", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return done, time.monotonic() - started


def test_an_unreachable_worker_is_one_clear_line_and_exit_2(layered_model):
    nobody = f"127.0.0.1:{free_port()}"
    done, seconds = _run_to_exit("--model", str(layered_model), "--port", str(free_port()), "--rpc", nobody)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"RPC worker {nobody} is unreachable" in errors[0], done.stderr
    assert seconds < 20


def test_a_bad_rpc_flag_is_refused_before_loading(layered_model):
    done, _ = _run_to_exit("--model", str(layered_model), "--rpc", "no-port-here")
    assert done.returncode == 2 and "invalid --rpc" in done.stderr and "HOST:PORT" in done.stderr


def _special_tokens(model: Path) -> dict[str, float]:
    from edge_server.ggufmeta import read_gguf_metadata

    tokens = read_gguf_metadata(model)["tokenizer.ggml.tokens"]
    return {str(index): -100 for index, text in enumerate(tokens) if text.startswith("<|")}


def _stream_until_error(base_url: str, model: Path, after_tokens, max_tokens: int = 2000) -> tuple[list, str]:
    body = {"model": "m", "messages": [{"role": "user", "content": "Go on"}], "stream": True,
            "max_tokens": max_tokens, "temperature": 1.0, "logit_bias": _special_tokens(model)}  # no end of turn
    with requests.post(base_url + "/v1/chat/completions", json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200
        events, fired = [], False
        for line in response.iter_lines():
            if line.startswith(b"data: "):
                events.append(line[6:].decode())
                if not fired and len(events) >= 5:
                    fired = True
                    after_tokens()
    return events, response.headers.get("Content-Type", "")


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_worker_lost_mid_stream_ends_the_stream_with_an_error_and_the_server_exits(start_server, workers,
                                                                                     layered_model, how):
    worker = workers()
    server = start_server("--model", str(layered_model), "--rpc", worker.endpoint, "--rpc-timeout", "3")
    lose = {"killed": lambda: worker.process.kill(),
            "hung": lambda: worker.process.send_signal(signal.SIGSTOP)}[how]
    events, _ = _stream_until_error(server.base_url, layered_model, lose)
    parsed = sse_events_from(events)
    errors = [event for event in parsed if isinstance(event, dict) and "error" in event]
    assert len(errors) == 1, events[-3:]
    assert errors[0]["error"]["code"] == "backend_failed"
    assert "the server exits to be restarted" in errors[0]["error"]["message"]
    assert ".cpp:" not in errors[0]["error"]["message"]
    assert server.process.wait(timeout=30) == EXIT_BACKEND_FAILED
    log = server.log()
    assert "the backend failed" in log
    if how == "killed":
        assert "Remote RPC server crashed" in log
    else:
        assert "waited 3s for the RPC workers" in log


def sse_events_from(payloads: list[str]) -> list:
    """Parse collected `data:` payloads as `sse_events` does."""
    import json

    return [payload if payload == "[DONE]" else json.loads(payload) for payload in payloads]


def test_worker_command_refuses_a_taken_port_and_warns_off_loopback(workers):
    taken = workers()
    done = subprocess.run([sys.executable, "-m", "edge_server", "worker", "--port", str(taken.port)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and f"cannot listen on 127.0.0.1:{taken.port}" in done.stderr
    from edge_server.settings import is_loopback
    from edge_server.worker import WARNING

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    assert "NO authentication" in WARNING


def test_health_reports_devices_when_served_locally(server):
    devices = server.health()["devices"]
    assert [share["device"] for share in devices] == ["CPU"] and devices[0]["layers"] > 0


def test_worker_host_given_by_name_is_resolved_and_served(tmp_path):
    port = free_port()
    with (tmp_path / "worker.log").open("wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "edge_server", "worker", "--host", "localhost", "--port",
                                   str(port), "--threads", "1"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert worker.poll() is None, f"worker exited {worker.returncode}: {(tmp_path / 'worker.log').read_text()}"
            with contextlib.suppress(Exception):
                assert greet(f"127.0.0.1:{port}")[0] == RPC_PROTO_MAJOR
                break
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            time.sleep(0.1)
    finally:
        worker.kill()
        worker.wait(timeout=10)
    nowhere = subprocess.run([sys.executable, "-m", "edge_server", "worker", "--host", "no-such-host.invalid",
                              "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert nowhere.returncode == 2 and "cannot resolve --host 'no-such-host.invalid'" in nowhere.stderr, nowhere.stderr


@contextlib.contextmanager
def silent_worker() -> Iterator[str]:
    """An endpoint that answers every connection's greeting as rpc-server does, then never answers again."""
    listener = socket.create_server(("127.0.0.1", 0))
    connections: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = listener.accept()
                connections.append(connection)
                request = connection.recv(9 + RPC_CONN_CAPS_SIZE, socket.MSG_WAITALL)
                if request[:1] == bytes([RPC_CMD_HELLO]):
                    connection.sendall(struct.pack("<QBBBB", 4 + RPC_CONN_CAPS_SIZE, RPC_PROTO_MAJOR, 0, 0, 0)
                                       + bytes(RPC_CONN_CAPS_SIZE))

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        for connection in connections:
            connection.close()


def test_a_worker_silent_after_its_greeting_fails_the_load_within_the_timeout(layered_model):
    with silent_worker() as endpoint:
        done, seconds = _run_to_exit("--model", str(layered_model), "--port", str(free_port()), "--rpc", endpoint,
                                     "--rpc-timeout", "3", timeout=45)
    assert done.returncode == EXIT_BACKEND_FAILED, done.stderr
    assert f"loading a model waited 3s for the RPC workers ({endpoint}) without progress" in done.stderr
    assert seconds < 15, seconds
