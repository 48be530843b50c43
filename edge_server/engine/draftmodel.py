"""The draft model of `--spec-type draft-simple`: a small model with the target's tokenizer writes ahead.

It has a context of its own with one sequence per slot of the target, kept in step with what each slot's
sequence holds (the prompt and accepted tokens; what the target rejected is rolled back by dropping cells
past the common prefix). Each step it writes ahead for every drafting slot together, one batched decode per
token, greedily, while its likeliest token is at least `p_min` likely, up to the slot's room or the end of
the answer. A recurrent or hybrid draft model (Qwen3.5) cannot drop cells: its state before writing ahead is
kept and restored instead. Engine thread only, but for `check_tokenizer` at load.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from edge_server.engine.batching import BATCH_TOKENS, add_to_batch
from edge_server.engine.partialmemory import PartialMemory, memory_kind
from edge_server.engine.prefixcache import common_prefix
from edge_server.engine.types import ModelLoadError

log = logging.getLogger("edge_server.engine")

VOCAB_SIZE_SLACK = 128  # as llama.cpp's speculative check: sizes may differ by padding, not by tokens
FIRST_COMPARED_TOKEN = 5  # llama.cpp's check skips the first few ids (control tokens some conversions renumber)


class DraftModel:
    """A loaded draft model and its context of `parallel` sequences."""

    def __init__(self, path: Path, *, n_ctx: int, parallel: int, threads: int, p_min: float):
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0x7FFFFFFF if llama_cpp.llama_supports_gpu_offload() else 0
        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx = n_ctx * parallel
        context_params.n_seq_max = parallel
        context_params.n_batch = context_params.n_ubatch = BATCH_TOKENS
        context_params.n_threads = context_params.n_threads_batch = threads
        context_params.no_perf = True
        try:
            self.model = internals.LlamaModel(path_model=str(path), params=model_params, verbose=False)
            self._ctx = internals.LlamaContext(model=self.model, params=context_params, verbose=False)
        except (ValueError, RuntimeError) as error:
            raise ModelLoadError(f"llama.cpp failed to load the draft model {path}: {error}") from None
        self.path = path
        self._p_min = p_min
        self._n_vocab = self.model.n_vocab()
        self._batch = internals.LlamaBatch(n_tokens=BATCH_TOKENS, embd=0, n_seq_max=1, verbose=False)
        self._held: list[list[int]] = [[] for _ in range(parallel)]  # the tokens each sequence's cells hold
        kind = memory_kind(self.model.model, swa_full=True)
        self._partial = PartialMemory(self._ctx, kind, 0) if kind == "recurrent" else None
        self._before_drafts: dict[int, tuple[int, Any]] = {}  # seq -> (tokens held, partial state) of recurrent ones
        self.limit = self._n_vocab  # token ids it may propose: those the target has too (set by check_tokenizer)

    def check_tokenizer(self, target: Any) -> None:
        """`ModelLoadError` unless the target (a LlamaModel) tokenizes as this model does: same vocabulary
        type, begin and end tokens, and the same text for every token id both have."""
        mine, theirs = self.model.vocab, target.vocab
        problems = []
        if llama_cpp.llama_vocab_type(mine) != llama_cpp.llama_vocab_type(theirs):
            problems.append("another tokenizer type")
        if abs(self._n_vocab - target.n_vocab()) > VOCAB_SIZE_SLACK:
            problems.append(f"{self._n_vocab} tokens against the target's {target.n_vocab()}")
        for name in ("bos", "eos"):
            if getattr(self.model, f"token_{name}")() != getattr(target, f"token_{name}")():
                problems.append(f"another {name.upper()} token")
        if not problems:
            shared = min(self._n_vocab, target.n_vocab())
            get_text = llama_cpp.llama_vocab_get_text
            different = next((token for token in range(FIRST_COMPARED_TOKEN, shared)
                              if get_text(mine, token) != get_text(theirs, token)), None)
            if different is not None:
                problems.append(f"token {different} is {get_text(mine, different)!r} here and "
                                f"{get_text(theirs, different)!r} in the target")
            self.limit = shared
        if problems:
            raise ModelLoadError(f"the draft model {self.path.name} does not share the target's tokenizer "
                                 f"({'; '.join(problems)}): use a smaller model of the same family")

    def propose(self, entries: list[tuple[Any, int]], history: Callable[[Any], list[int]]) -> None:
        """Set `slot.draft` for each (slot, room): what this model writes after `history(slot)`."""
        rooms = {slot.seq: slot.drafter.room(room) for slot, room in entries}
        slots = [slot for slot, _ in entries if rooms[slot.seq]]
        try:
            self._write_ahead(slots, rooms, history)
        except RuntimeError as error:  # the target goes on, without drafts this step
            log.warning("%s", error)
            for slot in slots:
                slot.draft = []

    def _write_ahead(self, slots: list[Any], rooms: dict[int, int], history: Callable[[Any], list[int]]) -> None:
        logits_at = self._catch_up({slot.seq: history(slot) for slot in slots})
        if self._partial is not None:
            for slot in slots:
                self._before_drafts[slot.seq] = (len(self._held[slot.seq]), self._partial.save(slot.seq))
        drafts: dict[int, list[int]] = {slot.seq: [] for slot in slots}
        writing = [slot.seq for slot in slots]
        while writing:
            batch = self._batch.batch
            batch.n_tokens = 0
            next_round = []
            for seq in writing:
                token = self._confident_token(logits_at[seq])
                if token is None or llama_cpp.llama_vocab_is_eog(self.model.vocab, token):
                    continue  # unsure, or the answer ends: the target's logits before it already predict that
                drafts[seq].append(token)
                if len(drafts[seq]) < rooms[seq]:
                    logits_at[seq] = add_to_batch(batch, [token], len(self._held[seq]), seq, logits=True)
                    self._held[seq].append(token)
                    next_round.append(seq)
            writing = next_round
            if writing:
                self._decode(batch)
        for slot in slots:
            slot.draft = drafts[slot.seq]

    def _catch_up(self, histories: dict[int, list[int]]) -> dict[int, int]:
        """Bring each sequence's cells to its history (dropping what differs, decoding what is missing, in
        batches); returns the batch index of each sequence's last token's logits in the last decode."""
        pending: dict[int, list[int]] = {}
        for seq, tokens in histories.items():
            keep = min(common_prefix(self._held[seq], tokens), len(tokens) - 1)  # the last one's logits are needed
            if keep < len(self._held[seq]):
                keep = self._go_back(seq, keep)
                del self._held[seq][keep:]
            pending[seq] = tokens[keep:]
        logits_at: dict[int, int] = {}
        while any(pending.values()):
            batch = self._batch.batch
            batch.n_tokens = 0
            for seq, tokens in pending.items():
                room = BATCH_TOKENS - batch.n_tokens
                if not tokens or room <= 0:
                    continue
                chunk = tokens[:room]
                last = add_to_batch(batch, chunk, len(self._held[seq]), seq, logits=len(chunk) == len(tokens))
                self._held[seq].extend(chunk)
                pending[seq] = tokens[len(chunk):]
                if not pending[seq]:
                    logits_at[seq] = last
            self._decode(batch)
        return logits_at

    def _decode(self, batch: Any) -> None:
        status = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if status != 0:  # start these sequences afresh next time
            for seq in range(len(self._held)):
                self._drop(seq, 0)
                self._held[seq].clear()
            raise RuntimeError(f"the draft model's llama_decode returned {status}")

    def _go_back(self, seq: int, keep: int) -> int:
        """Drop sequence `seq`'s cells past `keep`; returns how many it holds then (a recurrent state goes back to
        where it was before the last drafts, or to nothing)."""
        if self._drop(seq, keep):
            return keep
        before = self._before_drafts.pop(seq, None)
        if before is not None and before[0] <= keep and self._partial.load(seq, before[1]) \
                and self._drop(seq, before[0]):
            return before[0]
        self._drop(seq, 0)
        return 0

    def _drop(self, seq: int, start: int) -> bool:
        """Drop sequence `seq`'s cells from position `start` on; False when the memory cannot."""
        return llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx.ctx), seq, start, -1)

    def _confident_token(self, index: int) -> int | None:
        """The likeliest token at batch `index`, or None when it is less than `p_min` likely."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx.ctx, index), shape=(self._n_vocab,))
        logits = logits[:self.limit]
        best = int(np.argmax(logits))
        if self._p_min > 0:
            probability = 1.0 / float(np.exp(logits - logits[best]).sum())
            if probability < self._p_min:
                return None
        return best
