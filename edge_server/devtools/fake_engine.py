"""A fake engine for fast in-process tests of the HTTP API and the generation pipeline (no model)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edge_server.engine.types import (
    Finish,
    FinishReason,
    Job,
    ModelInfo,
    PromptTooLong,
    QueueFull,
    Token,
    TokenStream,
)


@dataclass
class FakeGrammar:
    """What `FakeEngine.compile_grammar` hands back: the grammar it was given."""

    text: str


@dataclass
class FakeEngine:
    """An `EngineClient` whose every job yields `pieces` (cut at `max_tokens`) and then `finish`.

    One token per byte of text; `queue_full` makes `submit` refuse; `error_code` goes with an ERROR finish.
    """

    pieces: Sequence[bytes] = (b"Hello", b",", b" world", b"!")
    finish: FinishReason = FinishReason.STOP
    error_code: str = "generation_failed"
    queue_full: bool = False
    chat_template: str | None = None  # the GGUF template the fake model carries
    n_ctx: int = 512
    parallel: int = 1
    jobs: list[Job] = field(default_factory=list)
    grammars: list[str] = field(default_factory=list)
    closed: bool = False

    def __post_init__(self) -> None:
        self.info = ModelInfo(
            path=Path(__file__), n_ctx=self.n_ctx, n_ctx_train=self.n_ctx, n_vocab=256, n_layer=1, backend="CPU",
            gpu_layers=0, threads=1, chat_template=self.chat_template, max_token_bytes=1, bos_token="", eos_token="<|im_end|>",
            add_bos=False, metadata={})

    running = 0
    queued = 0
    reused_tokens = 0
    threads_in_use = 1
    checkpoints = None  # its memory drops any suffix

    def tokenize(self, text: bytes, add_bos: bool, special: bool, max_tokens: int | None = None) -> list[int]:
        """One token per byte."""
        if max_tokens is not None and len(text) > max_tokens:
            raise PromptTooLong(len(text))
        return list(text)

    def detokenize(self, tokens: list[int]) -> bytes:
        """One byte per token."""
        return bytes(tokens)

    def compile_grammar(self, grammar: str) -> FakeGrammar:
        """Record the grammar."""
        self.grammars.append(grammar)
        return FakeGrammar(grammar)

    def submit(self, job: Job) -> TokenStream:
        """Answer at once with the scripted pieces and finish."""
        if self.queue_full:
            raise QueueFull
        self.jobs.append(job)
        stream = TokenStream()
        for index, piece in enumerate(self.pieces[: job.max_tokens]):
            stream._emit(Token(index, piece))
        if len(self.pieces) > job.max_tokens:
            stream._emit(Finish(FinishReason.LENGTH))
        elif self.finish is FinishReason.ERROR:
            stream._emit(Finish(FinishReason.ERROR, "scripted failure", self.error_code))
        else:
            stream._emit(Finish(self.finish))
        return stream

    def drain(self, grace_seconds: float, reason: str = "the server is shutting down") -> None:
        """Nothing runs between calls."""

    def close(self) -> None:
        """Remember that the server closed us."""
        self.closed = True
