"""Images through the real server (openai SDK): a random-weight projector (--mmproj) beside the tiny model, image
tokens counted, the prefix cache keyed by image, and every hostile image refused with a 400 naming its field."""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from pathlib import Path

import openai
import pytest
from openai import OpenAI
from PIL import Image

from edge_server.devtools import assets

IMAGE_TOKENS = 16  # the synthetic projector: a 56x56 input in 14-pixel patches
QUESTION = "What is in this picture?"


def data_url(image: Image.Image, fmt: str = "PNG", media: str | None = None, **options) -> str:
    """`image` encoded as `fmt` in a base64 data URL of type `media` (default: the format's own)."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return f"data:{media or 'image/' + fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def noise(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A reproducible image of random pixels."""
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def image_message(*urls: str, text: str = QUESTION) -> list[dict]:
    """A user message of `text` followed by an image part per url."""
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         *({"type": "image_url", "image_url": {"url": url}} for url in urls)]}]


@pytest.fixture(scope="module")
def client(vision_server) -> OpenAI:
    """The openai SDK on the vision server."""
    return OpenAI(base_url=vision_server.base_url + "/v1", api_key="none", max_retries=0, timeout=60)


def ask(client: OpenAI, messages: list[dict], **fields):
    """A greedy chat completion of up to 16 tokens."""
    return client.chat.completions.create(model="tiny-test", messages=messages, **{"temperature": 0,
                                                                                   "max_tokens": 16, **fields})


def test_the_model_says_it_sees_images(vision_server, client):
    assert "vision (projector mmproj-" in vision_server.log()
    assert client.models.list().data[0].model_extra["meta"]["vision"] is True


def test_an_image_counts_its_tokens_in_usage(client):
    text_only = ask(client, [{"role": "user", "content": QUESTION}])
    with_image = ask(client, image_message(data_url(noise(1))))
    assert with_image.usage.prompt_tokens == text_only.usage.prompt_tokens + IMAGE_TOKENS


def test_the_answer_depends_on_the_image_and_the_same_image_hits_the_cache(vision_server, client):
    red, blue = data_url(noise(2)), data_url(noise(3))
    logged = len(vision_server.log())
    first = ask(client, image_message(red))
    again = ask(client, image_message(red))
    other = ask(client, image_message(blue))
    assert again.choices[0].message.content == first.choices[0].message.content
    assert other.choices[0].message.content != first.choices[0].message.content
    prompt = first.usage.prompt_tokens
    assert again.usage.prompt_tokens_details.cached_tokens == prompt - 1  # all but the token sampled from
    # The blue image shares only the text before the image with the cached red one.
    assert other.usage.prompt_tokens_details.cached_tokens < prompt - IMAGE_TOKENS
    # The red image's embeddings were kept too: encoded once for three requests.
    ask(client, image_message(red, text="Again: " + QUESTION))
    since = vision_server.log()[logged:]
    assert since.count("image 64x48: 16 tokens, encoded in") == 2  # red, blue
    assert since.count("image 64x48: 16 tokens, encoded earlier") == 2


def test_the_same_pixels_in_another_format_are_the_same_image(client):
    image = noise(4)
    png = ask(client, image_message(data_url(image, "PNG")))
    webp = ask(client, image_message(data_url(image, "WEBP", lossless=True)))
    jpeg = ask(client, image_message(data_url(image, "JPEG")))
    assert webp.choices[0].message.content == png.choices[0].message.content
    assert webp.usage.prompt_tokens_details.cached_tokens == png.usage.prompt_tokens - 1
    assert jpeg.usage.prompt_tokens == png.usage.prompt_tokens


