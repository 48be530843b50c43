"""Shared fixtures: the generated models every test uses (tests never download one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_server.devtools.synthetic import write_random_model, write_scripted_model

ROOT = Path(__file__).resolve().parent.parent
MAKE_TEST_MODEL = ROOT / "models" / "generated" / "tiny-test.gguf"  # written by `make tiny-model`

# Readable output with characters split across tokens: the emoji over two pieces, CJK mid-character.
# "<|im_" + "end|>" are ordinary pieces: the text of the end-of-turn token, which must not end the turn.
SCRIPT = [b"Hello", b",", b" world", b"!", b" \xf0\x9f", b"\x91\x8b", b" \xe4\xbd", b"\xa0\xe5\xa5", b"\xbd",
          b" STOP", b" <|im_", b"end|>", b" done", b"."]
SCRIPT_TEXT = b"".join(SCRIPT).decode("utf-8")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny random-weight Qwen2 GGUF (`make tiny-model`'s file when present)."""
    if MAKE_TEST_MODEL.is_file():
        return MAKE_TEST_MODEL
    return write_random_model(tmp_path_factory.mktemp("models") / "tiny-test.gguf")


@pytest.fixture(scope="session")
def scripted_model(tmp_path_factory) -> Path:
    """A model whose greedy answer to any chat is exactly SCRIPT_TEXT."""
    return write_scripted_model(tmp_path_factory.mktemp("models") / "scripted.gguf", SCRIPT)


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory) -> Path:
    """A wider random model (~200 tokens/s on 2 cores) for disconnect and queue timing."""
    return write_random_model(tmp_path_factory.mktemp("models") / "slow.gguf", n_layer=4, n_embd=384, n_head=6,
                              n_head_kv=2, n_ff=1024, seed=1)
