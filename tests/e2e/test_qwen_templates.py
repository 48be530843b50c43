"""Today's Qwen through the real server: llama.cpp's real Qwen templates and the real Qwen tokenizer.

Every model here is scripted (synthetic.write_scripted_vocab_model): it carries the real 151,936-token
vocabulary and one real template, and its greedy reply is a fixed text, so thinking, both tool-call
dialects, forced calls and history round trips are checked exactly, streamed and whole.
"""

from __future__ import annotations

import json

import openai
import pytest
import requests
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from tests.e2e.conftest import sse_events

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
THOUGHT = "The user asks about France. Its capital is Paris."
ANSWER = "The capital of France is Paris."
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
    "type": "object", "required": ["city"],
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"}}}}}
ARGUMENTS = {"city": "Paris", "days": 3, "metric": True}
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "metric": true}}\n</tool_call>'
XML_CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
            "</parameter>\n<parameter=metric>\ntrue\n</parameter>\n</function>\n</tool_call>")

# template -> (thinking prefix of a reply, or None when the template has no <think>; its call markup;
#              request fields that make the template think)
TEMPLATES = {
    "qwen2.5": (None, HERMES_CALL, {}),
    "qwen3": (f"<think>\n{THOUGHT}\n</think>\n\n", HERMES_CALL, {}),  # the model opens the block itself
    # llama.cpp's QwQ template closes the block unless enable_thinking is set (it is the variable's default).
    "qwq": (f"{THOUGHT}\n</think>\n\n", HERMES_CALL, {"enable_thinking": True}),
    "qwen3-coder": (None, XML_CALL, {}),
    "qwen3.5": (f"{THOUGHT}\n</think>\n\n", XML_CALL, {}),  # the generation prompt opens the block
}


@pytest.fixture(scope="module")
def served(start_server, qwen_scripted_model):
    """Factory: served(template, script, **template_kwargs) -> base URL of a server on that scripted model."""
    servers: dict[tuple, str] = {}

    def serve(template: str, script: str, **template_kwargs) -> str:
        key = (template, script, tuple(sorted(template_kwargs.items())))
        if key not in servers:
            model = qwen_scripted_model(template, script, **template_kwargs)
            servers[key] = start_server("--model", str(model), "--parallel", "1").base_url
            MODEL_OF[servers[key]] = model
        return servers[key]

    return serve


def post(base_url: str, **body) -> requests.Response:
    body = {"model": "qwen", "temperature": 0, "max_tokens": 120, **body}
    return requests.post(base_url + "/v1/chat/completions", json=body, timeout=60, stream=bool(body.get("stream")))


def whole(base_url: str, **body) -> dict:
    response = post(base_url, **body)
    assert response.status_code == 200, response.text
    return response.json()


def streamed(base_url: str, **body) -> tuple[list[dict], dict]:
    """(the deltas after the role chunk, the final chunk's choice) of a streamed answer."""
    response = post(base_url, stream=True, stream_options={"include_usage": True}, **body)
    assert response.status_code == 200, response.text
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[1:-1] if e["choices"] and e["choices"][0]["delta"]]
    finish = next(e["choices"][0] for e in events if e["choices"] and e["choices"][0]["finish_reason"])
    return deltas, {**finish, "usage": events[-2]["usage"]}


def joined(deltas: list[dict], key: str) -> str:
    return "".join(d.get(key) or "" for d in deltas)


def thinking_kwargs(template: str) -> dict:
    kwargs = TEMPLATES[template][2]
    return {"chat_template_kwargs": kwargs} if kwargs else {}


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_thinking_is_split_from_the_answer_streamed_and_whole(served, template):
    thinking, _, kwargs = TEMPLATES[template]
    base_url = served(template, (thinking or "") + ANSWER, **kwargs)
    card = requests.get(base_url + "/v1/models", timeout=10).json()["data"][0]["meta"]
    assert card["chat_template"] == "gguf" and card["thinking"] is (thinking is not None)

    body = whole(base_url, messages=QUESTION, **thinking_kwargs(template))
    message = body["choices"][0]["message"]
    assert message["content"] == ANSWER
    assert body["choices"][0]["finish_reason"] == "stop"
    if thinking is None:
        assert "reasoning_content" not in message and "completion_tokens_details" not in body["usage"]
        return
    assert message["reasoning_content"] == THOUGHT
    reasoning_tokens = body["usage"]["completion_tokens_details"]["reasoning_tokens"]
    assert 10 < reasoning_tokens < body["usage"]["completion_tokens"]

    deltas, finish = streamed(base_url, messages=QUESTION, **thinking_kwargs(template))
    assert joined(deltas, "reasoning_content") == THOUGHT and joined(deltas, "content") == ANSWER
    assert len([d for d in deltas if "reasoning_content" in d]) > 3  # the reasoning streams as it comes
    assert all("think>" not in (d.get("content") or "") for d in deltas)
    assert finish["finish_reason"] == "stop"
    assert finish["usage"]["completion_tokens_details"]["reasoning_tokens"] == reasoning_tokens


