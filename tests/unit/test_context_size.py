"""The default context: KV bytes per token from a GGUF's shape, and the context that memory allows."""

from __future__ import annotations

import pytest

from edge_server.engine.contextsize import FLOOR, default_context, kv_bytes_per_token
from edge_server.ggufmeta import read_gguf_metadata

# Qwen2.5-1.5B-Instruct's shape: 28 layers, 12 query heads of 128 over 1536, 2 KV heads.
QWEN25_1_5B = {"general.architecture": "qwen2", "qwen2.block_count": 28, "qwen2.embedding_length": 1536,
               "qwen2.attention.head_count": 12, "qwen2.attention.head_count_kv": 2, "qwen2.context_length": 32768}
GIB = 2**30


def test_kv_bytes_per_token_of_a_dense_model_by_cache_type():
    assert kv_bytes_per_token(QWEN25_1_5B) == 28 * 2 * (128 + 128) * 2  # 28 KiB
    assert kv_bytes_per_token(QWEN25_1_5B, "q8_0", "q8_0") == 28 * 2 * (128 + 128) * 34 / 32
    assert kv_bytes_per_token(QWEN25_1_5B, "f16", "q4_0") == 28 * 2 * (128 * 2 + 128 * 18 / 32)


def test_explicit_head_widths_and_layers_without_attention():
    gemma = {"general.architecture": "gemma3", "gemma3.block_count": 18, "gemma3.embedding_length": 640,
             "gemma3.attention.head_count": 4, "gemma3.attention.head_count_kv": 1,
             "gemma3.attention.key_length": 256, "gemma3.attention.value_length": 256}
    assert kv_bytes_per_token(gemma) == 18 * 1 * 512 * 2  # sliding-window layers are cached in full
    hybrid = {"general.architecture": "qwen35", "qwen35.block_count": 24, "qwen35.embedding_length": 1024,
              "qwen35.attention.head_count": 8, "qwen35.attention.head_count_kv": 2,
              "qwen35.attention.key_length": 256, "qwen35.attention.value_length": 256,
              "qwen35.full_attention_interval": 4}
    assert kv_bytes_per_token(hybrid) == 6 * 2 * 512 * 2  # one attention layer in four
    per_layer = {**QWEN25_1_5B, "qwen2.block_count": 4, "qwen2.attention.head_count_kv": [2, 0, 0, 2]}
    assert kv_bytes_per_token(per_layer) == 4 * 256 * 2


@pytest.mark.parametrize("free_gib, slots, expected", [
    (64, 4, 32768),  # room for 4 x 32k: the trained context
    (6, 4, 23296),  # (6 - 1 GiB weights) / 2 over 4 x 28 KiB: 32,768 do not fit, whole 256s that do
    (6, 1, 32768),  # one slot (--parallel 1 or --kv-unified) fits it
    (1.5, 4, FLOOR),  # never below 4096
])
def test_the_default_context_is_the_trained_one_as_far_as_half_the_free_memory_holds_it(free_gib, slots, expected):
    per_token = kv_bytes_per_token(QWEN25_1_5B)
    assert default_context(32768, per_token, slots=slots, free_bytes=int(free_gib * GIB), weights_bytes=GIB) == expected


def test_without_a_memory_figure_or_a_shape_the_default_is_the_old_one():
    assert default_context(32768, 28672, slots=4, free_bytes=None, weights_bytes=0) == FLOOR
    assert default_context(2048, 0, slots=4, free_bytes=64 * GIB, weights_bytes=0) == 2048  # never past trained


def test_a_real_gguf_is_read_for_its_shape(smollm2_model):
    # SmolLM2-135M: 30 layers, 9 heads of 64 over 576, 3 KV heads.
    assert kv_bytes_per_token(read_gguf_metadata(smollm2_model, arrays=False)) == 30 * 3 * (64 + 64) * 2
