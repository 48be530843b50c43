"""A recording proxy between a coding agent and the server: every exchange is kept (request body, status,
the response as streamed), so a test can fail on any 4xx/5xx to a generation request or a broken stream."""

from __future__ import annotations

import http.client
import http.server
import json
import threading
from dataclasses import dataclass, field
from typing import Any

GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses")
# What the last event of a whole stream is, per route: the agent saw its answer end as the protocol says.
_STREAM_ENDS = {"/v1/chat/completions": b"data: [DONE]", "/v1/completions": b"data: [DONE]",
                "/v1/messages": b"event: message_stop", "/v1/responses": b"event: response.completed"}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade"}


@dataclass
class Exchange:
    """One request the agent made and what it got back."""

    method: str
    path: str
    body: Any
    status: int = 0
    content_type: str = ""
    response: bytes = b""

    @property
    def route(self) -> str:
        """The path without its query (`/v1/messages?beta=true` -> `/v1/messages`)."""
        return self.path.split("?", 1)[0]

    @property
    def is_generation(self) -> bool:
        """Whether the request asked for a generation (token counting and model lists do not)."""
        return self.route in GENERATION_ROUTES

    def problem(self) -> str | None:
        """What went wrong with a generation request, or None: an error status, or a stream that did not end
        with its protocol's last event (incomplete Responses count as ended)."""
        if self.status >= 400:
            return f"{self.method} {self.path} -> {self.status}: {self.response[:300]!r}"
        if self.content_type.startswith("text/event-stream"):
            blocks = [b for b in self.response.replace(b"\r\n", b"\n").split(b"\n\n") if b.strip(b"\n")]
            last = [line for line in (blocks[-1] if blocks else b"").split(b"\n") if not line.startswith(b":")]
            ends = (_STREAM_ENDS[self.route], b"event: response.incomplete")
            if not last or not last[0].startswith(ends):
                return f"{self.method} {self.path}: the stream broke off: ...{self.response[-300:]!r}"
        return None

    def text(self) -> str:
        """The request body as JSON text (to look for what the agent sent)."""
        return json.dumps(self.body, ensure_ascii=False)


@dataclass
class Recorder:
    """A proxy on a free loopback port to `upstream` (host:port); `exchanges` in the order they began."""

    upstream: str
    exchanges: list[Exchange] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def generations(self) -> list[Exchange]:
        """The generation requests so far."""
        with self._lock:
            return [e for e in self.exchanges if e.is_generation]

    def problems(self) -> list[str]:
        """Every failed generation request and broken stream."""
        return [problem for e in self.generations() if (problem := e.problem())]

    def close(self) -> None:
        """Stop listening."""
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # the test prints what matters
                pass

            def _forward(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(size) if size else b""
                try:
                    body: Any = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                exchange = Exchange(self.command, self.path, body)
                with recorder._lock:
                    recorder.exchanges.append(exchange)
                host, port = recorder.upstream.rsplit(":", 1)
                upstream = http.client.HTTPConnection(host, int(port), timeout=600)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"host"}}
                headers["Content-Length"] = str(len(raw))
                upstream.request(self.command, self.path, body=raw, headers=headers)
                reply = upstream.getresponse()
                exchange.status, exchange.content_type = reply.status, reply.getheader("Content-Type", "")
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() not in _HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Connection", "close")
                self.end_headers()
                while chunk := reply.read1(65536):
                    exchange.response += chunk
                    self.wfile.write(chunk)
                    self.wfile.flush()
                upstream.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward

        return Handler
