"""Log-probabilities through the real engine: chat (streamed and whole) and legacy completions, OpenAI's shapes."""

from __future__ import annotations

import math

import openai
import pytest
import requests

from tests.e2e.conftest import chat, sse_events, streamed_text

GREEDY = {"temperature": 0, "max_tokens": 12}


def check_entries(entries: list[dict], top: int) -> None:
    for entry in entries:
        assert entry["logprob"] <= 0 and bytes(entry["bytes"]).decode("utf-8", "replace")
        alternatives = entry["top_logprobs"]
        assert len(alternatives) == top
        assert [a["logprob"] for a in alternatives] == sorted((a["logprob"] for a in alternatives), reverse=True)
        assert sum(math.exp(a["logprob"]) for a in alternatives) <= 1.0 + 1e-6
        if top:  # greedy: the chosen token is the likeliest one
            assert alternatives[0]["token"] == entry["token"] and alternatives[0]["logprob"] == pytest.approx(entry["logprob"])


def test_chat_logprobs_whole_and_streamed_match_the_text(base_url):
    body = chat(base_url, "Hello", logprobs=True, top_logprobs=3, **GREEDY).json()
    choice = body["choices"][0]
    entries = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in entries) == choice["message"]["content"]
    assert len(entries) == body["usage"]["completion_tokens"]
    check_entries(entries, 3)
    response = requests.post(base_url + "/v1/chat/completions", stream=True, timeout=60, json={
        "messages": [{"role": "user", "content": "Hello"}], "stream": True, "logprobs": True, "top_logprobs": 3,
        **GREEDY})
    events = sse_events(response)
    streamed = [e for chunk in events[1:-1] if chunk["choices"] and chunk["choices"][0]["logprobs"]
                for e in chunk["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in entries]
    assert streamed_text(events) == choice["message"]["content"]


def test_without_logprobs_they_stay_null_and_top_zero_gives_only_the_token(base_url):
    assert chat(base_url, "Hello", **GREEDY).json()["choices"][0]["logprobs"] is None
    entries = chat(base_url, "Hello", logprobs=True, **GREEDY).json()["choices"][0]["logprobs"]["content"]
    check_entries(entries, 0)


def test_the_openai_sdk_reads_them(base_url):
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none")
    answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], logprobs=True,
                                            top_logprobs=2, **GREEDY)
    content = answer.choices[0].logprobs.content
    assert "".join(t.token for t in content) == answer.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 for t in content)


def test_legacy_completion_logprobs(base_url):
    body = requests.post(base_url + "/v1/completions", timeout=60, json={
        "prompt": "Once upon a time", "logprobs": 2, "echo": True, **GREEDY}).json()
    choice = body["choices"][0]
    logprobs = choice["logprobs"]
    assert "Once upon a time" + "".join(logprobs["tokens"]) == choice["text"]
    assert len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == body["usage"]["completion_tokens"]
    assert logprobs["text_offset"][0] == len("Once upon a time")
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
    assert all(0 < len(top) <= 2 for top in logprobs["top_logprobs"])


@pytest.mark.parametrize("path,fields,param", [
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
])
def test_out_of_range_requests_are_400(base_url, path, fields, param):
    body = {"prompt": "x"} if path.endswith("/completions") and "chat" not in path else {
        "messages": [{"role": "user", "content": "x"}]}
    response = requests.post(base_url + path, json={**body, **fields}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == param
