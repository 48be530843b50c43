"""When the backend can go no further (llama.cpp aborts, e.g. on a lost RPC worker, or a step hangs): no silent
death and no hang. Every handler runs once (running streams end with an error event, /health turns 503), then
the process exits with `EXIT_BACKEND_FAILED` for its supervisor to restart it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import threading
from collections.abc import Callable

log = logging.getLogger("edge_server.engine")

EXIT_BACKEND_FAILED = 3  # llama.cpp aborted or a decoding step hung: restart the server (systemd Restart=on-failure)

_handlers: list[Callable[[str], None]] = []
_final: list[Callable[[str], None]] = []  # after the others: e.g. waiting for the HTTP threads to send what they were told
_lock = threading.Lock()
_failed = threading.Event()


def on_fatal(handler: Callable[[str], None], *, last: bool = False) -> None:
    """Call `handler(reason)` when the backend fails, before the process exits (in the order added; those added
    with `last` after all others)."""
    with _lock:
        (_final if last else _handlers).append(handler)


def forget(handler: Callable[[str], None]) -> None:
    """Stop calling `handler` (an engine that was closed)."""
    with _lock:
        if handler in _handlers:
            _handlers.remove(handler)


def fail(reason: str) -> None:
    """The backend failed: run every handler once, then end the process with `EXIT_BACKEND_FAILED`."""
    if _failed.is_set():
        threading.Event().wait()  # another thread is already ending the process: block, never return into llama.cpp
    _failed.set()
    log.critical("the backend failed: %s; ending running requests with an error and exiting (status %d)",
                 reason, EXIT_BACKEND_FAILED)
    with _lock:
        handlers = [*_handlers, *_final]
    for handler in handlers:
        try:
            handler(reason)
        except Exception:  # one handler's bug must not keep the others from running
            log.exception("a backend-failure handler failed")
    logging.shutdown()
    os._exit(EXIT_BACKEND_FAILED)


_SOURCE_LINE = re.compile(r"^\S+:\d+: ")
_ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)


@_ABORT_CALLBACK
def _on_abort(message: bytes | None) -> None:
    # ggml calls this from whichever thread hit GGML_ABORT (for a lost RPC worker, its dispatcher thread) and
    # would call abort() after it returns: `fail` exits the process itself first.
    text = (message or b"").decode("utf-8", errors="replace").strip()
    log.critical("llama.cpp aborted: %s", text)
    fail("llama.cpp aborted: " + _SOURCE_LINE.sub("", text))  # clients get the message, not the source line


@functools.cache
def catch_aborts() -> None:
    """Route llama.cpp's aborts (GGML_ABORT, failed GGML_ASSERTs) through `fail` (once per process)."""
    from edge_server.engine.rpc import ggml_library

    base = ggml_library("ggml-base")
    base.ggml_set_abort_callback.argtypes = [_ABORT_CALLBACK]
    base.ggml_set_abort_callback.restype = ctypes.c_void_p
    base.ggml_set_abort_callback(_on_abort)
