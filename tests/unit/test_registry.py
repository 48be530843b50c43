"""The model registry on fake engines: naming, loading on first use, LRU eviction of idle models only,
failed loads, idle unloading."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from edge_server.api.errors import APIError
from edge_server.api.registry import ModelRegistry, ModelSpec
from edge_server.api.state import ServedModel
from edge_server.devtools.fake_engine import FakeEngine
from edge_server.engine.types import ModelLoadError


class Loader:
    """Loads fake models and records what it did; `broken` ids fail."""

    def __init__(self, broken: frozenset[str] = frozenset()):
        self.loads: list[str] = []
        self.broken = broken
        self.engines: dict[str, FakeEngine] = {}

    def __call__(self, spec: ModelSpec) -> ServedModel:
        self.loads.append(spec.id)
        if spec.id in self.broken:
            raise ModelLoadError(f"{spec.id}: cannot load")
        self.engines[spec.id] = FakeEngine()
        return ServedModel.of(self.engines[spec.id], spec.id)


def registry(*ids: str, loader: Loader, **options) -> ModelRegistry:
    events: list[tuple[str, str]] = []
    made = ModelRegistry([ModelSpec(i, Path(f"{i}.gguf")) for i in ids], loader, events=lambda e, m: events.append((e, m)),
                         **options)
    made.events = events  # type: ignore[attr-defined]
    return made


def use(made: ModelRegistry, name: str | None) -> ServedModel:
    """A request to `name` that has ended: the model is lent and given back."""
    served = made.get(name)
    made.give_back(served)
    return served


def age(made: ModelRegistry, seconds: float) -> None:
    """Pretend every model was last used `seconds` ago."""
    for entry in made._entries.values():
        entry.last_used -= seconds
        entry.loaded_at -= seconds


def test_requests_name_their_model_and_one_model_answers_to_any_name():
    loader = Loader()
    several = registry("a", "b", loader=loader)
    several.preload()
    assert use(several, "b").model_id == "b" and use(several, None).model_id == "a"
    with pytest.raises(APIError) as error:
        several.get("gpt-3.5-turbo")
    assert error.value.status == 404 and error.value.code == "model_not_found"
    single = registry("only", loader=Loader())
    single.preload()
    assert use(single, "gpt-3.5-turbo").model_id == "only"


def test_max_loaded_loads_on_first_use_and_evicts_the_least_recently_used_idle_model():
    loader = Loader()
    made = registry("a", "b", "c", loader=loader, max_loaded=2)
    made.preload()
    assert loader.loads == ["a", "b"] and [s["state"] for s in made.status()] == ["ready", "ready", "unloaded"]
    use(made, "a")
    use(made, "b")
    made._entries["a"].last_used -= 5  # both idle; b used after a
    made._entries["b"].last_used -= 3
    use(made, "c")
    assert [s["state"] for s in made.status()] == ["unloaded", "ready", "ready"]
    assert ("unloaded", "a") in made.events and ("loaded", "c") in made.events
    made._entries["b"].last_used -= 10  # now b is the least recently used
    made._entries["c"].last_used -= 5
    use(made, "a")
    assert [s["state"] for s in made.status()] == ["ready", "unloaded", "ready"]


def test_a_busy_or_just_chosen_model_is_never_evicted():
    loader = Loader()
    made = registry("a", "b", loader=loader, max_loaded=1)
    made.preload()
    held = made.get("a")  # a request holds it (from choosing it until it ends)
    age(made, 10)
    with pytest.raises(APIError) as error:
        made.get("b")
    assert error.value.status == 503 and error.value.code == "models_busy"
    made.give_back(held)
    use(made, "a")  # chosen just now: not evicted at once
    with pytest.raises(APIError):
        made.get("b")
    age(made, 10)
    loader.engines["a"].running = 1  # a request is decoding
    with pytest.raises(APIError):
        made.get("b")
    loader.engines["a"].running = 0
    assert use(made, "b").model_id == "b"


def test_a_failed_load_is_a_503_shown_in_status_and_retried_later():
    loader = Loader(broken=frozenset({"b"}))
    made = registry("a", "b", loader=loader)
    made.preload()
    assert made.status()[1]["state"] == "failed" and "cannot load" in made.status()[1]["error"]
    with pytest.raises(APIError) as error:
        made.get("b")
    assert error.value.status == 503 and error.value.code == "model_load_failed"
    assert loader.loads.count("b") == 1  # not hammered
    made._entries["b"].failed_at -= 60
    loader.broken = frozenset()
    assert use(made, "b").model_id == "b"


def test_the_default_model_failing_at_start_is_fatal():
    with pytest.raises(ModelLoadError):
        registry("a", loader=Loader(broken=frozenset({"a"}))).preload()


def test_idle_models_unload_after_the_idle_time_and_reload_on_use():
    loader = Loader()
    made = registry("a", loader=loader, idle_unload=30)
    made.preload()
    made.unload_idle()
    assert made.status()[0]["state"] == "ready"  # loaded just now
    age(made, 31)
    made.unload_idle()
    assert made.status()[0]["state"] == "unloaded" and loader.engines["a"].closed
    assert use(made, "a").model_id == "a" and loader.loads == ["a", "a"]


def test_concurrent_loads_of_two_models_never_exceed_max_loaded():
    release, loader = threading.Event(), Loader()

    def slow(spec: ModelSpec) -> ServedModel:
        release.wait(10)
        return loader(spec)

    made = ModelRegistry([ModelSpec(i, Path(f"{i}.gguf")) for i in ("a", "b")], slow, max_loaded=1)
    made.started = True  # as after start-up: nothing loaded (an idle unload took both)
    first = threading.Thread(target=use, args=(made, "a"))
    first.start()
    deadline = time.monotonic() + 5
    while made.status()[0]["state"] != "loading":
        assert time.monotonic() < deadline, made.status()
        time.sleep(0.01)
    with pytest.raises(APIError) as error:  # a is on its way in: no room for b, and a is no one to evict
        made.get("b")
    assert error.value.code == "models_busy"
    release.set()
    first.join()
    assert loader.loads == ["a"] and [s["state"] for s in made.status()] == ["ready", "unloaded"]

