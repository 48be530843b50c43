"""The models one server serves: which are in memory, loading on first use within `--max-loaded`, the
least recently used idle one unloaded to make room, idle ones unloaded after `--idle-unload` seconds."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edge_server.api.errors import APIError
from edge_server.api.state import ServedModel
from edge_server.engine.types import ModelLoadError
from edge_server.ggufmeta import read_gguf_metadata
from edge_server.memory import give_back_free_heap

log = logging.getLogger("edge_server")

# A model chosen this recently is not evicted (requests alternating between two models would thrash).
_IN_USE_SECONDS = 2.0
_RETRY_FAILED_AFTER = 30.0


@dataclass(frozen=True)
class ModelSpec:
    """A configured model: the id requests name it by, its file, and its role."""

    id: str
    path: Path
    role: str = "chat"  # or "embedding"
    demo_warning: str | None = None
    options: dict = field(default_factory=dict)  # per-model settings from --models-file (n_ctx, parallel, ...)
    mmproj: Path | None = None  # the projector that lets it see images


def model_role(path: Path) -> str:
    """'embedding' for a GGUF made for embeddings (pooling metadata, a BERT family), else 'chat'."""
    try:
        metadata = read_gguf_metadata(path, arrays=False)
    except (OSError, ValueError):
        return "chat"  # the loader reports what is wrong with the file
    arch = str(metadata.get("general.architecture", ""))
    return "embedding" if f"{arch}.pooling_type" in metadata or "bert" in arch else "chat"


@dataclass
class _Entry:
    spec: ModelSpec
    served: ServedModel | None = None
    state: str = "unloaded"  # loading, ready, failed
    error: str | None = None
    failed_at: float = 0.0
    last_used: float = float("-inf")  # when a request last chose it (loading at start-up is no use)
    loaded_at: float = 0.0
    borrowed: int = 0  # requests holding it now (from `get` until `give_back`)
    retiring: ServedModel | None = None  # taken out of service, its memory not yet given back
    load_lock: threading.Lock = field(default_factory=threading.Lock)  # one load of this model at a time

    def idle(self, now: float) -> bool:
        engine = self.served.engine if self.served else None
        return (engine is not None and not self.borrowed and not engine.running
                and not engine.queued and now - self.last_used > _IN_USE_SECONDS)

    @property
    def holds_memory(self) -> bool:
        """Loading, loaded, or being unloaded: it counts against `--max-loaded`."""
        return self.state in ("loading", "ready")

    def retire(self) -> None:
        """Take the loaded model out of service (no request gets it any more) before its memory is freed."""
        self.retiring, self.served = self.served, None


Events = Callable[[str, str], None]  # (event: loaded | load_failed | unloaded, model id)


class ModelRegistry:
    """Every configured model by id; the first is the default. Thread-safe."""

    def __init__(self, specs: Sequence[ModelSpec], load: Callable[[ModelSpec], ServedModel] | None, *,
                 max_loaded: int | None = None, idle_unload: float = 0.0, events: Events = lambda e, m: None):
        if not specs:
            raise ValueError("a registry needs at least one model")
        self._entries = {spec.id: _Entry(spec) for spec in specs}
        self.default_id = specs[0].id
        self._load = load
        self.max_loaded = max_loaded or len(specs)
        self.idle_unload = idle_unload
        self._events = events
        # Every decision on what is in memory (lending, loading, evicting, unloading) is taken under this lock;
        # the slow work (loading, freeing) runs outside it. Listing models never takes it.
        self._changed = threading.Condition()
        self.started = load is None  # preload() has run (a registry of loaded models needs none)

    @classmethod
    def of_loaded(cls, served: ServedModel) -> ModelRegistry:
        """A registry of one model that is already loaded (tests, embedding the API)."""
        registry = cls([ModelSpec(served.model_id, served.engine.info.path, demo_warning=served.demo_warning)], None)
        entry = registry._entries[served.model_id]
        entry.served, entry.state = served, "ready"
        return registry

    @property
    def ids(self) -> list[str]:
        """Configured model ids, the default first."""
        return list(self._entries)

    def spec(self, model_id: str) -> ModelSpec | None:
        """The configuration of `model_id`, or None."""
        entry = self._entries.get(model_id)
        return entry.spec if entry else None

    def default(self) -> ServedModel | None:
        """The default model when it is in memory."""
        return self._entries[self.default_id].served

    def loaded(self) -> list[ServedModel]:
        """Models in memory now."""
        return [entry.served for entry in list(self._entries.values()) if entry.served is not None]

    def status(self) -> list[dict]:
        """Each model's id, role, state (unloaded, loading, ready, failed) and why its last load failed."""
        return [{"id": e.spec.id, "role": e.spec.role, "state": e.state, "error": e.error}
                for e in self._entries.values()]

    def entry_id(self, name: str | None) -> str:
        """The id a request's `model` names: its own, the default when absent, or when only one model is
        served (clients send any name, e.g. the spec's "gpt-3.5-turbo"); else a 404."""
        if name in self._entries:
            return name
        if name is None or len(self._entries) == 1:
            return self.default_id
        raise APIError(f"The model '{name}' does not exist; this server serves {', '.join(map(repr, self._entries))}.",
                       status=404, param="model", code="model_not_found")

    def get(self, name: str | None) -> ServedModel:
        """The model a request names, loading it first if need be (503 while it loads at start-up, after a
        failed load, or when every loaded model is busy and none can make room). The caller holds it until
        `give_back`: a model held is never unloaded."""
        entry = self._entries[self.entry_id(name)]
        with self._changed:
            entry.last_used = time.monotonic()
            if entry.served is not None:
                return self._lend(entry)
            self._refuse_failed(entry)
        # While the server starts, say so at once (as /health does); later, wait for another request's load.
        if not entry.load_lock.acquire(timeout=-1 if self.started else 0):
            raise _loading(entry.spec.id)
        try:
            with self._changed:
                while entry.retiring is not None:  # its old copy is being unloaded: a file is never mapped twice
                    self._changed.wait()
                if entry.served is not None:
                    return self._lend(entry)
                self._refuse_failed(entry)
                victim = self._reserve(entry)
            try:
                if victim is not None:
                    self._free(victim, f"evicted for {entry.spec.id}")
            except BaseException:
                with self._changed:
                    entry.state = "unloaded"
                    self._changed.notify_all()
                raise
            self._load_entry(entry)
        finally:
            entry.load_lock.release()
        with self._changed:
            if entry.served is None:
                raise APIError(f"The model '{entry.spec.id}' failed to load: {entry.error}", status=503,
                               code="model_load_failed", headers={"Retry-After": str(int(_RETRY_FAILED_AFTER))})
            entry.last_used = time.monotonic()
            return self._lend(entry)

    def give_back(self, served: ServedModel) -> None:
        """A request is done with a model `get` lent it."""
        with self._changed:
            entry = self._entries.get(served.model_id)
            if entry is not None and entry.borrowed:
                entry.borrowed -= 1

    def preload(self) -> None:
        """Load models in order, as many as `--max-loaded` holds (the server's start-up, in the background).
        Raises `ModelLoadError` when the default model cannot load."""
        try:
            for index, entry in enumerate(self._entries.values()):
                with entry.load_lock:
                    with self._changed:
                        if entry.holds_memory:
                            continue  # a request loaded it first
                        if sum(e.holds_memory for e in self._entries.values()) >= self.max_loaded:
                            break
                        entry.state, entry.error = "loading", None
                    self._load_entry(entry)
                if index == 0 and entry.served is None:
                    raise ModelLoadError(entry.error or "the default model failed to load")
        finally:
            self.started = True

    def unload_idle(self) -> None:
        """Unload models idle for `--idle-unload` seconds (called periodically)."""
        if not self.idle_unload:
            return
        now = time.monotonic()
        with self._changed:
            quiet = [entry for entry in self._entries.values()
                     if entry.served is not None and entry.idle(now)
                     and now - max(entry.last_used, entry.loaded_at) >= self.idle_unload]
            for entry in quiet:
                entry.retire()
        for entry in quiet:
            self._free(entry, "idle")

    def running(self) -> int:
        """Requests holding a slot, over every loaded model."""
        return sum(served.engine.running for served in self.loaded())

    def queued(self) -> int:
        """Requests waiting for a slot, over every loaded model."""
        return sum(served.engine.queued for served in self.loaded())

    def drain(self, grace_seconds: float) -> None:
        """Drain every loaded model (graceful shutdown)."""
        for served in self.loaded():
            served.engine.drain(grace_seconds)

    def close(self) -> None:
        """Stop every loaded model."""
        for served in self.loaded():
            served.engine.close()

    def _lend(self, entry: _Entry) -> ServedModel:
        entry.borrowed += 1
        return entry.served

    def _refuse_failed(self, entry: _Entry) -> None:
        if entry.state == "failed" and time.monotonic() - entry.failed_at < _RETRY_FAILED_AFTER:
            raise APIError(f"The model '{entry.spec.id}' failed to load: {entry.error}", status=503,
                           code="model_load_failed", headers={"Retry-After": str(int(_RETRY_FAILED_AFTER))})

    def _reserve(self, entry: _Entry) -> _Entry | None:
        """Under the registry lock: mark `entry` loading if `--max-loaded` has room for it, else take the least
        recently used idle model out of service for the caller to free (returned); 503 when none is idle.
        Loading and unloading models count as held, so concurrent loads never exceed the limit."""
        held = [e for e in self._entries.values() if e.holds_memory]
        victim = None
        if len(held) >= self.max_loaded:
            now = time.monotonic()
            idle = sorted((e for e in held if e.idle(now)), key=lambda e: e.last_used)
            if not idle:
                raise APIError(f"Every loaded model is busy; '{entry.spec.id}' can load once one is idle "
                               f"(--max-loaded {self.max_loaded}). Retry shortly.", status=503, code="models_busy",
                               headers={"Retry-After": "2"})
            victim = idle[0]
            victim.retire()
        entry.state, entry.error = "loading", None
        return victim

    def _load_entry(self, entry: _Entry) -> None:
        """Load a model `_reserve` (or `preload`) marked loading."""
        if self._load is None:
            return
        started = time.monotonic()
        try:
            served = self._load(entry.spec)
        except ModelLoadError as error:
            with self._changed:
                entry.state, entry.error, entry.failed_at = "failed", str(error), time.monotonic()
                self._changed.notify_all()
            log.error("model %s failed to load: %s", entry.spec.id, error)
            self._events("load_failed", entry.spec.id)
            return
        except BaseException:
            with self._changed:
                entry.state = "unloaded"
                self._changed.notify_all()
            raise
        with self._changed:
            entry.served, entry.state, entry.loaded_at = served, "ready", time.monotonic()
            in_memory = sum(e.holds_memory for e in self._entries.values())
            self._changed.notify_all()
        log.info("model %s loaded in %.1fs (%d of at most %d in memory)", entry.spec.id, time.monotonic() - started,
                 in_memory, self.max_loaded)
        self._events("loaded", entry.spec.id)

    def _free(self, entry: _Entry, reason: str) -> None:
        """Give back the memory of a model `retire`d while nobody held it (no request can get it since)."""
        try:
            entry.retiring.close()
            gc.collect()  # what llama-cpp-python's own reference cycles still hold
            give_back_free_heap()
        finally:
            with self._changed:
                entry.state, entry.retiring = "unloaded", None
                self._changed.notify_all()
        log.info("model %s unloaded (%s)", entry.spec.id, reason)
        self._events("unloaded", entry.spec.id)


def _loading(model_id: str) -> APIError:
    return APIError(f"The model '{model_id}' is still loading; retry shortly (GET /health shows its state).",
                    status=503, code="model_loading", headers={"Retry-After": "2"})
