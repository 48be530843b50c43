"""What an attacker and real client libraries send, through the real server: never a crash, a stall
that others feel, a bloat, a 500, a forged log line or a leak."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Literal

import agents
import pytest
import requests
from openai import AsyncOpenAI, OpenAI
from openai.lib._parsing._completions import type_to_response_format_param
from pydantic import BaseModel

from edge_server.devtools.synthetic import write_scripted_model
from edge_server.engine.loader import load_engine
from edge_server.engine.types import PromptTooLong
from tests.e2e.conftest import chat, sse_events

USER = [{"role": "user", "content": "Hi"}]
CRASHING_SCHEMAS = [
    {"type": "string", "pattern": "^a{1,20000}$"},
    {"type": "string", "pattern": "^[a-z]{3,100000}$"},
    {"type": "string", "pattern": "^(x{1,2}){1,1000000}$"},
    {"type": "string", "maxLength": 100000},
    {"type": "array", "items": {"type": "integer"}, "maxItems": 1000000},
]


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def post(base_url: str, body: dict | bytes, route: str = "/v1/chat/completions", **kwargs) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(base_url + route, data=data, headers={"Content-Type": "application/json"}, timeout=60,
                         **kwargs)


def assert_400(response: requests.Response, param: str | None = None) -> dict:
    assert response.status_code == 400, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.fixture(scope="module")
def client(base_url) -> OpenAI:
    return OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=60)


# ---- 1: schemas that used to kill the process -----------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("schema", CRASHING_SCHEMAS, ids=[json.dumps(s)[:40] for s in CRASHING_SCHEMAS])
def test_schema_that_crashed_the_process_is_a_400_naming_the_limit(server, schema, stream):
    response = post(server.base_url, {"messages": USER, "stream": stream, "max_tokens": 4,
                                      "response_format": json_schema_format(schema)})
    error = assert_400(response, "response_format.json_schema.schema")
    assert error["code"] == "schema_too_large" and "1000" in error["message"]
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"value": schema}, "required": ["value"]}}}
    response = post(server.base_url, {"messages": USER, "stream": stream, "max_tokens": 4, "tools": [tool],
                                      "tool_choice": {"type": "function", "function": {"name": "f"}}})
    assert_400(response, "tools.0")  # the tool whose parameters are too large
    assert server.process.poll() is None
    assert chat(server.base_url, max_tokens=2, temperature=0).status_code == 200


def test_largest_allowed_repetition_and_enum_are_served(client):
    answer = client.chat.completions.create(
        model="m", messages=USER, max_tokens=6, temperature=0,
        response_format=json_schema_format({"type": "string", "pattern": "^a{1,1000}$"}))
    assert answer.choices[0].message.content.startswith('"a')
    values = [f"value-{i:03d}" for i in range(256)]
    answer = client.chat.completions.create(
        model="m", messages=USER, max_tokens=40, temperature=0,
        response_format=json_schema_format({"type": "object", "properties": {"v": {"enum": values}},
                                            "required": ["v"], "additionalProperties": False}))
    assert json.loads(answer.choices[0].message.content)["v"] in values


@pytest.mark.parametrize("size, refusal", [(20000, "at most 10000"), (5000, "256 alternatives")])
def test_huge_enum_is_refused_without_touching_the_engine(server, size, refusal):
    enum = {"type": "string", "enum": [f"value-{i:06d}" for i in range(size)]}
    error = assert_400(post(server.base_url, {"messages": USER, "response_format": json_schema_format(enum)}))
    assert error["param"].startswith("response_format.json_schema.schema") and refusal in error["message"]
    assert server.health()["running"] == 0


def test_a_pattern_asking_for_a_nul_byte_is_written_as_its_json_escape(server):
    # No token holds a NUL byte: llama.cpp's grammar allowed no token here and accepting one aborted the
    # process. JSON writes it as an escape, which the schema's pattern reads as the character.
    response = post(server.base_url, {"messages": USER, "max_tokens": 12, "temperature": 0,
                                      "response_format": json_schema_format({"type": "string", "pattern": "^\\x00$"})})
    assert response.status_code == 200 and json.loads(response.json()["choices"][0]["message"]["content"]) == "\x00"
    assert server.process.poll() is None
    assert chat(server.base_url, max_tokens=2, temperature=0).status_code == 200


def test_extreme_sampling_settings_never_make_the_grammar_accept_a_refused_token(server):
    # A temperature of 1e-40 turned logits into inf and NaN; the chain then picked a token the grammar
    # refuses, and accepting it aborts llama.cpp.
    for seed in range(3):
        response = post(server.base_url, {"messages": USER, "max_tokens": 12, "temperature": 1e-40, "top_p": 1,
                                          "min_p": 0, "seed": seed,
                                          "response_format": json_schema_format({"enum": ["yes", "no"]})})
        assert response.status_code == 200, response.text
        assert json.loads(response.json()["choices"][0]["message"]["content"]) in ("yes", "no")
    assert assert_400(post(server.base_url, {"messages": USER, "repeat_penalty": 1e-300}), "repeat_penalty")
    assert server.process.poll() is None


@pytest.mark.parametrize("schema", [{"type": "string", "minLength": 5, "maxLength": 2},
                                    {"type": "string", "pattern": "^a]$"}], ids=["min above max", "stray bracket"])
def test_schemas_that_hung_or_exhausted_the_process_are_a_400(server, schema):
    response = post(server.base_url, {"messages": USER, "response_format": json_schema_format(schema)})
    assert assert_400(response, "response_format.json_schema.schema")["code"] == "invalid_schema"


# ---- 3 and 4: bodies that cost before they are refused -----------------------------------------

def test_million_element_bodies_are_refused(server):
    assert_400(post(server.base_url, json.dumps({"messages": [1] * 1_000_000}).encode()), "messages")
    assert_400(post(server.base_url, json.dumps({"messages": USER, "tools": [1] * 1_000_000}).encode()), "tools")


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def test_eight_huge_prompts_are_refused_before_they_are_tokenized(start_server, tiny_model):
    server = start_server("--model", str(tiny_model), "--log-level", "warning")
    pid = server.process.pid
    assert chat(server.base_url, max_tokens=2, temperature=0).status_code == 200
    before = rss_kib(pid, "VmRSS")
    text = "word " * 1_900_000  # ~9.5 MB
    bodies = [json.dumps({"messages": [{"role": "user", "content": text}]}).encode(),
              json.dumps({"prompt": text}).encode()]
    answers: list[requests.Response] = []

    def send(i: int) -> None:
        answers.append(post(server.base_url, bodies[i % 2], "/v1/chat/completions" if i % 2 == 0 else "/v1/completions"))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(answers) == 8
    for answer in answers:
        assert assert_400(answer)["code"] == "context_length_exceeded"
    peak, after = rss_kib(pid, "VmHWM"), rss_kib(pid, "VmRSS")
    print(f"\nRSS before {before / 1024:.0f} MB, peak {peak / 1024:.0f} MB, after {after / 1024:.0f} MB")
    assert peak - before < 800 * 1024  # tokenizing them all reached +3.5 GB
    assert after - before < 60 * 1024
    assert chat(server.base_url, max_tokens=2, temperature=0).status_code == 200


@pytest.mark.parametrize("body, param", [
    ({"messages": USER, "stop": ["b" * 400_000] * 15 + ["a" * 400_000 + "b"]}, "stop"),
    ({"messages": USER, "logit_bias": {"0" * 5000: 1}}, "logit_bias"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f", "parameters": json.loads(
        '{"type": "object", "properties": {"a": ' * 40 + '{"type": "string"}' + "}}" * 40)}}]}, "tools.0"),
], ids=["long stop strings", "4,000-digit token id", "deep tool schema"])
def test_costly_field_values_are_refused_up_front(server, body, param):
    assert assert_400(post(server.base_url, body))["param"].startswith(param)


def test_integer_literals_past_40_digits_are_a_400(server):
    raw = b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": ' + b"1" * 5000 + b"}"
    assert "40 digits" in assert_400(post(server.base_url, raw))["message"]


def test_text_whose_bytes_cannot_fit_is_refused_before_the_tokenizer_reads_it(start_server, tiny_model):
    engine = load_engine(tiny_model, threads=1)
    try:
        longest = engine.info.max_token_bytes
        with pytest.raises(PromptTooLong) as refused:
            engine.tokenize(b"x" * (longest * 300), False, True, max_tokens=256)
        assert refused.value.at_least and refused.value.tokens == 300
    finally:
        engine.close()
    # Four bytes per character: the character count lets it through, the rendered bytes cannot fit.
    server = start_server("--model", str(tiny_model), "--n-ctx", "256")
    emoji = "\U0001F600" * (100 * longest)
    for route, body in (("/v1/completions", {"prompt": emoji}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": emoji}]})):
        error = assert_400(post(server.base_url, body, route))
        assert error["code"] == "context_length_exceeded" and "at least" in error["message"]


# ---- 5: nesting and invalid text are 400s, streamed or not -------------------------------------

HOSTILE_BODIES = [
    ("100,000 deep", b'{"messages":' + b"[" * 100_000 + b"]" * 100_000 + b',"stream":true}', None),
    ("content 5,000 deep", b'{"stream":true,"messages":[{"role":"user","content":' + b"[" * 5000 + b"]" * 5000
     + b"}]}", None),
    ("surrogate in content", b'{"stream":true,"messages":[{"role":"user","content":"a\\ud800"}]}',
     "messages.0.content"),
    ("surrogate in model", b'{"stream":true,"model":"\\ud800","messages":[{"role":"user","content":"a"}]}', "model"),
]


@pytest.mark.parametrize("name, raw, param", HOSTILE_BODIES, ids=[case[0] for case in HOSTILE_BODIES])
@pytest.mark.parametrize("stream", [True, False])
def test_nesting_and_lone_surrogates_are_a_400_envelope(server, name, raw, param, stream):
    if not stream:
        raw = raw.replace(b'"stream":true', b'"stream":false')
    assert_400(post(server.base_url, raw), param)


@pytest.mark.parametrize("stream", ["true", "false"])
def test_lone_surrogate_in_a_legacy_prompt_is_a_400(server, stream):
    assert_400(post(server.base_url, b'{"prompt":"x\\ud800","stream":' + stream.encode() + b"}", "/v1/completions"),
               "prompt")


# ---- 6 and 7: logs and metrics ------------------------------------------------------------------

def raw_get(port: int, target: str, headers: str = "") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n".encode("latin-1"))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_client_text_cannot_forge_access_log_lines(start_server, tiny_model):
    server = start_server("--model", str(tiny_model))
    raw_get(server.port, "/v1/models/x%0d%0aFORGED%20line")
    raw_get(server.port, "/nope%0aFORGED%1b[31m")
    answer = raw_get(server.port, "/health", "X-Request-Id: evil\x1b[2Jid FORGED\r\n")
    assert b"evil" not in answer.split(b"\r\n\r\n")[0]
    good = requests.get(server.base_url + "/health", headers={"X-Request-Id": "client-42.a:b"}, timeout=5)
    assert good.headers["X-Request-Id"] == "client-42.a:b"
    time.sleep(0.2)
    lines = server.log().splitlines()
    assert not any(line.startswith("FORGED") for line in lines)
    assert "\x1b" not in server.log()
    assert any("/v1/models/x\\r\\nFORGED line" in line for line in lines)
    assert any("client-42.a:b GET /health 200" in line for line in lines)


def test_metrics_need_the_api_key_unless_made_public(start_server, tiny_model):
    private = start_server("--model", str(tiny_model), "--api-key", "sesame")
    refused = requests.get(private.base_url + "/metrics", timeout=5)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    allowed = requests.get(private.base_url + "/metrics", headers={"Authorization": "Bearer sesame"}, timeout=5)
    assert allowed.status_code == 200 and "edge_requests_total" in allowed.text
    document = requests.get(private.base_url + "/openapi.json", timeout=5).json()
    assert document["paths"]["/metrics"]["get"]["security"] == [{"bearer": []}]
    public = start_server("--model", str(tiny_model), "--api-key", "sesame", "--metrics-public")
    assert requests.get(public.base_url + "/metrics", timeout=5).status_code == 200
    assert requests.get(public.base_url + "/v1/models", timeout=5).status_code == 401


# ---- 9: what real client libraries send ---------------------------------------------------------

def test_openai_sdk_none_parameters_are_sent_as_null_and_mean_the_default(client):
    answer = client.chat.completions.create(model="m", messages=USER, max_tokens=3, temperature=None, top_p=None,
                                            n=None, presence_penalty=None, frequency_penalty=None, seed=None)
    assert answer.choices[0].finish_reason in ("stop", "length")
    streamed = list(client.chat.completions.create(model="m", messages=USER, max_tokens=3, temperature=None,
                                                   n=None, stream=True, stream_options=None))
    assert streamed[-1].choices[0].finish_reason in ("stop", "length")


class Listing(BaseModel):
    """An output model with a field named like the schema keyword."""

    properties: list[str]
    kind: str


def test_strict_schema_with_a_field_named_properties_is_accepted(client):
    answer = client.chat.completions.create(model="m", messages=USER, max_tokens=8, temperature=0,
                                            response_format=type_to_response_format_param(Listing))
    assert answer.choices[0].message.content.startswith("{")


# The scripted model calls a tool straight away, as a model given tools and a structured output does.
CALL_SCRIPT = [b"<tool_", b"call>", b'\n{"name": ', b'"get_weather"', b', "arguments": ', b'{"city": ', b'"Oslo"}}',
               b"\n</tool", b"_call>"]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
    "additionalProperties": False}}}
VERDICT = {"type": "json_schema", "json_schema": {"name": "verdict", "strict": True, "schema": {
    "type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def calling_server(start_server, tmp_path_factory):
    model = write_scripted_model(tmp_path_factory.mktemp("models") / "direct-caller.gguf", CALL_SCRIPT)
    return start_server("--model", str(model))


@pytest.fixture(scope="module")
def calling_client(calling_server) -> OpenAI:
    return OpenAI(base_url=calling_server.base_url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_tools_beside_a_structured_output_can_still_be_called(calling_client):
    answer = calling_client.chat.completions.create(model="m", messages=USER, tools=[WEATHER], tool_choice="auto",
                                                    response_format=VERDICT, temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Oslo"})]


class Verdict(BaseModel):
    """The Agents SDK's `output_type`: a structured final answer."""

    answer: Literal["yes", "no"]


