"""Speculative decoding's draft side: what a slot proposes to verify in the same step as its next token.

Three sources: a draft model (`--spec-type draft-simple`, engine/draftmodel.py: a small model of the same
tokenizer writes ahead, greedily, while it is confident); prompt lookup (`--spec-type ngram-simple`): the
tokens that followed the most recent earlier occurrence of the sequence's last few tokens (longest match
first), in the prompt and the text generated so far, so text being copied or rewritten is proposed for free;
and the same lookup over one index shared by every request of the model (`--spec-type ngram-mod`, after
llama-server's mode of that name): what earlier answers went on with is proposed too, so answers that repeat
earlier ones (a regenerated answer, the same boilerplate again) are proposed whole. The target model verifies
every proposed token in one batch, sampling each position in turn with the request's own sampler: the output
is what plain decoding gives. How many tokens a slot proposes adapts to how many it had accepted, and a slot
whose proposals keep failing pauses, so prose does not pay for them. Pure Python; the engine owns the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

NGRAM_SIZES = (12, 8, 5)  # lookup n-grams, longest (most reliable) first
START_LENGTH = 8  # a fresh slot's first proposals: grown on success, shrunk on failure
MAX_PAUSE = 32  # steps a slot whose proposals keep failing waits before it proposes again
# ngram-mod's shared index: about 24 MB of Python objects (3 entries per token, ~60,000 tokens of prompts and
# answers); past it the index starts again empty, as llama-server's does at a quarter full.
SHARED_INDEX_ENTRIES = 180_000


@dataclass(frozen=True)
class SpecConfig:
    """The server's speculative decoding settings (`--spec-type` and its `--spec-draft-*` flags)."""

    kind: str = "ngram-simple"
    n_max: int = 16  # most tokens proposed per step and slot
    n_min: int = 0  # proposals shorter than this are not verified
    p_min: float = 0.75  # draft model: stop writing ahead below this probability of its likeliest token
    draft_model: str | None = None  # draft model: the GGUF's path


class DraftState:
    """One request's speculation: how long its next proposal may be (adapted to what it had accepted), whether
    it pauses, and what it proposed and had accepted so far."""

    def __init__(self, config: SpecConfig):
        self._config = config
        self.length = min(START_LENGTH, config.n_max)
        self._pause = 0  # steps left without proposals
        self._failures = 0  # proposals in a row of which nothing was accepted
        self.drafted = 0
        self.accepted = 0

    def extend(self, tokens: list[int]) -> None:
        """Note tokens accepted into the sequence (a source that keeps its own history overrides this)."""

    def room(self, room: int) -> int:
        """How many tokens to propose this step given `room` in the batch: 0 while paused or below n_min."""
        if self._pause:
            self._pause -= 1
            return 0
        limit = min(room, self.length, self._config.n_max)
        return limit if limit >= max(1, self._config.n_min) else 0

    def record(self, drafted: int, accepted: int) -> None:
        """Adapt to a verified proposal: longer after a full success, shorter after a miss, a pause (doubling
        up to `MAX_PAUSE` steps) after proposals of which nothing was accepted."""
        self.drafted += drafted
        self.accepted += accepted
        if accepted == drafted:
            self.length = min(self._config.n_max, self.length * 2)
            self._failures = 0
        elif accepted:
            self.length = max(1, accepted + 1)
            self._failures = 0
        else:
            self.length = max(1, self.length // 2)
            self._failures += 1
            self._pause = min(MAX_PAUSE, 2 ** self._failures // 2)


Occurrence = tuple[list[int], int]  # a token history and the position of an n-gram's last token in it


class NgramIndex:
    """Where each n-gram (by its hash) last ended: one request's own (ngram-simple), or one for all the requests
    of a model (ngram-mod), bounded by `limit` entries."""

    def __init__(self, limit: int | None = None):
        self._last: dict[int, Occurrence] = {}
        self._limit = limit

    def note(self, key: int, occurrence: Occurrence) -> Occurrence | None:
        """Record `occurrence` as the latest of the n-gram `key`; return the one before it, if any."""
        before = self._last.get(key)
        self._last[key] = occurrence
        if self._limit is not None and len(self._last) > self._limit:
            self._last.clear()
        return before

    def __len__(self) -> int:
        return len(self._last)


class PromptLookup(DraftState):
    """One sequence's draft source: its token history, noted in an n-gram index (its own unless `shared`)."""

    def __init__(self, config: SpecConfig, history: list[int], shared: NgramIndex | None = None):
        super().__init__(config)
        self._tokens: list[int] = []
        self._index = shared if shared is not None else NgramIndex()
        self._earlier: dict[int, Occurrence] = {}  # n -> where the current last n tokens ended before (none: never)
        self.extend(history)

    def extend(self, tokens: list[int]) -> None:
        """Append tokens to the history (the prompt at start, then each token as it is accepted)."""
        for token in tokens:
            self._tokens.append(token)
            end = len(self._tokens) - 1
            for n in NGRAM_SIZES:
                if end + 1 < n:
                    self._earlier.pop(n, None)
                    continue
                # A hash for a key: a tuple of n ints costs ~10x its hash's memory; a rare collision only
                # costs a rejected draft.
                before = self._index.note(hash((n, *self._tokens[end + 1 - n:])), (self._tokens, end))
                if before is None:
                    self._earlier.pop(n, None)
                else:
                    self._earlier[n] = before

    def propose(self, room: int) -> list[int]:
        """Up to `room` tokens likely to follow the history (none while paused or when nothing matches)."""
        limit = self.room(room)
        if not limit:
            return []
        for n in NGRAM_SIZES:
            before = self._earlier.get(n)
            if before is not None:
                tokens, end = before
                draft = tokens[end + 1:end + 1 + limit]
                if len(draft) >= max(1, self._config.n_min):
                    return draft
        return []


def propose_by_lookup(entries: list) -> None:
    """`batching.Propose` for prompt lookup: each (slot, room) proposes from its own history."""
    for slot, room in entries:
        slot.draft = slot.drafter.propose(room)
