"""Stop strings taken from the model's own output cut it exactly, streamed or not."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import chat, stream_chat, streamed_text


@pytest.fixture(scope="module")
def free_text(base_url) -> str:
    answer = chat(base_url, max_tokens=60, temperature=0).json()
    text = answer["choices"][0]["message"]["content"]
    assert len(text) > 40
    return text


def finish_reasons(events) -> list[str]:
    return [e["choices"][0]["finish_reason"] for e in events
            if isinstance(e, dict) and e["choices"] and e["choices"][0]["finish_reason"]]


@pytest.mark.parametrize("start, size", [(10, 5), (25, 1), (30, 8)])
def test_stop_string_from_the_output_cuts_it_there(base_url, free_text, start, size):
    stop = free_text[start : start + size]
    expected = free_text[: free_text.find(stop)]
    whole = chat(base_url, max_tokens=60, temperature=0, stop=stop).json()
    assert whole["choices"][0]["message"]["content"] == expected
    assert whole["choices"][0]["finish_reason"] == "stop"
    events = stream_chat(base_url, max_tokens=60, temperature=0, stop=[stop])
    assert streamed_text(events) == expected
    assert finish_reasons(events) == ["stop"]
    assert events[-1] == "[DONE]"


def test_earliest_of_several_stop_strings_wins(base_url, free_text):
    late, early = free_text[35:40], free_text[12:15]
    expected = free_text[: min(free_text.find(late), free_text.find(early))]
    whole = chat(base_url, max_tokens=60, temperature=0, stop=[late, early]).json()
    assert whole["choices"][0]["message"]["content"] == expected
    assert streamed_text(stream_chat(base_url, max_tokens=60, temperature=0, stop=[late, early])) == expected


def test_stop_string_that_never_appears_changes_nothing(base_url, free_text):
    events = stream_chat(base_url, max_tokens=60, temperature=0, stop=["\u2603never\u2603"])
    assert streamed_text(events) == free_text
    assert finish_reasons(events) == ["length"]


def test_usage_counts_only_tokens_up_to_the_stop(base_url, free_text):
    stop = free_text[20:24]
    answer = chat(base_url, max_tokens=60, temperature=0, stop=stop).json()
    assert 0 < answer["usage"]["completion_tokens"] < 60
