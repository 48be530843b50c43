"""The llama.cpp side of context checkpoints: what kind of memory a context has, and its partial state per sequence.

A context's memory drops any suffix of a sequence when it is attention only, or sliding-window with a full-size
window. Recurrent and hybrid models (Mamba, Qwen3.5's Gated DeltaNet) and a sliding window smaller than the
context cannot: for those `PartialMemory` saves and loads the part that cannot go back
(`LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY`: the recurrent state, or the small window's cells) and says whether keeping
a prefix in place would leave a usable state.
"""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp

PARTIAL_ONLY = llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY


def memory_kind(model: Any, *, swa_full: bool) -> str:
    """"recurrent" (recurrent or hybrid), "swa" (a window smaller than the context) or "full" (drops any suffix)."""
    if llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model):
        return "recurrent"
    if llama_cpp.llama_model_n_swa(model) > 0 and not swa_full:
        return "swa"
    return "full"


class PartialMemory:
    """Partial-state snapshots of one context's sequences (engine thread only)."""

    def __init__(self, context: Any, kind: str, n_swa: int):
        self._ctx = context.ctx
        self._memory = context.memory
        self.kind = kind
        self._n_swa = n_swa

    def save(self, seq: int) -> ctypes.Array:
        """A copy of `seq`'s partial state (empty when there is none)."""
        size = llama_cpp.llama_state_seq_get_size_ext(self._ctx, seq, PARTIAL_ONLY)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data_ext(self._ctx, buffer, size, seq, PARTIAL_ONLY)
        return buffer if written == size else (ctypes.c_uint8 * 0)()

    def load(self, seq: int, snapshot: ctypes.Array) -> bool:
        """Put `snapshot` (from `save`) back as `seq`'s partial state; False when llama.cpp refused it."""
        return llama_cpp.llama_state_seq_set_data_ext(self._ctx, snapshot, len(snapshot), seq, PARTIAL_ONLY) > 0

    def kept_in_place(self, seq: int, keep: int, held: int) -> bool:
        """Whether `seq`, holding positions up to `held`, is usable after dropping those from `keep` on in place."""
        if keep >= held:
            return True
        if self.kind == "recurrent":
            return False  # the state is that of all `held` tokens
        # A small window keeps only the last n_swa positions: the next token needs those before `keep`.
        lowest = llama_cpp.llama_memory_seq_pos_min(self._memory, seq)
        return lowest <= max(0, keep - self._n_swa)
