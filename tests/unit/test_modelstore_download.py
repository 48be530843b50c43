"""The download glue around huggingface-hub (the hub itself is never contacted: no network in tests)."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
import requests

from edge_server import modelstore
from edge_server.engine.types import ModelLoadError


@pytest.fixture
def reachable(monkeypatch):
    monkeypatch.setattr(modelstore, "hub_reachable", lambda timeout: None)


def test_download_asks_the_hub_for_the_file_into_models_dir(reachable, monkeypatch, tmp_path):
    calls = []

    def fake_download(repo, filename, *, local_dir, etag_timeout):
        calls.append((repo, filename, Path(local_dir), etag_timeout))
        return str(Path(local_dir) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    path = modelstore.download("Qwen/Repo-GGUF", "m.gguf", tmp_path, timeout=3)
    assert path == tmp_path / "m.gguf"
    assert calls == [("Qwen/Repo-GGUF", "m.gguf", tmp_path, 3)]


def test_hub_errors_become_one_line_model_load_errors(reachable, monkeypatch, tmp_path):
    def failing(*args, **kwargs):
        raise requests.ConnectionError("Max retries exceeded with url\nmore detail")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing)
    with pytest.raises(ModelLoadError, match=r"^download of a/b/c\.gguf failed: Max retries exceeded with url$"):
        modelstore.download("a/b", "c.gguf", tmp_path)


def test_offline_is_refused_before_any_hub_call(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("hub was called"))
    with pytest.raises(ModelLoadError, match="offline"):
        modelstore.download("a/b", "c.gguf", tmp_path)


def test_the_default_model_is_qwen35_sized_by_memory():
    from edge_server.modelstore import default_model

    gib = 1 << 30
    assert default_model(4 * gib) == ("unsloth/Qwen3.5-0.8B-GGUF", "Qwen3.5-0.8B-Q4_K_M.gguf")
    assert default_model(8 * gib) == ("unsloth/Qwen3.5-2B-GGUF", "Qwen3.5-2B-Q4_K_M.gguf")
    assert default_model(24 * gib) == ("unsloth/Qwen3.5-4B-GGUF", "Qwen3.5-4B-Q4_K_M.gguf")
    assert default_model(0) == ("unsloth/Qwen3.5-0.8B-GGUF", "Qwen3.5-0.8B-Q4_K_M.gguf")  # memory unknown


def test_with_nothing_configured_or_local_the_default_qwen35_is_downloaded(monkeypatch, tmp_path):
    asked = []

    def fake_download(repo, filename, models_dir, *, timeout=10.0):
        asked.append((repo, filename))
        target = models_dir / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"GGUF")
        return target

    monkeypatch.setattr(modelstore, "download", fake_download)
    monkeypatch.setattr(modelstore, "total_memory", lambda: 8 << 30)
    resolved = modelstore.resolve_model(None, tmp_path)
    # The model and, beside it, its vision projector.
    assert asked == [("unsloth/Qwen3.5-2B-GGUF", "Qwen3.5-2B-Q4_K_M.gguf"), ("unsloth/Qwen3.5-2B-GGUF", "mmproj-F16.gguf")]
    assert resolved.model_id == "Qwen3.5-2B-Q4_K_M" and resolved.demo_warning is None
    assert resolved.mmproj == tmp_path / "mmproj" / "Qwen3.5-2B-Q4_K_M" / "mmproj-F16.gguf"
    # Next start, offline: the local model is the newest GGUF and its projector is found beside it.
    monkeypatch.setattr(modelstore, "download", lambda *a, **k: pytest.fail("nothing to download"))
    again = modelstore.resolve_model(None, tmp_path)
    assert again.path == resolved.path and again.mmproj == resolved.mmproj


def test_a_projector_that_cannot_be_downloaded_leaves_the_default_model_text_only(monkeypatch, tmp_path, caplog):
    def fake_download(repo, filename, models_dir, *, timeout=10.0):
        if filename.startswith("mmproj"):
            raise ModelLoadError(f"download of {repo}/{filename} failed: 404")
        (models_dir / filename).write_bytes(b"GGUF")
        return models_dir / filename

    monkeypatch.setattr(modelstore, "download", fake_download)
    monkeypatch.setattr(modelstore, "total_memory", lambda: 4 << 30)
    resolved = modelstore.resolve_model(None, tmp_path)
    assert resolved.path.name == "Qwen3.5-0.8B-Q4_K_M.gguf" and resolved.mmproj is None
    assert "without images" in caplog.text
