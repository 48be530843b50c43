"""The engine's scheduler: one worker thread owns the llama.cpp context and decodes all running jobs together."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
from llama_cpp import _internals as internals

from edge_server.engine.prefixcache import PrefixCache
from edge_server.engine.sampler import CompiledGrammar, ConstrainedSampler, compile_grammar, make_sampler
from edge_server.engine.threadtuner import ThreadTuner
from edge_server.engine.types import (
    SHUTTING_DOWN,
    Finish,
    FinishReason,
    Job,
    ModelInfo,
    PromptTooLong,
    QueueFull,
    Token,
    TokenStream,
)
from edge_server.engine.vocab import Vocabulary

log = logging.getLogger("edge_server.engine")

BATCH_TOKENS = 512  # most tokens one decode step takes (llama.cpp's n_batch)
PROMPT_CHUNK = 256  # prompt tokens per step: bounds how long a new prompt stalls running streams


@dataclass
class _Slot:
    """One sequence of the shared context and the job it runs (its cells are the prefix cache's)."""

    seq: int
    job: Job | None = None
    stream: TokenStream | None = None
    sampler: internals.LlamaSampler | None = None
    grammar: Any = None  # llama.cpp grammar sampler pointer, owned by the slot while its job runs
    pending_prompt: list[int] = field(default_factory=list)  # prompt tokens not decoded yet
    next_token: int | None = None  # sampled, emitted, and to be decoded in the next step
    produced: int = 0
    logits_at: int = -1  # index of this slot's logits in the current batch, -1 if none


class Engine:
    """Owns the llama.cpp model and context; its worker thread decodes all running jobs together.

    Each step decodes one token for every generating sequence plus one bounded chunk of a pending
    prompt (chunked prefill). A new job takes the free slot whose cached tokens share the longest
    prefix with its prompt and evaluates only the rest.
    """

    def __init__(self, model: internals.LlamaModel, context: internals.LlamaContext, info: ModelInfo, *,
                 parallel: int, max_queue: int, tuner: ThreadTuner, fault_seed: int | None = None):
        self._model = model
        self._ctx = context
        self._vocab = Vocabulary(model.vocab)
        self.info = info
        self.parallel = parallel
        self._slots = [_Slot(seq) for seq in range(parallel)]
        self._cache = PrefixCache(parallel, lambda seq, start: context.kv_cache_seq_rm(seq, start, -1))
        self._pending: queue.Queue[tuple[Job, TokenStream] | None] = queue.Queue()
        self._max_queue = max_queue
        # Fault injection for the reliability tests: a job with this seed fails on its third token.
        self._fault_seed = fault_seed
        self._submit_lock = threading.Lock()
        self._batch = internals.LlamaBatch(n_tokens=BATCH_TOKENS, embd=0, n_seq_max=1, verbose=False)
        self._constrained = ConstrainedSampler(context, model.n_vocab())
        self._tuner = tuner
        self._closing = False
        self._draining = False  # shutting down: no new jobs start
        self._abort_reason: str | None = None  # set: running jobs end with this error at the next step
        self._worker = threading.Thread(target=self._work, name="edge-engine", daemon=True)
        self._worker.start()

    # ---- the HTTP threads' side --------------------------------------------------------------

    def tokenize(self, text: bytes, add_bos: bool, special: bool, max_tokens: int | None = None) -> list[int]:
        """Tokens of `text`; `PromptTooLong` past `max_tokens` (safe from any thread)."""
        fewest = len(text) // self.info.max_token_bytes
        if max_tokens is not None and fewest > max_tokens:
            # No token is longer than max_token_bytes: refused without the tokenizer's work on all of it.
            raise PromptTooLong(fewest, at_least=True)
        return self._vocab.tokenize(text, add_bos, special, max_tokens)

    def compile_grammar(self, grammar: str) -> CompiledGrammar:
        """Parse GBNF on the calling thread, never the engine's (safe from any thread); raises `GrammarRejected`."""
        return compile_grammar(self._vocab.pointer, grammar)

    def submit(self, job: Job) -> TokenStream:
        """Queue a job; returns its stream at once. Raises `QueueFull` when `--max-queue` are waiting."""
        if not job.prompt or job.max_tokens < 1 or len(job.prompt) + job.max_tokens > self.info.n_ctx:
            raise ValueError("job does not fit the context")
        stream = TokenStream()
        with self._submit_lock:
            if self._closing or self._draining or self._waiting() >= self._max_queue + (self.parallel - self.running):
                raise QueueFull
            self._pending.put((job, stream))
        return stream

    def _waiting(self) -> int:
        # Jobs whose clients already left still sit in the queue until the worker drops them;
        # they must not make a live request wait or be refused.
        with self._pending.mutex:
            return sum(1 for item in self._pending.queue if item is not None and not item[1].cancelled)

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens served from the prefix cache since start."""
        return self._cache.reused_tokens

    @property
    def running(self) -> int:
        """Jobs holding a slot."""
        return sum(slot.job is not None for slot in self._slots)

    @property
    def threads_in_use(self) -> int:
        """Threads the current decode steps use (fewer than configured while fewer run faster)."""
        return self._tuner.threads

    @property
    def queued(self) -> int:
        """Jobs waiting for a free slot."""
        return self._pending.qsize()

    def drain(self, grace_seconds: float, reason: str = "the server is shutting down") -> None:
        """Start no more jobs (waiting ones end with an error), let running ones finish for up to
        `grace_seconds`, then end those with an error too. Blocks until no job runs."""
        self._draining = True
        self._pending.put(None)  # wakes an idle worker so that it sees the drain
        deadline = time.monotonic() + grace_seconds
        while self.running and time.monotonic() < deadline:
            time.sleep(0.05)
        self._abort_reason = reason
        while self.running or self.queued:
            time.sleep(0.02)

    def close(self) -> None:
        """Stop the worker after the current step; running and queued jobs end as cancelled."""
        self._closing = True
        self._pending.put(None)
        self._worker.join(timeout=10)

    # ---- the worker thread -------------------------------------------------------------------

    def _work(self) -> None:
        while not self._closing:
            try:
                self._admit()
                active = [slot for slot in self._slots if slot.job is not None]
                if active:
                    self._step(active)
            except Exception as error:  # the worker must outlive any bug: fail the jobs, keep serving
                log.exception("engine step failed")
                for slot in self._slots:
                    if slot.job is not None:
                        self._forget(slot)
                        self._end(slot, Finish(FinishReason.ERROR, f"generation failed: {error}"))
        for slot in self._slots:
            if slot.job is not None:
                self._end(slot, Finish(FinishReason.CANCELLED))
        self._end_waiting(Finish(FinishReason.CANCELLED))

    def _end_waiting(self, finish: Finish) -> None:
        """End every job still in the queue with `finish`."""
        while True:
            try:
                item = self._pending.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[1]._emit(finish)

    def _admit(self) -> None:
        """Move waiting jobs into free slots; blocks while nothing at all is to be done."""
        if self._draining:
            self._refuse_waiting("the server is shutting down")
            return
        while True:
            free = [slot for slot in self._slots if slot.job is None]
            if not free:
                return
            busy = len(free) < len(self._slots)
            try:
                item = self._pending.get_nowait() if busy else self._pending.get()
            except queue.Empty:
                return
            if item is None:  # close() (which set _closing) or drain() waking us
                return
            job, stream = item
            if stream.cancelled:
                stream._emit(Finish(FinishReason.CANCELLED))
                continue
            slot = self._slots[self._cache.choose([slot.seq for slot in free], job.prompt)]
            try:
                self._start(slot, job, stream)
            except Exception as error:  # e.g. a sampler llama.cpp refuses: only this job fails
                log.exception("starting a job failed")
                slot.job = None
                self._forget(slot)
                stream._emit(Finish(FinishReason.ERROR, f"generation failed: {error}"))

    def _refuse_waiting(self, reason: str) -> None:
        self._end_waiting(Finish(FinishReason.ERROR, reason, SHUTTING_DOWN))
        if not any(slot.job for slot in self._slots):
            time.sleep(0.02)  # nothing runs: idle politely until close() or new (refused) jobs

    def _start(self, slot: _Slot, job: Job, stream: TokenStream) -> None:
        reuse = self._cache.reuse(slot.seq, job.prompt)
        stream.reused_tokens = reuse
        slot.job, slot.stream, slot.produced, slot.next_token = job, stream, 0, None
        slot.pending_prompt = job.prompt[reuse:]
        slot.sampler = make_sampler(job.sampling, self._model)
        slot.grammar = job.sampling.grammar.take() if job.sampling.grammar is not None else None

    def _step(self, active: list[_Slot]) -> None:
        for slot in active:
            if slot.stream.cancelled:
                self._end(slot, Finish(FinishReason.CANCELLED))
            elif self._abort_reason is not None:
                self._end(slot, Finish(FinishReason.ERROR, self._abort_reason, SHUTTING_DOWN))
        active = [slot for slot in active if slot.job is not None]
        batch = self._batch.batch
        batch.n_tokens = 0
        decoded: list[tuple[_Slot, list[int]]] = []
        for slot in active:
            slot.logits_at = -1
            if slot.next_token is not None:
                slot.logits_at = add_to_batch(batch, [slot.next_token], self._cache.length(slot.seq), slot.seq,
                                              logits=True)
                decoded.append((slot, [slot.next_token]))
        budget = min(PROMPT_CHUNK, BATCH_TOKENS - batch.n_tokens)
        prefilling = False
        # One prompt chunk per step, oldest job first, so running streams keep flowing.
        for slot in sorted(active, key=lambda s: s.stream.submitted_at):
            if slot.pending_prompt and budget > 0:
                chunk, slot.pending_prompt = slot.pending_prompt[:budget], slot.pending_prompt[budget:]
                last = add_to_batch(batch, chunk, self._cache.length(slot.seq), slot.seq,
                                    logits=not slot.pending_prompt)
                slot.logits_at = -1 if slot.pending_prompt else last
                decoded.append((slot, chunk))
                budget = 0
                prefilling = True
        if batch.n_tokens == 0:
            return
        threads = self._tuner.next_step_threads()
        if threads != llama_cpp.llama_n_threads(self._ctx.ctx):
            llama_cpp.llama_set_n_threads(self._ctx.ctx, threads, threads)
        started = time.perf_counter()
        try:
            self._ctx.decode(self._batch)
        except RuntimeError as error:
            log.exception("decoding a batch failed")
            for slot, _ in decoded:
                self._forget(slot)
                self._end(slot, Finish(FinishReason.ERROR, f"decoding failed: {error}"))
            return
        if not prefilling:  # steps with a prompt chunk take longer for reasons threads do not change
            self._tuner.record(batch.n_tokens, time.perf_counter() - started)
        for slot, tokens in decoded:
            self._cache.extend(slot.seq, tokens)
        for slot, _ in decoded:
            if slot.logits_at >= 0 and slot.job is not None:
                self._sample(slot)

    def _sample(self, slot: _Slot) -> None:
        try:
            if self._fault_seed is not None and slot.job.sampling.seed == self._fault_seed and slot.produced == 3:
                raise RuntimeError("injected fault (EDGE_FAULT_SEED)")
            if slot.grammar is None:
                token = slot.sampler.sample(self._ctx, slot.logits_at)
            else:
                token = self._constrained.sample(slot.sampler.sampler, slot.grammar, slot.logits_at)
        except Exception as error:  # a failing sampler ends its own job only
            log.exception("sampling failed")
            self._end(slot, Finish(FinishReason.ERROR, f"sampling failed: {error}"))
            return
        slot.next_token = None
        if self._vocab.ends_generation(token):
            self._end(slot, Finish(FinishReason.STOP))
            return
        slot.produced += 1
        slot.stream._emit(Token(token, self._vocab.piece(token)))
        if slot.produced >= slot.job.max_tokens:
            self._end(slot, Finish(FinishReason.LENGTH))
        else:
            slot.next_token = token

    def _end(self, slot: _Slot, finish: Finish) -> None:
        stream, sampler, grammar = slot.stream, slot.sampler, slot.grammar
        slot.job = slot.stream = slot.sampler = slot.grammar = None
        slot.next_token = None
        slot.pending_prompt = []
        self._cache.release(slot.seq, time.monotonic())
        if sampler is not None:
            sampler.close()
        if grammar is not None:
            llama_cpp.llama_sampler_free(grammar)
        # Free the slot before telling the client: whoever reads the answer then sees the engine idle.
        stream._emit(finish)

    def _forget(self, slot: _Slot) -> None:
        self._cache.forget(slot.seq)


def add_to_batch(batch: Any, tokens: list[int], position: int, seq: int, *, logits: bool) -> int:
    """Append `tokens` of sequence `seq` from `position` on to a llama.cpp batch; return the last one's index."""
    start = batch.n_tokens
    for i, token in enumerate(tokens):
        j = start + i
        batch.token[j] = token
        batch.pos[j] = position + i
        batch.n_seq_id[j] = 1
        batch.seq_id[j][0] = seq
        batch.logits[j] = False
    last = start + len(tokens) - 1
    batch.logits[last] = logits
    batch.n_tokens = last + 1
    return last
