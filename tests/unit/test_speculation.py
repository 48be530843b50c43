"""Prompt lookup's proposals and how they adapt (pure; the engine's verification: tests/e2e/test_speculative.py)."""

from __future__ import annotations

from edge_server.engine.speculation import MAX_PAUSE, NGRAM_SIZES, START_LENGTH, NgramIndex, PromptLookup, SpecConfig

SHORTEST = min(NGRAM_SIZES)
TEXT = list(range(100, 140))  # 40 distinct tokens


def test_proposes_what_followed_the_latest_earlier_match_of_the_last_tokens():
    lookup = PromptLookup(SpecConfig(n_max=16), TEXT + TEXT[:SHORTEST])
    assert lookup.propose(100) == TEXT[SHORTEST:SHORTEST + START_LENGTH]
    lookup.extend([TEXT[SHORTEST]])
    assert lookup.propose(3) == TEXT[SHORTEST + 1:SHORTEST + 4]  # never more than the room given


def test_nothing_matches_nothing_is_proposed():
    assert PromptLookup(SpecConfig(), TEXT).propose(16) == []
    assert PromptLookup(SpecConfig(), TEXT + TEXT[:SHORTEST - 1]).propose(16) == []  # too short a match


def test_the_longest_match_wins_over_a_more_recent_shorter_one():
    tail = TEXT[:max(NGRAM_SIZES)]
    decoy = [7] + tail[-SHORTEST:] + [8, 8, 8]  # a later occurrence of only the last few tokens
    lookup = PromptLookup(SpecConfig(), tail + [1, 2, 3] + decoy + tail)
    assert lookup.propose(3) == [1, 2, 3]


def test_a_shared_index_proposes_what_an_earlier_request_went_on_with():
    shared = NgramIndex()
    question, answer = [1, 2, 3], TEXT[:30]
    first = PromptLookup(SpecConfig(n_max=16), question, shared)
    assert first.propose(16) == []
    first.extend(answer)
    again = PromptLookup(SpecConfig(n_max=16), question + answer[:SHORTEST], shared)
    assert again.propose(16) == answer[SHORTEST:SHORTEST + START_LENGTH]
    alone = PromptLookup(SpecConfig(n_max=16), question + answer[:SHORTEST])  # ngram-simple: its own index only
    assert alone.propose(16) == []


def test_the_shared_index_starts_again_empty_past_its_limit():
    shared = NgramIndex(limit=10)
    PromptLookup(SpecConfig(), TEXT[:8], shared)  # four 5-grams and one 8-gram
    assert len(shared) == 5
    assert PromptLookup(SpecConfig(), TEXT[:SHORTEST], NgramIndex()).propose(16) == []
    assert PromptLookup(SpecConfig(), TEXT[:SHORTEST], shared).propose(16) == TEXT[SHORTEST:8]
    PromptLookup(SpecConfig(), TEXT[10:40], shared)  # more n-grams than the limit: emptied on the way
    assert len(shared) <= 10
    assert PromptLookup(SpecConfig(), TEXT[:SHORTEST], shared).propose(16) == []  # the first request's are gone


def test_drafts_grow_after_successes_shrink_after_misses_and_pause_after_failures():
    config = SpecConfig(n_max=16, n_min=0)
    lookup = PromptLookup(config, TEXT * 3)
    lookup.record(START_LENGTH, START_LENGTH)
    assert lookup.length == min(16, START_LENGTH * 2)
    lookup.record(8, 3)
    assert lookup.length == 4
    lookup.record(4, 0)
    assert lookup.length == 2 and lookup.propose(16) == []  # paused one step
    assert lookup.propose(16) != []
    for _ in range(10):
        lookup.record(1, 0)
    pauses = 0
    while lookup.propose(16) == []:
        pauses += 1
    assert pauses == MAX_PAUSE
    assert (lookup.drafted, lookup.accepted) == (START_LENGTH + 8 + 4 + 10, START_LENGTH + 3)


def test_drafts_shorter_than_n_min_are_not_proposed():
    lookup = PromptLookup(SpecConfig(n_max=16, n_min=6), TEXT + TEXT[:SHORTEST])
    assert lookup.propose(5) == []
    assert len(lookup.propose(16)) >= 6


def test_draft_model_settings():
    import pytest
    from pydantic import ValidationError

    from edge_server.settings import Settings

    assert Settings(threads=1, spec_draft_model="small.gguf").spec_type == "draft-simple"
    with pytest.raises(ValidationError, match="needs --spec-draft-model"):
        Settings(threads=1, spec_type="draft-simple")
    for kind in ("ngram-simple", "ngram-mod"):
        with pytest.raises(ValidationError, match=f"not {kind}"):
            Settings(threads=1, spec_type=kind, spec_draft_model="small.gguf")
    with pytest.raises(ValidationError):
        Settings(threads=1, spec_draft_p_min=1.5)


def test_the_speculative_field_must_be_a_boolean():
    from edge_server.api.app import create_app
    from edge_server.api.state import ServedModel
    from edge_server.devtools.fake_engine import FakeEngine
    from edge_server.settings import Settings

    client = create_app(Settings(threads=1), ServedModel.of(FakeEngine(), "fake-model")).test_client()
    messages = [{"role": "user", "content": "Hi"}]
    for bad in ("maybe", 2, [], {}):
        response = client.post("/v1/chat/completions", json={"messages": messages, "speculative": bad})
        assert response.status_code == 400, bad
        assert response.get_json()["error"]["param"] == "speculative"
    refused = client.post("/v1/completions", json={"prompt": "Hi", "speculative": "maybe"})
    assert refused.status_code == 400
    assert client.post("/v1/chat/completions", json={"messages": messages, "speculative": False}).status_code == 200


def test_a_draft_stops_before_the_end_of_generation_and_at_the_jobs_max_tokens():
    """fill_batch cuts what the drafter proposes to what the job can use: the position before an end token
    already predicts it, and tokens past max_tokens would never be sent."""
    from types import SimpleNamespace

    from llama_cpp import _internals as internals

    from edge_server.engine.batching import fill_batch
    from edge_server.engine.prefixcache import PrefixCache
    from edge_server.engine.slots import Slot

    END = 2
    batch = internals.LlamaBatch(n_tokens=64, embd=0, n_seq_max=1, verbose=False)
    cache = PrefixCache(1, lambda seq, start: True, lambda source, target, length: None)
    rooms = []

    def propose(entries):
        for slot, room in entries:
            rooms.append(room)
            slot.draft = [10, 11, END, 12, 13][:room]

    for max_tokens, produced, draft, room in ((100, 3, [10, 11], 100 - 3 - 1), (6, 3, [10, 11], 2), (5, 3, [10], 1)):
        slot = Slot(0, job=SimpleNamespace(max_tokens=max_tokens, images=()), stream=SimpleNamespace(submitted_at=0.0),
                    next_token=7, produced=produced, drafter=object())
        fill_batch(batch.batch, [slot], cache, propose, lambda token: token == END)
        assert (slot.draft, rooms[-1]) == (draft, room)
        assert batch.batch.n_tokens == 1 + len(draft)
    slot = Slot(0, job=SimpleNamespace(max_tokens=4, images=()), stream=SimpleNamespace(submitted_at=0.0), next_token=7,
                produced=3, drafter=object())
    fill_batch(batch.batch, [slot], cache, propose, lambda token: token == END)
    assert slot.draft == [] and len(rooms) == 3  # its next token is its last: nothing to propose
