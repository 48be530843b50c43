"""The hardened waitress pieces alone: request parser, error envelope task, connection maintenance."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
from waitress.adjustments import Adjustments

from edge_server.http_server import HardenedRequestParser, JSONErrorTask, create_hardened_server
from edge_server.settings import Settings

LIMIT = 4096


def adjustments() -> Adjustments:
    return Adjustments(max_request_body_size=LIMIT + 1)


def parse(*pieces: bytes) -> HardenedRequestParser:
    """Feed `pieces` the way a channel does, one recv() at a time, until the request completes."""
    parser = HardenedRequestParser(adjustments())
    for piece in pieces:
        while piece and not parser.completed:
            piece = piece[parser.received(piece):]
    return parser


def test_content_length_with_chunked_is_a_400():
    parser = parse(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert parser.completed and parser.error.code == 400
    assert "Content-Length and Transfer-Encoding" in parser.error.body


def test_transfer_encoding_in_http_1_0_is_a_400():
    parser = parse(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert parser.completed and parser.error.code == 400


def test_announced_chunk_past_the_limit_is_a_413_before_its_data():
    parser = parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"FFFFFFFFFFFF\r\n")
    assert parser.completed and parser.error.code == 413


def test_chunks_adding_up_past_the_limit_are_a_413():
    half = b"%x\r\n" % (LIMIT // 2) + b"a" * (LIMIT // 2) + b"\r\n"
    parser = parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", half, half, b"1\r\n")
    assert parser.completed and parser.error.code == 413


def test_chunked_body_within_the_limit_is_accepted():
    parser = parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n")
    assert parser.completed and parser.error is None
    assert parser.get_body_stream().read() == b"hello" and parser.headers["CONTENT_LENGTH"] == "5"


def test_content_length_at_the_limit_is_accepted_and_above_it_refused_without_100_continue():
    at_limit = parse(b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % LIMIT)
    assert at_limit.error is None and not at_limit.completed
    above = parse(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % (LIMIT + 1))
    assert above.completed and above.error.code == 413 and not above.expect_continue


def test_parser_notes_when_its_request_began():
    before = time.monotonic()
    assert before <= parse(b"GET / HTTP/1.1\r\n").started_at <= time.monotonic()


class RecordingChannel:
    """Just enough of a waitress channel for a task to write its response into."""

    def __init__(self):
        self.adj = adjustments()
        self.server = SimpleNamespace(adj=self.adj)
        self.written = b""

    def write_soon(self, data: bytes) -> int:
        self.written += data
        return len(data)


@pytest.mark.parametrize(("request_bytes", "status", "message", "error_type"), [
    (b"POST / HTTP/1.1\r\nContent-Length: 99999\r\n\r\n", 413, f"Request body too large (limit {LIMIT} bytes).",
     "invalid_request_error"),
    (b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400, "Bad Request: Content-Length is invalid.",
     "invalid_request_error"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501,
     "Not Implemented: Transfer-Encoding requested is not supported.", "server_error"),
])
def test_waitress_errors_are_answered_with_the_envelope_and_close(request_bytes, status, message, error_type):
    channel = RecordingChannel()
    task = JSONErrorTask(channel, parse(request_bytes))
    task.service()
    head, _, body = channel.written.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status)
    assert b"Content-Type: application/json" in head and b"Connection: close" in head
    assert json.loads(body) == {"error": {"message": message, "type": error_type, "param": None, "code": None}}
    assert task.close_on_finish


def fake_channel(*, served_ago: float = 0.0, headers_pending_for: float | None = None,
                 body_pending_for: float | None = None, busy: bool = False):
    request = None
    if headers_pending_for is not None:
        request = SimpleNamespace(headers_finished=False, completed=False,
                                  started_at=time.monotonic() - headers_pending_for)
    if body_pending_for is not None:
        request = SimpleNamespace(headers_finished=True, completed=False, started_at=time.monotonic() - body_pending_for)
    return SimpleNamespace(requests=["running"] if busy else [], request=request, will_close=False,
                           last_request_at=time.time() - served_ago)


def test_maintenance_closes_idle_and_overdue_connections_only():
    server = create_hardened_server(lambda environ, start_response: [], Settings(port=0, header_timeout=2,
                                    idle_timeout=4), threads=1)
    try:
        channels = {
            "fresh": fake_channel(served_ago=1),
            "idle": fake_channel(served_ago=5),
            "headers on time": fake_channel(served_ago=5, headers_pending_for=1),
            "headers overdue": fake_channel(headers_pending_for=3),
            "body on time": fake_channel(served_ago=5, body_pending_for=3),
            "body overdue": fake_channel(body_pending_for=5),
            "answering a request": fake_channel(served_ago=5, headers_pending_for=3, busy=True),
        }
        server.active_channels.update(enumerate(channels.values()))
        server.maintenance(time.time())
        assert {name for name, channel in channels.items() if channel.will_close} == {
            "idle", "headers overdue", "body overdue"}
    finally:
        server.active_channels.clear()
        server.close()
        server.task_dispatcher.shutdown()
