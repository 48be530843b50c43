"""`make bench BENCH_ARGS=--multiturn-only [PEER=llama-server]`: multi-turn chats, ours beside llama-server.

A 6-turn chat with a ~1,500-token system prompt, one slot; each turn sends the history back as the server returned
it. Per model and server: turn 1's time to first token (reasoning or content), the median of turns 2-6, their
ratio, the share of turns 2-6's prompt tokens served from cache, and peak RSS. Models: a random-weight `qwen35`
model of Qwen3.5-0.8B's shape, Q4_K_M (hybrid Gated DeltaNet + attention, the real Qwen3.5 tokenizer and template;
generated once into models/generated), Gemma 3 270M (sliding-window
attention; ours with the full-size and the small window) and SmolLM2 (plain attention, for reference). Then
speculation on the hybrid model: decode rates plain, with prompt lookup and with a draft model (itself: every
draft accepted, the mechanics' cost alone; its weights are random, so n-grams rarely match).
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import time
from pathlib import Path

import requests

from edge_server.devtools.harness import ROOT, free_port, memory_mb, start_server, stop

MULTITURN_HEADING = "## Multi-turn chats (context checkpoints)"
HYBRID_BENCH_MODEL = ROOT / "models" / "generated" / "bench-qwen3.5-0.8b-shape-q4_k_m.gguf"
# Qwen3.5-0.8B's shape (its config.json): 24 layers, every 4th full attention, embeddings tied (the vocab-only
# GGUF llama.cpp ships for qwen35 holds 151,936 tokens, not the released 248,320: a smaller output layer).
QWEN35_08B_SHAPE = {"n_layer": 24, "n_embd": 1024, "n_ff": 3584, "n_head": 8, "n_head_kv": 2, "head_dim": 256,
                    "ssm_state": 128, "ssm_groups": 16, "ssm_heads": 16, "conv_kernel": 4}
WORDS = ("river stone lantern orchard copper meadow violet harbor signal canvas ember thistle quartz falcon "
         "mosaic juniper cobalt prairie velvet summit").split()


def system_prompt(words: int = 1200, seed: int = 0) -> str:
    """About 1,500 tokens of ordinary words."""
    rng = random.Random(seed)
    return "You are a careful assistant. " + " ".join(rng.choice(WORDS) for _ in range(words))


def streamed_turn(base_url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed greedy turn: TTFT (first reasoning or content delta), the message as returned, cached tokens
    (usage's prompt_tokens_details, else llama-server's timings.cache_n) and prompt tokens."""
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent, first = time.perf_counter(), None
    content, reasoning, usage, timings = "", "", {}, {}
    with requests.post(base_url + "/v1/chat/completions", json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or timings
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("content") or delta.get("reasoning_content"):
                    first = first or time.perf_counter()
                content += delta.get("content") or ""
                reasoning += delta.get("reasoning_content") or ""
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is None:
        cached = timings.get("cache_n", 0)
    message = {"role": "assistant", "content": content, **({"reasoning_content": reasoning} if reasoning else {})}
    return {"ttft_s": (first or time.perf_counter()) - sent, "message": message, "cached": cached,
            "prompt_tokens": usage.get("prompt_tokens") or timings.get("prompt_n", 0) + cached}


def conversation(base_url: str, *, turns: int = 6, max_tokens: int = 16, seed: int = 0) -> list[dict]:
    """A `turns`-turn chat as a client keeps it (its system prompt drawn with `seed`); returns each turn's figures."""
    messages = [{"role": "system", "content": system_prompt(seed=seed)}]
    figures = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn + 1}: what comes next, and why?"})
        result = streamed_turn(base_url, messages, max_tokens)
        messages.append(result.pop("message"))
        figures.append(result)
    return figures


def summary(turns: list[dict], rss_mb: float) -> dict:
    """Turn 1's TTFT, turns 2-N's median and ratio, their cached share, peak RSS."""
    later = turns[1:]
    median_later = statistics.median(t["ttft_s"] for t in later)
    return {"turn1_ttft_s": turns[0]["ttft_s"], "later_median_ttft_s": median_later,
            "ratio": median_later / turns[0]["ttft_s"],
            "cached_share_min": min(t["cached"] / t["prompt_tokens"] for t in later),
            "cached_share": sum(t["cached"] for t in later) / sum(t["prompt_tokens"] for t in later),
            "peak_rss_mb": rss_mb, "turns": turns}


def ensure_hybrid_bench_model() -> Path:
    """The random-weight qwen35 model of Qwen3.5-0.8B's shape, Q4_K_M, on the real tokenizer and template (once)."""
    from edge_server.devtools import assets
    from edge_server.devtools.bench import ensure_quantized
    from edge_server.devtools.synthetic import write_qwen35_model

    def write(f16: Path) -> Path:
        vocab, added = assets.qwen_vocab("qwen3.5")
        return write_qwen35_model(f16, vocab, assets.qwen_template("qwen3.5"), added_tokens=added,
                                  **QWEN35_08B_SHAPE)

    return ensure_quantized(HYBRID_BENCH_MODEL, write, "Qwen3.5-0.8B shape, hybrid")


def _measure(process: subprocess.Popen, url: str) -> dict:
    conversation(url, turns=1, max_tokens=2, seed=1)  # warm-up on another system prompt: nothing of it is reused
    return summary(conversation(url), memory_mb(process.pid, "VmHWM"))


