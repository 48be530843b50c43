"""Random-weight projectors (mmproj GGUFs) of the Qwen-VL family and Gemma 3, and tiny text models to pair them with.

Tensor names and keys are those of the vendored llama.cpp (`tools/mtmd/clip-impl.h`, `clip.cpp`'s loader,
`models/qwen2vl.cpp`, `qwen3vl.cpp`, `siglip.cpp`; `src/models/qwen2vl.cpp`, `gemma3.cpp`). Every ViT is 2 layers,
32 wide, 2 heads: an image encodes in milliseconds. Each projector's output scale is chosen so an image weighs on
the answer about as much as the words around it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from edge_server.devtools.synthetic import (
    _check_shape,
    _output_row_scales,
    _random_layers,
    _random_output,
    _vocabulary,
    _write_gguf,
    write_clip_gguf,
    write_random_model,
)

__all__ = [
    "GEMMA3_IMAGE_MARKERS",
    "QWEN_VL_IMAGE_MARKERS",
    "write_gemma3_model",
    "write_gemma3_projector",
    "write_qwen25vl_projector",
    "write_qwen2vl_model",
    "write_qwen3vl_model",
    "write_qwen3vl_projector",
]

# The text mtmd puts around an image's embeddings (mtmd.cpp's img_beg/img_end): control tokens in the real vocabularies.
QWEN_VL_IMAGE_MARKERS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
GEMMA3_IMAGE_MARKERS = ("<start_of_image>", "<end_of_image>")

_QWEN25VL_MROPE = (16, 24, 24)  # Qwen2.5-VL's mrope_section (temporal, height, width) over 64 rotated pairs
_QWEN3VL_MROPE = (24, 20, 20)  # Qwen3-VL's
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen2-VL / Qwen2.5-VL's preprocessor (OpenAI CLIP's)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class _Weights:
    """Random tensors from one seeded generator, shaped as numpy sees ggml's (rows = outputs)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def dense(self, rows: int, cols: int, scale: float = 1.0) -> np.ndarray:
        return (self.rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float16)

    def bias(self, size: int) -> np.ndarray:
        return (self.rng.standard_normal(size) * 0.1).astype(np.float32)

    def patch(self, n_embd: int, patch_size: int) -> np.ndarray:
        """A patch-embedding convolution's kernel [n_embd, 3, patch, patch]."""
        return (self.rng.standard_normal((n_embd, 3, patch_size, patch_size)) / patch_size).astype(np.float16)

    def positions(self, count: int, n_embd: int) -> np.ndarray:
        """Learned position embeddings, f32: ggml adds them to f32 activations and interpolates them (neither
        takes f16 on the CPU)."""
        return (self.rng.standard_normal((count, n_embd)) * 0.1).astype(np.float32)


def _norm(prefix: str, size: int, *, bias: bool = True) -> dict[str, np.ndarray]:
    tensors = {f"{prefix}.weight": np.ones(size, np.float32)}
    if bias:
        tensors[f"{prefix}.bias"] = np.zeros(size, np.float32)
    return tensors


def _vit_layer(w: _Weights, il: int, n_embd: int, n_ff: int, *, fused_qkv: bool, gated: bool,
               norm_bias: bool) -> dict[str, np.ndarray]:
    """One ViT block (clip.cpp's layer tensors): ln1, attention, ln2, FFN; ffn_down is [n_embd, n_ff] so the
    loader's up/down swap for legacy files (ffn_down->ne[0] == n_embd) never applies."""
    blk = f"v.blk.{il}"
    tensors = {**_norm(f"{blk}.ln1", n_embd, bias=norm_bias), **_norm(f"{blk}.ln2", n_embd, bias=norm_bias)}
    if fused_qkv:
        tensors[f"{blk}.attn_qkv.weight"], tensors[f"{blk}.attn_qkv.bias"] = w.dense(3 * n_embd, n_embd), w.bias(3 * n_embd)
    else:
        for name in ("attn_q", "attn_k", "attn_v"):
            tensors[f"{blk}.{name}.weight"], tensors[f"{blk}.{name}.bias"] = w.dense(n_embd, n_embd), w.bias(n_embd)
    tensors[f"{blk}.attn_out.weight"], tensors[f"{blk}.attn_out.bias"] = w.dense(n_embd, n_embd), w.bias(n_embd)
    for name in ("ffn_gate", "ffn_up") if gated else ("ffn_up",):
        tensors[f"{blk}.{name}.weight"], tensors[f"{blk}.{name}.bias"] = w.dense(n_ff, n_embd), w.bias(n_ff)
    tensors[f"{blk}.ffn_down.weight"], tensors[f"{blk}.ffn_down.bias"] = w.dense(n_embd, n_ff), w.bias(n_embd)
    return tensors


