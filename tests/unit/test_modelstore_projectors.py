"""A projector (mmproj GGUF) beside the models is never picked as "the newest GGUF" to serve."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from edge_server.modelstore import is_projector, newest_gguf, resolve_model


def _gguf(path: Path, arch: str, mtime: float, **strings: str) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    for key, value in strings.items():
        writer.add_string(key.replace("_", "."), value)
    writer.add_tensor("w", np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.utime(path, (mtime, mtime))
    return path


def test_projectors_are_skipped_by_metadata_or_name(tmp_path):
    model = _gguf(tmp_path / "Qwen3.5-2B-Q4_K_M.gguf", "qwen35", 1000)
    by_type = _gguf(tmp_path / "vision-f16.gguf", "clip", 2000, general_type="mmproj")
    by_arch = _gguf(tmp_path / "llava-projector.gguf", "clip", 3000)
    by_name = _gguf(tmp_path / "mmproj-F16.gguf", "qwen35", 4000)
    assert [is_projector(p) for p in (model, by_type, by_arch, by_name)] == [False, True, True, True]
    assert newest_gguf(tmp_path) == model
    assert resolve_model(None, tmp_path).path == model


def test_only_projectors_is_no_local_model(tmp_path):
    _gguf(tmp_path / "mmproj-BF16.gguf", "clip", 1000, general_type="mmproj")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 8)  # unreadable: still a candidate, loading says why
    assert newest_gguf(tmp_path) == tmp_path / "broken.gguf"
