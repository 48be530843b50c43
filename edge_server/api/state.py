"""What the running server knows: its settings, and the engine once the model has loaded."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, current_app, request

import edge_server
from edge_server.dialects.dialect import ToolDialect, detect_dialect
from edge_server.engine.chat_templates import choose_chat_template, template_override
from edge_server.engine.protocol import EngineClient
from edge_server.generation.prompt import PromptRenderer
from edge_server.settings import Settings


@dataclass
class ServedModel:
    """The loaded engine with the renderer for its chat template and the name clients see."""

    engine: EngineClient
    renderer: PromptRenderer
    model_id: str
    demo_warning: str | None = None
    fingerprint: str = ""  # `system_fingerprint`: this model file under this build

    @property
    def dialect(self) -> ToolDialect:
        """How the chat template in use asks the model to write tool calls (read from its text)."""
        return detect_dialect(self.renderer.template_source)

    @classmethod
    def of(cls, engine: EngineClient, model_id: str, demo_warning: str | None = None, *,
           chat_template: str | None = None) -> ServedModel:
        """Wrap a loaded engine, building its prompt renderer from the model's own metadata (or the
        `--chat-template` override)."""
        info = engine.info
        template = choose_chat_template(
            info.chat_template, architecture=str(info.metadata.get("general.architecture", "")),
            n_vocab=info.n_vocab, override=template_override(chat_template) if chat_template else None)
        renderer = PromptRenderer(
            template,
            bos_token=info.bos_token,
            eos_token=info.eos_token,
            add_bos=info.add_bos,
            tokenize=functools.partial(engine.tokenize, max_tokens=info.n_ctx),
        )
        return cls(engine=engine, renderer=renderer, model_id=model_id, demo_warning=demo_warning,
                   fingerprint=_fingerprint(info.path, template.label))


def _fingerprint(path: Path, template: str) -> str:
    """What decides an answer besides the request: the model file, the template in use and the build
    (the file's identity, not a hash of gigabytes)."""
    try:
        stat = path.stat()
        identity = f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"
    except OSError:
        identity = path.name
    build = f"{edge_server.__version__}:{importlib.metadata.version('llama-cpp-python')}"
    return "fp_" + hashlib.sha256(f"{identity}|{template}|{build}".encode()).hexdigest()[:12]


@dataclass
class ServerState:
    """One per app (`state_of`); `served` is None while the model loads."""

    settings: Settings
    served: ServedModel | None = None
    shutting_down: bool = False

    def running(self) -> int:
        """Requests holding a slot (0 while loading)."""
        return self.served.engine.running if self.served else 0

    def queued(self) -> int:
        """Requests waiting for a slot (0 while loading)."""
        return self.served.engine.queued if self.served else 0

    def attach(self, served: ServedModel) -> None:
        """Start answering with a loaded model."""
        self.served = served


_EXTENSION = "edge_server"


def attach_state(app: Flask, state: ServerState) -> None:
    """Give `app` its state."""
    app.extensions[_EXTENSION] = state


def state_of(app: Flask | None = None) -> ServerState:
    """The state of `app`, or of the app handling the current request."""
    return (app or current_app).extensions[_EXTENSION]


def client_gone() -> Callable[[], bool]:
    """Whether the current request's client has disconnected, as a check to call later (waitress
    tells, through its `waitress.client_disconnected` environ key; other servers never do)."""
    return request.environ.get("waitress.client_disconnected") or (lambda: False)
