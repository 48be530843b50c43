"""POST /tokenize and /detokenize on the real engine: the tokenizer's own ids, and chat messages counted
exactly as a chat request's prompt."""

from __future__ import annotations

import pytest
import requests
from llama_cpp import Llama


TEXT = "Hello, world! 👋 Grüße <|im_end|>"


@pytest.fixture(scope="module")
def vocab(tiny_model):
    return Llama(str(tiny_model), vocab_only=True, verbose=False)


def post(base_url: str, path: str, **body) -> requests.Response:
    return requests.post(base_url + path, json=body, timeout=30)


def test_tokenize_content_matches_the_models_tokenizer_and_round_trips(base_url, vocab):
    body = post(base_url, "/tokenize", content=TEXT).json()
    expected = vocab.tokenize(TEXT.encode(), add_bos=False, special=True)
    assert body["tokens"] == expected and body["count"] == len(expected) and body["max_model_len"] > 0
    assert post(base_url, "/detokenize", tokens=expected).json() == {"content": TEXT}
    pieces = post(base_url, "/tokenize", content=TEXT, with_pieces=True).json()["tokens"]
    assert [p["id"] for p in pieces] == expected
    joined = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert joined.decode() == TEXT  # pieces that split a character come as byte lists


def test_tokenize_messages_counts_what_a_chat_request_would_send(base_url):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How many tokens is this?"}]
    counted = post(base_url, "/tokenize", messages=messages).json()["count"]
    sent = requests.post(base_url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1},
                         timeout=30).json()["usage"]["prompt_tokens"]
    assert counted == sent


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {}, None),
    ("/tokenize", {"content": "a", "messages": [{"role": "user", "content": "b"}]}, None),
    ("/tokenize", {"content": 5}, "content"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"messages": 1}},
     "chat_template_kwargs"),
    ("/detokenize", {"tokens": [-1]}, "tokens.0"),
    ("/detokenize", {"tokens": [0, 10**9]}, "tokens.1"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
])
def test_bad_bodies_are_400_envelopes(base_url, path, body, param):
    response = post(base_url, path, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"] and (param is None or error["param"] == param)


def test_detokenize_of_nothing_is_empty(base_url):
    assert post(base_url, "/detokenize", tokens=[]).json() == {"content": ""}


def test_a_text_too_long_for_the_context_is_refused_with_its_size(base_url):
    response = post(base_url, "/tokenize", content="word " * 100_000)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


def test_token_routes_need_the_api_key_when_one_is_set(start_server, tiny_model):
    server = start_server("--model", str(tiny_model), "--api-key", "sesame")
    assert post(server.base_url, "/tokenize", content="hi").status_code == 401
    response = requests.post(server.base_url + "/detokenize", json={"tokens": []},
                             headers={"Authorization": "Bearer sesame"}, timeout=30)
    assert response.status_code == 200
