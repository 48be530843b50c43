"""Several choices in one request through the real engine: chat `n`, legacy prompt lists and token-id
prompts; each choice equals the same request made alone."""

from __future__ import annotations

import requests
from llama_cpp import Llama

from tests.e2e.conftest import sse_events

USER = [{"role": "user", "content": "Tell me a story"}]


def post(base_url: str, path: str, **body) -> requests.Response:
    return requests.post(base_url + path, json=body, timeout=60, stream=bool(body.get("stream")))


def test_chat_n_gives_choices_each_equal_to_its_seeded_request_alone(base_url):
    body = post(base_url, "/v1/chat/completions", messages=USER, n=3, seed=7, temperature=1.0, max_tokens=12).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    alone_usage = []
    for index, choice in enumerate(body["choices"]):
        alone = post(base_url, "/v1/chat/completions", messages=USER, seed=7 + index, temperature=1.0,
                     max_tokens=12).json()
        assert choice["message"]["content"] == alone["choices"][0]["message"]["content"]
        alone_usage.append(alone["usage"])
    assert len({c["message"]["content"] for c in body["choices"]}) > 1  # seeds differ, so do the choices
    # Completion tokens summed over the choices, the shared prompt counted once (as OpenAI does).
    assert body["usage"]["completion_tokens"] == sum(u["completion_tokens"] for u in alone_usage)
    assert body["usage"]["prompt_tokens"] == alone_usage[0]["prompt_tokens"]


def test_streamed_choices_carry_their_index_and_equal_the_whole_answer(base_url):
    whole = post(base_url, "/v1/chat/completions", messages=USER, n=2, seed=3, temperature=1.0, max_tokens=10).json()
    events = sse_events(post(base_url, "/v1/chat/completions", messages=USER, n=2, seed=3, temperature=1.0,
                             max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]" and events[-2]["usage"] == whole["usage"] | {
        "prompt_tokens_details": events[-2]["usage"]["prompt_tokens_details"]}
    for index in (0, 1):
        chunks = [e["choices"][0] for e in events[:-2] if e["choices"][0]["index"] == index]
        assert chunks[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in chunks) == whole["choices"][index]["message"]["content"]
        assert chunks[-1]["finish_reason"] == whole["choices"][index]["finish_reason"]


def test_n_above_parallel_is_a_400(base_url):
    response = post(base_url, "/v1/chat/completions", messages=USER, n=5)
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"


def test_legacy_prompt_lists_and_token_ids(base_url, tiny_model):
    vocab = Llama(str(tiny_model), vocab_only=True, verbose=False)
    ids = vocab.tokenize(b"Once upon", add_bos=False, special=True)
    greedy = {"temperature": 0, "max_tokens": 6}
    alone = [post(base_url, "/v1/completions", prompt=p, **greedy).json()["choices"][0]["text"]
             for p in ("Once upon", "In a land")]
    body = post(base_url, "/v1/completions", prompt=["Once upon", "In a land"], **greedy).json()
    assert [c["text"] for c in body["choices"]] == alone and [c["index"] for c in body["choices"]] == [0, 1]
    by_ids = post(base_url, "/v1/completions", prompt=ids, echo=True, **greedy).json()["choices"][0]["text"]
    assert by_ids == "Once upon" + alone[0]
    lists = post(base_url, "/v1/completions", prompt=[ids, ids], n=2, **greedy).json()
    assert [c["text"] for c in lists["choices"]] == [alone[0]] * 4
    events = sse_events(post(base_url, "/v1/completions", prompt=["Once upon", "In a land"], stream=True, **greedy))
    for index in (0, 1):
        assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"][0]["index"] == index) == alone[index]
    bad = post(base_url, "/v1/completions", prompt=[10**9], **greedy)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