def multiturn(*, threads: int, out: Path, peer: Path | None = None) -> dict:
    """The multi-turn table and speculation on the hybrid model (see the module's docstring)."""
    from edge_server.devtools.assets import fetch
    from edge_server.devtools.bench import start_peer

    models = {"qwen35, Qwen3.5-0.8B shape (random weights)": (ensure_hybrid_bench_model(), [["--swa-full", "on"]]),
              "Gemma 3 270M (sliding window)": (fetch("model:gemma3-270m"), [["--swa-full", "on"],
                                                                             ["--swa-full", "off"]]),
              "SmolLM2-135M (attention)": (fetch("model:smollm2"), [["--swa-full", "on"]])}
    results: dict = {"rows": []}
    for name, (model, variants) in models.items():
        for flags in variants:
            port = free_port()
            process = start_server(model, port=port, log_path=out / f"server-multiturn-{port}.log",
                                   flags=["--threads", str(threads), "--parallel", "1", "--flash-attn", "off",
                                          "--n-ctx", "4096", *flags])  # llama-server's context here
            try:
                row = _measure(process, f"http://127.0.0.1:{port}")
            finally:
                stop([process])
            results["rows"].append({"model": name, "server": "edge-server " + " ".join(flags), **row})
        if peer is not None:
            port = free_port()
            process = start_peer(peer, model, port=port, threads=threads, parallel=1, n_ctx=4096,
                                 log_path=out / f"peer-multiturn-{port}.log")
            try:
                row = _measure(process, f"http://127.0.0.1:{port}")
            finally:
                stop([process])
            results["rows"].append({"model": name, "server": "llama-server", **row})
    results["speculation"] = hybrid_speculation(ensure_hybrid_bench_model(), threads=threads, out=out)
    return results


def hybrid_speculation(model: Path, *, threads: int, out: Path, runs: int = 3, max_tokens: int = 128) -> dict:
    """Decode rates on the hybrid model: plain, prompt lookup, and the model drafting for itself."""
    modes = {"plain": [], "ngram-simple": ["--spec-type", "ngram-simple"],
             "draft (itself, p_min 0)": ["--spec-draft-model", str(model), "--spec-draft-p-min", "0"]}
    prompt = [{"role": "user", "content": "Repeat this list twice: " + " ".join(WORDS)}]
    body = {"model": "bench", "messages": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "chat_template_kwargs": {"enable_thinking": False}, "logprobs": True, "top_logprobs": 2}
    servers = {}
    try:
        for mode, flags in modes.items():
            port = free_port()
            servers[mode] = (start_server(model, port=port, log_path=out / f"server-hybrid-spec-{port}.log",
                                          flags=["--threads", str(threads), "--parallel", "1", "--n-ctx", "4096",
                                                 *flags]),
                             f"http://127.0.0.1:{port}")
        rates: dict[str, list[float]] = {mode: [] for mode in modes}
        answers: dict[str, str] = {}
        for _ in range(runs):  # alternating: the machine's drift falls on every mode alike
            for mode, (_, url) in servers.items():
                started = time.perf_counter()
                reply = requests.post(url + "/v1/chat/completions", json=body, timeout=600).json()
                elapsed = time.perf_counter() - started
                rates[mode].append(reply["usage"]["completion_tokens"] / elapsed)
                answers[mode] = reply["choices"][0]["logprobs"]["content"]
        drafts = {}
        for mode, (_, url) in servers.items():
            metrics = requests.get(url + "/metrics", timeout=5).text
            values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                      if line.startswith(("edge_draft_tokens_total ", "edge_draft_accepted_total "))}
            drafts[mode] = values
    finally:
        stop([process for process, _ in servers.values()])
    plain = statistics.median(rates["plain"])
    return {mode: {"end_to_end_tok_s": statistics.median(r), "over_plain": statistics.median(r) / plain,
                   "first_difference": first_difference(answers["plain"], answers[mode]),
                   "drafted": drafts[mode].get("edge_draft_tokens_total", 0.0),
                   "accepted": drafts[mode].get("edge_draft_accepted_total", 0.0)} for mode, r in rates.items()}


def first_difference(plain: list[dict], other: list[dict]) -> str:
    """Where `other`'s greedy tokens first leave plain decoding's, with plain's top-two log-probability gap there
    (batch-shape noise moves a random quantized model's logits by up to ~2.5 between a 1-token and a 6-token
    batch, measured on both bench models)."""
    for index, (a, b) in enumerate(zip(plain, other)):
        if a["token"] != b["token"]:
            top = a["top_logprobs"]
            return f"token {index} (gap {top[0]['logprob'] - top[1]['logprob']:.2f})"
    return "none"


def markdown(results: dict) -> str:
    """The multi-turn table and the hybrid speculation table."""
    lines = ["6-turn chat, ~1,500-token system prompt, one slot, greedy, 16 tokens per answer; TTFT to the first "
             "reasoning or content token, end to end through HTTP.", "",
             "| model | server | turn 1 TTFT | turns 2-6 median TTFT | ratio | cached, turns 2-6 (min) | peak RSS |",
             "|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        lines.append(f"| {row['model']} | {row['server']} | {row['turn1_ttft_s'] * 1000:.0f} ms | "
                     f"{row['later_median_ttft_s'] * 1000:.0f} ms | {row['ratio']:.2f} | "
                     f"{row['cached_share']:.1%} ({row['cached_share_min']:.1%}) | {row['peak_rss_mb']:.0f} MB |")
    lines += ["", "Speculation on the hybrid model (random weights; end-to-end tok/s, medians of alternating runs):",
              "", "| mode | tok/s | x plain | drafted / accepted | first token unlike plain decoding |",
              "|---|---|---|---|---|"]
    for mode, row in results["speculation"].items():
        lines.append(f"| {mode} | {row['end_to_end_tok_s']:.1f} | {row['over_plain']:.2f} | "
                     f"{row['drafted']:.0f} / {row['accepted']:.0f} | {row['first_difference']} |")
    return "\n".join(lines)
