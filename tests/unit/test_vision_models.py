"""The synthetic projector pairs (devtools/vision_models.py) through the pinned llama.cpp's mtmd, in-process: each
loads beside its text model, cuts an image into the tokens the projector type makes, encodes them into finite
embeddings as wide as the text model's input (Qwen3-VL's with its deepstack features), and asks of the engine what its real family asks (M-RoPE, non-causal)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from llama_cpp import _internals as internals
from llama_cpp import llama_model_default_params
from llama_cpp import mtmd_cpp as mtmd

from edge_server.devtools import assets
from tests.conftest import or_fail

MARKER = b"<__media__>"


def encode(model_path: Path, projector: Path, width: int, height: int) -> dict:
    """mtmd's view of one noise image of width x height in "Look: <image>": the image chunk's tokens and
    positions, its embeddings, and whether the model decodes images with M-RoPE or non-causally."""
    model = internals.LlamaModel(path_model=str(model_path), params=llama_model_default_params(), verbose=False)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings, params.media_marker = False, 2, False, MARKER
    ctx = mtmd.mtmd_init_from_file(str(projector).encode(), model.model, params)
    assert ctx, f"mtmd refused {projector.name} for {model_path.name}"
    pixels = np.random.default_rng(1).integers(0, 256, width * height * 3, dtype=np.uint8).tobytes()
    bitmap = mtmd.mtmd_bitmap_init(width, height, (ctypes.c_uint8 * len(pixels)).from_buffer_copy(pixels))
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        prompt = b"Look: " + MARKER
        text = mtmd.mtmd_input_text(prompt, len(prompt), False, True)
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) == 0
        parts = [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))]
        image = next(p for p in parts if mtmd.mtmd_input_chunk_get_type(p) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE)
        n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(image)
        assert mtmd.mtmd_encode_chunk(ctx, image) == 0
        n_embd = llama_cpp.llama_model_n_embd_inp(model.model)  # Qwen3-VL: its deepstack features too
        embeddings = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n_tokens * n_embd,)).copy()
        return {"tokens": n_tokens, "positions": mtmd.mtmd_input_chunk_get_n_pos(image),
                "embeddings": embeddings.reshape(n_tokens, n_embd), "mrope": mtmd.mtmd_decode_use_mrope(ctx),
                "non_causal": mtmd.mtmd_decode_use_non_causal(ctx, image)}
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(ctx)
        model.close()


# case -> (text model, projector, image size, (image tokens, positions they take, M-RoPE, non-causal)); the mlp pair
# is served in tests/e2e/test_vision.py.
CASES = {
    "qwen2.5vl 64x48": (assets.qwen2vl_model, assets.qwen25vl_projector, (64, 48), (12, 4, True, False)),  # 112x84
    "qwen2.5vl 300x200": (assets.qwen2vl_model, assets.qwen25vl_projector, (300, 200), (77, 11, True, False)),  # 308x196
    "qwen3.5 64x48": (assets.qwen35_model, assets.qwen35_projector, (64, 48), (12, 4, True, False)),  # 128x96, 32 px
    "qwen3-vl 64x48": (assets.qwen3vl_model, assets.qwen3vl_projector, (64, 48), (12, 4, True, False)),
    "gemma3": (assets.gemma3_model, assets.gemma3_projector, (300, 200), (16, 16, False, True)),  # any: 224x224 -> 4x4
}


@pytest.mark.parametrize("case", CASES)
def test_mtmd_loads_each_pair_and_encodes_an_image(case):
    model, projector, (width, height), expected = CASES[case]
    seen = encode(or_fail(model), or_fail(projector), width, height)
    assert (seen["tokens"], seen["positions"], seen["mrope"], seen["non_causal"]) == expected
    embeddings = seen["embeddings"]
    assert np.isfinite(embeddings).all()
    # About the size of a token's embedding, and different from patch to patch.
    assert 0.3 < np.sqrt(np.mean(embeddings ** 2)) < 10, np.sqrt(np.mean(embeddings ** 2))
    assert np.std(embeddings, axis=0).mean() > 0.05
