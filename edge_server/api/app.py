"""The Flask application factory: one app per server, every room of the HTTP API registered on it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask

from edge_server.api.errors import register_error_handlers
from edge_server.settings import Settings

if TYPE_CHECKING:
    from edge_server.api.state import ServedModel

def create_app(settings: Settings, served: ServedModel | None = None) -> Flask:
    """The Flask app; `served` may be attached later (GET /health answers 503 until then)."""
    from edge_server.api.anthropic_api import anthropic
    from edge_server.api.chatpage import page
    from edge_server.api.embeddings import embeddings_api
    from edge_server.api.observability import Metrics, register_observability
    from edge_server.api.openapi import spec
    from edge_server.api.responses_api import responses_api
    from edge_server.api.routes import api
    from edge_server.api.security import register_security
    from edge_server.api.state import ServerState, attach_state
    from edge_server.api.submit import give_back_models
    from edge_server.api.tokens import tokens_api

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # OpenAI's field order, as the schemas declare it
    app.json.ensure_ascii = False
    state = ServerState(settings=settings)
    if served is not None:
        state.attach(served)
    attach_state(app, state)
    register_observability(app, Metrics(running=state.running, queued=state.queued,
                                        loaded=lambda: len(state.registry.loaded()) if state.registry else 0,
                                        checkpoints=state.checkpoint_stats))
    register_security(app, settings)
    app.register_blueprint(api)
    app.register_blueprint(embeddings_api)
    app.register_blueprint(responses_api)
    app.register_blueprint(anthropic)
    app.register_blueprint(page)
    app.register_blueprint(spec)
    app.register_blueprint(tokens_api)
    register_error_handlers(app)
    app.teardown_request(give_back_models)
    return app
