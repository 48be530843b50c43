"""Slow, idle and malformed connections must not starve the server or smuggle requests past it."""

from __future__ import annotations

import json
import select
import socket
import statistics
import threading
import time

import pytest
import requests

HEADER_TIMEOUT = 2.0
IDLE_TIMEOUT = 4.0
MAX_BODY_BYTES = 4096
CLOSE_SLACK = 1.5  # the server's maintenance runs once a second
SLOW_CLIENTS = 200
IDLE_CLIENTS = 150
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}


@pytest.fixture(scope="module")
def hostile_server(start_server, tiny_model):
    """A server with short header and idle timeouts and a small body limit."""
    return start_server("--model", str(tiny_model), "--header-timeout", str(HEADER_TIMEOUT),
                        "--idle-timeout", str(IDLE_TIMEOUT), "--max-body-bytes", str(MAX_BODY_BYTES))


def connect(server, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def read_response(sock: socket.socket, within: float) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response (status, lower-cased headers, body) that must fully arrive within `within` seconds."""
    deadline = time.monotonic() + within
    data = b""

    def more() -> bytes:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a full response arrived: {data!r}"
        return chunk

    while b"\r\n\r\n" not in data:
        data += more()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in header_lines)}
    while len(body) < int(headers.get("content-length", "0")):
        body += more()
    return int(status_line.split()[1]), headers, body


def closed_by_server(sock: socket.socket, within: float, trickle: bytes = b"") -> bool:
    """Whether the server closes `sock` within `within` seconds; `trickle` is sent every half second meanwhile."""
    deadline = time.monotonic() + within
    while True:
        readable, _, _ = select.select([sock], [], [], max(0.0, min(0.5, deadline - time.monotonic())))
        try:
            if readable:
                return sock.recv(65536) == b""
            if time.monotonic() >= deadline:
                return False
            if trickle:
                sock.send(trickle)
        except (ConnectionResetError, BrokenPipeError):
            return True


def assert_envelope(status: int, headers: dict[str, str], body: bytes, expected_status: int) -> dict:
    assert status == expected_status, body
    assert headers["content-type"].startswith("application/json")
    assert headers.get("connection", "").lower() == "close"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return error


def test_slow_header_senders_do_not_starve_health_or_chat(start_server, tiny_model):
    server = start_server("--model", str(tiny_model))
    slow = [connect(server) for _ in range(SLOW_CLIENTS)]
    stop = threading.Event()

    def trickle_one_byte_a_second() -> None:
        while not stop.wait(1.0):
            for sock in slow:
                try:
                    sock.send(b"a")
                except OSError:
                    pass

    latencies: list[float] = []
    trickler = threading.Thread(target=trickle_one_byte_a_second, daemon=True)
    try:
        for sock in slow:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: slow\r\nX-Slow: ")
        trickler.start()
        window_ends = time.monotonic() + 4.0
        chat = requests.post(server.base_url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert chat.status_code == 200, chat.text
        while time.monotonic() < window_ends:
            started = time.monotonic()
            health = requests.get(server.base_url + "/health", timeout=1)
            latencies.append(time.monotonic() - started)
            assert health.status_code == 200
            time.sleep(0.1)
    finally:
        stop.set()
        if trickler.is_alive():
            trickler.join()
        for sock in slow:
            sock.close()
    print(f"/health with {SLOW_CLIENTS} slow-header connections: median {statistics.median(latencies) * 1000:.1f} ms, "
          f"max {max(latencies) * 1000:.1f} ms over {len(latencies)} requests")
    assert max(latencies) < 1.0


def test_idle_keep_alive_connections_neither_block_new_ones_nor_stay_open(hostile_server):
    idle: list[socket.socket] = []
    try:
        for _ in range(IDLE_CLIENTS):
            sock = connect(hostile_server)
            idle.append(sock)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: idle\r\n\r\n")
            status, headers, _ = read_response(sock, within=5)
            assert status == 200 and headers.get("connection", "").lower() != "close"
        last_answer = time.monotonic()
        started = time.monotonic()
        assert requests.get(hostile_server.base_url + "/health", timeout=1).status_code == 200
        print(f"/health with {IDLE_CLIENTS} idle keep-alive connections: {(time.monotonic() - started) * 1000:.1f} ms")

        # The header timeout is for requests in progress: an idle keep-alive connection outlives it.
        time.sleep(max(0.0, last_answer + HEADER_TIMEOUT + 0.5 - time.monotonic()))
        idle[-1].sendall(b"GET /health HTTP/1.1\r\nHost: idle\r\n\r\n")
        assert read_response(idle[-1], within=1)[0] == 200
        reused = time.monotonic()

        deadline = reused + IDLE_TIMEOUT + CLOSE_SLACK
        still_open = [sock for sock in idle if not closed_by_server(sock, within=deadline - time.monotonic())]
        assert not still_open, f"{len(still_open)} idle connections still open {IDLE_TIMEOUT + CLOSE_SLACK}s later"
        print(f"idle connections closed {time.monotonic() - reused:.2f}s after their last request "
              f"(idle timeout {IDLE_TIMEOUT}s)")
    finally:
        for sock in idle:
            sock.close()


def test_headers_not_finished_within_header_timeout_are_cut_off(hostile_server):
    with connect(hostile_server) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: partial\r\nX-Slow: ")
        assert closed_by_server(sock, within=HEADER_TIMEOUT + CLOSE_SLACK, trickle=b"a")
        elapsed = time.monotonic() - started
    print(f"partial headers closed after {elapsed:.2f}s (header timeout {HEADER_TIMEOUT}s)")
    assert elapsed >= HEADER_TIMEOUT - 0.1


def test_bare_line_breaks_do_not_keep_a_connection_alive(hostile_server):
    # waitress reads each CRLF pair as an empty request; they must not count as activity.
    with connect(hostile_server) as sock:
        started = time.monotonic()
        assert closed_by_server(sock, within=IDLE_TIMEOUT + CLOSE_SLACK, trickle=b"\r\n\r\n")
        assert time.monotonic() - started >= IDLE_TIMEOUT - 0.1


def test_a_body_trickled_past_the_idle_timeout_is_cut_off(hostile_server):
    with connect(hostile_server) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 4000\r\n\r\n")
        started = time.monotonic()
        assert closed_by_server(sock, within=IDLE_TIMEOUT + CLOSE_SLACK, trickle=b" ")
        assert time.monotonic() - started >= IDLE_TIMEOUT - 0.2


def test_content_length_with_chunked_is_refused_and_the_connection_closed(hostile_server):
    smuggling = (b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\n\r\n"
                 b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    with connect(hostile_server) as sock:
        sock.sendall(smuggling)
        error = assert_envelope(*read_response(sock, within=2), expected_status=400)
        assert "Content-Length" in error["message"] and "Transfer-Encoding" in error["message"]
        assert closed_by_server(sock, within=1), "the pipelined request must not be answered"
    assert requests.get(hostile_server.base_url + "/health", timeout=5).status_code == 200


def test_huge_chunk_size_is_refused_at_once(hostile_server):
    with connect(hostile_server) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFF\r\n")
        error = assert_envelope(*read_response(sock, within=1), expected_status=413)
        assert f"limit {MAX_BODY_BYTES} bytes" in error["message"]
        assert closed_by_server(sock, within=1)


@pytest.mark.parametrize("expect_continue", [False, True], ids=["plain", "expect-100-continue"])
def test_oversized_content_length_is_refused_before_the_body_is_read(hostile_server, expect_continue):
    with connect(hostile_server) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {MAX_BODY_BYTES + 1}\r\n".encode()
                     + (b"Expect: 100-continue\r\n" if expect_continue else b"") + b"\r\n")
        error = assert_envelope(*read_response(sock, within=1), expected_status=413)
        assert error["message"] == f"Request body too large (limit {MAX_BODY_BYTES} bytes)."
        assert closed_by_server(sock, within=1)


def test_bodies_within_the_limit_still_reach_the_app(hostile_server):
    exactly_the_limit = json.dumps(CHAT).encode().ljust(MAX_BODY_BYTES)  # trailing spaces are valid JSON
    url = hostile_server.base_url + "/v1/chat/completions"
    fixed = requests.post(url, data=exactly_the_limit, headers={"Content-Type": "application/json"}, timeout=30)
    assert fixed.status_code == 200, fixed.text
    # waitress counts the chunk framing against the limit too, hence the few bytes of room
    near_the_limit = exactly_the_limit[:MAX_BODY_BYTES - 64]
    chunked = requests.post(url, data=iter([near_the_limit[:100], near_the_limit[100:]]),
                            headers={"Content-Type": "application/json"}, timeout=30)
    assert chunked.status_code == 200, chunked.text
