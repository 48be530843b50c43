"""waitress hardened against slow, idle and malformed clients, answering its own errors with the JSON envelope."""

from __future__ import annotations

import json
import logging
import os
import threading
import time

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher
from waitress.utilities import BadRequest, RequestEntityTooLarge, RequestHeaderFieldsTooLarge

from edge_server.api.anthropic_api import anthropic_error_body, is_anthropic_path
from edge_server.api.errors import APIError
from edge_server.settings import Settings

try:
    import resource
except ImportError:  # Windows
    resource = None

log = logging.getLogger("edge_server")

SPARE_FILE_DESCRIPTORS = 128  # model file, log files, the trigger pipe, the listener, libraries' own handles
MAX_CHUNK_LINE = 1024  # bytes of one chunk-size line (with extensions)
MAX_CHUNK_TRAILER = 16 * 1024
HANDLER_NICENESS = 10  # added to the HTTP threads' niceness
NON_CLIENT_MAP_ENTRIES = 2  # waitress counts its listener and trigger against connection_limit


class HardenedRequestParser(HTTPRequestParser):
    """waitress's parser, also refusing ambiguous framing and announced oversize chunks; notes its first byte."""

    def __init__(self, adj: Adjustments):
        super().__init__(adj)
        # The channel makes a parser when a request's first bytes arrive.
        self.started_at = time.monotonic()

    def parse_header(self, header_plus: bytes) -> None:
        """Parse as waitress does, then refuse the framings RFC 9112 §6.1 and §6.3 call unsafe."""
        super().parse_header(header_plus)
        # waitress removes Transfer-Encoding only from HTTP/1.1 requests, and frames any other by Content-Length.
        if "TRANSFER_ENCODING" in self.headers:
            raise ParsingError("Transfer-Encoding is only allowed in HTTP/1.1 requests")
        if self.chunked and "CONTENT_LENGTH" in self.headers:
            raise ParsingError("Content-Length and Transfer-Encoding must not both be sent")

    def received(self, data: bytes) -> int:
        """Take bytes as waitress does; refuse a chunked body once its announced size passes the limit."""
        consumed = super().received(data)
        body = self.body_rcv
        if self.chunked and body is not None and not self.completed:
            if len(body) + body.chunk_remainder >= self.adj.max_request_body_size:
                self.error = RequestEntityTooLarge("announced chunk passes the limit")
                self.completed = True
            elif len(body.control_line) > MAX_CHUNK_LINE or len(body.trailer) > MAX_CHUNK_TRAILER:
                # waitress copies these buffers on every read: unbounded, they cost quadratic time.
                self.error = BadRequest("chunk-size line or trailer too long")
                self.completed = True
        if self.error is not None:
            # Otherwise waitress answers "100 Continue" to a refused request and reads its body after all.
            self.expect_continue = False
        return consumed


class JSONErrorTask(ErrorTask):
    """waitress's own error answers (400, 413, 431, 501, 500) as the error envelope (Anthropic's on its routes); the
    connection closes."""

    def execute(self) -> None:
        """Write the envelope."""
        error = self.request.error
        message = self._message(error)
        if is_anthropic_path(getattr(self.request, "path", "") or ""):  # Anthropic's routes, Anthropic's envelope
            payload = anthropic_error_body(error.code, message)
        else:
            payload = APIError(message, status=error.code).body()
        body = json.dumps(payload, separators=(",", ":")).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)

    def _message(self, error) -> str:
        adj = self.channel.adj
        if isinstance(error, RequestEntityTooLarge):
            return f"Request body too large (limit {adj.max_request_body_size - 1} bytes)."
        if isinstance(error, RequestHeaderFieldsTooLarge):
            return f"Request headers too large (limit {adj.max_request_header_size} bytes)."
        return f"{error.reason}: {error.body.rstrip('.')}."


class HardenedChannel(HTTPChannel):
    """A connection parsed by HardenedRequestParser whose errors are answered by JSONErrorTask."""

    parser_class = HardenedRequestParser
    error_task_class = JSONErrorTask

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_request_at = self.creation_time  # when a real request was last answered

    def service(self) -> None:
        """Answer as waitress does, then note the time: only real requests keep a connection alive
        (a bare CRLF pair, which waitress reads as an empty request, does not)."""
        try:
            super().service()
        finally:
            self.last_request_at = time.time()


class LowPriorityDispatcher(ThreadedTaskDispatcher):
    """waitress's handler threads, each at a lower scheduling priority than the engine's compute threads.

    Relaying tokens must never preempt llama.cpp's threads on a machine with few cores (Linux sets
    priorities per thread; elsewhere this is a no-op).
    """

    def handler_thread(self, thread_no: int) -> None:
        """Lower this thread's priority once, then serve tasks as waitress does."""
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HANDLER_NICENESS)
        except (AttributeError, OSError):
            pass
        super().handler_thread(thread_no)


class HardenedServer(TcpWSGIServer):
    """waitress's TCP server that also closes connections whose requests come too slowly."""

    channel_class = HardenedChannel

    def __init__(self, application, *, header_timeout: float, idle_timeout: float, **kwargs):
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        super().__init__(application, **kwargs)

    def maintenance(self, now: float) -> None:
        """Close connections idle for idle_timeout, and those whose current request is overdue: its
        headers after header_timeout, the whole request after idle_timeout (from its first byte)."""
        idle_since = now - self.idle_timeout
        headers_due_since = time.monotonic() - self.header_timeout
        request_due_since = time.monotonic() - self.idle_timeout
        closing = False
        for channel in self.active_channels.values():
            if channel.requests or channel.will_close:
                continue  # a request is being answered, or the connection is already closing
            request = channel.request
            receiving = request is not None and not request.completed
            overdue = receiving and request.started_at < (
                request_due_since if request.headers_finished else headers_due_since)
            if overdue or (not receiving and channel.last_request_at < idle_since):
                channel.will_close = True
                closing = True
        if closing:
            # Channels already polled in this round become writable, and so close, only once the loop wakes.
            self.pull_trigger()


def create_hardened_server(app, settings: Settings, *, threads: int, **adjustments) -> HardenedServer:
    """A HardenedServer for `app` on settings.host:port with `threads` handler threads and other waitress options."""
    raise_open_file_limit(settings.max_connections + SPARE_FILE_DESCRIPTORS)
    adj = Adjustments(
        host=settings.host,
        port=settings.port,
        threads=threads,
        asyncore_use_poll=True,  # select() cannot watch descriptors past 1024
        connection_limit=settings.max_connections + NON_CLIENT_MAP_ENTRIES,
        cleanup_interval=1,  # how often maintenance() runs, so the timeouts act within about a second
        max_request_body_size=settings.max_body_bytes + 1,  # waitress refuses bodies of this size and more
        **adjustments,
    )
    if len(adj.listen) > 1:
        log.warning("%s resolves to several addresses; listening on the first, %s", settings.host, adj.listen[0][3])
    dispatcher = LowPriorityDispatcher()
    dispatcher.set_thread_count(threads)
    return HardenedServer(app, adj=adj, sockinfo=adj.listen[0], dispatcher=dispatcher,
                          header_timeout=settings.header_timeout, idle_timeout=settings.idle_timeout)


def raise_open_file_limit(needed: int) -> None:
    """Raise the soft open-file limit towards the hard one when it is below `needed`; log when it stays below."""
    if resource is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    if target < needed:
        log.warning("open-file limit is %d, below the %d that --max-connections needs; "
                    "raise it (ulimit -n) or lower --max-connections", target, needed)
