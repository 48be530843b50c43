"""Which tokens each sequence's KV cells hold, and how much of a new prompt they spare (pure).

A new prompt reuses the longest prefix held by any sequence: its own in place, another's by copying
those cells, or, when another sequence is evaluating that prefix right now, by waiting for it and
copying then (so several jobs arriving together evaluate their common prefix once). The cells live
in llama.cpp's memory; this class keeps the record of them and is handed the memory operations
it needs, so it is tested without a model.

A memory that cannot drop a suffix (recurrent state, a small sliding window: `kept_in_place` says when)
goes back to a context checkpoint at or before the shared prefix instead (`checkpoints.py`); a prefix no
checkpoint reaches is evaluated again, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edge_server.engine.checkpoints import Checkpoints
from edge_server.engine.placeholders import ends_inside_image, image_ends, position_at, span, whole_images

RemoveCells = Callable[[int, int], bool]  # (sequence, from position) -> whether the memory dropped them
CopyCells = Callable[[int, int], None]  # (source, destination): the destination holds the source's cells
# (sequence, position to keep up to, position held up to) -> whether dropping the rest in place leaves a usable state
KeptInPlace = Callable[[int, int, int], bool]

log = logging.getLogger("edge_server.engine")

MIN_SHARED = 16  # fewest more tokens another sequence must hold to be copied from (or waited for)
WORTH_A_WARNING = 64  # shared tokens evaluated again for want of a checkpoint that are worth a warning line


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class Plan:
    """Where a prompt's reusable prefix comes from."""

    source: int  # the sequence holding it (the job's own: kept in place; another: copied)
    tokens: int  # prompt tokens it spares
    ready: bool  # False: the source is still evaluating them; wait, then plan again