def test_openai_agents_sdk_agent_with_output_type_calls_its_function_tool(calling_server):
    agents.set_tracing_disabled(True)  # no traces leave this machine
    called: list[str] = []

    @agents.function_tool
    def get_weather(city: Literal["Paris", "Oslo"]) -> str:
        """Current weather for a city."""
        called.append(city)
        return "sunny"

    model = agents.OpenAIChatCompletionsModel(model="m", openai_client=AsyncOpenAI(
        base_url=calling_server.base_url + "/v1", api_key="none", max_retries=0, timeout=60))
    agent = agents.Agent(name="forecaster", instructions="Use the tool.", tools=[get_weather],
                         output_type=Verdict, model=model, model_settings=agents.ModelSettings(temperature=0))
    # One turn: the model's call is run; the scripted model would only call again in a second turn.
    with pytest.raises(agents.MaxTurnsExceeded):
        agents.Runner.run_sync(agent, "Is it sunny in Oslo?", max_turns=1)
    assert called == ["Oslo"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_tools_beside_a_structured_output_give_a_call_or_the_answer(client, seed):
    answer = client.chat.completions.create(model="m", messages=USER, tools=[WEATHER], response_format=VERDICT,
                                            seed=seed, max_tokens=60)
    message = answer.choices[0].message
    if message.tool_calls:
        assert json.loads(message.tool_calls[0].function.arguments)["city"] in ("Paris", "Oslo")
    else:
        assert json.loads(message.content)["answer"] in ("yes", "no")


@pytest.mark.parametrize("max_tokens", [1, 2, 5])
def test_forced_call_cut_by_max_tokens_leaves_no_markup_in_content(server, max_tokens):
    body = {"messages": USER, "max_tokens": max_tokens, "tools": [WEATHER], "tool_choice": "required"}
    message = post(server.base_url, body).json()["choices"][0]["message"]
    assert "<tool" not in (message["content"] or "")
    with requests.post(server.base_url + "/v1/chat/completions", json={**body, "stream": True}, stream=True,
                       timeout=60) as response:
        events = sse_events(response)
    deltas = [e["choices"][0]["delta"] for e in events if isinstance(e, dict) and e.get("choices")]
    assert "<tool" not in "".join(d.get("content") or "" for d in deltas)
    assert events[-1] == "[DONE]"
