"""edge-server: an OpenAI-compatible chat server for GGUF Qwen models over llama-cpp-python."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask

from .errors import register_error_handlers
from .settings import Settings

if TYPE_CHECKING:
    from .state import ServedModel

__version__ = "0.1.0"


def create_app(settings: Settings, served: ServedModel | None = None) -> Flask:
    """The Flask app; `served` may be attached later (GET /health answers 503 until then)."""
    from .chatpage import page
    from .observability import Metrics, register_observability
    from .openapi import spec
    from .routes import api
    from .security import register_security
    from .state import ServerState

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # OpenAI's field order, as the schemas declare it
    app.json.ensure_ascii = False
    state = ServerState(settings=settings)
    if served is not None:
        state.attach(served)
    app.extensions["edge_server"] = state
    register_observability(app, Metrics(running=state.running, queued=state.queued))
    register_security(app, settings)
    app.register_blueprint(api)
    app.register_blueprint(page)
    app.register_blueprint(spec)
    register_error_handlers(app)
    return app
