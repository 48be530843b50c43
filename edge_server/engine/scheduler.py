"""The engine's scheduler: one worker thread owns the llama.cpp context and decodes all running jobs together."""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any

import llama_cpp
from llama_cpp import _internals as internals

from edge_server.engine import fatal
from edge_server.engine.admission import Admission
from edge_server.engine.batching import BATCH_TOKENS, PROMPT_CHUNK, Propose, fill_batch
from edge_server.engine.imagebatch import fill_image_batch
from edge_server.engine.checkpoints import Checkpoints
from edge_server.engine.draftmodel import DraftModel
from edge_server.engine.partialmemory import PartialMemory
from edge_server.engine.prefixcache import PrefixCache
from edge_server.engine.sampler import CompiledGrammar, CompiledGrammars
from edge_server.engine.slots import Slot, Slots
from edge_server.engine.speculation import SpecConfig, propose_by_lookup
from edge_server.engine.threadtuner import ThreadTuner
from edge_server.engine.types import (BACKEND_FAILED, SHUTTING_DOWN, Finish, FinishReason, ImageChunk, ImageInput, Job,
                                      ModelInfo, PromptTooLong, TokenStream)
from edge_server.engine.vision import Vision
from edge_server.engine.vocab import Vocabulary

log = logging.getLogger("edge_server.engine")

NO_ROOM = 1  # llama_decode: no KV cells for the batch; nothing was decoded


