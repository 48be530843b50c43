"""Request ids, the access log, each generation's accounting, and Prometheus metrics (`GET /metrics`)."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from edge_server.api.declaration import Reply, documented

if TYPE_CHECKING:
    from edge_server.generation.pipeline import Outcome

access_log = logging.getLogger("edge_server.access")
metrics_api = Blueprint("metrics", __name__)
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def log_safe(text: str) -> str:
    """`text` with control characters (CR, LF, ESC, ...) escaped: a client cannot forge or colour log lines."""
    return _CONTROL_CHARACTERS.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


class Metrics:
    """The metrics of one app, in its own registry (no module-level state)."""

    def __init__(self, running: Callable[[], int], queued: Callable[[], int], loaded: Callable[[], int] = lambda: 0,
                 checkpoints: Callable[[], dict[str, int]] = lambda: {}):
        self.registry = CollectorRegistry()
        self.requests = Counter("edge_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.prompt_tokens = Counter("edge_prompt_tokens", "Prompt tokens of generation requests",
                                     registry=self.registry)
        self.completion_tokens = Counter("edge_completion_tokens", "Tokens generated", registry=self.registry)
        self.ttft = Histogram("edge_time_to_first_token_seconds", "Time from request to first token",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.decode_rate = Histogram("edge_decode_tokens_per_second", "Decode rate of each generation",
                                     buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000),
                                     registry=self.registry)
        Gauge("edge_queue_depth", "Requests waiting for a slot", registry=self.registry).set_function(queued)
        Gauge("edge_busy_slots", "Slots running a request", registry=self.registry).set_function(running)
        Gauge("edge_models_loaded", "Models in memory", registry=self.registry).set_function(loaded)
        self.draft_tokens = Counter("edge_draft_tokens", "Tokens drafted by speculative decoding and verified",
                                    registry=self.registry)
        self.draft_accepted = Counter("edge_draft_accepted", "Drafted tokens the model agreed with",
                                      registry=self.registry)
        self.forced_tokens = Counter("edge_forced_tokens", "Tokens a grammar left no choice about, decoded with the "
                                     "token before them (fast-forward)", registry=self.registry)
        for name, key, text in (
                ("edge_ctx_checkpoints", "count", "Context checkpoints held (recurrent, hybrid and small-window models)"),
                ("edge_ctx_checkpoint_bytes", "bytes", "Bytes the context checkpoints hold"),
                ("edge_ctx_checkpoints_saved", "saved", "Context checkpoints taken since start"),
                ("edge_ctx_checkpoints_restored", "restored", "Prompts resumed from a context checkpoint since start"),
                ("edge_ctx_checkpoint_misses", "misses", "Prompts evaluated from the start for want of a checkpoint")):
            Gauge(name, text, registry=self.registry).set_function(lambda key=key: checkpoints().get(key, 0))
        self.model_events = Counter("edge_model_events", "Model loads, failed loads and unloads", ["model", "event"],
                                    registry=self.registry)

    def model_event(self, event: str, model_id: str) -> None:
        """Count a model's load, failed load or unload."""
        self.model_events.labels(model=model_id, event=event).inc()

    def observe_generation(self, prompt_tokens: int, completion_tokens: int, ttft: float | None,
                           rate: float, draft_tokens: int = 0, draft_accepted: int = 0,
                           forced_tokens: int = 0) -> None:
        """Count one finished generation."""
        self.prompt_tokens.inc(prompt_tokens)
        self.forced_tokens.inc(forced_tokens)
        self.draft_tokens.inc(draft_tokens)
        self.draft_accepted.inc(draft_accepted)
        self.completion_tokens.inc(completion_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)
        if rate > 0:
            self.decode_rate.observe(rate)


_EXTENSION = "edge_server_metrics"


def metrics_of(app: Flask | None = None) -> Metrics:
    """The metrics of `app`, or of the app handling the current request."""
    return (app or current_app).extensions[_EXTENSION]


def route_label() -> str:
    """The matched route's pattern (bounded label values), or 'unmatched'."""
    return request.url_rule.rule if request.url_rule is not None else "unmatched"


class Accounting:
    """One generation request's access-log line and metrics. The route opens it once the generation has
    started (this request then logs its own line); serialize.py ends it once, however the answer ends."""

    def __init__(self) -> None:
        g.access_log_deferred = True
        self.request_id, self.route, self.started = g.request_id, request.path, time.monotonic()
        self.metrics = metrics_of()

    def end(self, outcome: Outcome, status: int = 200) -> None:
        """Write the access-log line and count the generation in the metrics."""
        seconds = time.monotonic() - self.started
        decode_seconds = seconds - (outcome.first_token_seconds or 0.0)
        tokens = outcome.completion_tokens
        rate = (tokens - 1) / decode_seconds if tokens > 1 and decode_seconds > 0 else 0.0
        ttft = f"{outcome.first_token_seconds * 1000:.0f}ms" if outcome.first_token_seconds is not None else "-"
        drafts = ""
        if outcome.draft_tokens:
            steps = max(1, tokens - outcome.draft_accepted)  # steps that verified a draft or decoded one token
            drafts = (f" drafts={outcome.draft_accepted}/{outcome.draft_tokens} accepted "
                      f"({outcome.draft_accepted / outcome.draft_tokens:.0%}, {outcome.draft_tokens / steps:.1f}/step)")
        if outcome.forced_tokens:
            drafts += f" forced={outcome.forced_tokens}"
        access_log.info(
            "%s POST %s %s prompt=%d completion=%d ttft=%s rate=%.1ftok/s finish=%s cached=%d%s%s",
            self.request_id, self.route, status, outcome.prompt_tokens, tokens, ttft, rate,
            outcome.finish_reason, outcome.cached_tokens, drafts, f" error={outcome.error!r}" if outcome.error else "",
        )
        self.metrics.observe_generation(outcome.prompt_tokens, tokens, outcome.first_token_seconds, rate,
                                        outcome.draft_tokens, outcome.draft_accepted, outcome.forced_tokens)


def register_observability(app: Flask, metrics: Metrics) -> None:
    """Give each request an id (echoed as X-Request-Id), count it, and log it."""
    app.extensions[_EXTENSION] = metrics
    app.register_blueprint(metrics_api)

    @app.before_request
    def _start():
        given = request.headers.get("X-Request-Id", "")
        # A client's own id is kept only in a safe form: it goes into log lines and a response header.
        g.request_id = given if _SAFE_REQUEST_ID.fullmatch(given) else f"req_{uuid.uuid4().hex[:20]}"
        g.started = time.monotonic()

    @app.after_request
    def _finish(response: Response) -> Response:
        response.headers["X-Request-Id"] = getattr(g, "request_id", "")
        metrics.requests.labels(route_label(), str(response.status_code)).inc()
        if not g.get("access_log_deferred"):
            access_log.info("%s %s %s %s %.0fms", g.get("request_id", "-"), log_safe(request.method),
                            log_safe(request.path), response.status_code,
                            (time.monotonic() - g.get("started", time.monotonic())) * 1000)
        return response


@metrics_api.get("/metrics")
@documented("metrics", "operations", "Prometheus metrics (text exposition)", {200: Reply("Metrics.", media="text/plain")})
def metrics_text():
    """Prometheus text exposition of this app's metrics."""
    registry = metrics_of().registry
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