def test_streamed_image_answer_equals_the_whole_one(client):
    messages = image_message(data_url(noise(5)))
    whole = ask(client, messages).choices[0].message.content
    stream = ask(client, messages, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == whole


def test_several_choices_and_images_in_history(client):
    one, two = data_url(noise(6)), data_url(noise(7))
    history = [*image_message(one, text="Look at this."), {"role": "assistant", "content": "I see it."},
               *image_message(two, text="And this one?")]
    answer = ask(client, history, n=2)
    assert answer.usage.prompt_tokens > 2 * IMAGE_TOKENS
    assert answer.choices[0].message.content == answer.choices[1].message.content  # greedy, prompt shared


def test_an_image_request_runs_beside_a_text_stream(client):
    results = {}

    def text_stream():
        results["text"] = ask(client, [{"role": "user", "content": "Tell me a story."}], max_tokens=64)

    thread = threading.Thread(target=text_stream)
    thread.start()
    results["image"] = ask(client, image_message(data_url(noise(8)), data_url(noise(9))))
    thread.join(60)
    assert results["text"].usage.completion_tokens >= 1
    assert results["image"].usage.prompt_tokens > 2 * IMAGE_TOKENS


def test_an_image_for_a_model_without_projector_is_a_400_naming_it(server):
    text_client = OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as refused:
        ask(text_client, image_message(data_url(noise(1))))
    error = refused.value.body
    assert error["code"] == "model_not_multimodal" and error["param"] == "messages[0].content[1].image_url"
    assert "tiny-test" in error["message"] and "--mmproj" in error["message"]


def png_bomb(width: int, height: int) -> bytes:
    """A greyscale PNG of zeros: a few hundred kilobytes that decode to width x height bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor, row = zlib.compressobj(9), b"\0" * (width + 1)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def base64_url(data: bytes, media: str = "image/png") -> str:
    """`data` as a base64 data URL of type `media`."""
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def animated_gif() -> str:
    frames = [noise(1, (16, 16)).convert("P"), noise(2, (16, 16)).convert("P")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100)
    return base64_url(buffer.getvalue(), "image/gif")


def truncated_png() -> str:
    buffer = io.BytesIO()
    noise(3, (64, 64)).save(buffer, "PNG")
    return base64_url(buffer.getvalue()[:2000])


HOSTILE = {
    "corrupt": (base64_url(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50), "invalid_image"),
    "truncated": (truncated_png(), "invalid_image"),
    "1x1": (data_url(Image.new("RGB", (1, 1))), "invalid_image"),
    "30000x30000 PNG bomb": (base64_url(png_bomb(30000, 30000)), "image_too_large"),
    "animated GIF": (animated_gif(), "invalid_image"),
    "wrong base64": ("data:image/png;base64,iVBORw0K!!!not base64", "invalid_image"),
    "JPEG sent as PNG": (data_url(noise(1), "JPEG", "image/png"), "invalid_image"),
    "BMP": (data_url(noise(1), "BMP", "image/bmp"), "unsupported_image_format"),
    "no media type": (data_url(noise(1)).replace("image/png", ""), "unsupported_image_format"),
    "remote URL": ("https://example.com/cat.png", "image_url_refused"),
    "file path": ("file:///etc/passwd", "invalid_image"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_image_is_a_400_naming_the_field(vision_server, client, name):
    url, code = HOSTILE[name]
    pid = vision_server.process.pid
    before = _rss_kib(pid)
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, image_message(data_url(noise(1)), url))
    error = refused.value.body
    assert (error["code"], error["param"]) == (code, "messages[0].content[2].image_url"), error
    assert _rss_kib(pid) - before < 64 * 1024  # the bomb's 900 MB are never decoded


def test_too_many_images_or_an_image_outside_a_user_message_is_a_400(client):
    url = data_url(noise(1, (8, 8)))
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, image_message(*[url] * 9))
    assert (refused.value.body["code"], refused.value.body["param"]) == (
        "too_many_images", "messages[0].content[9].image_url")
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": url}}]},
                     {"role": "user", "content": "Hi"}])
    assert refused.value.body["param"] == "messages[0].content[0].image_url"


def test_the_server_still_answers_after_every_refusal(client):
    assert ask(client, image_message(data_url(noise(1)))).choices[0].finish_reason in ("stop", "length")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_speculation_keeps_the_greedy_image_answer(start_server, tiny_model, client):
    from tests.e2e.conftest import assert_same_greedy_answer

    speculating = start_server("--model", str(tiny_model), "--mmproj", str(assets.vision_projector()),
                               "--spec-type", "ngram-simple")
    spec_client = OpenAI(base_url=speculating.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
    messages = image_message(data_url(noise(10)), text="Repeat: alpha beta gamma alpha beta gamma alpha beta")

    def tokens(answer) -> list[dict]:
        return [entry.model_dump() for entry in answer.choices[0].logprobs.content]

    plain = ask(client, messages, max_tokens=32, logprobs=True, top_logprobs=2)
    spec = ask(spec_client, messages, max_tokens=32, logprobs=True, top_logprobs=2)
    assert_same_greedy_answer(tokens(plain), tokens(spec))
    assert spec.usage.prompt_tokens == plain.usage.prompt_tokens
