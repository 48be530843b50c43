"""Images in requests: found in the messages, decoded and checked against hostile input before any pixel
reaches llama.cpp (a 400 naming the field for each refusal)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from collections.abc import Sequence

from PIL import Image, UnidentifiedImageError

from edge_server.api.errors import APIError
from edge_server.api.imagefetch import ImageFetcher
from edge_server.api.schemas import ChatMessage
from edge_server.engine.types import ImageInput

MAX_IMAGES = 8  # per request
MAX_IMAGE_BYTES = 8 << 20  # one encoded image (the body limit, --max-body-bytes, bounds them all)
MAX_IMAGE_PIXELS = 4096 * 4096  # one image, checked from its header before it is decoded (bombs)
MAX_REQUEST_PIXELS = 2 * MAX_IMAGE_PIXELS  # all images of a request: their RGB is held together
MIN_IMAGE_SIDE = 2  # pixels: a projector cannot resize a single pixel row or column
# Pillow's names of the formats taken, and their media types.
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
_DATA_URL = re.compile(r"data:(?P<media>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,", re.ASCII)


def find_images(messages: Sequence[ChatMessage]) -> list[tuple[str, str]]:
    """(param, url) of every image part, in prompt order; a 400 for one outside a user message or too many."""
    found = []
    for i, message in enumerate(messages):
        if isinstance(message.content, str) or message.content is None:
            continue
        for j, part in enumerate(message.content):
            if part.type != "image_url":
                continue
            param = f"messages[{i}].content[{j}].image_url"
            if message.role != "user":
                raise APIError(f"Images go in user messages; {param} is in a {message.role!r} message.",
                               param=param, code="invalid_image")
            found.append((param, part.image_url.url))
    if len(found) > MAX_IMAGES:
        raise APIError(f"The request has {len(found)} images; at most {MAX_IMAGES} are accepted per request.",
                       param=found[MAX_IMAGES][0], code="too_many_images")
    return found


def decode_images(found: Sequence[tuple[str, str]], fetcher: ImageFetcher | None = None) -> list[ImageInput]:
    """Each image decoded to RGB and checked (`decode_image`), within `MAX_REQUEST_PIXELS` together."""
    images, pixels = [], 0
    for param, url in found:
        image = decode_image(url, param, fetcher)
        pixels += image.width * image.height
        if pixels > MAX_REQUEST_PIXELS:
            raise APIError(f"The request's images have more than {MAX_REQUEST_PIXELS} pixels together; send "
                           f"fewer or smaller images.", param=param, code="image_too_large")
        images.append(image)
    return images


def decode_image(url: str, param: str, fetcher: ImageFetcher | None = None) -> ImageInput:
    """A data URL's image (or, with a `fetcher`, an http(s) URL's) as RGB pixels; a 400 naming `param` for a
    remote URL without one, a media type other than PNG, JPEG, WebP or GIF (or other than the bytes are), bad
    base64, too many bytes or pixels, too small a side, an animation, or a corrupt or truncated file."""
    match = _DATA_URL.match(url)
    if match is None:
        if not url.lower().startswith(("http://", "https://")):
            raise APIError("An image must be a base64 data URL (data:image/png;base64,...) or an http(s) URL.",
                           param=param, code="invalid_image")
        if fetcher is None:
            raise APIError("This server does not fetch image URLs: send the image inline as a data URL "
                           "(data:image/png;base64,...), or start the server with --allow-image-urls.",
                           param=param, code="image_url_refused")
        fetched = fetcher.fetch(url, param)
        # A server's generic type (application/octet-stream) leaves the format to the bytes.
        return _pixels(fetched.data, fetched.media if fetched.media in FORMATS.values() else None, param)
    media = (match.group("media") or "").lower()
    if media not in FORMATS.values():
        raise APIError(f"Image media type {media or '(none)'!r} is not supported; send PNG, JPEG, WebP or GIF "
                       f"({', '.join(FORMATS.values())}).", param=param, code="unsupported_image_format")
    payload = url[match.end():]
    if len(payload) > (MAX_IMAGE_BYTES + 2) // 3 * 4 + 4:
        raise APIError(f"The image is larger than {MAX_IMAGE_BYTES} bytes.", param=param, code="image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError("The image's data is not valid base64.", param=param, code="invalid_image") from None
    return _pixels(data, media, param)


def _pixels(data: bytes, media: str | None, param: str) -> ImageInput:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=list(FORMATS)) as image:
                kind = FORMATS[image.format]
                if media is not None and kind != media:
                    raise APIError(f"The image is {kind}, not {media} as its media type says.", param=param,
                                   code="invalid_image")
                width, height = image.size  # read from the header: nothing is decoded yet
                if width * height > MAX_IMAGE_PIXELS:
                    raise APIError(f"The image is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS} pixels are "
                                   f"accepted (e.g. 4096x4096).", param=param, code="image_too_large")
                if min(width, height) < MIN_IMAGE_SIDE:
                    raise APIError(f"The image is {width}x{height} pixels; each side needs at least "
                                   f"{MIN_IMAGE_SIDE}.", param=param, code="invalid_image")
                if getattr(image, "n_frames", 1) > 1:
                    raise APIError("Animated images are not accepted; send a single frame.", param=param,
                                   code="invalid_image")
                rgb = image.convert("RGB").tobytes()
    except APIError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):  # Pillow's own check, at open
        raise APIError(f"The image has more than {MAX_IMAGE_PIXELS} pixels (e.g. 4096x4096).", param=param,
                       code="image_too_large") from None
    except UnidentifiedImageError:
        raise APIError(f"The data is not a {media or 'PNG, JPEG, WebP or GIF'} image this server can read.", param=param,
                       code="invalid_image") from None
    except (OSError, SyntaxError, ValueError, EOFError):  # Pillow's words for corrupt and truncated files
        raise APIError("The image is corrupt or truncated.", param=param, code="invalid_image") from None
    digest = hashlib.sha256(b"%dx%d:" % (width, height) + rgb).hexdigest()
    return ImageInput(rgb=rgb, width=width, height=height, digest=digest)
