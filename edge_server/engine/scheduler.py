"""The only module that imports `llama_cpp`: loads the model; one worker thread owns the context."""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import numpy as np
from llama_cpp import _internals as internals
from llama_cpp._logger import set_verbose as set_llama_log_verbosity

from edge_server.engine.threadtuner import ThreadTuner

log = logging.getLogger("edge_server.engine")

DEFAULT_N_CTX = 4096
BATCH_TOKENS = 512  # most tokens one decode step takes (llama.cpp's n_batch)
PROMPT_CHUNK = 256  # prompt tokens per step: bounds how long a new prompt stalls running streams
SHUTTING_DOWN = "shutting_down"
PENALTY_WINDOW = 64  # tokens the repetition penalties look back over (llama.cpp's default)


class ModelLoadError(Exception):
    """The model file is missing, not a GGUF, or llama.cpp cannot load it."""


class QueueFull(Exception):
    """More requests are waiting than `--max-queue` allows."""


class PromptTooLong(Exception):
    """A text has more tokens than the limit it was tokenized against."""

    def __init__(self, tokens: int):
        super().__init__(f"{tokens} tokens")
        self.tokens = tokens


class GrammarRejected(ValueError):
    """llama.cpp refused to parse a grammar."""


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


@dataclass(frozen=True)
class Sampling:
    """Per-request sampler settings (temperature 0 = greedy)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    grammar: CompiledGrammar | None = None  # what the output must match (forced tool calls, JSON output)


@dataclass(frozen=True)
class Job:
    """One generation: prompt tokens, a completion budget that fits the context, and sampling."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling


@dataclass(frozen=True)
class Token:
    """A generated token and its bytes (possibly part of a UTF-8 character)."""

    id: int
    piece: bytes


@dataclass(frozen=True)
class Finish:
    """The end of a stream: `stop` (end of turn), `length`, `cancelled` or `error`."""

    reason: str
    error: str | None = None
    code: str = "generation_failed"  # the error envelope's code when reason == "error"


class TokenStream:
    """The consumer's side of one job: a thread-safe queue of `Token`s ending with one `Finish`."""

    def __init__(self) -> None:
        self._events: queue.SimpleQueue[Token | Finish] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self.submitted_at = time.monotonic()
        self.reused_tokens = 0  # prompt tokens the prefix cache spared

    def next(self, timeout: float | None = None) -> Token | Finish | None:
        """The next event, or None if nothing arrived within `timeout` seconds."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def cancel(self) -> None:
        """Ask the engine to drop this job before its next decode step (idempotent)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        """Whether `cancel()` was called."""
        return self._cancelled.is_set()

    def _emit(self, event: Token | Finish) -> None:
        self._events.put(event)


@dataclass(frozen=True)
class ModelInfo:
    """What the loaded model and its context are, for logs, /health and /v1/models."""

    path: Path
    n_ctx: int
    n_ctx_train: int
    n_vocab: int
    n_layer: int
    backend: str
    gpu_layers: int
    threads: int
    chat_template: str | None
    max_token_bytes: int  # the longest token's text: no n bytes of text are fewer than n / this tokens
    bos_token: str
    eos_token: str
    add_bos: bool
    metadata: dict[str, str]


def read_n_ctx_train(path: Path) -> int:
    """The model's training context from its GGUF metadata, read without loading the weights."""
    try:
        fields = gguf.GGUFReader(path).fields
        arch = fields["general.architecture"].contents()
        return int(fields[f"{arch}.context_length"].contents())
    except (KeyError, ValueError, OSError) as error:
        raise ModelLoadError(f"{path} has no usable GGUF metadata ({error})") from None


def offload_backend() -> str:
    """Name of the GPU backend this llama-cpp-python build offloads to, or 'CPU'."""
    if not llama_cpp.llama_supports_gpu_offload():
        return "CPU"
    info = llama_cpp.llama_print_system_info().decode(errors="replace").upper()
    for name in ("CUDA", "METAL", "VULKAN", "HIP", "SYCL"):
        if name in info:
            return name.title() if name == "METAL" else name
    return "GPU"


