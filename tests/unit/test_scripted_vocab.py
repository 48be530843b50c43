"""Scripted models on the real Qwen vocabulary and templates (devtools/synthetic.write_scripted_vocab_model),
and the test-asset cache they are built from (devtools/assets.py). The models are loaded with llama.cpp and
decoded greedily here; the e2e tests serve them."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import time

import gguf
import pytest
from llama_cpp import Llama

from edge_server.devtools import assets, synthetic
from tests.conftest import ROOT, asset_or_fail

THINK_SCRIPT = "<think>\nI think.\n</think>\n\nParis is the capital."
XML_CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
            "</parameter>\n</function>\n</tool_call>")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                         "required": ["city"]}}}]


def vocab_for(template: str) -> synthetic.Vocab:
    path, added = assets.qwen_vocab(template)
    return synthetic.read_vocab(path, added)


def greedy(model, template: str, messages=None, *, temperature: float = 0.0, n_ctx: int = 2048,
           **render) -> tuple[str, list[int]]:
    """The reply llama.cpp decodes from `model` to `messages` rendered with the real template, up to <|im_end|>."""
    vocab = vocab_for(template)
    prompt = synthetic.render_generation_prompt(vocab, assets.qwen_template(template), messages, **render)
    llm = Llama(model_path=str(model), n_ctx=n_ctx, n_threads=2, n_batch=512, verbose=False)
    reply: list[int] = []
    sampling = {"temp": temperature, "top_k": 0 if temperature else 1, "top_p": 1.0, "min_p": 0.0}
    for token in llm.generate(llm.tokenize(prompt.encode(), add_bos=False, special=True), **sampling):
        if token == vocab.special_ids["eos"] or len(reply) > 200:
            break
        reply.append(token)
    return llm.detokenize(reply).decode("utf-8"), reply


def test_thinking_script_with_repeated_words_and_newlines_after_the_qwen3_prompt(qwen_scripted_model):
    model = qwen_scripted_model("qwen3", THINK_SCRIPT)
    text, tokens = greedy(model, "qwen3")
    assert text == THINK_SCRIPT
    ids = {t: i for i, t in enumerate(vocab_for("qwen3").tokens)}
    assert tokens[0] == ids["<think>"] == 151667 and ids["</think>"] in tokens  # single tokens, as Qwen3 emits
    assert tokens.count(ids[synthetic._token_text(b"\n")]) == 1  # "\n" twice in the text: once alone, once in ".\n"


def test_qwen3_with_thinking_off_replies_after_the_empty_think_block(qwen_scripted_model):
    prompt = synthetic.render_generation_prompt(vocab_for("qwen3"), assets.qwen_template("qwen3"),
                                                enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    model = qwen_scripted_model("qwen3", "Paris is the capital.", enable_thinking=False)
    assert greedy(model, "qwen3", enable_thinking=False)[0] == "Paris is the capital."


def test_one_model_for_several_prompt_endings(qwen_scripted_model):
    # `after` lists the prompt endings to answer after: here Qwen3's with thinking on and off.
    model = qwen_scripted_model("qwen3", "Paris.", after=["<|im_start|>assistant\n", "<think>\n\n</think>\n\n"])
    assert greedy(model, "qwen3")[0] == "Paris."
    assert greedy(model, "qwen3", enable_thinking=False)[0] == "Paris."


def test_xml_tool_call_after_the_qwen35_prompt_opening_think(qwen_scripted_model):
    # Qwen3.5's generation prompt ends inside <think>\n; the reply closes it and calls the tool in XML form.
    script = "The user wants the weather.\n</think>\n\n" + XML_CALL
    model = qwen_scripted_model("qwen3.5", script)
    messages = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
    text, tokens = greedy(model, "qwen3.5", messages, tools=TOOLS)
    assert text == script
    assert 151657 in tokens and 151658 in tokens  # <tool_call> and </tool_call> as the single tokens


def test_bare_xml_tool_call_with_repeated_lines(qwen_scripted_model):
    model = qwen_scripted_model("qwen3.5", XML_CALL)
    assert greedy(model, "qwen3.5")[0] == XML_CALL
    # The same reply after a long history, a system prompt and sampling at temperature 1: the previous-token
    # heads find the right offset among thousands, and the scripted token outweighs all others.
    history = [{"role": "system", "content": "You are a weather bot."},
               {"role": "user", "content": " ".join(f"line {i} of a long question.\n" for i in range(300))},
               {"role": "assistant", "content": "Which city?"},
               {"role": "user", "content": "Paris, 3 days"}]
    assert greedy(model, "qwen3.5", history, temperature=1.0, n_ctx=4096)[0] == XML_CALL


@pytest.mark.parametrize("template", ["qwen2.5", "qwq", "qwen3-coder"])
def test_answer_after_each_other_template(qwen_scripted_model, template):
    script = "Hello! Hello, hello: how can I help you today?\n\n- one\n- two"
    model = qwen_scripted_model(template, script, enable_thinking=True)
    assert greedy(model, template, enable_thinking=True)[0] == script


def test_model_carries_the_real_tokenizer_and_template(qwen_scripted_model, qwen_template):
    model = qwen_scripted_model("qwen3.5", XML_CALL)
    assert model.stat().st_size < 40_000_000
    meta = synthetic.read_gguf_metadata(model)
    source = synthetic.read_gguf_metadata(asset_or_fail("vocab:qwen35"))
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == 151936
    assert meta["tokenizer.chat_template"] == qwen_template("qwen3.5")
    assert meta["tokenizer.ggml.pre"] == source["tokenizer.ggml.pre"] == "qwen35"
    assert meta["tokenizer.ggml.merges"] == source["tokenizer.ggml.merges"]
    changed = [i for i, (a, b) in enumerate(zip(tokens, source["tokenizer.ggml.tokens"])) if a != b]
    assert changed == list(range(151646, 151669))  # only padding slots, filled with Qwen3's added tokens
    assert tokens[151667] == "<think>" and meta["tokenizer.ggml.token_type"][151667] == gguf.TokenType.USER_DEFINED
    assert tokens[meta["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    assert tokens[meta["tokenizer.ggml.bos_token_id"]] == "<|endoftext|>"


def test_metadata_reader_agrees_with_gguf_reader(scripted_model):
    # read_gguf_metadata exists because GGUFReader takes ~8 s on a 150k-token vocabulary.
    reader = gguf.GGUFReader(scripted_model)
    expected = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    assert synthetic.read_gguf_metadata(scripted_model) == expected


def test_segmenter_splits_repeats_into_distinct_tokens_at_order_one():
    vocab = vocab_for("qwen3")
    newline = vocab.tokens.index(synthetic._token_text(b"\n"))
    script = "<think>\nI think.\n</think>\n\nParis is the capital.".encode()
    chain = synthetic.segment_script(vocab, script, [(newline,)], order=1)
    assert b"".join(vocab.piece(t) for t in chain) == script
    assert len(set(chain)) == len(chain) and newline not in chain  # each token once, and not the prompt's last


def test_segmenter_says_clearly_when_no_split_exists():
    vocab = vocab_for("qwen3")
    newline = vocab.tokens.index(synthetic._token_text(b"\n"))
    # Order 1: both "\n"s need a token of their own, and "\n" alone is the prompt's last token.
    with pytest.raises(ValueError, match="cannot split .* contexts never repeat"):
        synthetic.segment_script(vocab, b"a\nb\nc", [(newline,)], order=1)


def test_llama_cpp_python_version_is_the_pinned_one():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    pins = [line.strip() for line in config["options"]["install_requires"].splitlines() if "llama-cpp-python" in line]
    assert pins == [f"llama-cpp-python=={assets.LLAMA_CPP_PYTHON_VERSION}"]


def test_cached_file_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "file.bin"

    def broken(out):
        out.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        assets.cached(target, broken)
    assert not target.exists() and [p.name for p in target.parent.iterdir()] == ["file.bin.lock"]
    assert assets.cached(target, lambda out: out.write_bytes(b"whole")).read_bytes() == b"whole"
    assert assets.cached(target, lambda out: pytest.fail("made twice")) == target


def test_missing_asset_that_cannot_be_fetched_fails_with_the_way_to_fetch_it(tmp_path):
    # An empty cache and a package index that has nothing: the CLI exits 1 with the reason and the remedy.
    empty = tmp_path / "links"
    empty.mkdir()
    env = {**os.environ, assets.ENV_DIR: str(tmp_path / "cache"), "PIP_CONFIG_FILE": os.devnull,
           "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty)}
    result = subprocess.run([sys.executable, "-m", "edge_server.devtools.assets", "fetch", "template:qwen3"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1
    assert "template:qwen3 is not cached" in result.stderr and "make test-assets" in result.stderr
    assert "llama-cpp-python==" in result.stderr and "failed" in result.stderr
    assert not list((tmp_path / "cache").rglob("*.jinja"))


def test_scripted_model_cache_drops_the_long_unused_and_the_least_recently_used_beyond_its_budget(tmp_path):
    now = time.time()
    for name, hours, size in [("stale", 24 * 8, 10), ("older", 5, 600 << 20), ("old", 4, 600 << 20),
                              ("in-use", 0.1, 600 << 20), ("recent", 0.2, 10)]:
        path = tmp_path / f"{name}.gguf"
        with path.open("wb") as handle:
            handle.truncate(size)  # sparse: nothing is written
        os.utime(path, (now - hours * 3600,) * 2)
    assets._prune(tmp_path, keep_days=7)
    assert sorted(p.stem for p in tmp_path.glob("*.gguf")) == ["in-use", "recent"]
