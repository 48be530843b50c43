"""Conversations rendered through the Qwen2.5-style template the test models carry."""

from __future__ import annotations

from edge_server.generation.prompt import PromptRenderer
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
