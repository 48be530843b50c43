"""What the engine takes and gives: jobs, sampling settings, token streams, model facts, errors.

No llama.cpp import here: the HTTP side and a fake engine use these types freely.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_server.engine.protocol import CompiledGrammarHandle

BACKEND_FAILED = "backend_failed"  # error code: llama.cpp aborted (e.g. a lost RPC worker); the server exits
SHUTTING_DOWN = "shutting_down"  # error code: the server is stopping
ENGINE_STOPPED = "engine_stopped"  # error code: the engine closed under a running job
KV_CACHE_FULL = "kv_cache_full"  # error code: the shared KV pool (--kv-unified) had no room for the request
# Where an image goes in a rendered prompt: secret per process, so that no client text can pose as an image.
IMAGE_MARKER = f"<__image_{secrets.token_hex(8)}__>"


class FinishReason(str, Enum):
    """Why a generation ended, from the engine to the wire: the one vocabulary every layer uses.

    The engine ends jobs with STOP, LENGTH, CANCELLED or ERROR; the generation pipeline turns STOP
    into TOOL_CALLS or FUNCTION_CALL when calls were made. The wire carries only the first four.
    """

    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    FUNCTION_CALL = "function_call"
    CANCELLED = "cancelled"  # the client left, or the engine closed
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


class ModelLoadError(Exception):
    """The model file is missing, not a GGUF, or llama.cpp cannot load it."""


class QueueFull(Exception):
    """More requests are waiting than `--max-queue` allows."""


class RequestTooLarge(Exception):
    """A request's jobs outnumber what the slots and the queue can ever hold together (`limit`): retrying
    cannot help."""

    def __init__(self, limit: int):
        super().__init__(f"at most {limit} jobs can be held at once")
        self.limit = limit


class PromptTooLong(Exception):
    """A text has more tokens than the limit it was tokenized against."""

    def __init__(self, tokens: int, *, at_least: bool = False):
        super().__init__(f"{'at least ' if at_least else ''}{tokens} tokens")
        self.tokens = tokens
        self.at_least = at_least  # counted from the text's length, without tokenizing it


class ImageRefused(ValueError):
    """The projector cannot take an image (llama.cpp's preprocessing refused it)."""


class GrammarRejected(ValueError):
    """llguidance would not compile a grammar for this vocabulary."""


@dataclass(frozen=True)
class ReasoningBudget:
    """Close a thinking block after `tokens` tokens of reasoning by writing `close` (e.g. "\n</think>\n\n")
    instead of sampling. The block is open from the start when the prompt opened it (`opened`), else once
    the output's first token is `open`; any of `ends` (the close tag, a tool call's opening) ends it early."""

    tokens: int
    opened: bool
    open: int
    ends: tuple[int, ...]
    close: tuple[int, ...]


@dataclass(frozen=True)
class Sampling:
    """Per-request sampler settings (a temperature of 0, or below `sampler.GREEDY_BELOW`, is greedy)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    grammar: CompiledGrammarHandle | None = None  # what the output must match (forced tool calls, JSON output)
    logprobs: int | None = None  # report each token's log-probability and this many top alternatives
    reasoning_budget: ReasoningBudget | None = None  # most tokens of thinking before the block is closed


@dataclass(frozen=True)
class ImageInput:
    """A decoded, checked image: RGB pixels row by row, and a digest of them (what the prefix cache knows it by)."""

    rgb: bytes
    width: int
    height: int
    digest: str


@dataclass(frozen=True)
class ImageChunk:
    """An image's place in a job's prompt: from `at` on, the prompt holds `n_tokens` placeholder ids, one per image
    token (`engine/placeholders.py`); `embeddings` (n_tokens x n_embd float32) are what is decoded there (None in a
    prompt only counted)."""

    at: int
    n_tokens: int
    embeddings: Any
    digest: str
    mrope_width: int = 0  # an M-RoPE image: its width in tokens (rows and columns are positions); 0: positions in a row
    whole: bool = False  # the model attends to it non-causally: decoded in one batch, causal attention off


@dataclass(frozen=True)
class Job:
    """One generation: prompt tokens, a completion budget that fits the context, and sampling."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    speculative: bool = True  # verify drafted tokens too when the server speculates (--spec-type)
    group: int = 1  # jobs its request submits together (prompts x n): admitted only if all could ever be held
    images: tuple[ImageChunk, ...] = ()  # where the prompt holds images, in order


@dataclass(frozen=True)
class Token:
    """A generated token and its bytes (possibly part of a UTF-8 character)."""

    id: int
    piece: bytes
    logprob: float | None = None  # the model's log-probability of it (when the job asked)
    top: tuple[tuple[bytes, float], ...] = ()  # the likeliest tokens' pieces and log-probabilities


@dataclass(frozen=True)
class Finish:
    """The end of a stream: STOP (end of turn), LENGTH, CANCELLED or ERROR."""

    reason: FinishReason
    error: str | None = None
    code: str = "generation_failed"  # the error envelope's code when reason == "error"


class TokenStream:
    """The consumer's side of one job: a thread-safe queue of `Token`s ending with one `Finish`."""

    def __init__(self) -> None:
        self._events: queue.SimpleQueue[Token | Finish] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self.submitted_at = time.monotonic()
        self.reused_tokens = 0  # prompt tokens the prefix cache spared
        self.draft_tokens = 0  # tokens proposed by speculation and verified (engine thread writes, reader reads at end)
        self.draft_accepted = 0  # of those, the ones the model agreed with
        self.forced_tokens = 0  # tokens the grammar left no choice about, decoded with the token before them

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


@dataclass
class DeviceShare:
    """What one device holds of a loaded model."""

    name: str  # llama.cpp's device name: CPU, CUDA0, RPC0, ...
    endpoint: str | None = None  # host:port of an RPC worker
    layers: int = 0
    weights_mib: float = 0.0
    kv_mib: float = 0.0

    def as_dict(self) -> dict:
        """The wire form shown in /health and /v1/models."""
        return {"device": self.name, "endpoint": self.endpoint, "layers": self.layers,
                "weights_mib": round(self.weights_mib, 1), "kv_cache_mib": round(self.kv_mib, 1)}



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
    devices: tuple[DeviceShare, ...] = ()  # what each device holds (engine/rpc.py reads it from llama.cpp's log)
    vision: bool = False  # a projector (--mmproj) lets the model see images