@dataclass
class _Slot:
    """One sequence of the shared context: the job it runs and the tokens its KV cells hold."""

    seq: int
    cached: list[int] = field(default_factory=list)  # tokens decoded into this sequence, in order
    job: Job | None = None
    stream: TokenStream | None = None
    sampler: internals.LlamaSampler | None = None
    grammar: Any = None  # llama.cpp grammar sampler pointer, owned by the slot while its job runs
    pending_prompt: list[int] = field(default_factory=list)  # prompt tokens not decoded yet
    next_token: int | None = None  # sampled, emitted, and to be decoded in the next step
    produced: int = 0
    logits_at: int = -1  # index of this slot's logits in the current batch, -1 if none
    last_used: float = 0.0


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
        self._vocab = model.vocab
        self.info = info
        self.parallel = parallel
        self._slots = [_Slot(seq) for seq in range(parallel)]
        self._pending: queue.Queue[tuple[Job, TokenStream] | None] = queue.Queue()
        self._max_queue = max_queue
        # Fault injection for the reliability tests: a job with this seed fails on its third token.
        self._fault_seed = fault_seed
        self._submit_lock = threading.Lock()
        self._batch = internals.LlamaBatch(n_tokens=BATCH_TOKENS, embd=0, n_seq_max=1, verbose=False)
        self._piece_buffer = ctypes.create_string_buffer(256)
        self._candidates = _Candidates(context, model.n_vocab())
        self._tuner = tuner
        self._closing = False
        self._draining = False  # shutting down: no new jobs start
        self._abort_reason: str | None = None  # set: running jobs end with this error at the next step
        self.reused_tokens = 0  # prompt tokens served from the prefix cache, since start
        self._worker = threading.Thread(target=self._work, name="edge-engine", daemon=True)
        self._worker.start()

    # ---- loading -----------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        n_ctx: int | None = None,
        n_gpu_layers: int | str = "auto",
        threads: int,
        parallel: int = 1,
        max_queue: int = 16,
        flash_attn: str = "auto",
        adapt_threads: bool = True,
        fault_seed: int | None = None,
    ) -> Engine:
        """Load a GGUF model and start the worker; raises `ModelLoadError` with a one-line reason.

        `n_ctx` is the limit of one request; the KV cache holds `parallel` such sequences.
        """
        path = Path(path)
        check_gguf_file(path)
        n_ctx_train = read_n_ctx_train(path)
        per_request = n_ctx or min(DEFAULT_N_CTX, n_ctx_train)
        backend = offload_backend()
        layers = (-1 if backend != "CPU" else 0) if n_gpu_layers == "auto" else int(n_gpu_layers)
        _init_backend()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0x7FFFFFFF if layers < 0 else layers
        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx = per_request * parallel
        context_params.n_seq_max = parallel
        context_params.kv_unified = False  # each sequence gets its own n_ctx cells: none is ever shrunk
        context_params.n_batch = context_params.n_ubatch = BATCH_TOKENS
        context_params.n_threads = context_params.n_threads_batch = threads
        context_params.no_perf = True
        context_params.flash_attn_type = {
            "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
            "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[flash_attn]
        try:
            model = internals.LlamaModel(path_model=str(path), params=model_params, verbose=False)
            context = internals.LlamaContext(model=model, params=context_params, verbose=False)
        except (ValueError, RuntimeError) as error:
            raise ModelLoadError(f"llama.cpp failed to load {path}: {error}") from None
        metadata = model.metadata()
        arch = metadata.get("general.architecture", "")
        n_layer = int(metadata.get(f"{arch}.block_count", "0") or 0)
        info = ModelInfo(
            path=path,
            n_ctx=per_request,
            n_ctx_train=n_ctx_train,
            n_vocab=model.n_vocab(),
            n_layer=n_layer,
            backend=backend,
            gpu_layers=0 if backend == "CPU" else (n_layer + 1 if layers < 0 else min(layers, n_layer + 1)),
            threads=threads,
            chat_template=metadata.get("tokenizer.chat_template"),
            max_token_bytes=_longest_token_bytes(model),
            bos_token=_token_text(model, model.token_bos()),
            eos_token=_token_text(model, model.token_eos()),
            add_bos=bool(model.add_bos_token()),
            metadata=metadata,
        )
        return cls(model, context, info, parallel=parallel, max_queue=max_queue,
                   tuner=ThreadTuner(threads, adaptive=adapt_threads), fault_seed=fault_seed)

    # ---- the HTTP threads' side --------------------------------------------------------------

    def tokenize(self, text: bytes, add_bos: bool, special: bool, max_tokens: int | None = None) -> list[int]:
        """Tokens of `text`; `PromptTooLong` past `max_tokens` (safe from any thread: the vocabulary is read-only).

        The output buffer holds `max_tokens`, not one token per byte: a 10 MB text refused for its
        length never becomes a list of millions of Python ints.
        """
        capacity = len(text) + 2 if max_tokens is None else max_tokens
        buffer = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(self._vocab, text, len(text), buffer, capacity, add_bos, special)
        if count < 0:
            raise PromptTooLong(-count)
        return buffer[:count]

    def compile_grammar(self, grammar: str) -> CompiledGrammar:
        """Parse GBNF on the calling thread (safe from any thread); raises `GrammarRejected`."""
        pointer = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        if not pointer:
            raise GrammarRejected("llama.cpp rejected the grammar built for this request")
        return CompiledGrammar(pointer)

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
                        self._end(slot, Finish("error", f"generation failed: {error}"))
        for slot in self._slots:
            if slot.job is not None:
                self._end(slot, Finish("cancelled"))
        self._end_waiting(Finish("cancelled"))

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
                stream._emit(Finish("cancelled"))
                continue
            slot = max(free, key=lambda s: (_common_prefix(s.cached, job.prompt), -s.last_used))
            try:
                self._start(slot, job, stream)
            except Exception as error:  # e.g. a sampler llama.cpp refuses: only this job fails
                log.exception("starting a job failed")
                slot.job = None
                self._forget(slot)
                stream._emit(Finish("error", f"generation failed: {error}"))

    def _refuse_waiting(self, reason: str) -> None:
        self._end_waiting(Finish("error", reason, SHUTTING_DOWN))
        if not any(slot.job for slot in self._slots):
            time.sleep(0.02)  # nothing runs: idle politely until close() or new (refused) jobs

    def _start(self, slot: _Slot, job: Job, stream: TokenStream) -> None:
        # Keep the longest common prefix in the KV cells, but always decode at least one prompt
        # token so that fresh logits exist to sample the first answer token from.
        reuse = min(_common_prefix(slot.cached, job.prompt), len(job.prompt) - 1)
        if not self._ctx.kv_cache_seq_rm(slot.seq, reuse, -1):
            self._ctx.kv_cache_seq_rm(slot.seq, 0, -1)
            reuse = 0
        del slot.cached[reuse:]
        self.reused_tokens += reuse
        stream.reused_tokens = reuse
        slot.job, slot.stream, slot.produced, slot.next_token = job, stream, 0, None
        slot.pending_prompt = job.prompt[reuse:]
        slot.sampler = make_sampler(job.sampling, self._model)
        slot.grammar = job.sampling.grammar.take() if job.sampling.grammar is not None else None

    def _step(self, active: list[_Slot]) -> None:
        for slot in active:
            if slot.stream.cancelled:
                self._end(slot, Finish("cancelled"))
            elif self._abort_reason is not None:
                self._end(slot, Finish("error", self._abort_reason, SHUTTING_DOWN))
        active = [slot for slot in active if slot.job is not None]
        batch = self._batch.batch
        batch.n_tokens = 0
        decoded: list[tuple[_Slot, list[int]]] = []
        for slot in active:
            slot.logits_at = -1
            if slot.next_token is not None:
                slot.logits_at = self._add(batch, [slot.next_token], len(slot.cached), slot.seq, logits=True)
                decoded.append((slot, [slot.next_token]))
        budget = min(PROMPT_CHUNK, BATCH_TOKENS - batch.n_tokens)
        prefilling = False
        # One prompt chunk per step, oldest job first, so running streams keep flowing.
        for slot in sorted(active, key=lambda s: s.stream.submitted_at):
            if slot.pending_prompt and budget > 0:
                chunk, slot.pending_prompt = slot.pending_prompt[:budget], slot.pending_prompt[budget:]
                last = self._add(batch, chunk, len(slot.cached), slot.seq, logits=not slot.pending_prompt)
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
                self._end(slot, Finish("error", f"decoding failed: {error}"))
            return
        if not prefilling:  # steps with a prompt chunk take longer for reasons threads do not change
            self._tuner.record(batch.n_tokens, time.perf_counter() - started)
        for slot, tokens in decoded:
            slot.cached.extend(tokens)
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
                token = self._candidates.sample_constrained(slot.sampler.sampler, slot.grammar, slot.logits_at)
        except Exception as error:  # a failing sampler ends its own job only
            log.exception("sampling failed")
            self._end(slot, Finish("error", f"sampling failed: {error}"))
            return
        slot.next_token = None
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._end(slot, Finish("stop"))
            return
        slot.produced += 1
        slot.stream._emit(Token(token, self._piece(token)))
        if slot.produced >= slot.job.max_tokens:
            self._end(slot, Finish("length"))
        else:
            slot.next_token = token

    def _end(self, slot: _Slot, finish: Finish) -> None:
        stream, sampler, grammar = slot.stream, slot.sampler, slot.grammar
        slot.job = slot.stream = slot.sampler = slot.grammar = None
        slot.next_token = None
        slot.pending_prompt = []
        slot.last_used = time.monotonic()
        if sampler is not None:
            sampler.close()
        if grammar is not None:
            llama_cpp.llama_sampler_free(grammar)
        # Free the slot before telling the client: whoever reads the answer then sees the engine idle.
        stream._emit(finish)

    def _forget(self, slot: _Slot) -> None:
        self._ctx.kv_cache_seq_rm(slot.seq, 0, -1)
        slot.cached.clear()

    @staticmethod
    def _add(batch: Any, tokens: list[int], position: int, seq: int, *, logits: bool) -> int:
        """Append `tokens` of sequence `seq` to the batch; return the index of the last one."""
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

    def _piece(self, token: int) -> bytes:
        size = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece_buffer, len(self._piece_buffer), 0, False)
        if size < 0:  # a piece longer than the buffer: grow it once and ask again
            self._piece_buffer = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece_buffer, -size, 0, False)
        return self._piece_buffer.raw[:size]


