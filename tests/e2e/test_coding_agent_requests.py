"""What coding agents send with their defaults, through the real server and the official SDKs: Claude Code's
Messages requests (a system message mid-conversation, adaptive thinking and effort, a thinking budget, tools
with schemas too large to enforce, betas), Codex's Responses requests (namespace tools, hosted tools, its
extra fields), chat requests with a max_tokens larger than the context, the server's output limits
(--n-predict, --n-predict-max) and the default context."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest
import requests

from edge_server.devtools.synthetic import write_random_model
from edge_server.engine.contextsize import kv_bytes_per_token
from edge_server.ggufmeta import read_gguf_metadata
from tests.conftest import SCRIPT_TEXT
from tests.e2e.test_qwen_templates import MODEL_OF, reference_prompt, tokenize

USER = [{"role": "user", "content": "What does hello.py print?"}]
LATE_SYSTEM = "Available agent types: general-purpose, Explore."
THOUGHT = "The user asks about France. Its capital is Paris, a city on the Seine with many museums and old bridges."
ANSWER = "The capital of France is Paris."
# Claude Code lists a Workflow tool whose script may be 512 KiB: far past what a grammar could enforce.
WORKFLOW = {"name": "Workflow", "description": "Run a workflow script", "input_schema": {
    "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "additionalProperties": False,
    "properties": {"script": {"type": "string", "maxLength": 524288}}, "required": ["script"]}}
READ = {"name": "Read", "description": "Read a file", "input_schema": {
    "type": "object", "additionalProperties": False, "required": ["file_path"], "properties": {
        "file_path": {"type": "string"}, "offset": {"type": "integer", "minimum": 0, "maximum": 9007199254740991}}}}
CLAUDE_BETAS = "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27," \
               "mid-conversation-system-2026-04-07,effort-2025-11-24,some-future-beta-2027-01-01"


def claude(base_url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base_url, api_key="none", max_retries=0, timeout=120)


def oai(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=120)


def claude_code_body(**fields) -> dict:
    """A request shaped like Claude Code's (2.1): cached system blocks, a system message after the user's,
    24 tools in the real one (two here), and the fields it always sends."""
    return {
        "model": "claude-sonnet-4-5", "max_tokens": 32000, "stream": True,
        "system": [{"type": "text", "text": "You are Claude Code."},
                   {"type": "text", "text": "Answer briefly.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [
                         {"type": "text", "text": "<system-reminder>context</system-reminder>"},
                         {"type": "text", "text": USER[0]["content"], "cache_control": {"type": "ephemeral"}}]},
                     {"role": "system", "content": LATE_SYSTEM}],
        "tools": [READ, WORKFLOW],
        "metadata": {"user_id": json.dumps({"device_id": "d", "session_id": "s"})},
        "thinking": {"type": "adaptive"}, "output_config": {"effort": "high"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        **fields,
    }


def sdk_call(body: dict) -> dict:
    """`body` as arguments of the SDK's messages.create: fields it may not know go in `extra_body`."""
    extra = {key: body[key] for key in ("output_config", "context_management", "thinking") if key in body}
    return {**{key: value for key, value in body.items() if key not in extra}, "extra_body": extra}


# ---- Claude Code: the Messages API ----------------------------------------------------------------

def test_claude_codes_request_streams_an_answer(scripted_server):
    body = claude_code_body()
    response = requests.post(scripted_server.base_url + "/v1/messages?beta=true", json=body, stream=True, timeout=120,
                             headers={"anthropic-beta": CLAUDE_BETAS, "anthropic-version": "2023-06-01",
                                      "x-api-key": "none"})
    assert response.status_code == 200, response.text
    events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == {"type": "message_stop"}
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert text == SCRIPT_TEXT
    # max_tokens 32,000 is far past the 4,096-token context: clamped, and the answer ends by itself.
    assert events[-2]["delta"]["stop_reason"] == "end_turn"


def test_the_anthropic_sdk_sends_claude_codes_fields_with_betas(scripted_server):
    message = claude(scripted_server.base_url).beta.messages.create(
        betas=CLAUDE_BETAS.split(","), **sdk_call(claude_code_body(stream=False)))
    assert [block.type for block in message.content] == ["text"] and message.content[0].text == SCRIPT_TEXT
    assert message.stop_reason == "end_turn"


