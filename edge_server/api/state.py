"""What the running server knows: its settings, and the engine once the model has loaded."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from pathlib import Path

from flask import Flask, current_app, request

import edge_server
from edge_server.dialects.dialect import ToolDialect, detect_dialect

if TYPE_CHECKING:
    from edge_server.api.registry import ModelRegistry
    from edge_server.engine.embedder import Embedder
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
    release: Callable[[], None] | None = field(default=None, repr=False, compare=False)  # frees the engine's memory
    _embedder: Any = field(default=None, init=False, repr=False, compare=False)
    _embedder_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def embedder(self) -> Embedder:
        """The model's embedding context (engine/embedder.py), created on first use; raises
        `EmbeddingUnsupported` for a model without embeddings."""
        with self._embedder_lock:
            if self._embedder is None:
                from edge_server.engine.embedder import open_embedder

                self._embedder = open_embedder(self.engine)
            return self._embedder

    def close(self) -> None:
        """Stop the engine, then free the embedding context and every native object of the model (nothing may
        use the model afterwards: the registry closes only a model no request holds)."""
        self.engine.close()
        with self._embedder_lock:
            embedder, self._embedder = self._embedder, None
        if embedder is not None:
            embedder.close()
        if self.release is not None:
            self.release()

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
            tokenize_images=functools.partial(engine.tokenize_images, max_tokens=info.n_ctx) if info.vision else None,
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
    """One per app (`state_of`); `registry` is None until the server has resolved its models."""

    settings: Settings
    registry: ModelRegistry | None = None
    shutting_down: bool = False
    failure: str | None = None  # the backend failed (engine.fatal): /health is 503 until the process exits

    @property
    def served(self) -> ServedModel | None:
        """The default model once it is loaded."""
        return self.registry.default() if self.registry else None

    def running(self) -> int:
        """Requests holding a slot, over every loaded model."""
        return self.registry.running() if self.registry else 0

    def queued(self) -> int:
        """Requests waiting for a slot, over every loaded model."""
        return self.registry.queued() if self.registry else 0

    def checkpoint_stats(self) -> dict[str, int]:
        """Context checkpoints over every loaded model: held (count, bytes), saved, restored and missed."""
        totals = {"count": 0, "bytes": 0, "saved": 0, "restored": 0, "misses": 0}
        for served in self.registry.loaded() if self.registry else []:
            store = getattr(served.engine, "checkpoints", None)
            if store is not None:
                stats = store.stats
                for key, value in (("count", store.count), ("bytes", store.bytes), ("saved", stats.saved),
                                   ("restored", stats.restored), ("misses", stats.misses)):
                    totals[key] += value
        return totals

    def attach(self, served: ServedModel) -> None:
        """Answer with one model that is already loaded."""
        from edge_server.api.registry import ModelRegistry

        self.registry = ModelRegistry.of_loaded(served)


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
