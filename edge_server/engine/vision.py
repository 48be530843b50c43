"""A model's projector (`--mmproj`, llama.cpp's mtmd): prompts with images -> tokens and image embeddings.

Tokenizing and encoding run on the calling HTTP thread, one request at a time (the mtmd context is not
thread-safe), never on the engine's: the engine thread only decodes the embeddings into a slot, in bounded
chunks between steps (`engine/imagebatch.py`).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals
from llama_cpp import mtmd_cpp as mtmd

from edge_server.engine.llamalog import route_mtmd_log
from edge_server.engine.ownthread import on_own_thread
from edge_server.engine.placeholders import MAX_ADVANCE, MAX_ROWS, placeholders
from edge_server.engine.types import IMAGE_MARKER, ImageChunk, ImageInput, ImageRefused, ModelLoadError, PromptTooLong

log = logging.getLogger("edge_server.engine")

ENCODED_BYTES = 256 << 20  # image embeddings kept for the next request with the same image

class Vision:
    """The projector of one loaded model: checks it fits the model, turns prompts with images into chunks."""

    def __init__(self, path: Path, model: internals.LlamaModel, *, threads: int, use_gpu: bool, whole_limit: int):
        route_mtmd_log()
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = threads
        params.print_timings = False
        self._marker = IMAGE_MARKER.encode()  # referenced by params while the context is made
        params.media_marker = self._marker
        ctx = mtmd.mtmd_init_from_file(str(path).encode(), model.model, params)
        if not ctx:
            raise ModelLoadError(f"llama.cpp could not load the projector {path} for this model (a projector of "
                                 f"another model, or not an mmproj GGUF: see the log above)")
        if not mtmd.mtmd_support_vision(ctx):
            mtmd.mtmd_free(ctx)
            raise ModelLoadError(f"cannot use the projector {path}: it has no vision encoder")
        self.path = path
        self._ctx = ctx
        self.mrope = bool(mtmd.mtmd_decode_use_mrope(ctx))  # Qwen2-VL to Qwen3.5: images placed in 2-D
        # An image row's width: the model's input width (Qwen3-VL's deepstack features make it wider than n_embd).
        self.n_embd = llama_cpp.llama_model_n_embd_inp(model.model)
        self._whole_limit = whole_limit  # the most tokens of an image seen whole (one batch)
        self._encoded: OrderedDict[str, np.ndarray] = OrderedDict()  # digest -> embeddings, least recent first
        self._lock = threading.Lock()

    def tokenize(self, text: bytes, add_bos: bool, images: Sequence[ImageInput],
                 max_tokens: int | None = None, *, encode: bool = True) -> tuple[list[int], tuple[ImageChunk, ...]]:
        """Prompt ids (image tokens as `placeholders`) and each image's embeddings (None without `encode`: the
        tokens alone, e.g. to count them), for `text` with one
        `IMAGE_MARKER` per image; `PromptTooLong` past `max_tokens` (before any image is encoded),
        `ImageRefused` when the projector cannot take one."""
        bitmaps = [self._bitmap(image) for image in images]
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            with self._lock:
                return self._tokenize(chunks, text, add_bos, images, bitmaps, max_tokens, encode)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)

    def _tokenize(self, chunks, text: bytes, add_bos: bool, images: Sequence[ImageInput], bitmaps: list,
                  max_tokens: int | None, encode: bool) -> tuple[list[int], tuple[ImageChunk, ...]]:
        source = mtmd.mtmd_input_text(text, len(text), add_bos, True)
        array = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
        status = mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(source), array, len(bitmaps))
        if status == 1:
            raise ImageRefused(f"the prompt places {text.count(IMAGE_MARKER.encode())} images for {len(images)}")
        if status != 0:
            raise ImageRefused("the projector could not preprocess an image")
        parts = [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))]
        total = sum(mtmd.mtmd_input_chunk_get_n_tokens(part) for part in parts)
        if max_tokens is not None and total > max_tokens:
            raise PromptTooLong(total)
        tokens: list[int] = []
        placed: list[ImageChunk] = []
        for part in parts:
            if mtmd.mtmd_input_chunk_get_type(part) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                count = ctypes.c_size_t()
                ids = mtmd.mtmd_input_chunk_get_tokens_text(part, ctypes.byref(count))
                tokens.extend(ids[:count.value])
                continue
            if mtmd.mtmd_input_chunk_get_type(part) != mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                raise ImageRefused("the projector made a chunk that is not an image")
            image = images[len(placed)]
            n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(part)
            n_pos = mtmd.mtmd_input_chunk_get_n_pos(part)
            whole = bool(mtmd.mtmd_decode_use_non_causal(self._ctx, part))
            if n_tokens > MAX_ROWS or (self.mrope and n_pos > MAX_ADVANCE):
                raise ImageRefused(f"an image of {image.width}x{image.height} pixels makes {n_tokens} tokens, more "
                                   f"than this server takes")
            if whole and n_tokens > self._whole_limit:
                raise ImageRefused(f"an image of {image.width}x{image.height} pixels makes {n_tokens} tokens; this "
                                   f"model sees an image whole, in one batch of at most {self._whole_limit}")
            embeddings = self._embeddings(part, image, n_tokens) if encode else None
            width = mtmd.mtmd_image_tokens_get_nx(mtmd.mtmd_input_chunk_get_tokens_image(part)) if self.mrope else 0
            placed.append(ImageChunk(at=len(tokens), n_tokens=n_tokens, embeddings=embeddings, digest=image.digest,
                                     mrope_width=width, whole=whole))
            tokens.extend(placeholders(image.digest, n_tokens, n_pos if self.mrope else None))
        return tokens, tuple(placed)

    def _embeddings(self, part, image: ImageInput, n_tokens: int):
        """The image's embeddings: encoded now, or kept from an earlier request (a chat sends its images again
        every turn; encoding one can take seconds)."""
        kept = self._encoded.get(image.digest)
        if kept is not None and len(kept) == n_tokens:
            self._encoded.move_to_end(image.digest)
            log.info("image %dx%d: %d tokens, encoded earlier", image.width, image.height, n_tokens)
            return kept
        started = time.perf_counter()
        if on_own_thread(mtmd.mtmd_encode_chunk, self._ctx, part) != 0:
            raise ImageRefused("the projector failed to encode an image")
        output = mtmd.mtmd_get_output_embd(self._ctx)
        embeddings = np.ctypeslib.as_array(output, shape=(n_tokens * self.n_embd,)).reshape(
            n_tokens, self.n_embd).copy()
        embeddings.flags.writeable = False  # shared by every job with this image
        log.info("image %dx%d: %d tokens, encoded in %.0f ms", image.width, image.height, n_tokens,
                 (time.perf_counter() - started) * 1000)
        self._encoded[image.digest] = embeddings
        while sum(e.nbytes for e in self._encoded.values()) > ENCODED_BYTES and len(self._encoded) > 1:
            self._encoded.popitem(last=False)
        return embeddings

    @staticmethod
    def _bitmap(image: ImageInput):
        pixels = (ctypes.c_uint8 * len(image.rgb)).from_buffer_copy(image.rgb)
        bitmap = mtmd.mtmd_bitmap_init(image.width, image.height, pixels)  # copies the pixels
        mtmd.mtmd_bitmap_set_id(bitmap, image.digest.encode())
        return bitmap

    def close(self) -> None:
        """Free the projector (its engine is gone)."""
        if self._ctx:
            mtmd.mtmd_free(self._ctx)
            self._ctx = None
