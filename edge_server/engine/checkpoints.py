"""Context checkpoints: snapshots of the part of a sequence's memory that cannot drop a suffix (pure).

Attention caches drop any suffix, so a prompt that shares a prefix with what a sequence holds keeps that prefix
in place. Recurrent state (Mamba, Gated DeltaNet: Qwen3.5) holds only "everything so far", and a sliding-window
cache smaller than the context (Gemma 3 without a full-size window) has forgotten the old window; neither can go
back. A checkpoint is a copy of that part of one sequence taken when it held exactly `tokens` tokens; restoring it
and dropping the attention cells from `tokens` on puts the sequence back there, and only the rest of the new
prompt is evaluated.

Where the next request is likely to diverge, checkpoints are taken (`targets`): a few tokens before the end of
each prompt (chat templates render the previous answer differently from how it was generated: Qwen3.5 drops the
generation prompt's `<think>`), a batch before that, every `step` tokens along long prompts, and where another
sequence waits to copy a shared prefix. The batch cuts prompt chunks there (`next_target`) and the engine saves a
checkpoint after the step (`after_decode`). They are bounded in count per sequence and in bytes overall; the
oldest go first. The memory operations are handed in, so this is tested without a model.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sized
from dataclasses import dataclass, field

Save = Callable[[int], Sized]  # sequence -> the snapshot of its partial memory (its len() is its bytes)
Load = Callable[[int, object], bool]  # (sequence, snapshot) -> whether the memory took it

END_OFFSETS = (4, 4 + 512)  # checkpoints this many tokens before a prompt's end (llama-server's choice)
DEFAULT_PER_SEQUENCE = 8
DEFAULT_MAX_MIB = 512
DEFAULT_STEP = 4096  # spacing of the checkpoints along a long prompt


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A sequence's partial memory when it held `tokens` tokens."""

    tokens: int
    data: object  # what `Save` returned; shared, never changed, by the sequences it was copied to
    size: int
    order: int  # creation order: the oldest is evicted first


@dataclass
class CheckpointStats:
    """Counts since start, for /metrics and the log."""

    saved: int = 0
    restored: int = 0
    evicted: int = 0
    misses: int = 0  # prompts that had to be evaluated from the start: no checkpoint at or before the divergence
    missed_tokens: int = 0  # tokens the misses re-evaluated although a sequence held them


@dataclass
class _Sequence:
    checkpoints: list[Checkpoint] = field(default_factory=list)  # by `tokens`, ascending
    targets: set[int] = field(default_factory=set)


