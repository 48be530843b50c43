"""Images in the Responses API (openai SDK), the Anthropic Messages API (anthropic SDK) and /tokenize, on the
vision server: the same prompt, token count and greedy answer as chat's `image_url`, in streams and history, and
each API's own 400 naming the field for a bad image."""

from __future__ import annotations

import base64

import anthropic
import openai
import pytest
import requests
from openai import OpenAI

from tests.e2e.test_vision import IMAGE_TOKENS, QUESTION, data_url, image_message, noise

pytestmark = pytest.mark.e2e
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def chat_client(vision_server) -> OpenAI:
    """The openai SDK on the vision server."""
    return OpenAI(base_url=vision_server.base_url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def claude(vision_server) -> anthropic.Anthropic:
    """The anthropic SDK on the vision server."""
    return anthropic.Anthropic(base_url=vision_server.base_url, api_key="none", max_retries=0, timeout=60)


def chat_answer(client: OpenAI, messages: list[dict]):
    """The greedy chat answer: the reference the other APIs must equal."""
    return client.chat.completions.create(model="tiny-test", messages=messages, temperature=0, max_tokens=MAX_TOKENS)


def respond(client: OpenAI, content: list[dict], **fields):
    """A greedy Responses answer to one user message of `content` parts."""
    return client.responses.create(model="tiny-test", input=[{"role": "user", "content": content}], temperature=0,
                                   max_output_tokens=MAX_TOKENS, **fields)


def input_image(url: str) -> list[dict]:
    """A Responses user content: the question, then the image."""
    return [{"type": "input_text", "text": QUESTION}, {"type": "input_image", "image_url": url, "detail": "auto"}]


def base64_block(url: str, media: str | None = None) -> dict:
    """An Anthropic base64 image block of a data URL's bytes (its media type, or `media`)."""
    head, data = url.split(",", 1)
    return {"type": "image", "source": {"type": "base64", "data": data,
                                        "media_type": media or head.removeprefix("data:").split(";")[0]}}


def ask_claude(client: anthropic.Anthropic, messages: list[dict], **fields):
    """A greedy Messages answer."""
    return client.messages.create(model="tiny-test", messages=messages, max_tokens=MAX_TOKENS,
                                   extra_body={"temperature": 0}, **fields)


# ---- Responses ------------------------------------------------------------------------------------------------

def test_responses_input_image_equals_chat_whole_and_streamed(chat_client):
    url = data_url(noise(21))
    chat = chat_answer(chat_client, image_message(url))
    whole = respond(chat_client, input_image(url))
    assert whole.output_text == chat.choices[0].message.content
    assert whole.usage.input_tokens == chat.usage.prompt_tokens
    text_only = respond(chat_client, [{"type": "input_text", "text": QUESTION}])
    assert whole.usage.input_tokens == text_only.usage.input_tokens + IMAGE_TOKENS
    events = list(respond(chat_client, input_image(url), stream=True))
    streamed = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert streamed == whole.output_text  # the last event: completed, or incomplete at max_output_tokens
    assert events[-1].response.usage.input_tokens == whole.usage.input_tokens


def test_responses_images_in_history_and_another_image_answers_otherwise(chat_client):
    first, second = data_url(noise(22)), data_url(noise(23))
    history = [{"role": "user", "content": input_image(first)},
               {"role": "assistant", "content": [{"type": "output_text", "text": "I see it."}]},
               {"role": "user", "content": input_image(second)}]
    answer = chat_client.responses.create(model="tiny-test", input=history, temperature=0, max_output_tokens=MAX_TOKENS)
    chat = chat_answer(chat_client, [*image_message(first), {"role": "assistant", "content": "I see it."},
                                     *image_message(second)])
    assert answer.output_text == chat.choices[0].message.content
    assert answer.usage.input_tokens == chat.usage.prompt_tokens
    assert respond(chat_client, input_image(second)).output_text != respond(chat_client, input_image(first)).output_text


@pytest.mark.parametrize("part, param, code", [
    ({"type": "input_image", "image_url": data_url(noise(1), "JPEG", "image/png")}, "image_url", "invalid_image"),
    ({"type": "input_image", "image_url": "data:image/png;base64,iVBOR!!"}, "image_url", "invalid_image"),
    ({"type": "input_image", "image_url": "https://example.com/cat.png"}, "image_url", "image_url_refused"),
    ({"type": "input_image", "file_id": "file-abc"}, "file_id", "unsupported_parameter"),
], ids=["JPEG sent as PNG", "wrong base64", "remote URL", "file_id"])
def test_responses_bad_image_is_a_400_naming_the_input_part(chat_client, part, param, code):
    with pytest.raises(openai.BadRequestError) as refused:
        respond(chat_client, [{"type": "input_text", "text": QUESTION}, {**part, "detail": "high"}])
    assert (refused.value.body["param"], refused.value.body["code"]) == (f"input[0].content[1].{param}", code)


# ---- Anthropic ------------------------------------------------------------------------------------------------

def test_anthropic_base64_image_equals_chat_whole_streamed_and_counted(chat_client, claude):
    url = data_url(noise(24))
    chat = chat_answer(chat_client, image_message(url))
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, base64_block(url)]}]
    whole = ask_claude(claude, messages)
    assert whole.content[0].text == chat.choices[0].message.content
    usage = whole.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert claude.messages.count_tokens(model="tiny-test", messages=messages).input_tokens == chat.usage.prompt_tokens
    with claude.messages.stream(model="tiny-test", messages=messages, max_tokens=MAX_TOKENS,
                                 extra_body={"temperature": 0}) as stream:
        assert "".join(stream.text_stream) == whole.content[0].text


