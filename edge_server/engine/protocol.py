"""What the HTTP side may ask of an engine: the real one (`scheduler.Engine`) or a fake one in tests."""

from __future__ import annotations

from typing import Protocol

from edge_server.engine.types import Job, ModelInfo, TokenStream


class CompiledGrammarHandle(Protocol):
    """A grammar parsed for this engine, handed over with a job (`Sampling.grammar`)."""


class EngineClient(Protocol):
    """The engine as routes and the generation pipeline see it; every method is safe from any thread."""

    info: ModelInfo
    parallel: int

    @property
    def running(self) -> int:
        """Jobs holding a slot."""

    @property
    def queued(self) -> int:
        """Jobs waiting for a slot."""

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens served from the prefix cache since start."""

    @property
    def threads_in_use(self) -> int:
        """Threads decoding uses now."""

    def tokenize(self, text: bytes, add_bos: bool, special: bool, max_tokens: int | None = None) -> list[int]:
        """Tokens of `text`; raises `PromptTooLong` past `max_tokens`."""

    def detokenize(self, tokens: list[int]) -> bytes:
        """The bytes `tokens` stand for (ids must be below `info.n_vocab`)."""

    def compile_grammar(self, grammar: str) -> CompiledGrammarHandle:
        """Compile an llguidance grammar for this vocabulary now, on the caller's thread; raises `GrammarRejected`."""

    def submit(self, job: Job) -> TokenStream:
        """Queue a job and return its stream; raises `QueueFull`."""

    def drain(self, grace_seconds: float, reason: str = "the server is shutting down") -> None:
        """Start no more jobs; let running ones finish within the grace period; then end them."""

    def close(self) -> None:
        """Stop; running and waiting jobs end as cancelled."""
