"""Thinking models through the routes on the fake engine: reasoning apart from content, the controls,
history and template errors. tests/e2e/test_qwen_templates.py proves the same on real Qwen templates."""

from __future__ import annotations

import pytest

from edge_server.api.app import create_app
from edge_server.api.state import ServedModel
from edge_server.devtools.fake_engine import FakeEngine
from edge_server.dialects.constraints import check_grammar
from edge_server.settings import Settings
from tests.unit.test_api_in_process import USER, chat, events

# Like Qwen3.5's generation prompt: opens the block unless enable_thinking is false; raises like it.
THINKING_TEMPLATE = (
    "{%- if not (messages | selectattr('role', 'equalto', 'user') | list) -%}"
    "{{ raise_exception('No user query found in messages.') }}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' and not loop.first -%}{{ raise_exception('System message must be at the beginning.') }}{%- endif -%}"
    "{{ '<|im_start|>' + m.role + '\\n' }}"
    "{%- if m.reasoning_content is string -%}{{ '<think>' + m.reasoning_content + '</think>' }}{%- endif -%}"
    "{{ m.content + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else -%}{{ '<think>\\n' }}{%- endif -%}"
    "{%- if effort is defined -%}{{ 'effort=' + effort }}{%- endif -%}"
)
THOUGHT = [b"Let", b" me", b" see.", b"\n</th", b"ink>", b"\n\n", b"Paris", b"."]


def client_for(engine: FakeEngine, **settings):
    return create_app(Settings(threads=1, **settings), ServedModel.of(engine, "fake-model")).test_client()


def prompt_text(engine: FakeEngine, index: int = -1) -> str:
    return bytes(engine.jobs[index].prompt).decode()


def test_whole_answer_splits_reasoning_and_counts_its_tokens():
    engine = FakeEngine(pieces=THOUGHT, chat_template=THINKING_TEMPLATE)
    body = chat(client_for(engine)).get_json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Paris.",
                                             "reasoning_content": "Let me see."}
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 5}
    assert prompt_text(engine).endswith("<|im_start|>assistant\n<think>\n")


def test_stream_sends_reasoning_deltas_then_content_and_no_tag_reaches_content():
    engine = FakeEngine(pieces=THOUGHT, chat_template=THINKING_TEMPLATE)
    chunks = events(chat(client_for(engine), stream=True, stream_options={"include_usage": True}))
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-3]]
    reasoning = [d["reasoning_content"] for d in deltas if "reasoning_content" in d]
    content = [d["content"] for d in deltas if "content" in d]
    assert "".join(reasoning) == "Let me see." and len(reasoning) >= 2  # streamed, not held to the end
    assert "".join(content) == "Paris."
    assert all(set(d) <= {"reasoning_content", "content"} and len(d) == 1 for d in deltas)
    assert chunks[-2]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 5}


def test_unterminated_reasoning_at_length_stays_reasoning():
    engine = FakeEngine(pieces=THOUGHT, chat_template=THINKING_TEMPLATE)
    body = chat(client_for(engine), max_tokens=4).get_json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"] == {"role": "assistant", "content": "", "reasoning_content": "Let me see."}


def test_reasoning_format_none_leaves_the_raw_text_in_content():
    engine = FakeEngine(pieces=THOUGHT, chat_template=THINKING_TEMPLATE)
    body = chat(client_for(engine, reasoning_format="none")).get_json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Let me see.\n</think>\n\nParis."}
    assert "completion_tokens_details" not in body["usage"]


@pytest.mark.parametrize("fields,settings", [
    ({"chat_template_kwargs": {"enable_thinking": False}}, {}),
    ({"reasoning_effort": "none"}, {}),
    ({}, {"reasoning": "off"}),
    ({"chat_template_kwargs": {"enable_thinking": False}}, {"reasoning": "on"}),
])
def test_thinking_can_be_turned_off(fields, settings):
    engine = FakeEngine(pieces=[b"Paris", b"."], chat_template=THINKING_TEMPLATE)
    body = chat(client_for(engine, **settings), **fields).get_json()
    assert prompt_text(engine).endswith("<think>\n\n</think>\n\n")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Paris."}
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}


def test_request_kwargs_win_over_the_server_default_and_reach_the_template():
    engine = FakeEngine(pieces=[b"ok"], chat_template=THINKING_TEMPLATE)
    chat(client_for(engine, reasoning="off"), chat_template_kwargs={"enable_thinking": True, "effort": "x"})
    assert prompt_text(engine).endswith("<think>\neffort=x")


def test_reserved_template_variables_are_refused():
    response = chat(client_for(FakeEngine(chat_template=THINKING_TEMPLATE)),
                    chat_template_kwargs={"messages": []})
    assert response.status_code == 400
    assert "messages" in response.get_json()["error"]["message"]


def test_history_reasoning_is_handed_to_the_template_under_either_name():
    engine = FakeEngine(pieces=[b"ok"], chat_template=THINKING_TEMPLATE)
    client = client_for(engine)
    for name in ("reasoning_content", "reasoning"):
        messages = USER + [{"role": "assistant", "content": "Hello", name: "They greet."},
                           {"role": "user", "content": "Again"}]
        assert client.post("/v1/chat/completions", json={"messages": messages}).status_code == 200
        assert "<|im_start|>assistant\n<think>They greet.</think>Hello<|im_end|>" in prompt_text(engine)


def test_template_raise_exception_is_a_400_with_its_message():
    messages = [{"role": "system", "content": "No question."}]
    response = create_app(Settings(threads=1), ServedModel.of(FakeEngine(chat_template=THINKING_TEMPLATE), "m")) \
        .test_client().post("/v1/chat/completions", json={"messages": messages})
    assert response.status_code == 400
    assert "No user query found in messages." in response.get_json()["error"]["message"]


def test_a_late_system_message_the_template_refuses_is_merged_into_the_first():
    engine = FakeEngine(chat_template=THINKING_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, *USER, {"role": "system", "content": "late"}]
    response = create_app(Settings(threads=1), ServedModel.of(engine, "m")).test_client().post(
        "/v1/chat/completions", json={"messages": messages})
    assert response.status_code == 200
    assert bytes(engine.jobs[0].prompt).decode().startswith("<|im_start|>system\nBe brief.\n\nlate<|im_end|>\n")


def test_a_template_without_think_is_not_split():
    engine = FakeEngine(pieces=THOUGHT)  # ChatML fallback: no <think> in it
    body = chat(client_for(engine)).get_json()
    assert body["choices"][0]["message"]["content"] == "Let me see.\n</think>\n\nParis."
    assert "completion_tokens_details" not in body["usage"]


def test_a_constrained_answer_may_follow_reasoning_when_the_prompt_opened_it():
    engine = FakeEngine(pieces=[b"Hm.", b"</think>", b'{"a": 1}'], chat_template=THINKING_TEMPLATE)
    body = chat(client_for(engine), response_format={"type": "json_object"}).get_json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": '{"a": 1}', "reasoning_content": "Hm."}
    assert engine.grammars[0].startswith("start: edge_think ")
    check_grammar(engine.grammars[0], param="response_format")  # llguidance compiles it

    engine = FakeEngine(pieces=[b'{"a": 1}'], chat_template=THINKING_TEMPLATE)
    chat(client_for(engine), response_format={"type": "json_object"}, reasoning_effort="none")
    assert "edge_think" not in engine.grammars[0]  # the block is closed: answer at once