class Checkpoints:
    """Bounded checkpoints of `n_seq` sequences of one context."""

    def __init__(self, n_seq: int, save: Save, load: Load, *, per_sequence: int = DEFAULT_PER_SEQUENCE,
                 max_bytes: int = DEFAULT_MAX_MIB << 20, step: int = DEFAULT_STEP):
        self._sequences = [_Sequence() for _ in range(n_seq)]
        self._save = save
        self._load = load
        self.per_sequence = per_sequence
        self.max_bytes = max_bytes
        self.step = step
        self._order = itertools.count()
        self.stats = CheckpointStats()

    @property
    def enabled(self) -> bool:
        """False with `--ctx-checkpoints 0`: nothing is saved and every divergence is a full evaluation."""
        return self.per_sequence > 0 and self.max_bytes > 0

    # ---- where to take them -------------------------------------------------------------------

    def plan_prompt(self, seq: int, start: int, prompt_length: int) -> None:
        """Aim checkpoints of `seq` at where a later prompt is likely to leave this one, past `start` (held)."""
        targets = {prompt_length - offset for offset in END_OFFSETS}
        targets.update(range(start - start % self.step + self.step, prompt_length, self.step))
        self._sequences[seq].targets = {t for t in targets if start < t < prompt_length}

    def want(self, seq: int, tokens: int) -> None:
        """Take a checkpoint of `seq` when it holds `tokens` (another sequence will copy that prefix)."""
        self._sequences[seq].targets.add(tokens)

    def next_target(self, seq: int, length: int) -> int | None:
        """The next position past `length` where `seq` should be checkpointed (a prompt chunk ends there)."""
        if not self.enabled:
            return None
        ahead = [t for t in self._sequences[seq].targets if t > length]
        return min(ahead) if ahead else None

    def after_decode(self, seq: int, length: int) -> None:
        """`seq` now holds `length` tokens: save a checkpoint if one is wanted there."""
        sequence = self._sequences[seq]
        if length not in sequence.targets or not self.enabled:
            return
        sequence.targets.discard(length)
        if any(cp.tokens == length for cp in sequence.checkpoints):
            return
        data = self._save(seq)
        if not len(data):
            return
        checkpoint = Checkpoint(length, data, len(data), next(self._order))
        sequence.checkpoints.append(checkpoint)
        sequence.checkpoints.sort(key=lambda cp: cp.tokens)
        self.stats.saved += 1
        self._evict(keep=checkpoint)

    def _evict(self, keep: Checkpoint) -> None:
        for sequence in self._sequences:
            while len(sequence.checkpoints) > self.per_sequence:
                self._drop(sequence, min(sequence.checkpoints, key=lambda cp: cp.order))
        while self.bytes > self.max_bytes:
            candidates = [(cp, s) for s in self._sequences for cp in s.checkpoints if cp is not keep]
            if not candidates:
                return
            checkpoint, sequence = min(candidates, key=lambda pair: pair[0].order)
            self._drop(sequence, checkpoint)

    def _drop(self, sequence: _Sequence, checkpoint: Checkpoint) -> None:
        sequence.checkpoints.remove(checkpoint)
        self.stats.evicted += 1

    # ---- using them ---------------------------------------------------------------------------

    def reach(self, seq: int, tokens: int) -> int:
        """How many of the first `tokens` held by `seq` a checkpoint can restore (the newest at or before)."""
        best = 0
        for checkpoint in self._sequences[seq].checkpoints:
            if checkpoint.tokens <= tokens:
                best = checkpoint.tokens
        return best

    def restore(self, seq: int, tokens: int) -> int:
        """Load the newest checkpoint of `seq` at or before `tokens`; returns its length (0: none fits, or the
        memory refused it). Checkpoints past what `seq` then holds are dropped."""
        sequence = self._sequences[seq]
        for checkpoint in reversed(sequence.checkpoints):
            if checkpoint.tokens <= tokens and self._load(seq, checkpoint.data):
                self.stats.restored += 1
                self.invalidate(seq, checkpoint.tokens)
                return checkpoint.tokens
        self.invalidate(seq, 0)
        return 0

    def record_miss(self, held: int) -> None:
        """Count a prompt evaluated from the start although `held` of its tokens were held."""
        self.stats.misses += 1
        self.stats.missed_tokens += held

    def invalidate(self, seq: int, length: int) -> None:
        """`seq` holds only its first `length` tokens now: drop the checkpoints past them."""
        sequence = self._sequences[seq]
        sequence.checkpoints = [cp for cp in sequence.checkpoints if cp.tokens <= length]

    def copy(self, source: int, destination: int) -> None:
        """`destination` now holds what `source` holds: it shares `source`'s checkpoints too."""
        self._sequences[destination].checkpoints = list(self._sequences[source].checkpoints)

    def clear(self, seq: int) -> None:
        """`seq` holds nothing: no checkpoints, no targets."""
        self._sequences[seq] = _Sequence()

    # ---- accounting ---------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Checkpoints held (one shared by two sequences counts once)."""
        return len(self._unique())

    @property
    def bytes(self) -> int:
        """Bytes the checkpoints hold (shared ones once)."""
        return sum(cp.size for cp in self._unique())

    def _unique(self) -> list[Checkpoint]:
        seen: dict[int, Checkpoint] = {}
        for sequence in self._sequences:
            for checkpoint in sequence.checkpoints:
                seen[id(checkpoint)] = checkpoint
        return list(seen.values())

    def held(self, seq: int) -> list[int]:
        """The lengths `seq`'s checkpoints were taken at, ascending (for tests and logs)."""
        return [cp.tokens for cp in self._sequences[seq].checkpoints]
