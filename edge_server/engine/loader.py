"""Loading a GGUF into llama.cpp: file checks, metadata, backend and offload, the context for the scheduler."""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import _internals as internals

from edge_server.ggufmeta import read_gguf_metadata
from edge_server.engine import fatal, rpc
from edge_server.engine.batching import BATCH_TOKENS
from edge_server.engine.contextsize import choose_context
from edge_server.engine.llamalog import captured_log, route_llama_log
from edge_server.engine.draftmodel import DraftModel
from edge_server.engine.vision import Vision
from edge_server.engine.partialmemory import PartialMemory, memory_kind
from edge_server.engine.scheduler import Engine
from edge_server.engine.speculation import SpecConfig
from edge_server.engine.threadtuner import ThreadTuner
from edge_server.engine.types import ModelInfo, ModelLoadError

log = logging.getLogger("edge_server.engine")

CACHE_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}


def load_engine(
    path: Path,
    *,
    n_ctx: int | None = None,
    n_gpu_layers: int | str = "auto",
    threads: int,
    parallel: int = 1,
    max_queue: int = 16,
    flash_attn: str = "auto",
    adapt_threads: bool = True,
    fault_seed: int | None = None,
    cache_type_k: str = "f16",
    cache_type_v: str = "f16",
    kv_unified: bool = False,
    rpc_workers: tuple[str, ...] = (),
    tensor_split: tuple[float, ...] = (),
    speculation: SpecConfig | None = None,
    ctx_checkpoints: int = 8,
    ctx_checkpoint_mib: float = 512,
    swa_full: bool = False,
    mmproj: Path | None = None,
) -> Engine:
    """Load a GGUF model and start the worker; raises `ModelLoadError` with a one-line reason.

    `n_ctx` is the limit of one request; the KV cache holds `parallel` such sequences, or with
    `kv_unified` one pool of `n_ctx` cells that all sequences share (see `Engine`: when it is full).
    `cache_type_k` / `cache_type_v`: f16, q8_0 or q4_0 (a quantized V cache needs flash attention).
    `rpc_workers` (`host:port` of `edge-server worker`s) become devices first (`WorkerUnavailable` when one
    cannot be used); with them "auto" offloads every layer, spread by free memory or by `tensor_split`
    (one share per device: the workers in order, then local GPUs).
    A memory that cannot drop a suffix (recurrent, hybrid, or sliding-window layers without `swa_full`) gets
    `ctx_checkpoints` context checkpoints per slot, `ctx_checkpoint_mib` in all; speculation on a recurrent
    model goes back to its state before the drafts (`Slots.keep_state_before_drafts`).
    `mmproj`: the model's projector GGUF, which lets it see images (`engine/vision.py`).
    """
    path = Path(path)
    check_gguf_file(path)
    n_ctx_train = read_n_ctx_train(path)
    backend = offload_backend()
    _init_backend()
    if rpc_workers:
        rpc.add_workers(rpc_workers)
        backend = "RPC" if backend == "CPU" else f"{backend}+RPC"
    layers = (-1 if backend != "CPU" else 0) if n_gpu_layers == "auto" else int(n_gpu_layers)
    per_request = n_ctx
    if per_request is None:
        choice = choose_context(path, n_ctx_train, parallel=parallel, kv_unified=kv_unified,
                                offloaded=backend != "CPU" and layers != 0,
                                cache_type_k=cache_type_k, cache_type_v=cache_type_v)
        per_request = choice.n_ctx
        log.info("%s: n_ctx %d per request by default (%s)", path.name, per_request, choice.reason)
    model_params = llama_cpp.llama_model_default_params()
    model_params.n_gpu_layers = 0x7FFFFFFF if layers < 0 else layers
    if rpc_workers:
        model_params.progress_callback = rpc.report_progress  # the watchdog sees the upload move (rpc.LOADS)
    if tensor_split:
        split = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*tensor_split)
        model_params.tensor_split = split  # `split` outlives the load: it is read while the model loads
    context_params = llama_cpp.llama_context_default_params()
    # Apart (default), each sequence gets its own n_ctx cells and none is ever short of them.
    context_params.n_ctx = per_request if kv_unified else per_request * parallel
    context_params.n_seq_max = parallel
    context_params.kv_unified = kv_unified
    context_params.swa_full = swa_full
    context_params.type_k, context_params.type_v = CACHE_TYPES[cache_type_k], CACHE_TYPES[cache_type_v]
    context_params.n_batch = context_params.n_ubatch = BATCH_TOKENS
    context_params.n_threads = context_params.n_threads_batch = threads
    context_params.no_perf = True
    context_params.flash_attn_type = {
        "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
        "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
        "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
    }[flash_attn]
    try:
        with captured_log() as load_log:
            model = internals.LlamaModel(path_model=str(path), params=model_params, verbose=False)
            kind = memory_kind(model.model, swa_full=swa_full)
            context = internals.LlamaContext(model=model, params=context_params, verbose=False)
    except (ValueError, RuntimeError) as error:
        hint = ""
        if (cache_type_k, cache_type_v) != ("f16", "f16"):
            hint = (f" (with --cache-type-k {cache_type_k} --cache-type-v {cache_type_v}: a quantized cache needs the "
                    "model's attention head size to be a multiple of 32, and quantized values need flash attention)")
        raise ModelLoadError(f"llama.cpp failed to load {path}: {error}{hint}") from None
    vision = None
    if mmproj is not None:
        check_gguf_file(Path(mmproj))
        with captured_log():
            vision = Vision(Path(mmproj), model, threads=threads, use_gpu=backend != "CPU" and layers != 0,
                            whole_limit=BATCH_TOKENS)
    metadata = model.metadata()
    arch = metadata.get("general.architecture", "")
    n_layer = int(metadata.get(f"{arch}.block_count", "0") or 0)
    info = ModelInfo(
        path=path,
        n_ctx=per_request,
        n_ctx_train=n_ctx_train,
        n_vocab=model.n_vocab(),
        n_layer=n_layer,
        backend=backend,
        gpu_layers=0 if backend == "CPU" else (n_layer + 1 if layers < 0 else min(layers, n_layer + 1)),
        threads=threads,
        chat_template=metadata.get("tokenizer.chat_template"),
        max_token_bytes=_longest_token_bytes(model),
        bos_token=_token_text(model, model.token_bos()),
        eos_token=_token_text(model, model.token_eos()),
        add_bos=bool(model.add_bos_token()),
        metadata=metadata,
        devices=tuple(rpc.device_shares("".join(load_log))),
        vision=vision is not None,
    )
    partial = None
    if kind != "full":
        partial = PartialMemory(context, kind, llama_cpp.llama_model_n_swa(model.model))
        log.info("%s: %s memory cannot drop a suffix: up to %d context checkpoints per slot, %g MiB in all",
                 path.name, "recurrent" if kind == "recurrent" else "sliding-window", ctx_checkpoints,
                 ctx_checkpoint_mib)
    draft = None
    if speculation is not None and speculation.kind == "draft-simple":
        draft_path = Path(speculation.draft_model)
        check_gguf_file(draft_path)
        draft = DraftModel(draft_path, n_ctx=per_request, parallel=parallel, threads=threads,
                           p_min=speculation.p_min)
        draft.check_tokenizer(model)
    return Engine(model, context, info, parallel=parallel, max_queue=max_queue, shared_pool=kv_unified,
                  tuner=ThreadTuner(threads, adaptive=adapt_threads), fault_seed=fault_seed, speculation=speculation,
                  draft_model=draft, partial_memory=partial, checkpoints_per_slot=ctx_checkpoints,
                  checkpoint_bytes=int(ctx_checkpoint_mib * (1 << 20)), vision=vision)


