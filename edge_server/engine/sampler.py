"""Per-request sampling on llama.cpp: the sampler chain, and llguidance token masks applied before it."""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from edge_server.dialects.constraints import GrammarError, compile_matcher
from edge_server.engine.types import GrammarRejected, ReasoningBudget, Sampling


class GrammarDeadEnd(RuntimeError):
    """No token of the vocabulary can continue the grammar (e.g. a pattern asking for a NUL byte)."""


GREEDY_BELOW = 1e-3  # temperatures below this sample greedily (dividing logits by ~0 gives inf and NaN)
PENALTY_WINDOW = 64  # tokens the repetition penalties look back over (llama.cpp's default)


class CompiledGrammar:
    """A grammar compiled by llguidance for this engine's vocabulary, on the requesting thread; each job that
    carries it (n choices, several prompts) takes a matcher of its own."""

    def __init__(self, matcher: Any):
        self._matcher = matcher

    def take(self) -> Any:
        """A fresh matcher at the grammar's start; from now on it follows the caller's tokens."""
        return self._matcher.deep_copy()


class ConstrainedSampler:
    """Masks one batch position's logits to the tokens a grammar allows, then samples with the request's chain."""

    def __init__(self, context: internals.LlamaContext, n_vocab: int):
        self._context = context
        self._ctx = context.ctx
        self._n_vocab = n_vocab
        self._mask = mask_buffer(n_vocab)

    def sample(self, chain: internals.LlamaSampler, matcher: Any, index: int, *, keep_logits: bool,
               computed: np.ndarray | None = None) -> int:
        """Sample the next token with `chain` from what `matcher` allows, and let the matcher consume it.

        The mask is computed for this position alone (llguidance: microseconds), so a constrained slot
        costs the others in the batch nothing; `computed` is the matcher's mask at its state now, when already
        known (`forced_tokens` found it). With `keep_logits` the raw logits are put back afterwards
        (log-probabilities are reported under the model's own distribution).
        """
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, index), shape=(self._n_vocab,))
        allowed = allowed_tokens(matcher, self._mask, self._n_vocab, computed=computed)
        raw = logits.copy() if keep_logits else None
        np.copyto(logits, -np.inf, where=~allowed)
        token = chain.sample(self._context, index)
        if not allowed[token]:
            # Extreme settings (a temperature of 1e-40, a penalty near 0) turn logits into NaN and the
            # chain picks a refused token: take the best token the grammar allows instead.
            token = int(np.nanargmax(np.where(allowed & np.isfinite(logits), logits, -np.inf)))
            if not allowed[token]:
                token = int(np.flatnonzero(allowed)[0])
        if raw is not None:
            logits[:] = raw
        if not matcher.consume_token(token):
            raise GrammarDeadEnd(f"the output grammar failed: {matcher.get_error().splitlines()[0]}")
        return token


def mask_buffer(n_vocab: int) -> np.ndarray:
    """A bitmask buffer for `allowed_tokens` (one bit per token, in 32-bit words)."""
    return np.zeros((n_vocab + 31) // 32, dtype=np.int32)


def allowed_tokens(matcher: Any, mask: np.ndarray, n_vocab: int, *, computed: np.ndarray | None = None) -> np.ndarray:
    """What `matcher` allows next, one bool per token, computed into `mask` (or read from `computed`, its mask at
    this state); `GrammarDeadEnd` when nothing is."""
    if computed is not None:
        mask = computed
    else:
        matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
    if matcher.is_error():
        raise GrammarDeadEnd(f"the output grammar failed: {matcher.get_error().splitlines()[0]}")
    allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[:n_vocab].view(bool)
    if not allowed.any():
        raise GrammarDeadEnd("the output grammar allows no token of this model's vocabulary here")
    return allowed


def forced_tokens(matcher: Any, mask: np.ndarray, limit: int) -> list[int]:
    """The tokens (at most `limit`) that `matcher` allows one at a time from its state on: each is the only
    token its position can sample, at any settings, so feeding them as a draft changes no output. The matcher
    is left as it was; when fewer than `limit` come back, `mask` holds its mask after them (the next free choice's,
    so that sampling there need not compute it again)."""
    forced: list[int] = []
    try:
        while len(forced) < limit:
            matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
            words = np.flatnonzero(mask)
            if matcher.is_error() or len(words) != 1:
                break
            word = int(mask[words[0]]) & 0xFFFFFFFF
            if word & (word - 1):  # more than one bit
                break
            token = int(words[0]) * 32 + word.bit_length() - 1
            if not matcher.consume_token(token):
                break
            forced.append(token)
    finally:
        if forced:
            matcher.rollback(len(forced))
    return forced


def take_forced(chain: internals.LlamaSampler, matcher: Any, token: int) -> None:
    """Let `chain` and `matcher` take `token`, the only one the grammar allows here, without its logits: the chain
    runs on that one candidate (its random draw, penalties' history and thinking budget advance exactly as when
    sampling it from the full row), then accepts it."""
    candidate = llama_cpp.llama_token_data(id=token, logit=0.0, p=0.0)
    candidates = llama_cpp.llama_token_data_array(data=ctypes.pointer(candidate), size=1, selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(chain.sampler, ctypes.byref(candidates))
    llama_cpp.llama_sampler_accept(chain.sampler, token)
    if not matcher.consume_token(token):
        raise GrammarDeadEnd(f"the output grammar failed: {matcher.get_error().splitlines()[0]}")


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


def compile_grammar(tokenizer: Any, grammar: str) -> CompiledGrammar:
    """Compile an llguidance grammar for `tokenizer`'s vocabulary on the calling thread; raises `GrammarRejected`."""
    try:
        return CompiledGrammar(compile_matcher(tokenizer, grammar))
    except GrammarError as error:
        raise GrammarRejected(f"The output grammar cannot be compiled for this model: {error}") from None


class CompiledGrammars:
    """The grammars compiled for one vocabulary, the `capacity` most recently used kept: an application sends the
    same schema with every request, and its matcher (1.6 ms p50, up to ~25 ms for large schemas) is then built
    once; each job takes a copy of its own."""

    def __init__(self, tokenizer: Callable[[], Any], capacity: int = 64):
        self._tokenizer = tokenizer  # llguidance's, built on first use
        self._capacity = capacity
        self._kept: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, grammar: str) -> CompiledGrammar:
        """`grammar` compiled (on the calling thread when it is new); raises `GrammarRejected`."""
        with self._lock:
            kept = self._kept.get(grammar)
            if kept is not None:
                self._kept.move_to_end(grammar)
                return kept
        compiled = compile_grammar(self._tokenizer(), grammar)  # unlocked: other threads' grammars need not wait
        with self._lock:
            self._kept[grammar] = compiled
            while len(self._kept) > self._capacity:
                self._kept.popitem(last=False)
        return compiled


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
