"""The real server as a subprocess on a free port, and helpers to talk to it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from edge_server.devtools.harness import free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


class ServerProcess:
    """`python -m edge_server` in a subprocess, its log captured to a file."""

    def __init__(self, *args: str, log_dir: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        self._log = self.log_path.open("wb")
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edge_server", "--port", str(self.port), "--threads", "2", *args],
            cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60.0) -> ServerProcess:
        """Block until GET /health is 200; fail with the server's log if it never is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(self.base_url + "/health", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        pytest.fail(f"server not ready after {timeout}s:\n{self.log()}")

    def health(self) -> dict:
        """The parsed /health body."""
        return requests.get(self.base_url + "/health", timeout=5).json()

    def wait_idle(self, timeout: float) -> float:
        """Seconds until /health shows nothing running or queued; fails after `timeout`."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            body = self.health()
            if body["running"] == 0 and body["queued"] == 0:
                return time.monotonic() - start
            time.sleep(0.02)
        pytest.fail(f"server still busy after {timeout}s: {self.health()}")

    def log(self) -> str:
        """Everything the server printed so far."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Terminate and reap the process."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """Factory: start a server with the given CLI args; every one is stopped at the end."""
    started: list[ServerProcess] = []
    log_dir = tmp_path_factory.mktemp("server-logs")

    def start(*args: str, env: dict[str, str] | None = None, wait: bool = True) -> ServerProcess:
        server = ServerProcess(*args, log_dir=log_dir, env=env)
        started.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in started:  # all told at once: each shuts down gracefully, so one by one they took ~30 s
        if server.process.poll() is None:
            server.process.terminate()
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server, tiny_model) -> ServerProcess:
    """The server on the tiny random model, shared by the tests that do not disturb it."""
    return start_server("--model", str(tiny_model))


@pytest.fixture(scope="session")
def scripted_server(start_server, scripted_model) -> ServerProcess:
    """The server on the scripted model (greedy answer == SCRIPT_TEXT)."""
    return start_server("--model", str(scripted_model))


@pytest.fixture(scope="session")
def vision_server(start_server, tiny_model) -> ServerProcess:
    """The tiny model with the synthetic projector (--mmproj), two slots."""
    from edge_server.devtools import assets

    return start_server("--model", str(tiny_model), "--mmproj", str(assets.vision_projector()), "--parallel", "2")


@pytest.fixture(scope="session")
def base_url(server) -> str:
    """Base URL of the shared tiny-model server."""
    return server.base_url


def chat(base_url: str, content: str = "Hello", **fields) -> requests.Response:
    """POST a one-message chat and return the response (not raised)."""
    body = {"model": "test-model", "messages": [{"role": "user", "content": content}], **fields}
    return requests.post(base_url + "/v1/chat/completions", json=body, timeout=60)


def sse_events(response: requests.Response) -> list[dict | str]:
    """The `data:` payloads of a streamed response, parsed; `[DONE]` stays a string."""
    import json

    events: list[dict | str] = []
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            payload = line[6:].decode("utf-8")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def stream_chat(base_url: str, content: str = "Hello", **fields) -> list[dict | str]:
    """Stream a one-message chat and return its parsed events."""
    body = {"model": "test-model", "messages": [{"role": "user", "content": content}], "stream": True, **fields}
    with requests.post(base_url + "/v1/chat/completions", json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return sse_events(response)


def streamed_text(events: list[dict | str]) -> str:
    """Join the content deltas of parsed chat chunks."""
    return "".join(
        e["choices"][0]["delta"].get("content", "") for e in events if isinstance(e, dict) and e.get("choices")
    )


# llama.cpp computes slightly different logits for the same tokens in other batch shapes (several streams in
# one step, prompt chunks): a greedy answer may take the other of two tokens whose log-probabilities are this
# close. Measured: the wider random test model's log-probabilities move by up to 0.012 between a solo request
# and four concurrent ones (so a top-two gap by up to ~0.024; a 0.002 gap flipped); SmolLM2 Q4_1's by up to 0.2.
RANDOM_MODEL_NOISE = 0.05


def streamed_tokens(events: list[dict | str]) -> list[dict]:
    """The logprobs entries (token, logprob, top_logprobs) of parsed chat chunks, in order."""
    return [entry for e in events if isinstance(e, dict) and e.get("choices")
            for entry in ((e["choices"][0].get("logprobs") or {}).get("content") or [])]


def assert_same_greedy_answer(alone: list[dict], other: list[dict], noise: float = RANDOM_MODEL_NOISE) -> None:
    """Two greedy answers to one request (logprobs entries, `alone` with top_logprobs >= 2) are the same tokens,
    or differ first where `alone`'s two likeliest tokens are within batch-shape noise (after that they may
    part ways)."""
    tokens, others = [t["token"] for t in alone], [t["token"] for t in other]
    if tokens == others:
        return
    first = next((i for i, (a, b) in enumerate(zip(tokens, others)) if a != b), min(len(tokens), len(others)))
    assert first < min(len(tokens), len(others)), f"one answer is a prefix of the other: {tokens} / {others}"
    top = alone[first]["top_logprobs"]
    assert top[0]["logprob"] - top[1]["logprob"] < noise, (first, top, tokens[first], others[first])


def write_unloadable_gguf(path: Path) -> Path:
    """A well-formed GGUF of an architecture llama.cpp does not know ("alien"): it passes the file checks
    and fails in llama.cpp's loader."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "alien")
    writer.add_context_length(2048)
    writer.add_tensor("w", np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def forced_so_far(server) -> float:
    metrics = requests.get(server.base_url + "/metrics", timeout=5).text
    return float(re.search(r"^edge_forced_tokens_total (\S+)$", metrics, re.MULTILINE).group(1))


def order_body(**settings) -> dict:
    """A chat request for the bench's order, constrained to its schema."""
    from edge_server.devtools.bench_structured import ORDER_PROMPT, ORDER_SCHEMA

    return {"messages": [{"role": "user", "content": ORDER_PROMPT}], **settings,
            "response_format": {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER_SCHEMA}}}


def without_and_with_fast_forward(server, body: dict) -> list[dict]:
    """The choice `body` gets with fast-forward off, then on; checks that only the second fed forced tokens."""
    choices = []
    for speculative in (False, True):
        before = forced_so_far(server)
        response = requests.post(server.base_url + "/v1/chat/completions", json={**body, "speculative": speculative},
                                 timeout=120)
        assert response.status_code == 200, response.text
        choices.append(response.json()["choices"][0])
        forced = forced_so_far(server) - before
        assert (forced > 0) == speculative, forced
    return choices
