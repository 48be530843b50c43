"""Speculative decoding's draft side: what a slot proposes to verify in the same step as its next token.

Two sources: a draft model (`--spec-type draft-simple`, engine/draftmodel.py: a small model of the same
tokenizer writes ahead, greedily, while it is confident) and prompt lookup (`--spec-type ngram-simple`): the tokens that followed the most recent earlier occurrence of
the sequence's last few tokens (longest match first), from the prompt and the text generated so far, so
text being copied or rewritten is proposed for free. The target model verifies every proposed token in one
batch, sampling each position in turn with the request's own sampler: the output is what plain decoding
gives. How many tokens a slot proposes adapts to how many it had accepted, and a slot whose proposals keep
failing pauses, so prose does not pay for them. Pure Python; the engine owns the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

NGRAM_SIZES = (12, 8, 5)  # lookup n-grams, longest (most reliable) first
START_LENGTH = 8  # a fresh slot's first proposals: grown on success, shrunk on failure
MAX_PAUSE = 32  # steps a slot whose proposals keep failing waits before it proposes again


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


class PromptLookup(DraftState):
    """One sequence's draft source: token history with an index of where each n-gram last ended."""

    def __init__(self, config: SpecConfig, history: list[int]):
        super().__init__(config)
        self._tokens: list[int] = []
        self._last_end: dict[tuple[int, ...], int] = {}  # n-gram -> position of its last token, latest occurrence
        self._earlier: dict[int, int] = {}  # n -> where the current last n tokens ended before (no entry: never)
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
                key = tuple(self._tokens[end + 1 - n:])
                before = self._last_end.get(key)
                if before is None:
                    self._earlier.pop(n, None)
                else:
                    self._earlier[n] = before
                self._last_end[key] = end

    def propose(self, room: int) -> list[int]:
        """Up to `room` tokens likely to follow the history (none while paused or when nothing matches)."""
        limit = self.room(room)
        if not limit:
            return []
        for n in NGRAM_SIZES:
            before = self._earlier.get(n)
            if before is not None:
                draft = self._tokens[before + 1:before + 1 + limit]
                if len(draft) >= max(1, self._config.n_min):
                    return draft
        return []


def propose_by_lookup(entries: list) -> None:
    """`batching.Propose` for prompt lookup: each (slot, room) proposes from its own history."""
    for slot, room in entries:
        slot.draft = slot.drafter.propose(room)