def read_n_ctx_train(path: Path) -> int:
    """The model's training context from its GGUF metadata, read without loading the weights."""
    try:
        metadata = read_gguf_metadata(path, arrays=False)
        return int(metadata[f"{metadata['general.architecture']}.context_length"])
    except (KeyError, ValueError, TypeError, OSError) as error:
        raise ModelLoadError(f"{path} has no usable GGUF metadata ({error})") from None


def offload_backend() -> str:
    """Name of the GPU backend this llama-cpp-python build offloads to, or 'CPU'."""
    if not llama_cpp.llama_supports_gpu_offload():
        return "CPU"
    info = llama_cpp.llama_print_system_info().decode(errors="replace").upper()
    for name in ("CUDA", "METAL", "VULKAN", "HIP", "SYCL"):
        if name in info:
            return name.title() if name == "METAL" else name
    return "CPU"  # the RPC backend alone also makes llama.cpp report GPU offload


def check_gguf_file(path: Path) -> None:
    """Raise `ModelLoadError` unless `path` is a readable file that starts like a GGUF."""
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (it starts with {magic!r}, expected b'GGUF')")


def _longest_token_bytes(model: internals.LlamaModel) -> int:
    buffer = ctypes.create_string_buffer(1024)
    longest = 1
    for token in range(model.n_vocab()):
        size = llama_cpp.llama_token_to_piece(model.vocab, token, buffer, len(buffer), 0, True)
        longest = max(longest, abs(size))  # negative: the piece is longer than the buffer, by that size
    return longest


def _token_text(model: Any, token: int) -> str:
    if token < 0:
        return ""
    return model.token_get_text(token)


@functools.cache
def _init_backend() -> None:
    # Once per process (functools.cache): llama.cpp's backend is global state.
    route_llama_log()
    fatal.catch_aborts()
    llama_cpp.llama_backend_init()


def free_engine(engine: Engine) -> None:
    """Give a closed engine's memory back now: its contexts (an embedder's too), its draft model, its weights.
    llama-cpp-python frees a model only when the garbage collector breaks the model's own reference cycle (its
    contexts are held by it), which may be long after the last use: meanwhile a reload would map it twice."""
    if engine.step_since is not None:  # the worker is still inside a step (a hung RPC worker): never free under it
        log.warning("%s: a decoding step is still running; its memory is left to the garbage collector",
                    engine.info.path.name)
        return
    if engine.draft_model is not None:
        engine.draft_model.model.close()
    engine.model.close()  # frees every context made on it first, then the weights
