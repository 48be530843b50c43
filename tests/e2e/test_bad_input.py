"""Every malformed request gets a 4xx with the one error envelope, and the next request is served."""

from __future__ import annotations

import json

import pytest
import requests

from tests.e2e.conftest import chat

USER = [{"role": "user", "content": "Hi"}]

BAD_CHAT_BODIES = [
    ("invalid json", b'{"messages": [', None),
    ("empty body", b"", None),
    ("array body", b"[1, 2]", None),
    ("string body", b'"hello"', None),
    ("invalid utf-8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', None),
    ("missing messages", {"model": "m"}, "messages"),
    ("empty messages", {"messages": []}, "messages"),
    ("messages not a list", {"messages": "hi"}, "messages"),
    ("unknown role", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("unknown part type", {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages.0.content.0"),
    ("content of wrong type", {"messages": [{"role": "user", "content": 42}]}, "messages.0.content"),
    ("temperature too high", {"messages": USER, "temperature": 2.5}, "temperature"),
    ("temperature negative", {"messages": USER, "temperature": -0.1}, "temperature"),
    ("temperature as string", {"messages": USER, "temperature": "hot"}, "temperature"),
    ("top_p zero", {"messages": USER, "top_p": 0}, "top_p"),
    ("top_p above one", {"messages": USER, "top_p": 1.5}, "top_p"),
    ("presence penalty", {"messages": USER, "presence_penalty": 2.5}, "presence_penalty"),
    ("frequency penalty", {"messages": USER, "frequency_penalty": -3}, "frequency_penalty"),
    ("max_tokens zero", {"messages": USER, "max_tokens": 0}, "max_tokens"),
    ("max_tokens as fraction", {"messages": USER, "max_tokens": 1.5}, "max_tokens"),
    ("max_completion_tokens zero", {"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("n above --parallel", {"messages": USER, "n": 5}, "n"),
    ("stream not bool", {"messages": USER, "stream": "yes"}, "stream"),
    ("stop of wrong type", {"messages": USER, "stop": 5}, "stop"),
    ("empty stop string", {"messages": USER, "stop": [""]}, "stop"),
    ("logit_bias word key", {"messages": USER, "logit_bias": {"hello": 5}}, "logit_bias"),
    ("logit_bias superscript digit key", {"messages": USER, "logit_bias": {"\u00b2": 5}}, "logit_bias"),
    ("logit_bias out of range", {"messages": USER, "logit_bias": {"5": 500}}, "logit_bias"),
    ("logit_bias unknown token", {"messages": USER, "logit_bias": {"99999999": 1}}, "logit_bias"),
    ("stream_options wrong type", {"messages": USER, "stream": True, "stream_options": {"include_usage": "y"}},
     "stream_options.include_usage"),
]


def post_raw(base_url: str, route: str, body, **kwargs) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(base_url + route, data=data, headers={"Content-Type": "application/json"}, timeout=30,
                         **kwargs)


def assert_envelope(response: requests.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and isinstance(error["message"], str)
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize("name, body, param", BAD_CHAT_BODIES, ids=[case[0] for case in BAD_CHAT_BODIES])
def test_malformed_chat_request_is_a_400_envelope(base_url, name, body, param):
    assert_envelope(post_raw(base_url, "/v1/chat/completions", body), 400, param)
    assert chat(base_url, max_tokens=3, temperature=0).status_code == 200


@pytest.mark.parametrize("body, param", [
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["a", ""]}, "prompt"),
    ({"prompt": [[1], []]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": ""}, "prompt"),
    ({}, "prompt"),
])
def test_malformed_legacy_completion_is_a_400_envelope(base_url, body, param):
    assert_envelope(post_raw(base_url, "/v1/completions", body), 400, param)


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_longer_than_the_context_is_rejected_before_streaming(base_url, stream):
    long_text = "hello world " * 3000  # well over 4096 tokens
    response = post_raw(base_url, "/v1/chat/completions",
                        {"messages": [{"role": "user", "content": long_text}], "stream": stream})
    error = assert_envelope(response, 400)
    assert error["code"] == "context_length_exceeded"
    assert "4096" in error["message"]


def test_max_tokens_beyond_the_context_is_clamped_to_what_is_left(base_url):
    prompt = "hello world " * 1250  # about 3770 tokens: a few hundred left
    answer = post_raw(base_url, "/v1/chat/completions",
                      {"messages": [{"role": "user", "content": prompt}], "max_tokens": 100000, "temperature": 0}).json()
    usage = answer["usage"]
    assert 3000 < usage["prompt_tokens"] < 4000
    assert answer["choices"][0]["finish_reason"] == "length"
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 4096


def test_unknown_route_is_a_404_envelope(base_url):
    assert_envelope(requests.get(base_url + "/v1/nothing-here", timeout=10), 404)
    assert_envelope(requests.post(base_url + "/v2/chat/completions", json={}, timeout=10), 404)


def test_unknown_model_id_is_a_404_envelope(base_url):
    error = assert_envelope(requests.get(base_url + "/v1/models/no-such-model", timeout=10), 404, "model")
    assert error["code"] == "model_not_found"


def test_wrong_method_is_a_405_envelope(base_url):
    response = requests.get(base_url + "/v1/chat/completions", timeout=10)
    assert_envelope(response, 405)
    assert "POST" in response.headers["Allow"]


def test_over_large_body_is_a_413_envelope(base_url):
    huge = b'{"messages": [{"role": "user", "content": "' + b"a" * (11 * 1024 * 1024) + b'"}]}'
    assert_envelope(post_raw(base_url, "/v1/chat/completions", huge), 413)
    assert chat(base_url, max_tokens=2).status_code == 200


def test_unknown_fields_are_ignored(base_url):
    response = chat(base_url, max_tokens=2, temperature=0, frobnicate={"x": 1}, service_tier="auto")
    assert response.status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_more_prompts_than_slots_and_queue_can_ever_hold_is_a_400_saying_the_limit(base_url, stream):
    prompts = [f"prompt {i}" for i in range(21)]  # --parallel 4 + --max-queue 16 hold 20 at most
    response = requests.post(base_url + "/v1/completions", timeout=60,
                             json={"prompt": prompts, "max_tokens": 1, "stream": stream})
    error = assert_envelope(response, 400, "prompt")
    assert error["code"] == "request_too_large" and "20" in error["message"] and "Retry-After" not in response.headers
    held = requests.post(base_url + "/v1/completions", json={"prompt": prompts[:20], "max_tokens": 1}, timeout=60)
    assert held.status_code == 200 and len(held.json()["choices"]) == 20  # the largest that fits, on an idle server