class Engine:
    """Owns the llama.cpp model and context; its worker thread decodes all running jobs together.

    Each step decodes one token for every generating sequence plus chunks of pending prompts, oldest
    first: at most `PROMPT_CHUNK` prompt tokens while any sequence generates, up to the whole batch
    while none does (batched, chunked prefill). A new job evaluates only what no slot holds of its
    prompt: the longest prefix any slot holds is kept in place or copied (`PrefixCache.plan`).

    With `shared_pool` (`--kv-unified`) all sequences share one pool of `n_ctx` cells, which running
    jobs can fill. A step that finds no room first drops the cells idle slots keep for reuse; if
    that is not enough, the newest job ends: shortened (LENGTH) when it has answered, with the
    `kv_cache_full` error before its first token. The step is then tried again with the rest.

    With `partial_memory` (recurrent and hybrid models, a small sliding window) the prefix cache goes back to
    context checkpoints, at most `checkpoints_per_slot` per slot and `checkpoint_bytes` in all.
    """

    def __init__(self, model: internals.LlamaModel, context: internals.LlamaContext, info: ModelInfo, *,
                 parallel: int, max_queue: int, tuner: ThreadTuner, fault_seed: int | None = None,
                 shared_pool: bool = False, speculation: SpecConfig | None = None,
                 draft_model: DraftModel | None = None, partial_memory: PartialMemory | None = None,
                 checkpoints_per_slot: int = 8, checkpoint_bytes: int = 512 << 20, vision: Vision | None = None):
        self._ctx = context
        self._vision = vision  # the projector (--mmproj): prompts with images
        self.model = model  # for a second context on the same weights (engine/embedder.py)
        self._vocab = Vocabulary(model.vocab)
        self._grammars = CompiledGrammars(self._vocab.constraint_tokenizer)
        self.info = info
        self.parallel = parallel
        self.partial_memory = partial_memory
        checkpoints = None if partial_memory is None else Checkpoints(
            parallel, partial_memory.save, partial_memory.load, per_sequence=checkpoints_per_slot,
            max_bytes=checkpoint_bytes)
        self._cache = PrefixCache(parallel, lambda seq, start: context.kv_cache_seq_rm(seq, start, -1),
                                  functools.partial(copy_cells, context.memory), checkpoints=checkpoints,
                                  kept_in_place=partial_memory.kept_in_place if partial_memory else None)
        self.speculation = speculation
        self._propose: Propose | None = None
        if speculation and draft_model is not None:
            self._propose = functools.partial(draft_model.propose, history=self._history)
        elif speculation:
            self._propose = propose_by_lookup
        self.draft_model = draft_model  # held for as long as the engine
        self._slots = Slots(model, context, self._vocab, self._cache, parallel=parallel, fault_seed=fault_seed,
                            speculation=speculation, partial_memory=partial_memory)
        self._admission = Admission(n_ctx=info.n_ctx, parallel=parallel, max_queue=max_queue,
                                    running=lambda: self.running)
        self._batch = internals.LlamaBatch(n_tokens=BATCH_TOKENS, embd=0, n_seq_max=1, verbose=False)
        # An M-RoPE model's image rows take four positions each: llama.cpp's batch holds one per token allocated.
        self._image_batch = None if vision is None else internals.LlamaBatch(
            n_tokens=BATCH_TOKENS * (4 if vision.mrope else 1), embd=vision.n_embd, n_seq_max=1, verbose=False)
        self._tuner = tuner
        self._shared_pool = shared_pool
        # Monotonic start of the step running now (decode and sampling: with RPC devices llama_decode returns
        # before the workers answer, and reading the logits waits for them), for a watchdog to see a hang.
        self.step_since: float | None = None
        fatal.on_fatal(self._backend_failed)
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

    def tokenize_images(self, text: bytes, add_bos: bool, images: list[ImageInput], max_tokens: int | None = None,
                        *, encode: bool = True) -> tuple[list[int], tuple[ImageChunk, ...]]:
        """Tokens of `text` with `IMAGE_MARKER` where each image goes (image tokens as negative placeholders)
        and the images' embeddings, encoded for the calling thread (none without `encode`); `PromptTooLong` past
        `max_tokens`, `ImageRefused` for an image the projector cannot take. Only for a model with a projector
        (`info.vision`)."""
        if self._vision is None:
            raise ValueError("this model has no projector")
        return self._vision.tokenize(text, add_bos, images, max_tokens, encode=encode)

    def detokenize(self, tokens: list[int]) -> bytes:
        """The bytes `tokens` stand for (safe from any thread)."""
        return self._vocab.detokenize(tokens)

    def compile_grammar(self, grammar: str) -> CompiledGrammar:
        """Compile an llguidance grammar on the calling thread, never the engine's (safe from any thread); raises
        `GrammarRejected`."""
        return self._grammars.get(grammar)

    def submit(self, job: Job) -> TokenStream:
        """Queue a job; returns its stream at once. Raises `QueueFull` when `--max-queue` are waiting."""
        return self._admission.submit(job)

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens served from the prefix cache since start."""
        return self._cache.reused_tokens

    @property
    def checkpoints(self) -> Checkpoints | None:
        """The context checkpoints (None: the memory drops any suffix in place and needs none)."""
        return self._cache.checkpoints

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
        fatal.forget(self._backend_failed)
        self._admission.close()
        self._worker.join(timeout=10)
        if self._vision is not None and not self._worker.is_alive():
            self._vision.close()

    def _backend_failed(self, reason: str) -> None:
        # Called on another thread while the worker is stuck in llama.cpp (or about to abort): tell every
        # running and waiting request now; the process exits next.
        finish = Finish(FinishReason.ERROR, f"{reason}; the server exits to be restarted", BACKEND_FAILED)
        for slot in self._slots.active():
            if slot.stream is not None:
                slot.stream._emit(finish)
        self._admission.end_waiting(finish)

    # ---- the worker thread -------------------------------------------------------------------

    def _history(self, slot: Slot) -> list[int]:
        """What a generating slot's sequence is: the tokens its cells hold, then (decoded in the next step) any
        accepted drafts to decode again and its next token."""
        return [*self._cache.tokens(slot.seq), *slot.redo, slot.next_token]

    def _work(self) -> None:
        while not self._admission.closing:
            try:
                self._admit()
                active = self._slots.active()
                if active:
                    self.step_since = time.monotonic()
                    self._step(active)
            except Exception as error:  # the worker must outlive any bug: fail the jobs, keep serving
                log.exception("engine step failed")
                for slot in self._slots.active():
                    self._slots.fail(slot, f"generation failed: {error}")
            finally:
                self.step_since = None
                self._slots.send()
        for slot in self._slots.active():
            self._slots.end(slot, Finish(FinishReason.CANCELLED))
        self._slots.send()
        self._admission.end_waiting(Finish(FinishReason.CANCELLED))

    def _admit(self) -> None:
        """Move waiting jobs into free slots; blocks while nothing at all is to be done."""
        if self._admission.draining:
            self._admission.refuse_waiting()
            if not self.running:
                time.sleep(0.02)  # nothing runs: idle politely until close() or new (refused) jobs
            return
        self._slots.resume()  # before a freed slot that others wait for takes a new job
        while free := self._slots.free():
            self._slots.send()  # a job that failed to start hears of it before the worker waits
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
        self._slots.resume()
        batch = self._batch.batch
        generating = any(slot.next_token is not None for slot in active)
        decoded, prefilling = fill_batch(batch, active, self._cache, self._propose, self._vocab.ends_generation,
                                         self._slots.forced_tokens)
        # Image rows share the prompt chunk's bound, so that an image stalls running streams no longer than text.
        image_budget = (PROMPT_CHUNK if generating else BATCH_TOKENS) - batch.n_tokens + sum(
            1 + len(slot.draft) for slot in active if slot.next_token is not None)
        if batch.n_tokens and not self._decode(batch, decoded, prefilling):
            return
        if self._vision is not None:
            self._decode_image_rows(active, image_budget)

    def _decode(self, batch: Any, decoded: list[tuple[Slot, list[int]]], prefilling: bool) -> bool:
        """Decode the token batch and sample from it; False when nothing of it was decoded."""
        threads = self._tuner.next_step_threads()
        if threads != llama_cpp.llama_n_threads(self._ctx.ctx):
            llama_cpp.llama_set_n_threads(self._ctx.ctx, threads, threads)
        self._slots.keep_state_before_drafts(decoded)
        started = time.perf_counter()
        status = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if status == NO_ROOM and self._shared_pool:
            self._slots.make_room(decoded)  # nothing was decoded: free cells, try again next step
            return False
        if status != 0:
            log.error("decoding a batch failed: llama_decode returned %d", status)
            for slot, _ in decoded:
                self._slots.fail(slot, f"decoding failed: llama_decode returned {status}")
            return False
        if not prefilling:  # steps with a prompt chunk take longer for reasons threads do not change
            self._tuner.record(batch.n_tokens, time.perf_counter() - started)
        for slot, tokens in decoded:
            self._cache.extend(slot.seq, tokens)
            slot.redo = []
        for slot, _ in decoded:
            if slot.logits_at >= 0 and slot.job is not None:
                self._slots.sample(slot)
        return True

    def _decode_image_rows(self, active: list[Slot], budget: int) -> None:
        """Decode the next rows of one slot's image (after the token batch: its logits are read by then)."""
        active = [slot for slot in active if slot.job is not None]
        batch = self._image_batch.batch
        filled = fill_image_batch(batch, self._vision.n_embd, active, self._cache, budget)
        if filled is None:
            return
        slot, placeholders, whole = filled
        if whole:
            llama_cpp.llama_set_causal_attn(self._ctx.ctx, False)
        try:
            status = llama_cpp.llama_decode(self._ctx.ctx, batch)
        finally:
            if whole:
                llama_cpp.llama_set_causal_attn(self._ctx.ctx, True)
        if status != 0:
            log.error("decoding an image failed: llama_decode returned %d", status)
            self._slots.fail(slot, f"decoding an image failed: llama_decode returned {status}")
            return
        self._cache.extend(slot.seq, placeholders)
        if slot.logits_at >= 0:
            self._slots.sample(slot)


def copy_cells(memory: Any, source: int, destination: int) -> None:
    """Make sequence `destination` hold exactly the cells of sequence `source` (llama.cpp copies the
    whole stream between per-sequence streams, so the copy is always of all of them; in a unified
    pool the cells are shared, not copied)."""
    llama_cpp.llama_memory_seq_rm(memory, destination, -1, -1)
    llama_cpp.llama_memory_seq_cp(memory, source, destination, -1, -1)
