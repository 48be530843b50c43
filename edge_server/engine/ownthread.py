"""llama.cpp computations asked for by an HTTP thread run on a thread of their own that ends with them.

llama.cpp's CPU backend gives every thread that computes a team of OpenMP threads for as long as that thread
lives. Teams kept by long-lived HTTP threads (an image encoded, an embedding computed) slowed every later decode on
the engine's thread by 1.4-1.8x on 2 cores (a token in 48 ms instead of 28): a thread that ends takes its team along.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def on_own_thread(function: Callable[..., T], *args: object) -> T:
    """`function(*args)` run on a new thread, waited for; its exception is raised here."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, function(*args)))
        except BaseException as error:  # handed to the caller
            outcome.append((False, error))

    thread = threading.Thread(target=run, name="edge-compute")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
