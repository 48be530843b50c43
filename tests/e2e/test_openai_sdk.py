"""The current `openai` SDK against the real server: stream, non-stream, models, usage, seeds."""

from __future__ import annotations

import pytest
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from openai import OpenAI

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count from 1 to 10"}]


@pytest.fixture(scope="module")
def client(base_url) -> OpenAI:
    return OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def vocab(tiny_model) -> Llama:
    """The tiny model's tokenizer and template, loaded independently of the server."""
    return Llama(str(tiny_model), vocab_only=True, verbose=False)


def expected_prompt_tokens(vocab: Llama, messages: list[dict]) -> int:
    formatter = Jinja2ChatFormatter(template=vocab.metadata["tokenizer.chat_template"],
                                    eos_token="<|im_end|>", bos_token="<|endoftext|>")
    prompt = formatter(messages=messages).prompt
    return len(vocab.tokenize(prompt.encode(), add_bos=False, special=True))


def test_models_list_and_retrieve_name_the_served_model(client, tiny_model):
    models = client.models.list().data
    assert [m.id for m in models] == [tiny_model.stem]
    assert client.models.retrieve(tiny_model.stem).id == tiny_model.stem


def test_non_streamed_answer_has_usage_equal_to_the_tokenizer_counts(client, vocab):
    answer = client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES, max_tokens=25, temperature=0)
    assert answer.object == "chat.completion"
    assert answer.model == "gpt-3.5-turbo"
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"  # the random model never ends its turn by itself
    assert answer.usage.completion_tokens == 25
    assert answer.usage.prompt_tokens == expected_prompt_tokens(vocab, MESSAGES)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 25


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.1, "seed": 1234, "top_p": 0.9, "extra_body": {"top_k": 0}}])
def test_stream_joins_to_the_non_streamed_text(client, sampling):
    whole = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=40, **sampling)
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=40, stream=True,
                                                 stream_options={"include_usage": True}, **sampling))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == "m" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    assert chunks[-1].usage == whole.usage


def test_same_seed_gives_same_text_and_other_seed_differs(client):
    def sample(seed: int) -> str:
        return client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=30, temperature=1.5,
                                              top_p=1.0, seed=seed, extra_body={"top_k": 0, "min_p": 0.0}).choices[0].message.content
    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_logit_bias_can_force_a_token(client, vocab):
    token = vocab.tokenize(b" hello", add_bos=False)[0]
    answer = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3, temperature=0,
                                            logit_bias={str(token): 100})
    assert answer.choices[0].message.content == vocab.detokenize([token] * 3).decode()


def test_legacy_completions_stream_and_whole_agree(client):
    whole = client.completions.create(model="m", prompt="Once upon a time", max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="m", prompt="Once upon a time", max_tokens=20, temperature=0,
                                            stream=True))
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 20
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_content_as_text_parts_equals_content_as_string(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Count from "}, {"type": "text", "text": "1 to 10"}]}]
    plain = [{"role": "user", "content": "Count from 1 to 10"}]
    first = client.chat.completions.create(model="m", messages=parts, max_tokens=15, temperature=0)
    second = client.chat.completions.create(model="m", messages=plain, max_tokens=15, temperature=0)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.usage.prompt_tokens == second.usage.prompt_tokens


def test_multi_turn_conversation_with_null_assistant_content_is_answered(client):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "Again"},
    ]
    answer = client.chat.completions.create(model="m", messages=messages, max_tokens=5, temperature=0)
    assert answer.choices[0].message.content


def test_legacy_completion_echo_prepends_the_prompt_streamed_and_not(client):
    whole = client.completions.create(model="m", prompt="Once upon", max_tokens=5, temperature=0, echo=True)
    plain = client.completions.create(model="m", prompt="Once upon", max_tokens=5, temperature=0)
    assert whole.choices[0].text == "Once upon" + plain.choices[0].text
    chunks = list(client.completions.create(model="m", prompt="Once upon", max_tokens=5, temperature=0, echo=True,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