def test_a_forced_call_of_a_tool_whose_schema_cannot_be_enforced_is_a_clear_400(scripted_server):
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude(scripted_server.base_url).messages.create(**sdk_call(claude_code_body(
            stream=False, tool_choice={"type": "tool", "name": "Workflow"})))
    error = refused.value.body["error"]
    assert error["type"] == "invalid_request_error" and "1000" in error["message"] and "524288" in error["message"]
    # Listing the same tool is fine (the first tests); so is forcing the one whose schema can be enforced.
    forced = claude(scripted_server.base_url).messages.create(**sdk_call(claude_code_body(
        stream=False, tool_choice={"type": "tool", "name": "Read"}, max_tokens=40)))
    assert forced.content[-1].type == "tool_use" and forced.content[-1].name == "Read"


@pytest.fixture(scope="module")
def templates(start_server, qwen_scripted_model):
    """Factory: template name -> base URL of a server on a scripted model with that real Qwen template."""
    servers: dict[str, str] = {}

    def serve(template: str) -> str:
        if template not in servers:
            model = qwen_scripted_model(template, ANSWER)
            servers[template] = start_server("--model", str(model), "--parallel", "1").base_url
            MODEL_OF[servers[template]] = model
        return servers[template]

    return serve


@pytest.mark.parametrize("template, in_place", [("qwen2.5", True), ("qwen3", True), ("qwen3.5", False)])
def test_a_system_message_mid_conversation_is_rendered_in_place_or_merged_never_dropped(templates, template, in_place):
    base_url = templates(template)
    messages = [*USER, {"role": "system", "content": LATE_SYSTEM}]
    counted = claude(base_url).messages.count_tokens(model="m", system="Be brief.", messages=messages)
    chat = [{"role": "system", "content": "Be brief."}, *messages]
    merged = [{"role": "system", "content": f"Be brief.\n\n{LATE_SYSTEM}"}, *USER]
    expected = reference_prompt(template, chat if in_place else merged)
    assert counted.input_tokens == len(tokenize(base_url, expected))
    assert LATE_SYSTEM in expected
    if in_place:
        assert expected.index(LATE_SYSTEM) > expected.index(USER[0]["content"])
    else:  # Qwen3.5's template raises on a system message after the first
        with pytest.raises(Exception, match="beginning"):
            reference_prompt(template, chat)
    # The same through the chat API, and without a leading system prompt.
    answer = oai(base_url).chat.completions.create(model="m", messages=chat, temperature=0, max_tokens=20)
    assert answer.usage.prompt_tokens == counted.input_tokens and answer.choices[0].finish_reason == "stop"
    alone = claude(base_url).messages.count_tokens(model="m", messages=messages)
    expected = reference_prompt(template, messages if in_place else [{"role": "system", "content": LATE_SYSTEM}, *USER])
    assert alone.input_tokens == len(tokenize(base_url, expected))


@pytest.mark.parametrize("fields, thinks", [
    ({"thinking": {"type": "adaptive"}}, True),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, True),
    ({"thinking": {"type": "disabled"}}, False),
    ({"output_config": {"effort": "max"}}, True),
    ({"output_config": {"effort": "low"}, "thinking": {"type": "disabled"}}, False),
])
def test_thinking_and_effort_switch_the_templates_thinking(templates, fields, thinks):
    base_url = templates("qwen3")
    counted = requests.post(base_url + "/v1/messages/count_tokens", json={"model": "m", "messages": USER, **fields},
                            timeout=60)
    assert counted.status_code == 200, counted.text
    expected = reference_prompt("qwen3", USER, enable_thinking=thinks)
    assert counted.json()["input_tokens"] == len(tokenize(base_url, expected))
    assert expected.endswith("<think>\n\n</think>\n\n") is not thinks


@pytest.fixture(scope="module")
def thinker(start_server, qwen_scripted_model) -> str:
    """Qwen3 thinking at length, then answering; it answers as well after a block the server closed."""
    model = qwen_scripted_model("qwen3", f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}",
                                replies=(("\n</think>\n\n", ANSWER),))
    base_url = start_server("--model", str(model), "--parallel", "1").base_url
    MODEL_OF[base_url] = model
    return base_url