class _Candidates:
    """The whole vocabulary as llama.cpp candidates, refilled from one batch position's logits."""

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

    def sample_constrained(self, chain: Any, grammar: Any, index: int) -> int:
        """Sample with `chain`, constrained by `grammar`, and let both accept the token.

        As llama.cpp's own common sampler does: sample freely, then check only the chosen token
        against the grammar; the grammar pass over the whole vocabulary (its cost grows with
        vocabulary size times open alternatives) runs only when that token is refused. Sampling
        from what the grammar allows gives the same distribution either way.
        """
        self._fill(index)
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(self._array))
        token = self._array.data[self._array.selected].id
        self._one.id, self._one.logit, self._one.p = token, 1.0, 0.0
        self._one_array.size, self._one_array.selected = 1, -1
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(self._one_array))
        if self._one.logit == float("-inf"):
            self._fill(index)
            llama_cpp.llama_sampler_apply(grammar, ctypes.byref(self._array))
            llama_cpp.llama_sampler_apply(chain, ctypes.byref(self._array))
            token = self._array.data[self._array.selected].id
        llama_cpp.llama_sampler_accept(grammar, token)
        llama_cpp.llama_sampler_accept(chain, token)
        return token

    def _fill(self, index: int) -> None:
        logits = llama_cpp.llama_get_logits_ith(self._ctx, index)
        self._data["id"] = self._ids
        self._data["logit"] = np.ctypeslib.as_array(logits, shape=(self._n_vocab,))
        self._data["p"] = 0.0
        self._array.data, self._array.size, self._array.selected, self._array.sorted = (
            self._pointer, self._n_vocab, -1, False)


