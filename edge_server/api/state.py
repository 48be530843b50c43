"""What the running server knows: its settings, and the engine once the model has loaded."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from flask import Flask, current_app

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

    @classmethod
    def of(cls, engine: EngineClient, model_id: str, demo_warning: str | None = None) -> ServedModel:
        """Wrap a loaded engine, building its prompt renderer from the model's own metadata."""
        info = engine.info
        renderer = PromptRenderer(
            info.chat_template,
            bos_token=info.bos_token,
            eos_token=info.eos_token,
            add_bos=info.add_bos,
            tokenize=functools.partial(engine.tokenize, max_tokens=info.n_ctx),
        )
        return cls(engine=engine, renderer=renderer, model_id=model_id, demo_warning=demo_warning)


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