def test_anthropic_images_in_history(chat_client, claude):
    first, second = data_url(noise(25), "JPEG"), data_url(noise(26), "WEBP", lossless=True)
    answer = ask_claude(claude, [
        {"role": "user", "content": [{"type": "text", "text": "Look at this."}, base64_block(first)]},
        {"role": "assistant", "content": "I see it."},
        {"role": "user", "content": [{"type": "text", "text": QUESTION}, base64_block(second)]}])
    chat = chat_answer(chat_client, [*image_message(first, text="Look at this."),
                                     {"role": "assistant", "content": "I see it."}, *image_message(second)])
    assert answer.content[0].text == chat.choices[0].message.content


@pytest.mark.parametrize("block, words", [
    (base64_block(data_url(noise(1), "JPEG"), "image/png"), "is image/jpeg, not image/png"),
    ({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR!!"}}, "base64"),
    ({"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": "Qk0="}}, "image/bmp"),
    ({"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}, "--allow-image-urls"),
], ids=["JPEG sent as PNG", "wrong base64", "BMP", "remote URL"])
def test_anthropic_bad_image_is_a_400_naming_the_block(vision_server, block, words):
    body = {"model": "tiny-test", "max_tokens": 4, "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": QUESTION}, block]}]}
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        response = requests.post(vision_server.base_url + path, json=body, timeout=30)
        assert response.status_code == 400, response.text
        error = response.json()
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        message = error["error"]["message"]
        assert message.startswith("messages.2.content.1.source: ") and words in message


def test_anthropic_file_source_and_images_in_tool_results_are_refused(claude):
    with pytest.raises(anthropic.BadRequestError, match="'file' source"):
        ask_claude(claude, [{"role": "user", "content": [
            {"type": "image", "source": {"type": "file", "file_id": "file_1"}}]}])
    with pytest.raises(anthropic.BadRequestError, match="not supported in a tool_result"):
        ask_claude(claude, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t1", "name": "shot", "input": {}}]}, {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": [base64_block(data_url(noise(1)))]}]}])


def test_anthropic_count_tokens_counts_an_image_without_encoding_it(vision_server, claude):
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, base64_block(data_url(noise(29)))]}]
    logged = len(vision_server.log())
    counted = claude.messages.count_tokens(model="tiny-test", messages=messages).input_tokens
    assert "tokens, encoded" not in vision_server.log()[logged:]
    usage = ask_claude(claude, messages).usage
    assert counted == usage.input_tokens + usage.cache_read_input_tokens
    assert vision_server.log()[logged:].count("tokens, encoded in") == 1


# ---- /tokenize ------------------------------------------------------------------------------------------------

def test_tokenize_messages_counts_image_tokens_as_usage_does(vision_server, chat_client):
    messages = image_message(data_url(noise(27)), data_url(noise(28)))
    logged = len(vision_server.log())
    body = requests.post(vision_server.base_url + "/tokenize", json={"messages": messages, "with_pieces": True},
                         timeout=30).json()
    assert "tokens, encoded" not in vision_server.log()[logged:]  # counted without running the projector
    assert body["count"] == chat_answer(chat_client, messages).usage.prompt_tokens
    assert vision_server.log()[logged:].count("tokens, encoded in") == 2  # the chat encodes them
    images = [piece for piece in body["tokens"] if piece["id"] == -1]
    assert len(images) == 2 * IMAGE_TOKENS and all(piece["piece"] is None for piece in images)
    assert all(piece["id"] >= 0 for piece in body["tokens"] if piece not in images)
    refused = requests.post(vision_server.base_url + "/tokenize", timeout=30, json={"messages": image_message(
        "data:image/png;base64," + base64.b64encode(b"not a png").decode())}).json()["error"]
    assert (refused["param"], refused["code"]) == ("messages[0].content[1].image_url", "invalid_image")
