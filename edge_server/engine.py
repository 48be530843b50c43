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
from llama_cpp import _internals as internals
from llama_cpp.llama_grammar import LlamaGrammar

log = logging.getLogger("edge_server.engine")

DEFAULT_N_CTX = 4096
PROMPT_CHUNK = 512  # prompt tokens decoded per step; cancellation is checked between chunks
PENALTY_WINDOW = 64  # tokens the repetition penalties look back over (llama.cpp's default)
SEQUENCE = 0  # the one sequence id; continuous batching gives each running request its own


class ModelLoadError(Exception):
    """The model file is missing, not a GGUF, or llama.cpp cannot load it."""


class QueueFull(Exception):
    """More requests are waiting than `--max-queue` allows."""


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
    grammar: str | None = None  # GBNF the output must match (forced tool calls, JSON output)


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


class TokenStream:
    """The consumer's side of one job: a thread-safe queue of `Token`s ending with one `Finish`."""

    def __init__(self) -> None:
        self._events: queue.SimpleQueue[Token | Finish] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self.submitted_at = time.monotonic()

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


class Engine:
    """Owns the llama.cpp model and context; runs queued jobs on its single worker thread."""

    def __init__(self, llama: llama_cpp.Llama, info: ModelInfo, *, max_queue: int):
        self._llama = llama
        self._ctx = llama._ctx
        self._vocab = llama._model.vocab
        self.info = info
        self._pending: queue.Queue[tuple[Job, TokenStream] | None] = queue.Queue(maxsize=max_queue + 1)
        self._max_queue = max_queue
        self._submit_lock = threading.Lock()
        self._cached: list[int] = []  # tokens whose KV entries the context holds, in order
        self._batch = internals.LlamaBatch(n_tokens=PROMPT_CHUNK, embd=0, n_seq_max=1, verbose=False)
        self._piece_buffer = ctypes.create_string_buffer(256)
        self.running = 0
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
        max_queue: int = 16,
    ) -> Engine:
        """Load a GGUF model and start the worker; raises `ModelLoadError` with a one-line reason."""
        path = Path(path)
        check_gguf_file(path)
        n_ctx_train = read_n_ctx_train(path)
        context = n_ctx or min(DEFAULT_N_CTX, n_ctx_train)
        backend = offload_backend()
        layers = (-1 if backend != "CPU" else 0) if n_gpu_layers == "auto" else int(n_gpu_layers)
        try:
            llama = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=context,
                n_batch=PROMPT_CHUNK,
                n_ubatch=PROMPT_CHUNK,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=layers,
                verbose=False,
            )
        except (ValueError, RuntimeError) as error:
            raise ModelLoadError(f"llama.cpp failed to load {path}: {error}") from None
        metadata = dict(llama.metadata)
        arch = metadata.get("general.architecture", "")
        n_layer = int(metadata.get(f"{arch}.block_count", "0") or 0)
        model = llama._model
        info = ModelInfo(
            path=path,
            n_ctx=llama.n_ctx(),
            n_ctx_train=n_ctx_train,
            n_vocab=llama.n_vocab(),
            n_layer=n_layer,
            backend=backend,
            gpu_layers=0 if backend == "CPU" else (n_layer + 1 if layers < 0 else min(layers, n_layer + 1)),
            threads=threads,
            chat_template=metadata.get("tokenizer.chat_template"),
            bos_token=_token_text(model, model.token_bos()),
            eos_token=_token_text(model, model.token_eos()),
            add_bos=bool(model.add_bos_token()),
            metadata=metadata,
        )
        return cls(llama, info, max_queue=max_queue)

    # ---- the HTTP threads' side --------------------------------------------------------------

    def tokenize(self, text: bytes, add_bos: bool, special: bool) -> list[int]:
        """Tokens of `text` (safe from any thread: the vocabulary is read-only)."""
        return self._llama._model.tokenize(text, add_bos, special)

    def grammar_error(self, grammar: str) -> str | None:
        """Why llama.cpp cannot use `grammar`, or None if it can (safe from any thread)."""
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        if not sampler:
            return "llama.cpp rejected the grammar built for this request"
        llama_cpp.llama_sampler_free(sampler)
        return None

    def submit(self, job: Job) -> TokenStream:
        """Queue a job; returns its stream at once. Raises `QueueFull` when `--max-queue` are waiting."""
        if not job.prompt or job.max_tokens < 1 or len(job.prompt) + job.max_tokens > self.info.n_ctx:
            raise ValueError("job does not fit the context")
        stream = TokenStream()
        with self._submit_lock:
            if self.queued >= self._max_queue and (self.running or self.queued):
                raise QueueFull
            try:
                self._pending.put_nowait((job, stream))
            except queue.Full:
                raise QueueFull from None
        return stream

    @property
    def queued(self) -> int:
        """Jobs waiting for the worker."""
        return self._pending.qsize()

    def close(self) -> None:
        """Stop the worker after the job it is running (queued jobs end as cancelled)."""
        while True:
            try:
                item = self._pending.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[1]._emit(Finish("cancelled"))
        self._pending.put(None)
        self._worker.join(timeout=10)

    # ---- the worker thread -------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            job, stream = item
            if stream.cancelled:
                stream._emit(Finish("cancelled"))
                continue
            self.running = 1
            try:
                stream._emit(self._generate(job, stream))
            except Exception as error:  # one failing job must not take the engine down
                log.exception("generation failed")
                self._forget_cache()
                stream._emit(Finish("error", f"generation failed: {error}"))
            finally:
                self.running = 0

    def _generate(self, job: Job, stream: TokenStream) -> Finish:
        self._evaluate_prompt(job.prompt, stream)
        if stream.cancelled:
            return Finish("cancelled")
        sampler = make_sampler(job.sampling, self._llama._model)
        try:
            for produced in range(1, job.max_tokens + 1):
                token = sampler.sample(self._ctx, -1)
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    return Finish("stop")
                stream._emit(Token(token, self._piece(token)))
                if produced == job.max_tokens:
                    return Finish("length")
                if stream.cancelled:
                    return Finish("cancelled")
                self._decode([token], len(self._cached))
            return Finish("length")
        finally:
            sampler.close()

    def _evaluate_prompt(self, prompt: list[int], stream: TokenStream) -> None:
        # Reuse the KV entries of the longest common prefix, but always decode at least one prompt
        # token so that fresh logits exist to sample the first answer token from.
        reuse = min(_common_prefix(self._cached, prompt), len(prompt) - 1)
        if not self._ctx.kv_cache_seq_rm(SEQUENCE, reuse, -1):
            self._forget_cache()
            reuse = 0
        del self._cached[reuse:]
        for start in range(reuse, len(prompt), PROMPT_CHUNK):
            if stream.cancelled:
                return
            self._decode(prompt[start : start + PROMPT_CHUNK], start)

    def _decode(self, tokens: list[int], position: int) -> None:
        batch = self._batch.batch
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = position + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = SEQUENCE
            batch.logits[i] = False
        batch.logits[len(tokens) - 1] = True
        try:
            self._ctx.decode(self._batch)
        except RuntimeError:
            self._forget_cache()
            raise
        self._cached.extend(tokens)

    def _forget_cache(self) -> None:
        self._ctx.kv_cache_clear()
        self._cached.clear()

    def _piece(self, token: int) -> bytes:
        size = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece_buffer, len(self._piece_buffer), 0, False)
        if size < 0:  # a piece longer than the buffer: grow it once and ask again
            self._piece_buffer = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece_buffer, -size, 0, False)
        return self._piece_buffer.raw[:size]


def make_sampler(sampling: Sampling, model: internals.LlamaModel) -> internals.LlamaSampler:
    """A llama.cpp sampler chain for one request, in llama-server's order."""
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
    if sampling.grammar is not None:
        sampler.add_grammar(model, LlamaGrammar.from_string(sampling.grammar, verbose=False))
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


def _token_text(model: Any, token: int) -> str:
    if token < 0:
        return ""
    return model.token_get_text(token)
