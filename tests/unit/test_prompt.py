"""Conversations rendered through the Qwen2.5-style template the test models carry."""

from __future__ import annotations

import pytest

from edge_server.generation.prompt import PromptRenderer, TemplateRefused
from edge_server.api.schemas import ChatMessage
from edge_server.devtools.synthetic import CHAT_TEMPLATE


def render(messages: list[dict], tools: list[dict] | None = None) -> str:
    renderer = PromptRenderer(CHAT_TEMPLATE, bos_token="<|endoftext|>", eos_token="<|im_end|>", add_bos=False,
                              tokenize=lambda text, add_bos, special: list(text))
    return renderer.chat_text([ChatMessage.model_validate(m) for m in messages], tools)


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def test_assistant_call_arguments_are_rendered_as_an_object_not_a_string():
    text = render([{"role": "user", "content": "Weather?"},
                   {"role": "assistant", "content": None, "tool_calls": [CALL]}])
    assert '"arguments": {"city": "Paris"}' in text
    assert '\\"city\\"' not in text and "None" not in text


def test_consecutive_tool_results_share_one_user_turn_in_order():
    text = render([{"role": "user", "content": "Weather?"},
                   {"role": "assistant", "content": None, "tool_calls": [CALL, CALL]},
                   {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                   {"role": "tool", "tool_call_id": "call_1", "content": "windy"}])
    turn = text.split("<|im_start|>user")[-1]
    assert turn.index("sunny") < turn.index("windy")
    assert turn.count("<tool_response>") == 2


def test_tools_are_listed_in_the_system_turn():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    text = render([{"role": "user", "content": "Hi"}], tools)
    system = text.split("<|im_end|>")[0]
    assert "<tools>" in system and '"name": "get_weather"' in system
    assert text.endswith("<|im_start|>assistant\n")


def test_legacy_function_messages_render_like_tool_messages():
    legacy = render([{"role": "user", "content": "Weather?"},
                     {"role": "assistant", "content": None, "function_call": CALL["function"]},
                     {"role": "function", "name": "get_weather", "content": "sunny"}])
    current = render([{"role": "user", "content": "Weather?"},
                      {"role": "assistant", "content": None, "tool_calls": [CALL]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    assert legacy == current


# ---- system messages after the first (Claude Code sends one mid-conversation) ------------------------

# A template that renders only a leading system message and drops the others, and one that refuses them.
DROPPING = ("{% for m in messages %}{% if m.role != 'system' or loop.first %}<|im_start|>{{ m.role }}\n"
            "{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}<|im_start|>assistant\n")
REFUSING = ("{% for m in messages %}{% if m.role == 'system' and not loop.first %}"
            "{{ raise_exception('System message must be at the beginning.') }}{% endif %}<|im_start|>{{ m.role }}\n"
            "{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
LATE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "system", "content": "Agents: Explore."}, {"role": "developer", "content": "Use tools."}]


def render_with(template: str, messages: list[dict]) -> str:
    renderer = PromptRenderer(template, bos_token="", eos_token="<|im_end|>", add_bos=False,
                              tokenize=lambda text, add_bos, special: list(text))
    return renderer.chat_text([ChatMessage.model_validate(m) for m in messages])


def test_late_system_messages_stay_where_they_are_when_the_template_renders_them():
    text = render(LATE)
    assert text.index("Hi") < text.index("<|im_start|>system\nAgents: Explore.") < text.index("Use tools.")
    assert text.startswith("<|im_start|>system\nBe brief.")


def test_late_system_messages_are_merged_into_the_first_when_the_template_drops_or_refuses_them():
    merged = "<|im_start|>system\nBe brief.\n\nAgents: Explore.\n\nUse tools.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert render_with(DROPPING, LATE) == render_with(REFUSING, LATE) == merged + "<|im_start|>assistant"
    # Without a leading system message, the late ones become it.
    assert render_with(REFUSING, LATE[1:3]).startswith("<|im_start|>system\nAgents: Explore.<|im_end|>\n<|im_start|>user")


def test_a_template_that_refuses_the_conversation_for_another_reason_still_refuses_it():
    always = "{{ raise_exception('No user query found in messages.') }}"
    with pytest.raises(TemplateRefused, match="No user query"):
        render_with(always, LATE)
