"""Tests for the synthetic GGUF writers in edge_server.devtools.synthetic."""

from __future__ import annotations

import gguf
import pytest
from jinja2 import BaseLoader
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_server.devtools import synthetic

EMOJI_SCRIPT = [b"Hi", b" there", b" \xf0\x9f", b"\x91\x8b", b" \xe4\xbd", b"\xa0\xe5\xa5\xbd", b"!"]


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    return synthetic.write_random_model(tmp_path_factory.mktemp("synthetic") / "random.gguf")


@pytest.fixture(scope="module")
def scripted_model(tmp_path_factory):
    return synthetic.write_scripted_model(tmp_path_factory.mktemp("synthetic") / "scripted.gguf", EMOJI_SCRIPT)


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def _render(messages, **kwargs) -> str:
    env = ImmutableSandboxedEnvironment(loader=BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    return env.from_string(synthetic.CHAT_TEMPLATE).render(messages=messages, **kwargs)


def test_random_model_metadata(random_model):
    assert random_model.stat().st_size < 2_000_000
    reader = gguf.GGUFReader(random_model)
    assert _field(reader, "general.architecture") == "qwen2"
    assert "synthetic" in _field(reader, "general.name")
    assert _field(reader, "qwen2.context_length") == 4096
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "qwen2"
    assert _field(reader, "tokenizer.chat_template") == synthetic.CHAT_TEMPLATE
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    ids = {text: i for i, text in enumerate(tokens)}
    assert len(ids) == len(tokens) > 3000
    assert _field(reader, "tokenizer.ggml.eos_token_id") == ids["<|im_end|>"]
    assert _field(reader, "tokenizer.ggml.padding_token_id") == ids["<|endoftext|>"]
    for text in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert types[ids[text]] == gguf.TokenType.CONTROL
    for text in ("<tool_call>", "</tool_call>"):
        assert types[ids[text]] == gguf.TokenType.USER_DEFINED
    assert "Ġthe" in ids and types[ids["Ġthe"]] == gguf.TokenType.NORMAL


def test_random_model_is_deterministic(random_model, tmp_path):
    again = synthetic.write_random_model(tmp_path / "again.gguf")
    other = synthetic.write_random_model(tmp_path / "other.gguf", seed=1)
    assert again.read_bytes() == random_model.read_bytes()
    assert other.read_bytes() != random_model.read_bytes()


def test_template_default_system_prompt_and_generation_prompt():
    prompt = _render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert prompt == (f"<|im_start|>system\n{synthetic.DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
                      "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_template_tools_calls_and_grouped_responses():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "Sys."},
        {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
        ]},
        {"role": "tool", "tool_call_id": "a", "content": "20C"},
        {"role": "tool", "tool_call_id": "b", "content": "25C"},
    ]
    prompt = _render(messages, tools=tools, add_generation_prompt=False)
    assert prompt.startswith("<|im_start|>system\nSys.\n\n# Tools\n")
    assert '<tools>\n{"function": {"name": "get_weather"' in prompt
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' in prompt
    assert prompt.endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n20C\n</tool_response>\n<tool_response>\n25C\n</tool_response><|im_end|>\n"
    )


@pytest.mark.parametrize("script", [[b"a", b"a"], [b"\n"], [b""], [b"<|im_end|>"]])
def test_scripted_model_rejects_ambiguous_pieces(tmp_path, script):
    with pytest.raises(ValueError):
        synthetic.write_scripted_model(tmp_path / "bad.gguf", script)


def test_demo_script_is_distinct_readable_text():
    assert len(set(synthetic.DEMO_SCRIPT)) == len(synthetic.DEMO_SCRIPT)
    assert b"".join(synthetic.DEMO_SCRIPT).decode().endswith("\N{WAVING HAND SIGN}")


def test_main_writes_file(tmp_path, capsys):
    out = tmp_path / "tiny.gguf"
    assert synthetic.main([str(out), "--seed", "3"]) == 0
    assert out.exists() and str(out) in capsys.readouterr().out


def test_random_model_generates_varied_text(random_model):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(random_model), n_ctx=512, n_threads=2, verbose=False)
    out = llm.create_completion("Hello", max_tokens=40, temperature=0)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "length"
    assert len(set(choice["text"].split())) >= 10
    chat = llm.create_chat_completion(messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=8)
    assert chat["choices"][0]["message"]["content"].strip()


def test_scripted_model_replays_script(scripted_model):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(scripted_model), n_ctx=512, n_threads=2, verbose=False)
    assert llm.tokenize(b"<|im_start|>assistant\n", special=True)[-1] == llm.tokenize(b"\n")[0]
    for user in ("hi", "Tell me something long about dragons.\n\n", "你好"):
        out = llm.create_chat_completion(messages=[{"role": "user", "content": user}], temperature=0, max_tokens=50)
        choice = out["choices"][0]
        assert choice["message"]["content"] == b"".join(EMOJI_SCRIPT).decode()
        assert choice["finish_reason"] == "stop"
        assert out["usage"]["completion_tokens"] == len(EMOJI_SCRIPT)
