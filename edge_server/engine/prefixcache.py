"""Which tokens each sequence's KV cells hold, and how much of a new prompt they spare (pure).

The cells themselves live in llama.cpp's memory; this class keeps the record of them and is handed
the one memory operation it needs, so it is tested without a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

RemoveCells = Callable[[int, int], bool]  # (sequence, from position) -> whether the memory dropped them


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """Per-sequence token records of one llama.cpp context with `n_seq` sequences."""

    def __init__(self, n_seq: int, remove_cells: RemoveCells):
        self._tokens: list[list[int]] = [[] for _ in range(n_seq)]
        self._last_used = [0.0] * n_seq
        self._remove_cells = remove_cells
        self.reused_tokens = 0  # prompt tokens spared since start

    def choose(self, free: Sequence[int], prompt: Sequence[int]) -> int:
        """The free sequence sharing the longest prefix with `prompt`; the least recently used on ties."""
        return max(free, key=lambda seq: (common_prefix(self._tokens[seq], prompt), -self._last_used[seq]))

    def reuse(self, seq: int, prompt: Sequence[int]) -> int:
        """Keep the cells `seq` shares with `prompt`, drop the rest; returns how many prompt tokens they spare.

        One prompt token is always left to evaluate, since sampling the first answer token needs
        fresh logits. A memory that cannot drop part of a sequence (some recurrent models) loses
        the whole sequence instead.
        """
        keep = min(common_prefix(self._tokens[seq], prompt), len(prompt) - 1)
        if not self._remove_cells(seq, keep):
            self._remove_cells(seq, 0)
            keep = 0
        del self._tokens[seq][keep:]
        self.reused_tokens += keep
        return keep

    def length(self, seq: int) -> int:
        """Tokens `seq`'s cells hold: the position of the next token decoded into it."""
        return len(self._tokens[seq])

    def extend(self, seq: int, tokens: Sequence[int]) -> None:
        """Record tokens just decoded into `seq`."""
        self._tokens[seq].extend(tokens)

    def forget(self, seq: int) -> None:
        """Drop every cell of `seq` (its contents are unknown after a failed step)."""
        self._remove_cells(seq, 0)
        self._tokens[seq].clear()

    def release(self, seq: int, now: float) -> None:
        """Note that `seq`'s job ended at `now` (for least-recently-used ties)."""
        self._last_used[seq] = now
