"""The engine's scheduler: one worker thread owns the llama.cpp context and decodes all running jobs together."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import llama_cpp
from llama_cpp import _internals as internals

from edge_server.engine.admission import Admission
from edge_server.engine.prefixcache import PrefixCache
from edge_server.engine.sampler import CompiledGrammar, compile_grammar
from edge_server.engine.slots import Slot, Slots
from edge_server.engine.threadtuner import ThreadTuner
from edge_server.engine.types import SHUTTING_DOWN, Finish, FinishReason, Job, ModelInfo, PromptTooLong, TokenStream
from edge_server.engine.vocab import Vocabulary

log = logging.getLogger("edge_server.engine")

BATCH_TOKENS = 512  # most tokens one decode step takes (llama.cpp's n_batch)
PROMPT_CHUNK = 256  # prompt tokens per step: bounds how long a new prompt stalls running streams


class Engine:
    """Owns the llama.cpp model and context; its worker thread decodes all running jobs together.

    Each step decodes one token for every generating sequence plus one bounded chunk of a pending
    prompt (chunked prefill). A new job takes the free slot whose cached tokens share the longest
    prefix with its prompt and evaluates only the rest.
    """

    def __init__(self, model: internals.LlamaModel, context: internals.LlamaContext, info: ModelInfo, *,
                 parallel: int, max_queue: int, tuner: ThreadTuner, fault_seed: int | None = None):
        self._ctx = context
        self._vocab = Vocabulary(model.vocab)
        self.info = info
        self.parallel = parallel
        self._cache = PrefixCache(parallel, lambda seq, start: context.kv_cache_seq_rm(seq, start, -1))
        self._slots = Slots(model, context, self._vocab, self._cache, parallel=parallel, fault_seed=fault_seed)
        self._admission = Admission(n_ctx=info.n_ctx, parallel=parallel, max_queue=max_queue,
                                    running=lambda: self.running)
        self._batch = internals.LlamaBatch(n_tokens=BATCH_TOKENS, embd=0, n_seq_max=1, verbose=False)
        self._tuner = tuner
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

    def detokenize(self, tokens: list[int]) -> bytes:
        """The bytes `tokens` stand for (safe from any thread)."""
        return self._vocab.detokenize(tokens)

    def compile_grammar(self, grammar: str) -> CompiledGrammar:
        """Parse GBNF on the calling thread, never the engine's (safe from any thread); raises `GrammarRejected`."""
        return compile_grammar(self._vocab.pointer, grammar)

    def submit(self, job: Job) -> TokenStream:
        """Queue a job; returns its stream at once. Raises `QueueFull` when `--max-queue` are waiting."""
        return self._admission.submit(job)

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens served from the prefix cache since start."""
        return self._cache.reused_tokens

    @property
    def running(self) -> int:
        """Jobs holding a slot."""
        return self._slots.running

    @property
    def threads_in_use(self) -> int:
        """Threads the current decode steps use (fewer than configured while fewer run faster)."""
        return self._tuner.threads

    @property
    def queued(self) -> int:
        """Jobs waiting for a free slot."""
        return self._admission.queued

    def drain(self, grace_seconds: float, reason: str = "the server is shutting down") -> None:
        """Start no more jobs (waiting ones end with an error), let running ones finish for up to
        `grace_seconds`, then end those with an error too. Blocks until no job runs."""
        self._admission.drain(grace_seconds, reason)

    def close(self) -> None:
        """Stop the worker after the current step; running and queued jobs end as cancelled."""
        self._admission.close()
        self._worker.join(timeout=10)

    # ---- the worker thread -------------------------------------------------------------------

    def _work(self) -> None:
        while not self._admission.closing:
            try:
                self._admit()
                active = self._slots.active()
                if active:
                    self._step(active)
            except Exception as error:  # the worker must outlive any bug: fail the jobs, keep serving
                log.exception("engine step failed")
                for slot in self._slots.active():
                    self._slots.fail(slot, f"generation failed: {error}")
        for slot in self._slots.active():
            self._slots.end(slot, Finish(FinishReason.CANCELLED))
        self._admission.end_waiting(Finish(FinishReason.CANCELLED))

    def _admit(self) -> None:
        """Move waiting jobs into free slots; blocks while nothing at all is to be done."""
        if self._admission.draining:
            self._admission.refuse_waiting()
            if not self.running:
                time.sleep(0.02)  # nothing runs: idle politely until close() or new (refused) jobs
            return
        while free := self._slots.free():
            waiting = self._admission.next(block=len(free) == self.parallel)
            if waiting is None:
                return
            self._slots.start(free, *waiting)

    def _step(self, active: list[Slot]) -> None:
        for slot in active:
            if slot.stream.cancelled:
                self._slots.end(slot, Finish(FinishReason.CANCELLED))
            elif self._admission.abort_reason is not None:
                self._slots.end(slot, Finish(FinishReason.ERROR, self._admission.abort_reason, SHUTTING_DOWN))
        active = [slot for slot in active if slot.job is not None]
        batch = self._batch.batch
        batch.n_tokens = 0
        decoded: list[tuple[Slot, list[int]]] = []
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
                self._slots.fail(slot, f"decoding failed: {error}")
            return
        if not prefilling:  # steps with a prompt chunk take longer for reasons threads do not change
            self._tuner.record(batch.n_tokens, time.perf_counter() - started)
        for slot, tokens in decoded:
            self._cache.extend(slot.seq, tokens)
        for slot, _ in decoded:
            if slot.logits_at >= 0 and slot.job is not None:
                self._slots.sample(slot)


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
