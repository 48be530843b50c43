"""Faults inside the engine: the failing request gets an error, its neighbours and the engine go on."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.e2e.conftest import assert_same_greedy_answer, chat, stream_chat, streamed_tokens

FAULT_SEED = 666


def test_a_failing_request_gets_an_error_while_its_neighbours_complete(start_server, slow_model):
    server = start_server("--model", str(slow_model), "--parallel", "4", env={"EDGE_FAULT_SEED": str(FAULT_SEED)})
    neighbours = [dict(content=f"Neighbour {i}", max_tokens=40, temperature=0, logprobs=True, top_logprobs=2)
                  for i in range(3)]
    alone = [streamed_tokens(stream_chat(server.base_url, **fields)) for fields in neighbours]
    barrier = threading.Barrier(4)

    def failing_stream() -> list:
        barrier.wait()
        body = {"messages": [{"role": "user", "content": "Doomed"}], "stream": True, "max_tokens": 40,
                "temperature": 0.5, "seed": FAULT_SEED}
        with requests.post(server.base_url + "/v1/chat/completions", json=body, stream=True, timeout=60) as response:
            return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith(b"data: {")]

    def neighbour(fields: dict) -> list[dict]:
        barrier.wait()
        return streamed_tokens(stream_chat(server.base_url, **fields))

    with ThreadPoolExecutor(4) as pool:
        failing = pool.submit(failing_stream)
        together = list(pool.map(neighbour, neighbours))
        events = failing.result(timeout=60)
    assert len(together) == len(alone) == 3 and all(len(tokens) == 40 for tokens in alone)
    for solo, concurrent in zip(alone, together):
        assert_same_greedy_answer(solo, concurrent)
    assert events[-1]["error"]["code"] == "generation_failed" and "injected fault" in events[-1]["error"]["message"]
    whole = chat(server.base_url, "Doomed", max_tokens=40, temperature=0.5, seed=FAULT_SEED)
    assert whole.status_code == 500 and whole.json()["error"]["code"] == "generation_failed"
    assert "Traceback" not in whole.text
    assert chat(server.base_url, max_tokens=5).status_code == 200  # the engine keeps serving
    assert server.health()["running"] == 0


def test_generation_reaching_the_end_of_the_context_ends_with_length(start_server, tiny_model):
    server = start_server("--model", str(tiny_model), "--n-ctx", "96")
    for stream in (False, True):
        if stream:
            events = stream_chat(server.base_url, temperature=0, stream_options={"include_usage": True})
            usage = events[-2]["usage"]
            finish = [e["choices"][0]["finish_reason"] for e in events if isinstance(e, dict) and e["choices"]
                      and e["choices"][0]["finish_reason"]]
        else:
            answer = chat(server.base_url, temperature=0).json()
            usage, finish = answer["usage"], [answer["choices"][0]["finish_reason"]]
        assert finish == ["length"] and usage["prompt_tokens"] + usage["completion_tokens"] == 96
    assert chat(server.base_url, max_tokens=3).status_code == 200
