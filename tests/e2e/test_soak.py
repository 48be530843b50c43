"""The soak in its short CI form: mixed clients for a while, every promise kept (`make soak` runs 90 s)."""

from __future__ import annotations

from edge_server.devtools.soak import soak


def test_mixed_load_keeps_every_promise(start_server, tiny_model):
    server = start_server("--model", str(tiny_model), "--log-level", "warning")
    figures = soak(server.base_url, server.process.pid, seconds=12, clients=16)
    print(figures)
    assert figures["failures"] == []
    assert figures["server_errors"] == 0
    assert figures["requests"] > 200 and figures["kinds"]["sample"] > 20
    assert figures["health_after"] == {"running": 0, "queued": 0}
