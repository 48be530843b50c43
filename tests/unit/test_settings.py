"""Settings: command line over EDGE_* environment over defaults, validated up front."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from edge_server.settings import Settings, available_cores, load_settings


def test_defaults_bind_loopback_and_use_every_core():
    settings = load_settings({}, environ={})
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.threads == available_cores()
    assert settings.n_gpu_layers == "auto"


def test_environment_overrides_defaults_and_flags_override_environment():
    environ = {"EDGE_PORT": "9001", "EDGE_MODEL": "a.gguf", "EDGE_N_GPU_LAYERS": "12"}
    settings = load_settings({"port": 9002, "model": None}, environ=environ)
    assert settings.port == 9002
    assert settings.model == ("a.gguf",)
    assert settings.n_gpu_layers == 12


@pytest.mark.parametrize("values", [{"port": 70000}, {"threads": 0}, {"n_gpu_layers": "many"}, {"n_ctx": 2}])
def test_invalid_values_are_rejected(values):
    with pytest.raises(ValidationError):
        load_settings(values, environ={})


def test_settings_are_frozen():
    with pytest.raises(ValidationError):
        Settings().port = 1  # type: ignore[misc]


def test_several_models_from_flags_or_a_comma_separated_environment():
    assert load_settings({"model": ["a.gguf", "b.gguf"], "model_alias": ["a", "b"]}, environ={}).model_alias == ("a", "b")
    assert load_settings({}, environ={"EDGE_MODEL": "a.gguf, b.gguf"}).model == ("a.gguf", "b.gguf")
    with pytest.raises(ValidationError):
        load_settings({"model": ["a.gguf"], "model_alias": ["x", "y"]}, environ={})
    with pytest.raises(ValidationError):
        load_settings({"model": ["a.gguf", "b.gguf"], "model_alias": ["x", "x"]}, environ={})
