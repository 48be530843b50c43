"""Computations asked for by HTTP threads run on a thread that ends with them (`engine/ownthread.py`)."""

from __future__ import annotations

import threading

import pytest

from edge_server.engine.ownthread import on_own_thread


def test_the_function_runs_on_a_thread_of_its_own_that_is_gone_afterwards():
    seen = []

    def where(x):
        seen.append(threading.current_thread())
        return x * 2

    assert on_own_thread(where, 21) == 42
    assert seen[0] is not threading.current_thread() and seen[0].name == "edge-compute"
    assert not seen[0].is_alive()


def test_its_exception_reaches_the_caller():
    def fails():
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        on_own_thread(fails)
