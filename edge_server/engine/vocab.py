"""The model's vocabulary: bounded tokenizing, token pieces, end-of-generation tokens."""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp

from edge_server.engine.types import PromptTooLong


class Vocabulary:
    """Read-only access to a loaded model's vocabulary (`tokenize` is safe from any thread)."""

    def __init__(self, vocab: Any):
        self.pointer = vocab
        self._piece_buffer = ctypes.create_string_buffer(256)  # the engine thread's only

    def tokenize(self, text: bytes, add_bos: bool, special: bool, max_tokens: int | None = None) -> list[int]:
        """Tokens of `text`; `PromptTooLong` past `max_tokens`.

        The output buffer holds `max_tokens`, not one token per byte: a 10 MB text refused for its
        length never becomes a list of millions of Python ints.
        """
        capacity = len(text) + 2 if max_tokens is None else max_tokens
        buffer = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(self.pointer, text, len(text), buffer, capacity, add_bos, special)
        if count < 0:
            raise PromptTooLong(-count)
        return buffer[:count]

    def detokenize(self, tokens: list[int]) -> bytes:
        """The bytes `tokens` stand for, special tokens written out (safe from any thread)."""
        array = (llama_cpp.llama_token * len(tokens))(*tokens)
        size = max(64, 8 * len(tokens))
        while True:
            buffer = ctypes.create_string_buffer(size)
            written = llama_cpp.llama_detokenize(self.pointer, array, len(tokens), buffer, size, False, True)
            if written >= 0:
                return buffer.raw[:written]
            size = -written  # too small: llama.cpp says how much it needs

    def piece(self, token: int) -> bytes:
        """The bytes `token` stands for (possibly part of a UTF-8 character); engine thread only."""
        size = llama_cpp.llama_token_to_piece(self.pointer, token, self._piece_buffer, len(self._piece_buffer), 0,
                                              False)
        if size < 0:  # a piece longer than the buffer: grow it once and ask again
            self._piece_buffer = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self.pointer, token, self._piece_buffer, -size, 0, False)
        return self._piece_buffer.raw[:size]

    def ends_generation(self, token: int) -> bool:
        """Whether `token` ends a turn (end of text, end of turn...)."""
        return llama_cpp.llama_vocab_is_eog(self.pointer, token)
