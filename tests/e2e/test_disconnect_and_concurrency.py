"""Clients that leave stop their generation; concurrent requests never mix; a full queue answers 429."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.e2e.conftest import assert_same_greedy_answer, chat, stream_chat, streamed_tokens

LONG = {"max_tokens": 4000, "temperature": 0}  # the random model never ends its turn: runs to max_tokens


@pytest.fixture(scope="module")
def slow_server(start_server, slow_model):
    """A server on the wider random model, one request at a time, with room for one waiting request."""
    return start_server("--model", str(slow_model), "--parallel", "1", "--max-queue", "1")


def completion_tokens_logged(server, request_id: str) -> int:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        match = re.search(rf"{request_id} POST \S+ \d+ prompt=\d+ completion=(\d+)", server.log())
        if match:
            return int(match.group(1))
        time.sleep(0.05)
    pytest.fail(f"no access-log line for {request_id}:\n{server.log()[-2000:]}")


def full_run_seconds(server) -> float:
    """How long the LONG request takes to run to its end (measured once, so the limits below scale)."""
    started = time.monotonic()
    answer = chat(server.base_url, **{**LONG, "max_tokens": 400}).json()
    assert answer["usage"]["completion_tokens"] == 400
    return (time.monotonic() - started) * 10


def test_closed_stream_stops_generation_within_a_few_tokens(slow_server):
    full = full_run_seconds(slow_server)
    body = {"messages": [{"role": "user", "content": "Go on"}], "stream": True, **LONG}
    with requests.post(slow_server.base_url + "/v1/chat/completions", json=body, stream=True, timeout=30) as response:
        request_id = response.headers["X-Request-Id"]
        received = 0
        for line in response.iter_lines():
            if line.startswith(b"data: {") and b'"content":"' in line:
                received += 1
            if received == 5:
                break
    idle_after = slow_server.wait_idle(timeout=full / 4)
    generated = completion_tokens_logged(slow_server, request_id)
    assert idle_after < 1.0
    assert generated < 400, f"{generated} tokens generated after the client left at 5"
    # The next request is served at once.
    started = time.monotonic()
    assert chat(slow_server.base_url, max_tokens=5).status_code == 200
    assert time.monotonic() - started < 1.0


def test_non_streamed_request_that_times_out_stops_generation(slow_server):
    full = full_run_seconds(slow_server)
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(slow_server.base_url + "/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "Go on"}], **LONG}, timeout=0.5)
    assert slow_server.wait_idle(timeout=full / 4) < 1.0
    assert "499 prompt=" in slow_server.log()


def test_full_queue_answers_429_with_retry_after(slow_server):
    body = {"messages": [{"role": "user", "content": "Go on"}], "stream": True, **LONG}
    running = requests.post(slow_server.base_url + "/v1/chat/completions", json=body, stream=True, timeout=30)
    waiting = requests.post(slow_server.base_url + "/v1/chat/completions", json=body, stream=True, timeout=30)
    try:
        deadline = time.monotonic() + 5
        while slow_server.health()["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        health = slow_server.health()
        assert (health["running"], health["queued"]) == (1, 1)
        rejected = chat(slow_server.base_url, max_tokens=5)
        assert rejected.status_code == 429
        assert rejected.headers["Retry-After"] == "1"
        assert rejected.json()["error"]["code"] == "queue_full"
    finally:
        running.close()
        waiting.close()
    slow_server.wait_idle(timeout=10)
    assert chat(slow_server.base_url, max_tokens=5).status_code == 200


def test_concurrent_requests_get_the_texts_they_get_alone(server):
    # Greedy, so that a difference beyond batch-shape noise is crosstalk (seeded sampling under batching:
    # tests/e2e/test_batching.py).
    requests_ = [dict(content=f"Tell me about topic {i}", max_tokens=60, temperature=0, seed=100 + i,
                      stream=bool(i % 2), logprobs=True, top_logprobs=2) for i in range(6)]

    def run(fields: dict) -> list[dict]:
        fields = dict(fields)
        content, stream = fields.pop("content"), fields.pop("stream")
        if stream:
            return streamed_tokens(stream_chat(server.base_url, content, **fields))
        return chat(server.base_url, content, **fields).json()["choices"][0]["logprobs"]["content"]

    alone = [run(fields) for fields in requests_]
    assert len({tuple(t["token"] for t in tokens) for tokens in alone}) == len(alone)
    barrier = threading.Barrier(len(requests_))

    def run_together(fields: dict) -> list[dict]:
        barrier.wait()
        return run(fields)

    with ThreadPoolExecutor(len(requests_)) as pool:
        together = list(pool.map(run_together, requests_))
    for solo, concurrent in zip(alone, together, strict=True):
        assert_same_greedy_answer(solo, concurrent)  # the same, up to llama.cpp's batch-shape noise
    server.wait_idle(timeout=5)


def test_long_prompt_evaluation_sends_heartbeats_before_the_first_token(start_server, slow_model):
    server = start_server("--model", str(slow_model), env={"EDGE_HEARTBEAT_SECONDS": "0.02"})
    body = {"messages": [{"role": "user", "content": "hello world " * 1200}], "stream": True, "max_tokens": 2,
            "temperature": 0}
    with requests.post(server.base_url + "/v1/chat/completions", json=body, stream=True, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    first_content = next(i for i, line in enumerate(lines) if b'"content":"' in line and b'"role"' not in line)
    assert b": ping" in lines[1:first_content]
    assert lines[-1] == b"data: [DONE]"
