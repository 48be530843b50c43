"""The real server on the random-weight Qwen3.5-architecture model (llama.cpp's hybrid qwen35: Gated DeltaNet
layers and full attention, devtools/assets.qwen35_model) with the real Qwen3.5 template and tokenizer."""

from __future__ import annotations

import openai
import pytest

from edge_server.devtools import assets
from tests.conftest import or_fail


@pytest.fixture(scope="module")
def qwen35_server(start_server):
    return start_server("--model", str(or_fail(assets.qwen35_model)), "--parallel", "2")


def test_a_chat_completion_on_the_hybrid_model(qwen35_server):
    client = openai.OpenAI(base_url=qwen35_server.base_url + "/v1", api_key="none", max_retries=0)
    response = client.chat.completions.with_raw_response.create(
        model="qwen35", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0)
    assert response.http_response.status_code == 200
    completion = response.parse()
    choice = completion.choices[0]
    # The template opens <think> and the random model never closes it: everything is reasoning.
    message = choice.message.model_dump()
    text = (message.get("reasoning_content") or "") + (message.get("content") or "")
    assert text.strip(), message
    assert choice.finish_reason == "length"  # it never emits <|im_end|> (nor any other special token)
    assert completion.usage.completion_tokens == 24
