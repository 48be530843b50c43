"""Details SDKs read from every answer: cached prompt tokens and the system fingerprint, real engine."""

from __future__ import annotations

import openai

from tests.e2e.conftest import chat, stream_chat

LONG = "Tell me about the history of the printing press in Europe, from its first use to its spread. " * 3


def test_a_repeated_prompt_reports_the_tokens_the_prefix_cache_served(base_url):
    first = chat(base_url, LONG, max_tokens=2, temperature=0).json()["usage"]
    second = chat(base_url, LONG, max_tokens=2, temperature=0).json()["usage"]
    assert set(first["prompt_tokens_details"]) == {"cached_tokens"}
    # All but the last prompt token come from the cache (one is always evaluated again for its logits).
    assert second["prompt_tokens_details"]["cached_tokens"] >= second["prompt_tokens"] - 1 > 30
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none")
    usage = client.chat.completions.create(model="m", messages=[{"role": "user", "content": LONG}], max_tokens=2,
                                           temperature=0).usage
    assert usage.prompt_tokens_details.cached_tokens >= usage.prompt_tokens - 1


def test_system_fingerprint_is_stable_and_in_every_chunk(base_url):
    whole = chat(base_url, "Hi", max_tokens=2).json()
    assert whole["system_fingerprint"].startswith("fp_")
    assert chat(base_url, "Other", max_tokens=2).json()["system_fingerprint"] == whole["system_fingerprint"]
    events = stream_chat(base_url, "Hi", max_tokens=2, stream_options={"include_usage": True})
    assert {e["system_fingerprint"] for e in events if e != "[DONE]"} == {whole["system_fingerprint"]}
    assert events[-2]["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0