@pytest.mark.parametrize("template", ["qwen3", "qwen3.5"])
def test_enable_thinking_false_renders_a_closed_block_and_answers_without_reasoning(served, template):
    base_url = served(template, ANSWER, enable_thinking=False)
    for fields in ({"chat_template_kwargs": {"enable_thinking": False}}, {"reasoning_effort": "none"}):
        body = whole(base_url, messages=QUESTION, **fields)
        assert body["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}
        assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}
        expected = reference_prompt(template, QUESTION, enable_thinking=False)
        assert expected.endswith("<think>\n\n</think>\n\n")
        assert body["usage"]["prompt_tokens"] == len(tokenize(base_url, expected))


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_tool_calls_in_the_templates_own_dialect_with_typed_arguments(served, template):
    thinking, call, kwargs = TEMPLATES[template]
    base_url = served(template, (thinking or "") + call, **kwargs)
    body = whole(base_url, messages=QUESTION, tools=[WEATHER], **thinking_kwargs(template))
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"].get("reasoning_content") == (THOUGHT if thinking else None)
    [tool_call] = choice["message"]["tool_calls"]
    assert tool_call["function"]["name"] == "get_weather"
    assert json.loads(tool_call["function"]["arguments"]) == ARGUMENTS

    deltas, finish = streamed(base_url, messages=QUESTION, tools=[WEATHER], **thinking_kwargs(template))
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    first = calls[0]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"} for c in calls[1:])
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == ARGUMENTS
    assert joined(deltas, "content") == ""  # no fragment of the markup reaches content
    assert joined(deltas, "reasoning_content") == (THOUGHT if thinking else "")
    assert finish["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("template,tool_choice", [
    ("qwen3.5", "required"),
    ("qwen3.5", {"type": "function", "function": {"name": "get_weather"}}),
    ("qwen3-coder", "required"),
])
def test_forced_calls_are_constrained_to_the_xml_dialect(served, template, tool_choice):
    thinking, call, kwargs = TEMPLATES[template]
    base_url = served(template, (thinking or "") + call, **kwargs)
    body = whole(base_url, messages=QUESTION, tools=[WEATHER], tool_choice=tool_choice)
    choice = body["choices"][0]
    [tool_call] = choice["message"]["tool_calls"]
    assert json.loads(tool_call["function"]["arguments"]) == ARGUMENTS
    assert choice["message"].get("reasoning_content") == (THOUGHT if thinking else None)
    assert choice["finish_reason"] == "tool_calls"


