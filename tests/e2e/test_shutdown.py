"""SIGTERM / Ctrl-C: stop accepting, let open streams end with a final event, exit 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
import requests


def open_stream(base_url: str, max_tokens: int, events: list, ready: threading.Event) -> None:
    body = {"messages": [{"role": "user", "content": "Go on"}], "stream": True, "max_tokens": max_tokens,
            "temperature": 0}
    with requests.post(base_url + "/v1/chat/completions", json=body, stream=True, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith(b"data: "):
                events.append(line[6:].decode())
                ready.set()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stream_that_finishes_within_the_grace_period_completes_and_exit_is_0(start_server, slow_model, signum):
    server = start_server("--model", str(slow_model), "--shutdown-grace", "20")
    events: list[str] = []
    ready = threading.Event()
    reader = threading.Thread(target=open_stream, args=(server.base_url, 150, events, ready))
    reader.start()
    assert ready.wait(30)
    server.process.send_signal(signum)
    time.sleep(0.3)
    with pytest.raises(requests.ConnectionError):  # no new connections once shutting down
        requests.get(server.base_url + "/health", timeout=2)
    reader.join(60)
    assert server.process.wait(timeout=30) == 0
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def test_stream_cut_by_the_grace_period_ends_with_an_error_event(start_server, slow_model):
    server = start_server("--model", str(slow_model), "--shutdown-grace", "0.5")
    events: list[str] = []
    ready = threading.Event()
    reader = threading.Thread(target=open_stream, args=(server.base_url, 3500, events, ready))
    reader.start()
    assert ready.wait(30)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    reader.join(30)
    assert server.process.wait(timeout=30) == 0
    assert time.monotonic() - started < 10
    final = json.loads(events[-1])
    assert final["error"]["code"] == "shutting_down"
    assert "stopped" in server.log()