class PrefixCache:
    """Per-sequence token records of one llama.cpp context with `n_seq` sequences."""

    def __init__(self, n_seq: int, remove_cells: RemoveCells, copy_cells: CopyCells, *,
                 checkpoints: Checkpoints | None = None, kept_in_place: KeptInPlace | None = None):
        self._tokens: list[list[int]] = [[] for _ in range(n_seq)]
        self._positions = [0] * n_seq  # the position after each record (its length, unless it holds images)
        self._promised: list[list[int]] = [[] for _ in range(n_seq)]  # prompt tokens being evaluated
        self._last_used = [0.0] * n_seq
        self._remove_cells = remove_cells
        self._copy_cells = copy_cells
        self.checkpoints = checkpoints  # None: the memory drops any suffix in place
        self._kept_in_place = kept_in_place or (lambda seq, keep, held: True)
        self.reused_tokens = 0  # prompt tokens spared since start

    def reachable(self, seq: int, tokens: int) -> int:
        """How many of the first `tokens` that `seq` holds a new prompt can keep: all of them where the memory
        drops the rest in place, else as many as the newest checkpoint at or before them holds."""
        if self.checkpoints is None or self._in_place(seq, tokens):
            return tokens
        return self.checkpoints.reach(seq, tokens)

    def choose(self, free: Sequence[int], prompt: Sequence[int]) -> int:
        """The free sequence sharing the longest prefix with `prompt`; the least recently used on ties."""
        return max(free, key=lambda seq: (common_prefix(self._tokens[seq], prompt), -self._last_used[seq]))

    def plan(self, seq: int, prompt: Sequence[int]) -> Plan:
        """Where the longest prefix of `prompt` for sequence `seq` is: held by `seq` itself, held by
        another sequence (worth copying when `MIN_SHARED` longer), or about to be held by one that is
        evaluating it now (worth waiting for when `MIN_SHARED` longer than anything held).

        One prompt token is always left to evaluate, since sampling the first answer token needs
        fresh logits.
        """
        limit = len(prompt) - 1
        held = Plan(seq, self.reachable(seq, min(common_prefix(self._tokens[seq], prompt), limit)), True)
        later = held
        for other, tokens in enumerate(self._tokens):
            if other == seq:
                continue
            now = self.reachable(other, min(common_prefix(tokens, prompt), limit))
            if now >= held.tokens + MIN_SHARED:
                held = Plan(other, now, True)
            promised = self._promised[other]
            if promised and now == len(tokens) < limit:
                soon = min(now + common_prefix(promised, prompt[now:]), limit)
                if soon > later.tokens:
                    later = Plan(other, soon, False)
        return later if later.tokens >= held.tokens + MIN_SHARED else held

    def take(self, seq: int, prompt: Sequence[int], plan: Plan) -> int:
        """Give `seq` the cells of a ready `plan` and drop the rest; returns how many prompt tokens they spare.

        A memory that cannot drop part of a sequence goes back to its newest checkpoint at or before the shared
        prefix; without one (or without checkpoints) it loses the whole sequence, and a warning says so.
        """
        held = min(common_prefix(self._tokens[seq], prompt), len(prompt) - 1)  # what `seq` itself shares
        if plan.source != seq:
            self._copy_cells(plan.source, seq)
            self._tokens[seq] = self._tokens[plan.source][:]
            self._positions[seq] = self._positions[plan.source]
            if self.checkpoints is not None:
                self.checkpoints.copy(plan.source, seq)
        shared = min(plan.tokens, common_prefix(self._tokens[seq], prompt))
        keep = self._rewind(seq, shared)
        if keep == 0 and held >= WORTH_A_WARNING:
            # Worth a line: a whole conversation evaluated again is what makes a turn slow.
            log.warning("sequence %d: no context checkpoint at or before token %d of the %d it holds; evaluating "
                        "the prompt's first %d tokens again (--ctx-checkpoints)", seq, held,
                        len(self._tokens[seq]), held)
            if self.checkpoints is not None:
                self.checkpoints.record_miss(held)
        self._cut(seq, keep)
        self.reused_tokens += keep
        return keep

    def _rewind(self, seq: int, keep: int) -> int:
        """Drop `seq`'s cells past its first `keep` tokens (fewer where that would split an image); returns how
        many it still holds."""
        keep = whole_images(self._tokens[seq], keep)
        if self.checkpoints is not None and not self._in_place(seq, keep):
            restored = self.checkpoints.restore(seq, keep)
            # After a restore the unrollable part already stands at `restored`: this drops attention cells only.
            if restored and self._remove_cells(seq, self._position(seq, restored)):
                return restored
            self._remove_cells(seq, 0)
            self.checkpoints.invalidate(seq, 0)
            return 0
        # Nothing past the record's end to drop (its end position may be an unfinished M-RoPE image's own).
        if keep < len(self._tokens[seq]) and not self._remove_cells(seq, self._position(seq, keep)):
            self._remove_cells(seq, 0)
            keep = 0
        if self.checkpoints is not None:
            self.checkpoints.invalidate(seq, keep)
        return keep

    def reuse(self, seq: int, prompt: Sequence[int]) -> int:
        """Keep the cells `seq` itself shares with `prompt` (in place), drop the rest; returns the tokens spared."""
        limit = len(prompt) - 1
        return self.take(seq, prompt, Plan(seq, min(common_prefix(self._tokens[seq], prompt), limit), True))

    def promise(self, seq: int, tokens: Sequence[int]) -> None:
        """Note that `seq` is about to evaluate `tokens` (a prompt's rest): others may wait for them."""
        self._promised[seq] = list(tokens)
        if self.checkpoints is not None:
            held = len(self._tokens[seq])
            self.checkpoints.plan_prompt(seq, held, held + len(tokens))
            for end in image_ends(tokens):  # another question about the same image parts there
                self.checkpoints.want(seq, held + end)

    def until_checkpoint(self, seq: int) -> int | None:
        """Prompt tokens `seq` may evaluate before it reaches a position to checkpoint (None: no limit)."""
        if self.checkpoints is None:
            return None
        length = len(self._tokens[seq])
        target = self.checkpoints.next_target(seq, length)
        return None if target is None else target - length

    def tokens(self, seq: int) -> list[int]:
        """The tokens `seq`'s cells hold (the cache's own list: read, do not change)."""
        return self._tokens[seq]

    def length(self, seq: int) -> int:
        """Tokens `seq`'s cells hold."""
        return len(self._tokens[seq])

    def position(self, seq: int) -> int:
        """The position of the next token decoded into `seq` (its length, unless it holds M-RoPE images)."""
        return self._positions[seq]

    def extend(self, seq: int, tokens: Sequence[int]) -> None:
        """Record tokens just decoded into `seq` (a promised prompt chunk or a generated token)."""
        self._tokens[seq].extend(tokens)
        self._positions[seq] += span(tokens)
        del self._promised[seq][:len(tokens)]
        if self.checkpoints is not None and not ends_inside_image(self._tokens[seq]):
            self.checkpoints.after_decode(seq, len(self._tokens[seq]))

    def truncate(self, seq: int, length: int) -> bool:
        """Drop `seq`'s cells past its first `length` tokens (drafted tokens the model rejected); False when the
        memory cannot drop part of a sequence."""
        if not self._remove_cells(seq, self._position(seq, length)):
            return False
        self._cut(seq, length)
        return True

    def forget(self, seq: int) -> None:
        """Drop every cell of `seq` (its contents are unknown after a failed step)."""
        self._remove_cells(seq, 0)
        self._tokens[seq].clear()
        self._positions[seq] = 0
        self._promised[seq].clear()
        if self.checkpoints is not None:
            self.checkpoints.clear(seq)

    def _position(self, seq: int, length: int) -> int:
        return position_at(self._tokens[seq], length, self._positions[seq])

    def _cut(self, seq: int, length: int) -> None:
        self._positions[seq] = self._position(seq, length)
        del self._tokens[seq][length:]

    def _in_place(self, seq: int, keep: int) -> bool:
        return self._kept_in_place(seq, self._position(seq, keep), self._positions[seq])

    def release(self, seq: int, now: float) -> None:
        """Note that `seq`'s job ended at `now` (for least-recently-used ties); it promises nothing more."""
        self._last_used[seq] = now
        self._promised[seq].clear()
