"""The default context of a served model: as long as it was trained for, as far as memory lets the KV cache grow
(bytes per token estimated from the GGUF's shape before loading, the free memory of where the cache will live)."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_server.ggufmeta import read_gguf_metadata

FLOOR = 4096  # the default before this estimate: never less (but never more than the model was trained for)
STEP = 256  # contexts are whole multiples of this
MEMORY_SHARE = 0.5  # of the memory the weights leave free: the rest is for compute buffers and everything else
VALUE_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}  # per cached value, by --cache-type-k/-v
_GPU_TYPES = (1, 2, 3)  # ggml_backend_dev_type: GPU, IGPU, ACCEL (0 is the CPU)


@dataclass(frozen=True)
class ContextChoice:
    """The context chosen per request and why (for the start-up log)."""

    n_ctx: int
    reason: str


def kv_bytes_per_token(metadata: dict[str, Any], cache_type_k: str = "f16", cache_type_v: str = "f16") -> float:
    """Bytes the KV cache takes per token of one sequence: attention layers x KV heads x (key + value width).

    Layers without attention (recurrent ones of hybrid models) hold no per-token cache: a per-layer head count
    of 0 marks them, or `full_attention_interval` (one attention layer in that many). Sliding-window layers
    count in full, as llama-cpp-python sizes their cache."""
    arch = metadata.get("general.architecture", "")

    def get(key: str) -> Any:
        return metadata.get(f"{arch}.{key}")

    n_layer = int(get("block_count") or 0)
    n_head = get("attention.head_count") or 0
    heads_kv = get("attention.head_count_kv")
    heads_kv = n_head if heads_kv is None else heads_kv
    if isinstance(heads_kv, list):
        per_layer = [int(h) for h in heads_kv[:n_layer]]
    else:
        interval = int(get("full_attention_interval") or 1)
        per_layer = [int(heads_kv) if (layer + 1) % interval == 0 else 0 for layer in range(n_layer)]
    widest_head = max(n_head) if isinstance(n_head, list) else int(n_head)
    default_width = int(get("embedding_length") or 0) // widest_head if widest_head else 0
    key_width = int(get("attention.key_length") or default_width)
    value_width = int(get("attention.value_length") or default_width)
    per_head = key_width * VALUE_BYTES[cache_type_k] + value_width * VALUE_BYTES[cache_type_v]
    return sum(per_layer) * per_head


def default_context(n_ctx_train: int, per_token: float, *, slots: int, free_bytes: int | None,
                    weights_bytes: int) -> int:
    """Tokens per request: the trained context where half the memory the weights leave holds `slots` caches of
    it, else the most that does (whole `STEP`s), never below min(FLOOR, trained)."""
    floor = min(FLOOR, n_ctx_train)
    if free_bytes is None or per_token <= 0:
        return floor
    budget = max(0.0, (free_bytes - weights_bytes) * MEMORY_SHARE)
    fits = int(budget // (per_token * slots)) // STEP * STEP
    return max(floor, min(n_ctx_train, fits))


def choose_context(path: Path, n_ctx_train: int, *, parallel: int, kv_unified: bool, offloaded: bool,
                   cache_type_k: str, cache_type_v: str) -> ContextChoice:
    """The default context for the model at `path`, with a line saying how it was chosen."""
    metadata = read_gguf_metadata(path, arrays=False)
    arch = metadata.get("general.architecture", "")
    if metadata.get(f"{arch}.attention.head_count_kv", 0) is None:  # a per-layer array: read the arrays too
        metadata = read_gguf_metadata(path)
    per_token = kv_bytes_per_token(metadata, cache_type_k, cache_type_v)
    slots = 1 if kv_unified else parallel
    where, free = ("GPU", gpu_free_bytes()) if offloaded else ("RAM", host_available_bytes())
    weights = path.stat().st_size
    n_ctx = default_context(n_ctx_train, per_token, slots=slots, free_bytes=free, weights_bytes=weights)
    if free is None:
        return ContextChoice(n_ctx, f"free {where} unknown: min({FLOOR}, trained)")
    if n_ctx == n_ctx_train:
        limit = "the trained context"
    elif n_ctx == min(FLOOR, n_ctx_train):
        limit = f"the floor of {n_ctx}"
    else:
        limit = "memory" + ("; --kv-unified or a lower --parallel gives longer contexts" if slots > 1 else "")
    plural = "s" if slots > 1 else ""
    return ContextChoice(n_ctx, f"KV cache {per_token / 1024:.1f} KiB/token x {slots} slot{plural} x {n_ctx} = "
                                f"{per_token * slots * n_ctx / 2**30:.2f} GiB; {free / 2**30:.1f} GiB {where} free, "
                                f"{weights / 2**30:.2f} GiB weights; limited by {limit}")


def host_available_bytes() -> int | None:
    """Memory the system can give without swapping (MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gpu_free_bytes() -> int | None:
    """Free memory over the GPU devices ggml knows (RPC workers' included once registered), or None."""
    try:
        from edge_server.engine.rpc import ggml_library

        ggml = ggml_library("ggml")
        ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
        ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_dev_type.restype = ctypes.c_int
        ggml.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                                 ctypes.POINTER(ctypes.c_size_t)]
        total_free = 0
        for index in range(ggml.ggml_backend_dev_count()):
            device = ggml.ggml_backend_dev_get(index)
            if ggml.ggml_backend_dev_type(device) in _GPU_TYPES:
                free, total = ctypes.c_size_t(), ctypes.c_size_t()
                ggml.ggml_backend_dev_memory(device, ctypes.byref(free), ctypes.byref(total))
                total_free += free.value
        return total_free or None
    except (OSError, AttributeError):
        return None