def _merger(w: _Weights, n_embd: int, n_embd_text: int) -> dict[str, np.ndarray]:
    """The Qwen-VL patch merger: 2x2 neighbouring patches concatenated, then mm.0 -> GELU -> mm.2."""
    merged = 4 * n_embd
    return {"mm.0.weight": w.dense(merged, merged), "mm.0.bias": w.bias(merged),
            "mm.2.weight": w.dense(n_embd_text, merged, scale=2.0), "mm.2.bias": w.bias(n_embd_text)}


def write_qwen25vl_projector(path: str | Path, *, n_embd_text: int = 64, seed: int = 0, n_layer: int = 2,
                             n_embd: int = 32, n_head: int = 2, n_ff: int = 48, patch_size: int = 14,
                             window_pattern: int = 2) -> Path:
    """Write a random-weight Qwen2.5-VL mmproj (`qwen2.5vl_merger`): RMS-normed ViT with 2D M-RoPE, SiLU-gated
    FFN, window attention but every `window_pattern`-th layer, no position embeddings; two temporal patch kernels
    (`v.patch_embd.weight`, `.weight.1`) summed for a still image; the 2x2 merger. An image of W x H pixels becomes
    (W' / 28) x (H' / 28) tokens, W' x H' its size rounded to multiples of 28 within [8, 4096] tokens."""
    if (n_embd // n_head) % 4:
        raise ValueError("the ViT's head size must split into 4 M-RoPE sections")
    w = _Weights(seed)
    tensors = {"v.patch_embd.weight": w.patch(n_embd, patch_size), "v.patch_embd.weight.1": w.patch(n_embd, patch_size)}
    for il in range(n_layer):
        tensors.update(_vit_layer(w, il, n_embd, n_ff, fused_qkv=False, gated=True, norm_bias=False))
    tensors.update(_norm("v.post_ln", n_embd, bias=False))  # the merger's ln_q
    tensors.update(_merger(w, n_embd, n_embd_text))
    return write_clip_gguf(path, "qwen2.5vl_merger", tensors, n_embd=n_embd, n_ff=n_ff, n_layer=n_layer,
                           n_head=n_head, n_embd_text=n_embd_text, image_size=560, patch_size=patch_size, eps=1e-6,
                           activation="silu", image_mean=_CLIP_MEAN, image_std=_CLIP_STD,
                           more={"clip.vision.n_wa_pattern": window_pattern, "clip.vision.spatial_merge_size": 2})


def write_qwen3vl_projector(path: str | Path, *, n_embd_text: int = 64, seed: int = 0, n_layer: int = 2,
                            n_embd: int = 32, n_head: int = 2, n_ff: int = 48, patch_size: int = 16,
                            n_position_side: int = 4, deepstack_layers: tuple[int, ...] = ()) -> Path:
    """Write a random-weight Qwen3-VL / Qwen3.5 mmproj (`qwen3vl_merger`, what llama.cpp's converter writes for
    Qwen3_5ForConditionalGeneration): LayerNorm ViT with fused QKV and 2D M-RoPE, learned position embeddings
    (`n_position_side`^2, interpolated to the patch grid), a patch bias, GELU FFN, the 2x2 merger; no deepstack
    layers unless `deepstack_layers` names some (Qwen3.5's text model takes no deepstack features, so its n_embd_inp
    is its n_embd; Qwen3-VL's takes one set per such ViT layer, each merged, normed and projected like the output,
    appended to it: `write_qwen3vl_model`). An image becomes (W' / 32) x (H' / 32) tokens, W' x H' its size rounded
    to multiples of 32 within [8, 4096] tokens."""
    if (n_embd // n_head) % 4:
        raise ValueError("the ViT's head size must split into 4 M-RoPE sections")
    w = _Weights(seed)
    tensors = {"v.patch_embd.weight": w.patch(n_embd, patch_size), "v.patch_embd.weight.1": w.patch(n_embd, patch_size),
               "v.patch_embd.bias": w.bias(n_embd), "v.position_embd.weight": w.positions(n_position_side ** 2, n_embd)}
    for il in range(n_layer):
        tensors.update(_vit_layer(w, il, n_embd, n_ff, fused_qkv=True, gated=False, norm_bias=True))
    for il in deepstack_layers:
        merged = 4 * n_embd
        tensors.update(_norm(f"v.deepstack.{il}.norm", merged))
        tensors.update({f"v.deepstack.{il}.fc1.weight": w.dense(merged, merged),
                        f"v.deepstack.{il}.fc1.bias": w.bias(merged),
                        f"v.deepstack.{il}.fc2.weight": w.dense(n_embd_text, merged, scale=2.0),
                        f"v.deepstack.{il}.fc2.bias": w.bias(n_embd_text)})
    tensors.update(_norm("v.post_ln", n_embd))  # the merger's norm
    tensors.update(_merger(w, n_embd, n_embd_text))
    return write_clip_gguf(path, "qwen3vl_merger", tensors, n_embd=n_embd, n_ff=n_ff, n_layer=n_layer,
                           n_head=n_head, n_embd_text=n_embd_text, image_size=n_position_side * patch_size,
                           patch_size=patch_size, eps=1e-6, activation="gelu",
                           more={"clip.vision.spatial_merge_size": 2})


def write_gemma3_projector(path: str | Path, *, n_embd_text: int = 64, seed: int = 0, n_layer: int = 2,
                           n_embd: int = 32, n_head: int = 2, n_ff: int = 48, image_size: int = 224,
                           patch_size: int = 14, pool: int = 4) -> Path:
    """Write a random-weight Gemma 3 mmproj (`gemma3`): a SigLIP ViT on a fixed `image_size` square, its patch
    grid average-pooled `pool` x `pool`, RMS-normed (`mm.soft_emb_norm`) and projected (`mm.input_projection`,
    [n_embd, n_embd_text] as ggml reads it transposed). Every image becomes ((image_size / patch_size) / pool)^2
    tokens: 16 by default (Gemma 3's real 896 / 14 / 4 gives 256)."""
    if (image_size // patch_size) % pool:
        raise ValueError("the patch grid must divide into pool x pool blocks")
    w = _Weights(seed)
    tensors = {"v.patch_embd.weight": w.patch(n_embd, patch_size), "v.patch_embd.bias": w.bias(n_embd),
               "v.position_embd.weight": w.positions((image_size // patch_size) ** 2, n_embd)}
    for il in range(n_layer):
        tensors.update(_vit_layer(w, il, n_embd, n_ff, fused_qkv=False, gated=False, norm_bias=True))
    tensors.update(_norm("v.post_ln", n_embd))
    tensors["mm.soft_emb_norm.weight"] = np.ones(n_embd, np.float32)
    # Unit-RMS rows in, unit-RMS image embeddings out: the size of the model's scaled token embeddings.
    tensors["mm.input_projection.weight"] = (w.rng.standard_normal((n_embd, n_embd_text)) / np.sqrt(n_embd)).astype(np.float16)
    return write_clip_gguf(path, "gemma3", tensors, n_embd=n_embd, n_ff=n_ff, n_layer=n_layer, n_head=n_head,
                           n_embd_text=n_embd_text, image_size=image_size, patch_size=patch_size, eps=1e-6,
                           activation="gelu", more={"clip.vision.projector.scale_factor": pool})


def _mrope_sections(pairs: int, sections: tuple[int, ...]) -> list[int]:
    """`sections` (a model's mrope_section) scaled to `pairs` rotated pairs, plus the unused 4th."""
    scaled = [pairs * s // sum(sections) for s in sections]
    scaled[0] += pairs - sum(scaled)
    return [*scaled, 0]


def write_qwen2vl_model(path: str | Path, *, seed: int = 0, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                        n_head_kv: int = 2, n_ff: int = 128, context_length: int = 4096) -> Path:
    """Write the tiny random qwen2 model as llama.cpp's `qwen2vl` architecture (Qwen2-VL and Qwen2.5-VL's text
    model: M-RoPE, `rope.dimension_sections` as Qwen2.5-VL's scaled to its head), on the same vocabulary plus
    the vision markers as control tokens."""
    pairs = n_embd // n_head // 2

    def sections(writer: gguf.GGUFWriter) -> None:
        writer.add_array("qwen2vl.rope.dimension_sections", _mrope_sections(pairs, _QWEN25VL_MROPE))

    return write_random_model(path, seed=seed, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
                              n_ff=n_ff, context_length=context_length, arch="qwen2vl",
                              control_tokens=QWEN_VL_IMAGE_MARKERS, more_metadata=sections)


def write_qwen3vl_model(path: str | Path, *, seed: int = 0, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                        n_head_kv: int = 2, n_ff: int = 128, context_length: int = 4096,
                        n_deepstack_layers: int = 1) -> Path:
    """Write the tiny random model as llama.cpp's `qwen3vl` architecture (Qwen3-VL's text model: Qwen3's attention,
    M-RoPE with Qwen3-VL's sections, and `n_deepstack_layers` sets of deepstack features in each image row, added
    to the first layers' outputs: its n_embd_inp is n_embd x (1 + n_deepstack_layers)), with the vision markers."""
    pairs = n_embd // n_head // 2

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_array("qwen3vl.rope.dimension_sections", _mrope_sections(pairs, _QWEN3VL_MROPE))
        writer.add_uint32("qwen3vl.n_deepstack_layers", n_deepstack_layers)

    return write_random_model(path, seed=seed, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
                              n_ff=n_ff, context_length=context_length, arch="qwen3vl", qk_norm=True,
                              control_tokens=QWEN_VL_IMAGE_MARKERS, more_metadata=metadata)


_GEMMA3_NAME = "edge-server synthetic Gemma 3-architecture model (random weights, not a real LLM)"


def write_gemma3_model(path: str | Path, *, seed: int = 0, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                       n_head_kv: int = 2, n_ff: int = 128, context_length: int = 4096,
                       sliding_window: int = 512) -> Path:
    """Write a tiny random-weight `gemma3` GGUF (per-head q/k norms, post-attention and post-FFN norms, GELU FFN,
    token embeddings scaled by sqrt(n_embd) in the graph, sliding-window attention on every layer but each
    second) on the tiny ChatML vocabulary plus Gemma 3's image markers."""
    _check_shape(n_embd, n_head, n_head_kv)
    rng = np.random.default_rng(seed)
    tokens, types, merges = _vocabulary(control_tokens=GEMMA3_IMAGE_MARKERS)
    embeddings = rng.standard_normal((len(tokens), n_embd))
    # Stored at 1/sqrt(n_embd): the graph's sqrt(n_embd) scale brings tokens to unit RMS, as the projector's images.
    tensors: dict[str, np.ndarray] = {"token_embd.weight": (embeddings / np.sqrt(n_embd)).astype(np.float16)}
    head_dim = n_embd // n_head
    for name, array in _random_layers(rng, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
                                      n_ff=n_ff, mix=1.0).items():
        if not name.endswith(".bias"):  # Gemma has no attention biases
            tensors[name] = array
    for i in range(n_layer):
        for name, size in (("attn_q_norm", head_dim), ("attn_k_norm", head_dim), ("post_attention_norm", n_embd),
                           ("post_ffw_norm", n_embd)):
            tensors[f"blk.{i}.{name}.weight"] = np.ones(size, np.float32)
    tensors["output_norm.weight"] = np.ones(n_embd, np.float32)
    tensors["output.weight"] = _random_output(rng, embeddings, _output_row_scales(tokens, types)).astype(np.float16)

    def gemma3_metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_uint32("gemma3.attention.sliding_window", sliding_window)
        writer.add_uint32("gemma3.attention.sliding_window_pattern", 2)  # layer 0 local, layer 1 global, ...

    return _write_gguf(Path(path), name=_GEMMA3_NAME, tokens=tokens, types=types, merges=merges, tensors=tensors,
                       n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff,
                       context_length=context_length, rope_freq_base=10_000.0, arch="gemma3",
                       more_metadata=gemma3_metadata)


WRITERS: dict[str, Callable[..., Path]] = {
    "qwen2.5vl_merger": write_qwen25vl_projector,
    "qwen3vl_merger": write_qwen3vl_projector,
    "gemma3": write_gemma3_projector,
}
