"""Images on models that place them in two dimensions (M-RoPE: Qwen2.5-VL's and Qwen3.5's projectors) or see them
whole (Gemma 3's), through the real server: positions stay right across prefix-cache hits (an answer served from
cached image cells equals the one computed cold), different images answer differently, several choices and
history work. Random-weight projectors and text models (`devtools/vision_models.py`)."""

from __future__ import annotations

import pytest
from openai import OpenAI

from edge_server.devtools import assets
from tests.e2e.conftest import assert_same_greedy_answer
from tests.e2e.test_vision import data_url, noise

FAMILIES = {
    "qwen2.5-vl": (assets.qwen2vl_model, assets.qwen25vl_projector),
    "qwen3.5": (assets.qwen35_model, assets.qwen35_projector),
    "qwen3-vl": (assets.qwen3vl_model, assets.qwen3vl_projector),
    "gemma3": (assets.gemma3_model, assets.gemma3_projector),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, start_server):
    """One server per family, two slots."""
    model, projector = (make() for make in FAMILIES[request.param])
    server = start_server("--model", str(model), "--mmproj", str(projector), "--parallel", "2", "--n-ctx", "2048")
    client = OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
    return request.param, client


def image_message(url: str, text: str = "What is this?") -> list[dict]:
    """A user message of an image, then `text` (so that another question about the same image shares it)."""
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def answer(client: OpenAI, messages: list[dict], tokens: int = 8):
    """A greedy answer with its logprobs (two alternatives per token) and its usage."""
    reply = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=tokens,
                                           logprobs=True, top_logprobs=2,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    entries = [{"token": e.token, "top_logprobs": [{"logprob": t.logprob} for t in e.top_logprobs]}
               for e in reply.choices[0].logprobs.content]
    return entries, reply.usage


def cold(client: OpenAI, messages: list[dict]):
    """The answer to `messages` with nothing of them cached: an unrelated request for each slot goes first."""
    for words in ("Unrelated words to push a slot's cells out.", "Other words again, for the other slot."):
        answer(client, [{"role": "user", "content": words}], tokens=1)
    return answer(client, messages)


def test_an_answer_from_cached_image_cells_equals_the_cold_one(family):
    name, client = family
    picture = data_url(noise(1, (64, 64)))
    first, _ = cold(client, image_message(picture, text="What is this?"))
    # The same image, other words after it: the image's cells are kept, the text after it is dropped by position.
    follow = image_message(picture, text="What colour dominates?")
    warm, usage = answer(client, follow)
    again, cold_usage = cold(client, follow)
    assert cold_usage.prompt_tokens == usage.prompt_tokens
    # The warm answer was served from the image's cells (at least 4 of them), the cold one was not.
    assert usage.prompt_tokens_details.cached_tokens >= cold_usage.prompt_tokens_details.cached_tokens + 4, name
    assert_same_greedy_answer(again, warm)


def test_a_conversation_with_an_image_in_its_history_goes_on_from_the_cache(family):
    name, client = family
    history = image_message(data_url(noise(2, (80, 48))), text="Look at this.")
    said, _ = cold(client, history)
    turn = [*history, {"role": "assistant", "content": "".join(t["token"] for t in said)},
            {"role": "user", "content": "And now?"}]
    warm, usage = answer(client, turn)
    again, cold_usage = cold(client, turn)
    assert usage.prompt_tokens_details.cached_tokens >= cold_usage.prompt_tokens_details.cached_tokens + 4, name
    assert_same_greedy_answer(again, warm)


def test_different_images_answer_differently_and_several_choices_agree(family):
    name, client = family
    answers = {tuple(t["token"] for t in answer(client, image_message(data_url(noise(seed, (64, 64)))))[0])
               for seed in (3, 4, 5)}
    assert len(answers) > 1, (name, answers)
    reply = client.chat.completions.create(model="m", messages=image_message(data_url(noise(3, (64, 64)))),
                                           temperature=0, max_tokens=8, n=2,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert len(reply.choices) == 2 and reply.choices[0].message.content == reply.choices[1].message.content


def test_speculation_on_the_hybrid_m_rope_model_keeps_the_greedy_image_answer(start_server):
    """Qwen3.5's own pair (M-RoPE images, recurrent memory rolled back on rejected drafts)."""
    model, projector = (make() for make in FAMILIES["qwen3.5"])
    plain = start_server("--model", str(model), "--mmproj", str(projector), "--parallel", "1", "--n-ctx", "2048")
    speculating = start_server("--model", str(model), "--mmproj", str(projector), "--parallel", "1",
                               "--n-ctx", "2048", "--spec-type", "ngram-simple")
    messages = image_message(data_url(noise(6, (96, 64))), text="Repeat: alpha beta gamma alpha beta gamma")
    answers = [answer(OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=120),
                      messages, tokens=24) for server in (plain, speculating)]
    assert answers[0][1].prompt_tokens == answers[1][1].prompt_tokens
    assert_same_greedy_answer(answers[0][0], answers[1][0])
