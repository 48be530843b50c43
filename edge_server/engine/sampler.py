"""Per-request sampling on llama.cpp: the sampler chain, and grammars parsed off the engine thread."""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from edge_server.engine.types import GrammarRejected, ReasoningBudget, Sampling


class GrammarDeadEnd(RuntimeError):
    """No token of the vocabulary can continue the grammar (e.g. a pattern asking for a NUL byte)."""


GREEDY_BELOW = 1e-3  # temperatures below this sample greedily (dividing logits by ~0 gives inf and NaN)
PENALTY_WINDOW = 64  # tokens the repetition penalties look back over (llama.cpp's default)


class CompiledGrammar:
    """A llama.cpp grammar sampler, parsed on the requesting thread; the engine takes it over once.

    Parsing a large grammar takes long (a 20,000-value enum: about 1 s), and it must never happen on
    the engine's thread, where it would stall every running stream.
    """

    def __init__(self, pointer: Any):
        self._pointer = pointer

    def take(self) -> Any:
        """The sampler pointer; from now on the caller frees it."""
        pointer, self._pointer = self._pointer, None
        return pointer

    def __del__(self) -> None:
        if self._pointer:  # never started (cancelled while waiting, refused by a full queue)
            llama_cpp.llama_sampler_free(self._pointer)
            self._pointer = None


class ConstrainedSampler:
    """Samples under a grammar from one batch position's logits, keeping the whole vocabulary as candidates."""

    def __init__(self, context: internals.LlamaContext, n_vocab: int):
        self._ctx = context.ctx
        self._n_vocab = n_vocab
        dtype = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        assert dtype.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)
        self._data = np.zeros(n_vocab, dtype=dtype)
        self._data["id"] = np.arange(n_vocab, dtype=np.int32)
        self._ids = self._data["id"].copy()
        self._pointer = self._data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
        self._array = llama_cpp.llama_token_data_array(data=self._pointer, size=n_vocab, selected=-1, sorted=False)
        self._one = llama_cpp.llama_token_data(id=0, logit=0.0, p=0.0)
        self._one_array = llama_cpp.llama_token_data_array(data=ctypes.pointer(self._one), size=1, selected=-1,
                                                           sorted=False)

    def sample(self, chain: Any, grammar: Any, index: int) -> int:
        """Sample with `chain`, constrained by `grammar`, and let both accept the token.

        As llama.cpp's own common sampler does: sample freely, then check only the chosen token
        against the grammar; the grammar pass over the whole vocabulary (its cost grows with
        vocabulary size times open alternatives) runs only when that token is refused. Sampling
        from what the grammar allows gives the same distribution either way.
        """
        self._fill(index)
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(self._array))
        token = self._array.data[self._array.selected].id
        if not self._allows(grammar, token):
            self._fill(index)
            llama_cpp.llama_sampler_apply(grammar, ctypes.byref(self._array))
            allowed = self._data["logit"].copy()  # the grammar's verdict, before the chain reorders the data
            if not np.isfinite(allowed).any():
                # Accepting any token now would make llama.cpp abort the process: end this job instead.
                raise GrammarDeadEnd("the output grammar allows no token of this model's vocabulary here")
            llama_cpp.llama_sampler_apply(chain, ctypes.byref(self._array))
            token = self._array.data[self._array.selected].id
            if not self._allows(grammar, token):
                # Extreme settings (a temperature of 1e-40, a penalty near 0) turn logits into NaN and the
                # chain picks a refused token: take the best token the grammar allows instead.
                token = int(self._ids[np.nanargmax(np.where(np.isfinite(allowed), allowed, -np.inf))])
        llama_cpp.llama_sampler_accept(grammar, token)
        llama_cpp.llama_sampler_accept(chain, token)
        return token

    def _allows(self, grammar: Any, token: int) -> bool:
        self._one.id, self._one.logit, self._one.p = token, 1.0, 0.0
        self._one_array.size, self._one_array.selected = 1, -1
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(self._one_array))
        return self._one.logit != float("-inf")

    def _fill(self, index: int) -> None:
        logits = llama_cpp.llama_get_logits_ith(self._ctx, index)
        self._data["id"] = self._ids
        self._data["logit"] = np.ctypeslib.as_array(logits, shape=(self._n_vocab,))
        self._data["p"] = 0.0
        self._array.data, self._array.size, self._array.selected, self._array.sorted = (
            self._pointer, self._n_vocab, -1, False)


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class ThinkingBudget:
    """A sampler in a request's chain that counts the thinking block's tokens as they are accepted and, once
    `ReasoningBudget.tokens` are spent, leaves only the next token of `close` to pick until it is written."""

    def __init__(self, budget: ReasoningBudget):
        self._budget = budget
        self._phase = "thinking" if budget.opened else "opening"
        self._spent = 0
        self._written = 0  # tokens of `close` accepted so far
        # The callbacks and the interface must live as long as llama.cpp may call them: as long as this object.
        self._callbacks = (llama_cpp.llama_sampler_i_name(lambda _: b"edge-thinking-budget"),
                           llama_cpp.llama_sampler_i_accept(self._accept),
                           llama_cpp.llama_sampler_i_apply(self._apply))
        self._iface = llama_cpp.llama_sampler_i(name=self._callbacks[0], accept=self._callbacks[1],
                                                apply=self._callbacks[2])
        self._sampler = llama_cpp.llama_sampler(iface=ctypes.pointer(self._iface), ctx=None)

    def add_to(self, chain: internals.LlamaSampler) -> None:
        """Put this sampler first in `chain`, which takes it out again before freeing itself."""
        llama_cpp.llama_sampler_chain_add(chain.sampler, ctypes.pointer(self._sampler))
        chain.custom_samplers.append((llama_cpp.llama_sampler_chain_n(chain.sampler) - 1, self))

    @property
    def closing(self) -> bool:
        """Whether the budget is spent and the block is being closed."""
        return self._phase == "thinking" and self._spent >= self._budget.tokens

    def _apply(self, _sampler: Any, candidates: Any) -> None:
        if not self.closing:
            return
        array = candidates.contents
        address = ctypes.cast(array.data, ctypes.c_void_p).value
        view = np.frombuffer((llama_cpp.llama_token_data * array.size).from_address(address), dtype=_TOKEN_DATA)
        view["logit"] = np.where(view["id"] == self._budget.close[self._written], 0.0, -np.inf)

    def _accept(self, _sampler: Any, token: int) -> None:
        budget = self._budget
        if self._phase == "opening":
            self._phase = "thinking" if token == budget.open else "answer"
        elif self.closing:
            self._written += 1
            if self._written == len(budget.close):
                self._phase = "answer"
        elif self._phase == "thinking":
            if token in budget.ends:
                self._phase = "answer"
            else:
                self._spent += 1


