"""`make bench BENCH_ARGS=--vision-only [PEER=llama-server]`: image encode time and what it does to other streams.

The hybrid bench model (Qwen3.5-0.8B's shape, random weights, Q4_K_M) with a random-weight Qwen3.5 projector
(`qwen3vl_merger`) of Qwen3-VL-2B's vision-tower shape (24 layers, 1024 wide: the size of the small Qwen3.5
models' towers). Per server: each image size's encode time (ours from its log line; llama-server's from its own),
then one text stream of 96 tokens alone and again while a request with a 512x512 image arrives after its 16th token:
that stream's inter-token gaps (median, p99, longest) and the image request's time to first token.
"""

from __future__ import annotations

import base64
import io
import re
import statistics
import threading
import time
from pathlib import Path

import requests

from edge_server.devtools.harness import ROOT, free_port, start_server, stop

VISION_HEADING = "## Images: encode time and other streams"
BENCH_PROJECTOR = ROOT / "models" / "generated" / "bench-qwen3.5-mmproj-f16.gguf"
# Qwen3-VL-2B's vision tower (its config.json); the projector's output is the text model's width.
TOWER_SHAPE = {"n_layer": 24, "n_embd": 1024, "n_head": 16, "n_ff": 4096, "patch_size": 16, "n_position_side": 48}
SIZES = ((256, 256), (512, 512))  # a 2-core CPU takes minutes over a 1024x768 image with this tower
STREAM_TOKENS = 96


def ensure_projector(n_embd_text: int) -> Path:
    """The bench's random-weight Qwen3.5 projector (once; kept in models/generated)."""
    from edge_server.devtools.vision_models import write_qwen3vl_projector

    if not BENCH_PROJECTOR.is_file():
        print(f"generating {BENCH_PROJECTOR.name} (random weights, Qwen3-VL-2B tower shape) ...", flush=True)
        write_qwen3vl_projector(BENCH_PROJECTOR, n_embd_text=n_embd_text, **TOWER_SHAPE)
    return BENCH_PROJECTOR