@pytest.mark.parametrize("stream", [False, True])
def test_budget_tokens_ends_the_thinking_there_and_the_answer_follows(thinker, stream):
    client = claude(thinker)

    def ask(thinking: dict) -> anthropic.types.Message:
        fields = {"model": "m", "max_tokens": 200, "messages": USER, "extra_body": {"thinking": thinking}}
        if not stream:
            return client.messages.create(**fields)
        with client.messages.stream(**fields) as events:
            return events.get_final_message()

    free = ask({"type": "adaptive"})
    assert [b.type for b in free.content] == ["thinking", "text"] and free.content[0].thinking == THOUGHT
    budgeted = ask({"type": "enabled", "budget_tokens": 6})
    assert [b.type for b in budgeted.content] == ["thinking", "text"] and budgeted.content[1].text == ANSWER
    thought = budgeted.content[0].thinking
    assert THOUGHT.startswith(thought) and len(tokenize(thinker, "\n" + thought)) == 6  # "\n" opens the block
    assert budgeted.stop_reason == "end_turn"
    # <think>, 6 tokens of thought, the block closed by the server ("\n</think>\n\n"), the answer.
    assert budgeted.usage.output_tokens == 1 + 6 + 3 + len(tokenize(thinker, ANSWER))
    roomy = ask({"type": "enabled", "budget_tokens": 1000})
    assert roomy.content[0].thinking == THOUGHT and roomy.usage.output_tokens == free.usage.output_tokens


# ---- Codex: the Responses API ---------------------------------------------------------------------

SPAWN = {"type": "function", "name": "spawn_agent", "description": "Spawn a sub-agent", "strict": False,
         "parameters": {"type": "object", "additionalProperties": False, "required": ["agent"],
                        "properties": {"agent": {"type": "string", "enum": ["explorer", "worker"]}}}}
NAMESPACE = {"type": "namespace", "name": "multi_agent_v1", "description": "Tools for sub-agents.", "tools": [SPAWN]}
EXEC = {"type": "function", "name": "exec_command", "description": "Run a command", "strict": False,
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}}


def codex_body(**fields) -> dict:
    """A request shaped like `codex exec`'s (0.171): developer and user messages as input_text parts, function,
    namespace and hosted tools, and the fields it always sends."""
    def message(role: str, text: str) -> dict:
        return {"type": "message", "role": role, "content": [{"type": "input_text", "text": text}]}

    return {
        "model": "qwen", "stream": True, "tool_choice": "auto", "parallel_tool_calls": True,
        "input": [message("developer", "You are a coding agent."), message("developer", "<skills>none</skills>"),
                  message("user", "<environment_context>cwd</environment_context>"), message("user", "say hi")],
        "tools": [EXEC, NAMESPACE, {"type": "web_search", "external_web_access": False}],
        "reasoning": {"summary": "auto"}, "store": False, "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0190-session", "client_metadata": {"thread_id": "t", "turn_id": "u"},
        **fields,
    }


def responses_call(body: dict) -> dict:
    """`body` as arguments of the SDK's responses.create/stream: fields it may not know go in `extra_body`."""
    extra = {key: body[key] for key in ("client_metadata", "prompt_cache_key") if key in body}
    return {**{key: value for key, value in body.items() if key not in extra}, "extra_body": extra}


def test_codexs_request_is_answered_and_its_hosted_tool_left_out_with_a_warning(scripted_server):
    body = responses_call(codex_body())
    del body["stream"]
    with oai(scripted_server.base_url).responses.stream(**body) as events:
        final = events.get_final_response()
    assert final.status == "completed" and final.output_text == SCRIPT_TEXT
    assert [tool.type for tool in final.tools] == ["function", "namespace", "web_search"]  # echoed as sent
    assert "left out tools that do not run on this server: tools.2 (web_search)" in scripted_server.log()