def test_a_forced_xml_call_steers_a_model_that_would_answer_in_prose(served):
    """The grammar, not the script, decides: a model that wants to chat still produces a parseable call."""
    base_url = served("qwen3-coder", ANSWER)
    schema_tool = {"type": "function", "function": {"name": "count", "parameters": {
        "type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}}}
    body = whole(base_url, messages=QUESTION, tools=[schema_tool], tool_choice="required", max_tokens=300)
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    [tool_call] = body["choices"][0]["message"]["tool_calls"]
    assert tool_call["function"]["name"] == "count"
    assert isinstance(json.loads(tool_call["function"]["arguments"])["n"], int)


# ---- history round trips ------------------------------------------------------------------------

HISTORY = [
    {"role": "system", "content": "You are a weather assistant."},
    *QUESTION,
    {"role": "assistant", "content": "", "reasoning_content": "I should look the weather up.",
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": json.dumps(ARGUMENTS)}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
]


def reference_prompt(template: str, messages: list[dict], tools: list[dict] | None = None, **kwargs) -> str:
    """The template rendered as Hugging Face does it: arguments as mappings, reasoning as a field."""
    from edge_server.devtools.assets import qwen_template

    rendered = []
    for message in messages:
        message = dict(message)
        if "tool_calls" in message:
            message["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                                     for c in message["tool_calls"]]
        rendered.append(message)
    return Jinja2ChatFormatter(qwen_template(template), eos_token="<|im_end|>", bos_token="")(
        messages=rendered, tools=tools, **kwargs).prompt


MODEL_OF: dict[str, object] = {}  # base URL -> the GGUF its server runs
_VOCABS: dict[str, Llama] = {}


def tokenize(base_url: str, text: str) -> list[int]:
    """`text` in tokens of the served model's own vocabulary (the real one plus the template's added tokens)."""
    if base_url not in _VOCABS:
        _VOCABS[base_url] = Llama(str(MODEL_OF[base_url]), vocab_only=True, verbose=False)
    return _VOCABS[base_url].tokenize(text.encode(), add_bos=False, special=True)


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_history_with_calls_results_and_reasoning_renders_as_the_template_intends(served, template):
    thinking, call, kwargs = TEMPLATES[template]
    base_url = served(template, (thinking or "") + ANSWER, **kwargs)
    body = whole(base_url, messages=HISTORY, tools=[WEATHER], **thinking_kwargs(template))
    assert body["choices"][0]["message"]["content"] == ANSWER
    expected = reference_prompt(template, HISTORY, [WEATHER], **kwargs)
    assert body["usage"]["prompt_tokens"] == len(tokenize(base_url, expected))
    # The call went back in the template's own dialect, its arguments as values.
    if call is XML_CALL:
        assert "<parameter=city>\nParis\n</parameter>" in expected and "<parameter=days>\n3\n</parameter>" in expected
    else:
        assert '"arguments": {"city": "Paris", "days": 3, "metric": true}' in expected
    if template == "qwen3.5":  # keeps the reasoning of turns after the last user query
        assert "<think>\nI should look the weather up.\n</think>" in expected
    # The same history under vLLM's and Ollama's field name renders the same.
    renamed = [{("reasoning" if k == "reasoning_content" else k): v for k, v in m.items()} for m in HISTORY]
    assert whole(base_url, messages=renamed, tools=[WEATHER], **thinking_kwargs(template))["usage"]["prompt_tokens"] \
        == body["usage"]["prompt_tokens"]


def test_a_template_exception_is_a_400_with_its_message(served):
    base_url = served("qwen3.5", TEMPLATES["qwen3.5"][0] + ANSWER)
    response = post(base_url, messages=[{"role": "system", "content": "Only a system message."}])
    assert response.status_code == 400
    assert "No user query found in messages." in response.json()["error"]["message"]


def test_the_openai_sdk_reads_reasoning_and_xml_calls(served):
    thinking, call, _ = TEMPLATES["qwen3.5"]
    client = openai.OpenAI(base_url=served("qwen3.5", thinking + call) + "/v1", api_key="none")
    with client.chat.completions.stream(model="qwen", messages=QUESTION, tools=[WEATHER], temperature=0) as stream:
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert message.tool_calls[0].function.parsed_arguments == ARGUMENTS or \
        json.loads(message.tool_calls[0].function.arguments) == ARGUMENTS
    assert message.reasoning_content == THOUGHT


def test_reasoning_cut_off_by_max_tokens_stays_reasoning(served):
    thinking, _, _ = TEMPLATES["qwen3.5"]
    base_url = served("qwen3.5", thinking + ANSWER)
    body = whole(base_url, messages=QUESTION, max_tokens=6)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == ""
    assert THOUGHT.startswith(choice["message"]["reasoning_content"]) and choice["message"]["reasoning_content"]
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 6
    deltas, finish = streamed(base_url, messages=QUESTION, max_tokens=6)
    assert joined(deltas, "reasoning_content") == choice["message"]["reasoning_content"]
    assert joined(deltas, "content") == "" and finish["finish_reason"] == "length"


def test_xml_text_before_the_call_and_parallel_calls_by_index(served):
    oslo = XML_CALL.replace("Paris", "Oslo").replace("\n3\n", "\n1\n")
    base_url = served("qwen3-coder", f"Let me check both.\n\n{XML_CALL}\n{oslo}")
    body = whole(base_url, messages=QUESTION, tools=[WEATHER])
    message = body["choices"][0]["message"]
    assert message["content"] == "Let me check both."
    assert [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]] == [
        ARGUMENTS, {**ARGUMENTS, "city": "Oslo", "days": 1}]
    deltas, finish = streamed(base_url, messages=QUESTION, tools=[WEATHER])
    assert joined(deltas, "content") == "Let me check both."
    starts = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]]
    assert [s["index"] for s in starts] == [0, 1] and len({s["id"] for s in starts}) == 2
    for index, expected in enumerate(message["tool_calls"]):
        fragments = [d["tool_calls"][0]["function"]["arguments"] for d in deltas
                     if "tool_calls" in d and d["tool_calls"][0]["index"] == index]
        assert json.loads("".join(fragments)) == json.loads(expected["function"]["arguments"])
    assert finish["finish_reason"] == "tool_calls"
    # parallel_tool_calls false: one call only.
    single = whole(base_url, messages=QUESTION, tools=[WEATHER], parallel_tool_calls=False)
    assert len(single["choices"][0]["message"]["tool_calls"]) == 1