_backend_ready = threading.Lock()
_backend_initialised = False


def _init_backend() -> None:
    global _backend_initialised
    with _backend_ready:
        if not _backend_initialised:
            set_llama_log_verbosity(False)
            llama_cpp.llama_backend_init()
            _backend_initialised = True


def make_sampler(sampling: Sampling, model: internals.LlamaModel) -> internals.LlamaSampler:
    """A llama.cpp sampler chain for one request, in llama-server's order (the grammar is kept apart)."""
    n_vocab = model.n_vocab()
    sampler = internals.LlamaSampler()
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
    if sampling.temperature == 0.0:
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


def check_gguf_file(path: Path) -> None:
    """Raise `ModelLoadError` unless `path` is a readable file that starts like a GGUF."""
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (it starts with {magic!r}, expected b'GGUF')")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _longest_token_bytes(model: internals.LlamaModel) -> int:
    buffer = ctypes.create_string_buffer(1024)
    longest = 1
    for token in range(model.n_vocab()):
        size = llama_cpp.llama_token_to_piece(model.vocab, token, buffer, len(buffer), 0, True)
        longest = max(longest, abs(size))  # negative: the piece is longer than the buffer, by that size
    return longest


def _token_text(model: Any, token: int) -> str:
    if token < 0:
        return ""
    return model.token_get_text(token)