def test_a_hosted_tool_named_by_tool_choice_is_a_400(scripted_server):
    with pytest.raises(openai.BadRequestError) as refused:
        oai(scripted_server.base_url).responses.create(**responses_call(codex_body(
            stream=False, tool_choice={"type": "web_search"})))
    assert refused.value.body["param"] == "tool_choice" and "web_search" in refused.value.body["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_namespace_function_is_called_by_its_flat_name_and_answered_by_namespace_and_name(server, stream):
    body = responses_call(codex_body(stream=False, tool_choice={"type": "function", "name": "spawn_agent"},
                                     temperature=0, max_output_tokens=60))
    if stream:
        with oai(server.base_url).responses.stream(**{k: v for k, v in body.items() if k != "stream"}) as events:
            done = [e.item for e in events if e.type == "response.output_item.done"]
            final = events.get_final_response()
        assert done[-1].model_dump()["namespace"] == "multi_agent_v1"
    else:
        final = oai(server.base_url).responses.create(**body)
    call = next(item for item in final.output if item.type == "function_call")
    raw = call.model_dump()
    assert (raw["name"], raw["namespace"]) == ("spawn_agent", "multi_agent_v1")
    assert json.loads(call.arguments)["agent"] in ("explorer", "worker")
    # Codex hands the call back with its namespace, then the output: the history renders and runs.
    history = [*body["input"], raw, {"type": "function_call_output", "call_id": call.call_id, "output": "spawned"}]
    after = oai(server.base_url).responses.create(**responses_call(codex_body(stream=False, input=history,
                                                                             max_output_tokens=4)))
    assert after.status in ("completed", "incomplete")


# ---- chat agents: opencode, Qwen Code, Continue, aider ----------------------------------------------

def test_a_max_tokens_past_the_context_is_clamped_to_it(start_server, tiny_model):
    base_url = start_server("--model", str(tiny_model), "--n-ctx", "96", "--parallel", "1").base_url
    messages = [{"role": "user", "content": "Count."}]
    for max_tokens in (4096, 64000):  # Qwen Code asks again with 64,000 after a length finish
        chunks = list(oai(base_url).chat.completions.create(
            model="m", messages=messages, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
            temperature=0))
        finish = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
        usage = chunks[-1].usage
        assert finish == "length" and usage.prompt_tokens + usage.completion_tokens == 96


def test_tools_with_unenforceable_schemas_are_listed_and_refused_only_when_required(scripted_server):
    tools = [{"type": "function", "function": {"name": "ok", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "big", "parameters": {
                 "type": "object", "properties": {"text": {"type": "string", "maxLength": 524288}}}}}]
    listed = oai(scripted_server.base_url).chat.completions.create(model="m", messages=USER, tools=tools,
                                                                   temperature=0)
    assert listed.choices[0].message.content == SCRIPT_TEXT
    with pytest.raises(openai.BadRequestError) as refused:
        oai(scripted_server.base_url).chat.completions.create(model="m", messages=USER, tools=tools,
                                                              tool_choice="required")
    assert refused.value.body["param"] == "tools.1" and refused.value.body["code"] == "schema_too_large"


# ---- the server's output limits ---------------------------------------------------------------------

def test_n_predict_is_the_default_limit_and_n_predict_max_the_ceiling(start_server, scripted_model):
    base_url = start_server("--model", str(scripted_model), "--n-predict", "3", "--n-predict-max", "5").base_url
    meta = requests.get(base_url + "/v1/models", timeout=10).json()["data"][0]["meta"]
    assert (meta["n_predict"], meta["n_predict_max"]) == (3, 5)
    client = oai(base_url)
    unlimited = client.chat.completions.create(model="m", messages=USER, temperature=0)
    assert unlimited.usage.completion_tokens == 3 and unlimited.choices[0].finish_reason == "length"
    greedy = client.chat.completions.create(model="m", messages=USER, temperature=0, max_tokens=100)
    assert greedy.usage.completion_tokens == 5 and greedy.choices[0].finish_reason == "length"
    assert greedy.choices[0].message.content.startswith("Hello, world!")  # then half an emoji
    message = claude(base_url).messages.create(model="m", max_tokens=32000, messages=USER)
    assert message.usage.output_tokens == 5 and message.stop_reason == "max_tokens"
    response = client.responses.create(model="m", input="Hi")
    assert response.usage.output_tokens == 3 and response.status == "incomplete"


def test_without_output_limits_models_show_none(server):
    meta = requests.get(server.base_url + "/v1/models", timeout=10).json()["data"][0]["meta"]
    assert (meta["n_predict"], meta["n_predict_max"]) == (None, None)


# ---- the default context ------------------------------------------------------------------------------

def test_the_default_context_is_the_trained_one_when_memory_allows_and_the_estimate_is_llamas(start_server,
                                                                                                tmp_path):
    model = write_random_model(tmp_path / "long.gguf", context_length=32768)
    server = start_server("--model", str(model), "--parallel", "2")
    meta = requests.get(server.base_url + "/v1/models", timeout=10).json()["data"][0]["meta"]
    assert meta["n_ctx"] == meta["n_ctx_train"] == 32768
    assert "n_ctx 32768 per request by default" in server.log() and "limited by the trained context" in server.log()
    # The estimate from the GGUF's shape is what llama.cpp allocated.
    per_token = kv_bytes_per_token(read_gguf_metadata(model, arrays=False))
    assert meta["devices"][0]["kv_cache_mib"] == pytest.approx(per_token * 2 * 32768 / 2**20, abs=0.05)
    # A prompt past it is the 400 it always was.
    response = requests.post(server.base_url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "word " * 40000}], "max_tokens": 1})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert "32768" in response.json()["error"]["message"]
