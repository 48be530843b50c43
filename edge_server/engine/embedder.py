"""Embeddings: a second llama.cpp context, with embeddings on, on the model the engine has loaded.

The only module that makes llama.cpp's embedding calls. The context is created on first use, used by one
request at a time (its own lock; llama.cpp allows one thread per context, several contexts per model), and
never touches the chat engine's context. Several inputs go into one decode, one sequence each.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from edge_server.engine.ownthread import on_own_thread
from edge_server.engine.types import ModelInfo

SEQUENCES_PER_DECODE = 8  # inputs batched into one decode (llama.cpp's n_seq_max of this context)
MAX_INPUT_TOKENS = 8192  # OpenAI's limit per input; the context and the budget below may allow fewer
# llama.cpp computes (and keeps) a row of logits for every token of an embedding batch, so the longest
# input, which must fit one micro-batch, is bounded by what those rows cost: vocabulary x tokens x 4 bytes,
# twice over (the compute buffer and the output buffer): about 512 MiB at this budget.
LOGITS_BUDGET_BYTES = 256 << 20
MIN_INPUT_TOKENS = 512  # llama-server's default micro-batch, whatever the vocabulary

POOLING_NAMES = {llama_cpp.LLAMA_POOLING_TYPE_NONE: "none", llama_cpp.LLAMA_POOLING_TYPE_MEAN: "mean",
                 llama_cpp.LLAMA_POOLING_TYPE_CLS: "cls", llama_cpp.LLAMA_POOLING_TYPE_LAST: "last",
                 llama_cpp.LLAMA_POOLING_TYPE_RANK: "rank"}


class EmbeddingUnsupported(Exception):
    """This model cannot produce embeddings (a reranker's `rank` pooling)."""


@dataclass(frozen=True)
class Pooling:
    """How a model turns its last hidden states into one vector, read from its GGUF metadata."""

    kind: int  # a LLAMA_POOLING_TYPE_*
    declared: bool  # the GGUF says so (an embedding model); else a chat model, mean-pooled

    @property
    def name(self) -> str:
        return POOLING_NAMES.get(self.kind, str(self.kind))

    @classmethod
    def of(cls, metadata: dict[str, Any]) -> Pooling:
        """`<arch>.pooling_type` when the GGUF has it (`none` is mean-pooled: one vector per input is what the
        API returns); a chat model's hidden states are mean-pooled, as Ollama does."""
        arch = str(metadata.get("general.architecture", ""))
        value = metadata.get(f"{arch}.pooling_type")
        if value is None:
            return cls(llama_cpp.LLAMA_POOLING_TYPE_MEAN, declared=False)
        kind = int(value)
        if kind == llama_cpp.LLAMA_POOLING_TYPE_NONE:
            kind = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        return cls(kind, declared=True)


def longest_input(info: ModelInfo) -> int:
    """The most tokens one input may have: the server's context (`--n-ctx`), at most `MAX_INPUT_TOKENS`,
    and no more than `LOGITS_BUDGET_BYTES` of logits rows allow (never under `MIN_INPUT_TOKENS`); rounded
    down to a multiple of the sequences per decode (see `sequences_per_decode`)."""
    budget = max(MIN_INPUT_TOKENS, LOGITS_BUDGET_BYTES // (4 * max(info.n_vocab, 1)))
    limit = max(1, min(info.n_ctx, MAX_INPUT_TOKENS, budget))
    return limit - limit % sequences_per_decode(limit)


def sequences_per_decode(tokens: int) -> int:
    """n_seq_max for a micro-batch of `tokens`. llama.cpp reserves its worst-case graph with the micro-batch
    split evenly over n_seq_max sequences, and mean pooling aborts the process (GGML_ASSERT in
    build_pooling) unless n_seq_max divides n_ubatch: so the context's size is a multiple of it."""
    return min(SEQUENCES_PER_DECODE, tokens)


def normalized(vector: np.ndarray) -> np.ndarray:
    """`vector` scaled to unit L2 length (a zero vector stays zero)."""
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def truncated(vector: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Matryoshka truncation: the first `dimensions` components, renormalized (unchanged when None)."""
    return vector if dimensions is None or dimensions >= len(vector) else normalized(vector[:dimensions])


def llama_model_of(engine: Any) -> internals.LlamaModel:
    """The llama_model the chat engine loaded (`Engine.model`; a fake engine has none)."""
    model = getattr(engine, "model", None)
    if not isinstance(model, internals.LlamaModel):
        raise EmbeddingUnsupported("this engine has no llama.cpp model to embed with")
    return model


class Embedder:
    """One embedding context on a loaded model; `embed` is safe from any thread (one request at a time)."""

    def __init__(self, model: internals.LlamaModel, info: ModelInfo):
        self.pooling = Pooling.of(info.metadata)
        if self.pooling.kind == llama_cpp.LLAMA_POOLING_TYPE_RANK:
            raise EmbeddingUnsupported("this model is a reranker (pooling 'rank'); it has no embeddings")
        self.max_tokens = longest_input(info)
        self.n_vocab = info.n_vocab
        self.dimensions = int(llama_cpp.llama_model_n_embd_out(model.model))
        params = llama_cpp.llama_context_default_params()
        params.embeddings = True
        params.pooling_type = self.pooling.kind
        # One micro-batch holds the longest input whole: llama.cpp pools a sequence within one micro-batch,
        # and non-causal (BERT-like) attention needs the whole batch in one. Shorter inputs share it.
        params.n_ctx = params.n_batch = params.n_ubatch = self.max_tokens
        params.n_seq_max = self.sequences = sequences_per_decode(self.max_tokens)
        params.kv_unified = True  # the sequences of one decode share the n_ctx cells
        params.n_threads = params.n_threads_batch = info.threads
        params.no_perf = True
        self._lock = threading.Lock()  # one request decodes at a time
        self._count_lock = threading.Lock()
        self._waiting = 0
        self._context = internals.LlamaContext(model=model, params=params, verbose=False)
        self._batch = internals.LlamaBatch(n_tokens=self.max_tokens, embd=0, n_seq_max=1, verbose=False)

    @property
    def waiting(self) -> int:
        """Requests waiting for the context (the one running not counted)."""
        return self._waiting

    def close(self) -> None:
        """Free the context and its batch now, after any decode in progress (else they live as long as the
        model's own reference cycle in llama-cpp-python, which only the garbage collector breaks)."""
        with self._lock:
            self._context.close()
            self._batch.close()

    def embed(self, inputs: Sequence[Sequence[int]],
              cancelled: Callable[[], bool] = lambda: False) -> list[np.ndarray] | None:
        """The unit-length pooled embedding of each input (token ids, each 1..`max_tokens` long and below
        the vocabulary size: the caller checks). None when `cancelled()` turned true between decodes."""
        with self._count_lock:
            self._waiting += 1
        with self._lock:
            with self._count_lock:
                self._waiting -= 1
            if self._context.ctx is None:
                raise RuntimeError("the embedding context was closed (its model was unloaded)")
            vectors: list[np.ndarray] = []
            start = 0
            while start < len(inputs):
                if cancelled():
                    return None
                end, tokens = start, 0
                # As many inputs as one decode takes: sequences, and tokens within the micro-batch.
                while (end < len(inputs) and end - start < self.sequences
                       and tokens + len(inputs[end]) <= self.max_tokens):
                    tokens += len(inputs[end])
                    end += 1
                vectors.extend(self._decode(inputs[start:end]))
                start = end
            return vectors

    def _decode(self, group: Sequence[Sequence[int]]) -> list[np.ndarray]:
        ctx = self._context.ctx
        self._context.kv_cache_clear()
        self._batch.reset()
        for seq, tokens in enumerate(group):
            self._batch.add_sequence(tokens, seq, True)  # every token is an output: pooling reads them all
        status = on_own_thread(llama_cpp.llama_decode, ctx, self._batch.batch)  # see ownthread.py
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} for an embedding batch")
        vectors = []
        for seq in range(len(group)):
            pointer = llama_cpp.llama_get_embeddings_seq(ctx, seq)
            if not pointer:
                raise RuntimeError(f"llama.cpp returned no pooled embedding for sequence {seq}")
            vector = np.ctypeslib.as_array(pointer, shape=(self.dimensions,)).astype(np.float32)  # a copy
            vectors.append(normalized(vector))
        return vectors


def open_embedder(engine: Any) -> Embedder:
    """An embedder on the model `engine` loaded (raises `EmbeddingUnsupported`)."""
    return Embedder(llama_model_of(engine), engine.info)