def picture(width: int, height: int, seed: int) -> str:
    """A noisy PNG data URL (noise: no two images alike, nothing a codec makes trivial)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _request(text: str, image: str | None, max_tokens: int, bias: dict) -> dict:
    content: list | str = text if image is None else [{"type": "text", "text": text},
                                                      {"type": "image_url", "image_url": {"url": image}}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "logit_bias": bias, "chat_template_kwargs": {"enable_thinking": False}}


def streamed(url: str, body: dict) -> list[float]:
    """Arrival times of a streamed chat's content (or reasoning) deltas, from the request's start."""
    started = time.perf_counter()
    times = []
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith(b"data: {") and (b'"content":"' in line or b'"reasoning_content":"' in line):
                times.append(time.perf_counter() - started)
    return times


def gaps(times: list[float]) -> dict:
    """Inter-token gaps of a stream in ms: median, p99, longest."""
    between = sorted((b - a) * 1000 for a, b in zip(times, times[1:]))
    return {"median_ms": round(statistics.median(between), 1),
            "p99_ms": round(between[min(len(between) - 1, int(len(between) * 0.99))], 1),
            "max_ms": round(between[-1], 1), "tokens": len(times)}


def encode_times(log: Path) -> list[float]:
    """Encode times (ms) a server's log reports, in order: ours' `encoded in N ms`, llama-server's
    `image/slice encoded in N ms`."""
    text = log.read_text(errors="replace")
    return [float(m) for m in re.findall(r"encoded in (\d+(?:\.\d+)?) ms", text)]


def _measure(url: str, log: Path, bias: dict) -> dict:
    streamed(url, _request("Say something.", picture(64, 64, 99), 2, bias))  # warm-up
    encodes = {}
    for i, (width, height) in enumerate(SIZES):
        before = len(encode_times(log))
        first = streamed(url, _request("Describe the picture.", picture(width, height, i), 1, bias))[0]
        logged = encode_times(log)[before:]  # llama-server logs none at its default verbosity
        encodes[f"{width}x{height}"] = {"encode_ms": round(sum(logged)) if logged else None,
                                        "ttft_ms": round(first * 1000, 0)}
    alone = gaps(streamed(url, _request("Write a long story about a river.", None, STREAM_TOKENS, bias)))
    times: list[float] = []
    runner = threading.Thread(target=lambda: times.extend(
        streamed(url, _request("Write a long story about a harbor.", None, STREAM_TOKENS, bias))))
    runner.start()
    while len(times) < 16 and runner.is_alive():
        time.sleep(0.005)
    image_ttft = streamed(url, _request("Describe the picture.", picture(*SIZES[-1], 7), 1, bias))[0]
    runner.join()
    return {"encode": encodes, "stream_alone": alone, "stream_with_image": gaps(times),
            "image_ttft_ms": round(image_ttft * 1000, 0)}


def vision(*, threads: int, out: Path, peer: Path | None = None) -> dict:
    """The table's figures for ours and, with `peer`, llama-server (see the module's docstring)."""
    from edge_server.devtools.bench import end_of_turn_bias, load_vocab, start_peer
    from edge_server.devtools.bench_multiturn import QWEN35_08B_SHAPE, ensure_hybrid_bench_model

    model = ensure_hybrid_bench_model()
    projector = ensure_projector(QWEN35_08B_SHAPE["n_embd"])
    bias = end_of_turn_bias(load_vocab(model))
    results = {"model": model.name, "projector": projector.name, "threads": threads, "rows": []}
    port = free_port()
    log = out / f"server-vision-{port}.log"
    process = start_server(model, port=port, log_path=log, flags=[
        "--mmproj", str(projector), "--threads", str(threads), "--parallel", "2", "--n-ctx", "8192",
        "--flash-attn", "off"])
    try:
        results["rows"].append({"server": "edge-server", **_measure(f"http://127.0.0.1:{port}", log, bias)})
    finally:
        stop([process])
    if peer is not None:
        port = free_port()
        log = out / f"peer-vision-{port}.log"
        process = start_peer(peer, model, port=port, threads=threads, parallel=2, n_ctx=16384, log_path=log,
                             extra=["--mmproj", str(projector)])
        try:
            results["rows"].append({"server": "llama-server", **_measure(f"http://127.0.0.1:{port}", log, bias)})
        finally:
            stop([process])
    return results


def markdown(results: dict) -> str:
    """The section for bench/results.md."""
    lines = [f"Model `{results['model']}` with projector `{results['projector']}` (random weights), "
             f"{results['threads']} threads, 2 slots. Encode: the server's own log line; TTFT end to end (1 token).",
             "", "| server | image | encode | TTFT |", "|---|---|---|---|"]
    for row in results["rows"]:
        for size, figures in row["encode"].items():
            encode = "not logged" if figures["encode_ms"] is None else f"{figures['encode_ms']:.0f} ms"
            lines.append(f"| {row['server']} | {size} | {encode} | {figures['ttft_ms']:.0f} ms |")
    lines += ["", f"A text stream of {STREAM_TOKENS} tokens, alone and while a {SIZES[-1][0]}x{SIZES[-1][1]} image "
              "request arrives after its 16th token (inter-token gaps, decode only):", "",
              "| server | alone: median / p99 / longest | with the image: median / p99 / longest | image TTFT |",
              "|---|---|---|---|"]
    for row in results["rows"]:
        a, w = row["stream_alone"], row["stream_with_image"]
        lines.append(f"| {row['server']} | {a['median_ms']} / {a['p99_ms']} / {a['max_ms']} ms | "
                     f"{w['median_ms']} / {w['p99_ms']} / {w['max_ms']} ms | {row['image_ttft_ms']:.0f} ms |")
    return "\n".join(lines) + "\n"