def make_sampler(sampling: Sampling, model: internals.LlamaModel) -> internals.LlamaSampler:
    """A llama.cpp sampler chain for one request, in llama-server's order (the grammar is kept apart), after
    the thinking budget when the request has one."""
    n_vocab = model.n_vocab()
    sampler = internals.LlamaSampler()
    if sampling.reasoning_budget is not None:
        ThinkingBudget(sampling.reasoning_budget).add_to(sampler)
    if sampling.logit_bias:
        sampler.add_logit_bias(n_vocab, dict(sampling.logit_bias))
    if (sampling.repeat_penalty, sampling.frequency_penalty, sampling.presence_penalty) != (1.0, 0.0, 0.0):
        sampler.add_penalties(
            n_vocab=n_vocab,
            penalty_last_n=PENALTY_WINDOW,
            penalty_repeat=sampling.repeat_penalty,
            penalty_freq=sampling.frequency_penalty,
            penalty_present=sampling.presence_penalty,
        )
    if sampling.temperature < GREEDY_BELOW:
        sampler.add_greedy()
        return sampler
    sampler.add_top_k(sampling.top_k)
    sampler.add_top_p(sampling.top_p, 1)
    sampler.add_min_p(sampling.min_p, 1)
    sampler.add_temp(sampling.temperature)
    seed = llama_cpp.LLAMA_DEFAULT_SEED if sampling.seed is None else sampling.seed & 0xFFFFFFFF
    if seed == llama_cpp.LLAMA_DEFAULT_SEED and sampling.seed is not None:
        seed = 0xFFFFFFFE  # llama.cpp reads the default seed as "pick a random one"; keep the client's fixed
    sampler.add_dist(seed)
    return sampler


def compile_grammar(vocab: Any, grammar: str) -> CompiledGrammar:
    """Parse GBNF for `vocab` on the calling thread; raises `GrammarRejected`."""
    pointer = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not pointer:
        raise GrammarRejected("llama.cpp rejected the grammar built for this request")
    return CompiledGrammar(pointer)


def token_logprobs(context: Any, index: int, token: int, n_vocab: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` under the raw logits at batch `index` (before sampling settings), and
    the `top` likeliest tokens with theirs; samplers read the logits without changing them."""
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(context, index), shape=(n_vocab,))
    shifted = logits - logits.max()
    log_total = float(np.log(np.exp(shifted, dtype=np.float64).sum()))
    best: list[tuple[int, float]] = []
    if top:
        ids = np.argpartition(shifted, -top)[-top:]
        ids = ids[np.argsort(shifted[ids])[::-1]]
        best = [(int(i), float(shifted[i]) - log_total) for i in ids]
    return float(shifted[token]) - log_total, best
