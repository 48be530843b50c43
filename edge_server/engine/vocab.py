"""The model's vocabulary: bounded tokenizing, token pieces, end-of-generation tokens."""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import llama_cpp
import llguidance

from edge_server.engine.types import PromptTooLong


class Vocabulary:
    """Read-only access to a loaded model's vocabulary (`tokenize` is safe from any thread)."""

    def __init__(self, vocab: Any):
        self.pointer = vocab
        self._piece_buffer = ctypes.create_string_buffer(256)  # the engine thread's only
        self._tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()

    def constraint_tokenizer(self) -> Any:
        """llguidance's view of this vocabulary (built once, on first use: about 1 s for 150k tokens; any thread).

        Control tokens (and added ones written like `<tag>`) are special: no grammar text, a JSON string
        included, can hold them. Every end-of-generation token ends a complete grammar.
        """
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = self._built_tokenizer()
            return self._tokenizer

    def _built_tokenizer(self) -> Any:
        count = llama_cpp.llama_vocab_n_tokens(self.pointer)
        buffer = ctypes.create_string_buffer(16 * 1024)
        pieces, ends = [], []
        for token in range(count):
            size = llama_cpp.llama_token_to_piece(self.pointer, token, buffer, len(buffer), 0, True)
            piece = buffer.raw[:max(size, 0)]
            attributes = llama_cpp.llama_vocab_get_attr(self.pointer, token)
            if attributes & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL or (
                    attributes & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED and piece.startswith(b"<")
                    and piece.endswith(b">")):
                piece = b"\xff" + piece  # llguidance's mark of a special token
            pieces.append(piece)
            if llama_cpp.llama_vocab_is_eog(self.pointer, token):
                ends.append(token)
        tokenize = ctypes.cast(llama_cpp.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
        return llguidance.LLTokenizer.from_llamacpp(tokens=pieces, vocab_ptr=self.pointer, tokenize_fptr=tokenize,
                                                    eos_token=ends or llama_cpp.llama_vocab_eos(self.pointer),
                                                    slices=None)

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
