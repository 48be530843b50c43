"""Continuous batching through the real server: no crosstalk, cancellation, queueing, prefix reuse."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.e2e.conftest import assert_same_greedy_answer, chat, stream_chat, streamed_text, streamed_tokens


@pytest.fixture(scope="module")
def batch_server(start_server, slow_model):
    """Four slots on the wider random model, two more requests may wait."""
    return start_server("--model", str(slow_model), "--parallel", "4", "--max-queue", "2")


def request_fields(i: int, temperature: float = 0.0) -> dict:
    return dict(content=f"Story number {i} about the sea", max_tokens=48, temperature=temperature, seed=500 + i)


def common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def run(server, fields: dict, *, stream: bool) -> str:
    fields = dict(fields)
    content = fields.pop("content")
    if stream:
        return streamed_text(stream_chat(server.base_url, content, **fields))
    return chat(server.base_url, content, **fields).json()["choices"][0]["message"]["content"]


def run_tokens(server, fields: dict, *, stream: bool) -> list[dict]:
    """The answer's logprobs entries (with the two likeliest tokens at each position)."""
    fields = {**fields, "logprobs": True, "top_logprobs": 2}
    content = fields.pop("content")
    if stream:
        return streamed_tokens(stream_chat(server.base_url, content, **fields))
    return chat(server.base_url, content, **fields).json()["choices"][0]["logprobs"]["content"]


def run_all(server, jobs: list[dict], runner=run) -> list:
    barrier = threading.Barrier(len(jobs))

    def together(i: int):
        barrier.wait()
        return runner(server, jobs[i], stream=bool(i % 2))

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(together, range(len(jobs))))


def test_concurrent_greedy_requests_give_the_texts_they_give_alone(batch_server):
    jobs = [request_fields(i) for i in range(6)]  # six on four slots: two wait, then join the batch
    alone = [run_tokens(batch_server, job, stream=False) for job in jobs]
    assert len({tuple(t["token"] for t in tokens) for tokens in alone}) == len(alone)
    for solo, concurrent in zip(alone, run_all(batch_server, jobs, run_tokens), strict=True):
        assert_same_greedy_answer(solo, concurrent)  # the same, up to llama.cpp's batch-shape noise
    batch_server.wait_idle(timeout=10)


def test_concurrent_seeded_sampling_follows_each_requests_own_text(batch_server):
    # Batched matrix products round differently from single-token ones (llama.cpp's CPU kernels), so
    # a sampled text may drift from its solo run after some tokens. Crosstalk would instead make a
    # stream follow another request's text, or none from the start: that is what is checked.
    jobs = [request_fields(i, temperature=0.9) for i in range(6)]
    alone = [run(batch_server, job, stream=False) for job in jobs]
    together = run_all(batch_server, jobs)
    for i, text in enumerate(together):
        own = common_prefix(text, alone[i])
        others = max(common_prefix(text, alone[j]) for j in range(len(jobs)) if j != i)
        assert own > others, (i, own, others, text, alone[i])
    batch_server.wait_idle(timeout=10)


def test_a_cancelled_stream_does_not_disturb_its_neighbours(batch_server):
    jobs = [request_fields(i) for i in (10, 11, 12)]
    alone = [run_tokens(batch_server, job, stream=True) for job in jobs[:2]]
    body = {"messages": [{"role": "user", "content": "Go on forever"}], "stream": True, "max_tokens": 3000,
            "temperature": 0}
    with ThreadPoolExecutor(2) as pool:
        neighbours = [pool.submit(run_tokens, batch_server, job, stream=True) for job in jobs[:2]]
        with requests.post(batch_server.base_url + "/v1/chat/completions", json=body, stream=True,
                           timeout=30) as doomed:
            for received, _ in enumerate(doomed.iter_lines()):
                if received > 20:
                    break
        for solo, future in zip(alone, neighbours, strict=True):
            assert_same_greedy_answer(solo, future.result(timeout=60))
    batch_server.wait_idle(timeout=5)


def test_full_slots_and_queue_answer_429(batch_server):
    body = {"messages": [{"role": "user", "content": "Go on"}], "stream": True, "max_tokens": 3000, "temperature": 0}
    held = [requests.post(batch_server.base_url + "/v1/chat/completions", json=body, stream=True, timeout=30)
            for _ in range(6)]
    try:
        deadline = time.monotonic() + 10
        while (batch_server.health()["running"], batch_server.health()["queued"]) != (4, 2):
            assert time.monotonic() < deadline, batch_server.health()
            time.sleep(0.02)
        rejected = chat(batch_server.base_url, max_tokens=2)
        assert rejected.status_code == 429 and rejected.headers["Retry-After"]
    finally:
        for response in held:
            response.close()
    batch_server.wait_idle(timeout=10)
    assert chat(batch_server.base_url, max_tokens=2).status_code == 200


def test_prefix_reuse_gives_the_cold_text_and_skips_the_shared_prefix(start_server, slow_model):
    server = start_server("--model", str(slow_model), "--parallel", "2")
    history = [{"role": "system", "content": "You are a careful assistant. " * 60},
               {"role": "user", "content": "First question?"}]
    body = {"messages": history, "max_tokens": 24, "temperature": 0}
    cold = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=60).json()
    reused_before = server.health()["prefix_cache_tokens"]
    warm = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=60).json()
    reused = server.health()["prefix_cache_tokens"] - reused_before
    assert warm["choices"][0]["message"]["content"] == cold["choices"][0]["message"]["content"]
    assert reused == cold["usage"]["prompt_tokens"] - 1
    # A second turn over the same history reuses the whole first turn.
    turn_two = history + [{"role": "assistant", "content": cold["choices"][0]["message"]["content"]},
                          {"role": "user", "content": "And then?"}]
    reused_before = server.health()["prefix_cache_tokens"]
    answer = requests.post(server.base_url + "/v1/chat/completions",
                           json={"messages": turn_two, "max_tokens": 8, "temperature": 0}, timeout=60).json()
    assert server.health()["prefix_cache_tokens"] - reused_before >= cold["usage"]["prompt_tokens"] - 1
    assert answer["usage"]["completion_tokens"] == 8
