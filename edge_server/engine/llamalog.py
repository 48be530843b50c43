"""llama.cpp's log into Python's logging (its warnings and errors as warnings, the rest at debug), and captured while a model
loads (what llama.cpp alone knows: which device got which layers and buffers)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import threading
from collections.abc import Iterator

import llama_cpp

log = logging.getLogger("llama.cpp")

GGML_LOG_LEVEL_WARN = 3
GGML_LOG_LEVEL_CONT = 5  # the rest of the previous message
# Warnings that say nothing is wrong: an M-RoPE image's tokens share one position, which a recurrent memory
# (Qwen3.5's) notes on every image batch.
_EXPECTED = ("find_slot: non-consecutive token position",)

_capture: list[str] | None = None
_capture_lock = threading.Lock()
_last_level = threading.local()


@llama_cpp.llama_log_callback
def _on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    message = text.decode("utf-8", errors="replace")
    if level == GGML_LOG_LEVEL_CONT:
        level = getattr(_last_level, "value", 0)
    _last_level.value = level
    captured = _capture
    if captured is not None:
        captured.append(message)
    if GGML_LOG_LEVEL_WARN <= level < GGML_LOG_LEVEL_CONT and not message.startswith(_EXPECTED):
        # Not ours to call errors: llama.cpp also says "error" of what it then handles (a pooling type it
        # overrides, a load that fails and is reported to the caller, who logs what it means).
        log.warning("%s", message.rstrip())
    elif log.isEnabledFor(logging.DEBUG):
        log.debug("%s", message.rstrip())


@functools.cache
def route_llama_log() -> None:
    """Send llama.cpp's log to Python's logging instead of llama-cpp-python's printer (once per process)."""
    llama_cpp.llama_log_set(_on_log, ctypes.c_void_p(0))


@functools.cache
def route_mtmd_log() -> None:
    """The same for llama.cpp's multimodal library (projectors: `engine/vision.py`), once per process."""
    from llama_cpp import mtmd_cpp

    mtmd_cpp.mtmd_log_set(_on_log, ctypes.c_void_p(0))


@contextlib.contextmanager
def captured_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log text while the block runs (one capture at a time: loads are serialized by it)."""
    global _capture
    route_llama_log()
    with _capture_lock:
        _capture = lines = []
        try:
            yield lines
        finally:
            _capture = None
