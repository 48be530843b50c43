"""`make bench`: raw llama-cpp-python against the server on one model and prompt, with figures; with
`--peer llama-server`, also the same scenarios side by side with llama-server built from the same llama.cpp."""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import requests

from edge_server.devtools.harness import (ROOT, free_port, memory_mb, start_server, start_until_healthy,
                                          start_worker, stop)
from edge_server.settings import available_cores

BENCH_MODEL = ROOT / "models" / "generated" / "bench-qwen2.5-0.5b-shape-q4_k_m.gguf"
DRAFT_DIR = ROOT / "models" / "generated" / "bench-drafts"  # scripted draft models: never beside the results
END_OF_TURN = ("<|im_end|>", "<|endoftext|>")
# Single-stream decode runs on each side, alternated raw/server so that the machine's drift (several
# percent over minutes on shared hosts) hits both alike; the best run of each side is compared.
DECODE_RUNS = 4
TARGETS = {
    "decode_ratio_min": 0.97,
    "aggregate_4_over_1_min": 1.7,
    "warm_over_cold_ttft_max": 0.1,
    "rss_over_raw_max_mb": 80,
    "shared_prompt_ttft_ratio_max": 1.5,  # 4 clients with one fresh system prompt: median TTFT over one client's
}


# ---- the model -------------------------------------------------------------------------------

def ensure_bench_model(path: Path = BENCH_MODEL) -> Path:
    """The random-weight Qwen2.5-0.5B-shaped Q4_K_M model, generated and quantized once."""
    from edge_server.devtools.synthetic import QWEN25_05B_SHAPE, write_shaped_model

    return ensure_quantized(path, lambda f16: write_shaped_model(f16, **QWEN25_05B_SHAPE), "Qwen2.5-0.5B shape")


def ensure_quantized(path: Path, write_f16, shape: str) -> Path:
    """`path`, a Q4_K_M GGUF quantized from what `write_f16(f16_path)` writes (once; kept in models/generated)."""
    if path.is_file():
        return path
    import llama_cpp

    path.parent.mkdir(parents=True, exist_ok=True)
    f16 = path.with_suffix(".f16.tmp")
    print(f"generating {path.name} (random weights, {shape}) ...", flush=True)
    write_f16(f16)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = os.cpu_count() or 1
    partial = path.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(partial).encode(), params) != 0:
        raise SystemExit(f"quantizing {path.name} failed")
    f16.unlink()
    partial.rename(path)
    return path


def load_vocab(model: Path):
    """The model's tokenizer only (no weights)."""
    import llama_cpp

    return llama_cpp.Llama(str(model), vocab_only=True, verbose=False)


def end_of_turn_bias(vocab) -> dict[str, float]:
    """`logit_bias` that bans the end-of-turn tokens, so every stream runs to `max_tokens`."""
    ids = {tid for text in END_OF_TURN for tid in vocab.tokenize(text.encode(), add_bos=False, special=True)}
    return {str(tid): -100.0 for tid in sorted(ids)}


def shared_prompt(vocab, tokens: int = 680) -> str:
    """A system prompt of about `tokens` tokens on this model's tokenizer (~700 with the chat template)."""
    words = ("You are a careful assistant for an offline desktop. Answer precisely, cite the notes you "
             "were given, and keep answers short unless asked for detail. ").split() * 200
    count = 10
    while len(vocab.tokenize(" ".join(words[:count]).encode(), add_bos=False)) < tokens:
        count += 10
    return " ".join(words[:count])


def messages(system: str, user: str) -> list[dict]:
    """A two-turn chat."""
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# ---- raw llama-cpp-python (run in its own process, for its own peak RSS) ------------------------

def raw_worker(model: Path, *, threads: int, n_ctx: int, max_tokens: int, bias: dict[str, float], system: str) -> None:
    """llama-cpp-python's own `Llama`, no server, in its own process (for its own peak RSS): one line
    of JSON per `run` read from stdin (decode rate and TTFT on the bench prompt), then its peak RSS."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llama = llama_cpp.Llama(str(model), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    formatter = Jinja2ChatFormatter(template=llama.metadata["tokenizer.chat_template"], eos_token="<|im_end|>",
                                    bos_token="<|endoftext|>")
    prompt = formatter(messages=messages(system, "Summarise the notes.")).prompt
    tokens = llama.tokenize(prompt.encode(), add_bos=False, special=True)
    for command in sys.stdin:
        if command.strip() != "run":
            break
        started = time.perf_counter()
        stamps = [time.perf_counter() for _ in llama.create_completion(
            tokens, max_tokens=max_tokens, temperature=0.0, stream=True,
            logit_bias={int(k): v for k, v in bias.items()})]
        print(json.dumps({"prompt_tokens": len(tokens), "completion_tokens": len(stamps),
                          "ttft_s": stamps[0] - started,
                          "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
                          "peak_rss_mb": peak_rss_mb(os.getpid())}), flush=True)


def raw_batched_worker(model: Path, *, threads: int, n_ctx: int, parallel: int, context_tokens: int = 700,
                       steps: int = 6) -> None:
    """Raw llama-cpp-python, no server, no sampling: `parallel` sequences holding `context_tokens` each, then
    one `llama_decode` per step with a token of 1, 2, ... `parallel` of them (median of `steps`): the most
    batching can give on this machine and model. Prints {sequences: tok/s} as JSON."""
    import llama_cpp

    model_ptr = llama_cpp.llama_model_load_from_file(str(model).encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_seq_max = n_ctx * parallel, parallel
    params.n_batch = params.n_ubatch = 512
    params.n_threads = params.n_threads_batch = threads
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as the side-by-side servers
    ctx = llama_cpp.llama_init_from_model(model_ptr, params)
    from edge_server.engine.batching import add_to_batch

    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(runs: list[tuple[int, int, list[int]]], logits: bool) -> float:
        """One llama_decode of (sequence, first position, tokens) runs; its seconds."""
        batch.n_tokens = 0
        for seq, position, tokens in runs:
            add_to_batch(batch, tokens, position, seq, logits=logits)
        started = time.perf_counter()
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise SystemExit("raw llama_decode failed")
        return time.perf_counter() - started

    for seq in range(parallel):
        for start in range(0, context_tokens, 350):
            positions = range(start, min(start + 350, context_tokens))
            decode([(seq, start, [100 + (position * 7 + seq) % 5000 for position in positions])], False)
    memory, rates = llama_cpp.llama_get_memory(ctx), {}
    for n in sorted({1, 2, parallel}):
        times = []
        for _ in range(steps):
            for seq in range(parallel):
                llama_cpp.llama_memory_seq_rm(memory, seq, context_tokens, -1)
            times.append(decode([(seq, context_tokens, [200 + seq]) for seq in range(n)], True))
        rates[n] = n / statistics.median(times)
    print(json.dumps(rates), flush=True)


def raw_batched_decode(model: Path, *, threads: int, n_ctx: int, parallel: int) -> dict[int, float]:
    """`raw_batched_worker`'s figures, from a process of its own."""
    output = subprocess.run([sys.executable, "-m", "edge_server.devtools.bench", "--raw-batch-worker", str(model),
                             "--threads", str(threads), "--n-ctx", str(n_ctx), "--parallel", str(parallel)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, check=True).stdout
    return {int(n): rate for n, rate in json.loads(output.strip().splitlines()[-1]).items()}


class RawRunner:
    """Drives a `raw_worker` subprocess, one run at a time."""

    def __init__(self, model: Path, *, threads: int, n_ctx: int, max_tokens: int, bias: dict[str, float],
                 system: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edge_server.devtools.bench", "--raw-worker", str(model), "--threads", str(threads),
             "--n-ctx", str(n_ctx), "--max-tokens", str(max_tokens), "--bias", json.dumps(bias), "--system", system],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def run(self) -> dict:
        """One raw generation's figures."""
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit("the raw llama-cpp-python worker died")
        return json.loads(line)

    def close(self) -> None:
        """End the worker."""
        self.process.stdin.close()
        self.process.wait(timeout=30)


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of a process, in MB."""
    return memory_mb(pid, "VmHWM")


# ---- the server ------------------------------------------------------------------------------

class Stream:
    """One streamed chat request, timed per content delta."""

    def __init__(self, base_url: str, body: dict):
        self.base_url, self.body = base_url, body
        self.sent = self.first = self.last = self.done = 0.0
        self.deltas = 0
        self.text = ""
        self.usage: dict = {}
        self.finish: str | None = None

    def run(self) -> Stream:
        self.sent = time.perf_counter()
        body = {**self.body, "stream": True, "stream_options": {"include_usage": True}}
        with requests.post(self.base_url + "/v1/chat/completions", json=body, stream=True, timeout=600) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    self.usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        self.text += choice["delta"]["content"]
                        now = time.perf_counter()
                        self.first = self.first or now
                        self.last = now
                        self.deltas += 1
                    self.finish = choice.get("finish_reason") or self.finish
        self.done = time.perf_counter()  # [DONE] (or the stream's end): what a user waits for
        return self

    @property
    def ttft(self) -> float:
        return self.first - self.sent

    @property
    def decode_rate(self) -> float:
        return (self.usage["completion_tokens"] - 1) / (self.last - self.first)


def run_together(base_url: str, bodies: list[dict]) -> tuple[list[Stream], float]:
    """Start all streams at once; return them and the wall time until the last ended."""
    streams = [Stream(base_url, body) for body in bodies]
    threads = [threading.Thread(target=stream.run) for stream in streams]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return streams, time.perf_counter() - started


def shared_system_prompt(base_url: str, prompt: str, bias: dict[str, float], *, clients: int = 4, rounds: int = 2,
                         max_tokens: int = 8) -> dict:
    """`clients` arriving together with the same fresh system prompt (no slot holds it) and different
    questions: their median time to first token against one client alone on a fresh one (median of
    `rounds`). Peer-neutral: any OpenAI-compatible server at `base_url` can be measured."""

    def body(user: str, system: str) -> dict:
        return {"model": "bench", "messages": messages(system, user), "max_tokens": max_tokens,
                "temperature": 0.0, "logit_bias": bias}

    def fresh() -> str:
        return f"Session {uuid.uuid4().hex}. " + prompt

    alone, together = [], []
    for _ in range(rounds):
        alone.append(Stream(base_url, body("What do the notes say?", fresh())).run().ttft)
        system = fresh()
        streams, _ = run_together(base_url, [body(f"Question {i}: what does note {i * 7} say?", system)
                                             for i in range(clients)])
        together.append(statistics.median(s.ttft for s in streams))
    return {"clients": clients, "alone_ttft_s": statistics.median(alone),
            "together_median_ttft_s": statistics.median(together),
            "ratio": statistics.median(together) / statistics.median(alone),
            "rounds_alone_s": alone, "rounds_together_s": together}


def decode_throughput(streams: list[Stream]) -> float:
    """Tokens after the first of each stream, per second of time during which any stream decoded."""
    spans = sorted((s.first, s.last) for s in streams)
    covered, (start, end) = 0.0, spans[0]
    for first, last in spans[1:]:
        if first > end:
            covered += end - start
            start, end = first, last
        else:
            end = max(end, last)
    covered += end - start
    return sum(s.usage["completion_tokens"] - 1 for s in streams) / covered


# ---- a busy machine --------------------------------------------------------------------------

def cpu_hog() -> subprocess.Popen:
    """A process that keeps one core busy, as another program on the user's machine would."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def beside_a_busy_core(model: Path, *, threads: int, body: dict, raw_runner: RawRunner, out: Path) -> dict:
    """Single-stream decode with one core kept busy by another process: raw llama-cpp-python with
    `threads` threads, the server with its default (fewer threads while fewer run faster), and the
    server with --fixed-threads."""
    results: dict = {}
    hog = cpu_hog()
    try:
        results["raw_decode_tok_s"] = max(raw_runner.run()["decode_tok_s"] for _ in range(2))
        for label, flags in (("adaptive", []), ("fixed", ["--fixed-threads"])):
            port = free_port()
            server = start_server(model, port=port, log_path=out / f"server-busy-{label}.log",
                                  flags=["--threads", str(threads), "--parallel", "1", "--flash-attn", "off", *flags])
            base_url = f"http://127.0.0.1:{port}"
            try:
                runs = [Stream(base_url, body).run().decode_rate for _ in range(3)]  # the first also warms up
                results[f"server_{label}_decode_tok_s"] = max(runs[1:])
                results[f"server_{label}_threads_in_use"] = requests.get(base_url + "/health", timeout=5).json()[
                    "threads_in_use"]
            finally:
                server.terminate()
                server.wait(timeout=30)
    finally:
        hog.kill()
        hog.wait()
    return results


KV_CONFIGS = {"default (f16, apart)": [], "--kv-unified": ["--kv-unified"],
              "--kv-unified q8_0/q8_0": ["--kv-unified", "--cache-type-k", "q8_0", "--cache-type-v", "q8_0"]}


def kv_memory(model: Path, *, threads: int, parallel: int, body: dict, out: Path) -> dict:
    """The server's resident memory after one ~700-token request, per KV cache configuration (MB)."""
    results = {}
    for label, flags in KV_CONFIGS.items():
        port = free_port()
        server = start_server(model, port=port, log_path=out / "server-kv.log",
                              flags=["--threads", str(threads), "--parallel", str(parallel), *flags])
        try:
            Stream(f"http://127.0.0.1:{port}", body).run()
            results[label] = memory_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
    return results


# ---- split over RPC workers ---------------------------------------------------------------------

RPC_HEADING = "## Layers on loopback workers (RPC)"


SPLIT_CONFIGS = {"local": 0, "one_worker": 1, "two_workers": 2}  # name -> loopback workers holding the layers


def split_over_workers(model: Path, *, threads: int, max_tokens: int, prompt: str, bias: dict[str, float],
                       out: Path, runs: int = 3) -> dict:
    """Prefill and decode served locally vs with every layer on one `edge-server worker` on loopback (the
    compute stays on this machine, so the difference is the RPC protocol's own cost) vs split over two."""
    results = {}
    for label, count in SPLIT_CONFIGS.items():
        flags = ["--threads", str(threads), "--parallel", "1", "--flash-attn", "off"]
        ports = [free_port() for _ in range(count)]
        workers = [start_worker(port, log_path=out / f"worker-{port}.log", threads=threads) for port in ports]
        if ports:
            flags += ["--rpc", ",".join(f"127.0.0.1:{port}" for port in ports)]
        port = free_port()
        server = start_server(model, port=port, log_path=out / f"server-split-{label}.log", flags=flags)
        base_url = f"http://127.0.0.1:{port}"
        try:
            prefill, decode = [], []
            for run in range(runs + 1):  # the first warms up
                body = {"model": "bench", "messages": messages(f"Run {uuid.uuid4().hex}. " + prompt, "Go on."),
                        "max_tokens": max_tokens, "temperature": 0.0, "logit_bias": bias}
                stream = Stream(base_url, body).run()
                if run:
                    prefill.append(stream.usage["prompt_tokens"] / stream.ttft)
                    decode.append(stream.decode_rate)
            devices = requests.get(base_url + "/health", timeout=5).json()["devices"]
        finally:
            stop([server, *workers])
        results[label] = {"prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
                          "devices": devices}
    return results


def split_markdown(results: dict) -> str:
    """The split-over-workers figures as a table."""
    local = results["local"]
    lines = ["Prefill: a fresh ~700-token prompt, prompt tokens / time to first token (end to end). Decode: tokens "
             "after the first / their time (decode only). Medians of 3 runs. Every process on this machine's cores: "
             "two workers share them, so their split also measures contention, not the network.", "",
             "| | layers | prefill | decode | prefill / local | decode / local |", "|---|---|---|---|---|---|"]
    names = {"local": "served locally", "one_worker": "every layer on one loopback worker",
             "two_workers": "split over two loopback workers"}
    for label, name in names.items():
        row = results[label]
        layers = ", ".join(f"{d['device']} {d['layers']}" for d in row["devices"] if d["layers"])
        lines.append(f"| {name} | {layers} | {row['prefill_tok_s']:.1f} tok/s | {row['decode_tok_s']:.2f} tok/s | "
                     f"{row['prefill_tok_s'] / local['prefill_tok_s']:.3f} | "
                     f"{row['decode_tok_s'] / local['decode_tok_s']:.3f} |")
    return "\n".join(lines) + "\n"


# ---- speculative decoding ------------------------------------------------------------------------

SPEC_HEADING = "## Speculative decoding (prompt lookup)"
SPEC_CODE = """class Stack:
    \"\"\"A simple last-in, first-out stack.\"\"\"

    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from an empty stack")
        return self.items.pop()

    def peek(self):
        return self.items[-1]

    def __len__(self):
        return len(self.items)

    def is_empty(self):
        return not self.items

    def clear(self):
        self.items.clear()
"""
# SmolLM2-135M copies this block faithfully (greedy); longer blocks tried drift after ~150 tokens, and a
# copy that drifts measures the model's inventions, not speculation.
SPEC_COPY = [{"role": "user", "content": f"Write this Python code again, unchanged:\n\n```python\n{SPEC_CODE}```"}]
# Copy, then prose about it: what a coding assistant answers; drafts pay in the copy and cost in the explanation.
SPEC_MIXED = [{"role": "user", "content": "Rewrite this Python code unchanged, then explain in a few sentences what "
                                          f"it does:\n\n```python\n{SPEC_CODE}```"}]
SPEC_PROSE_SUBJECTS = ("a lighthouse keeper who finds a message in a bottle", "a baker who wakes before the town",
                       "a cartographer lost in her own city", "two ferry captains on one river",
                       "a clockmaker's last commission", "a child who trains a crow", "a night train through snow")
SPEC_MODES = ("plain", "ngram-simple", "ngram-mod")  # on both servers


def _spec_runs(base_url: str, messages_: list[dict], runs: int, max_tokens: int) -> list[Stream]:
    body = {"model": "bench", "messages": messages_, "max_tokens": max_tokens, "temperature": 0.0}
    return [Stream(base_url, body).run() for _ in range(runs)]


def _prose(run: int) -> list[dict]:
    """A story request of its own per run (same for every server): nothing in it is a repeat of earlier runs."""
    subject = SPEC_PROSE_SUBJECTS[run % len(SPEC_PROSE_SUBJECTS)]
    return [{"role": "user", "content": f"Write a short story about {subject}."}]


def _faithful(stream: Stream) -> bool:
    return stream.text.split("```python\n", 1)[-1].split("```", 1)[0] == SPEC_CODE


def _drafts(base_url: str) -> tuple[float, float]:
    text = requests.get(base_url + "/metrics", timeout=5).text
    values = [float(line.split()[1]) for name in ("edge_draft_tokens_total", "edge_draft_accepted_total")
              for line in text.splitlines() if line.startswith(name + " ")]
    return values[0], values[1]


def speculative_decoding(*, threads: int, out: Path, peer: Path | None = None, runs: int = 5,
                         max_tokens: int = 320) -> dict:
    """SmolLM2-135M-Instruct (a real model) writing a ~140-token Python class again, unchanged (the same request
    every run: the ngram-mod modes of both servers remember it), and writing a story (a new one every run):
    decode rates with and without speculation, one stream and four, and llama-server's modes. Every server
    runs at once (idle but for the one measured) and the runs alternate between them, so the machine's drift
    over minutes falls on all of them alike."""
    from edge_server.devtools.assets import fetch

    model = fetch("model:smollm2")
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        for mode in SPEC_MODES:
            port = free_port()
            process = start_server(model, port=port, log_path=out / f"server-spec-{mode}.log",
                                   flags=["--threads", str(threads), "--parallel", "4", "--flash-attn", "off",
                                          *([] if mode == "plain" else ["--spec-type", mode])])
            servers[f"ours:{mode}"] = (process, f"http://127.0.0.1:{port}")
        for mode in SPEC_MODES if peer is not None else ():
            port = free_port()
            process = start_peer(peer, model, port=port, threads=threads, parallel=1, n_ctx=4096,
                                 log_path=out / f"peer-spec-{mode}.log",
                                 extra=[] if mode == "plain" else ["--spec-type", mode])
            servers[f"peer:{mode}"] = (process, f"http://127.0.0.1:{port}")
        copies: dict[str, list[Stream]] = {name: [] for name in servers}
        mixed: dict[str, list[Stream]] = {name: [] for name in servers}
        proses: dict[str, list[Stream]] = {name: [] for name in servers if name.startswith("ours:")}
        fours: dict[str, list[float]] = {name: [] for name in proses}
        for name, (_, url) in servers.items():
            _spec_runs(url, SPEC_COPY, 1, 16)  # warm-up
        for run in range(runs):
            for name, (_, url) in servers.items():
                copies[name] += _spec_runs(url, SPEC_COPY, 1, max_tokens)
                mixed[name] += _spec_runs(url, SPEC_MIXED, 1, 200)
            for name in proses:
                url = servers[name][1]
                proses[name] += _spec_runs(url, _prose(run), 1, max_tokens)
                together, _ = run_together(url, [{"model": "bench", "messages": SPEC_COPY, "max_tokens": max_tokens,
                                                  "temperature": 0.0}] * 4)
                fours[name].append(decode_throughput(together))
        drafts = {name: _drafts(url) for name, (_, url) in servers.items() if name.startswith("ours:")
                  and not name.endswith(":plain")}
    finally:
        stop([process for process, _ in servers.values()])
    results: dict = {"model": model.name, "runs": runs, "ours": {}, "peer": {}}
    for name, copy in copies.items():
        side, label = name.split(":")
        row = {"copy_decode_tok_s": statistics.median(s.decode_rate for s in copy),
               "copy_end_to_end_tok_s": statistics.median(s.usage["completion_tokens"] / (s.done - s.sent)
                                                          for s in copy),
               "copy_tokens": copy[0].usage["completion_tokens"],
               "mixed_decode_tok_s": statistics.median(s.decode_rate for s in mixed[name]),
               "copy_faithful": all(_faithful(s) for s in copy)}
        if side == "ours":
            drafted, accepted = drafts.get(name, (0.0, 0.0))
            row.update(prose_decode_tok_s=statistics.median(s.decode_rate for s in proses[name]),
                       four_streams_decode_tok_s=statistics.median(fours[name]),
                       acceptance=accepted / drafted if drafted else None)
        results[side][label] = row
    return results


DRAFT_WRONG_TOKENS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.7)  # share of the answer's tokens the draft model gets wrong
def draft_model_table(*, threads: int, out: Path, runs: int = 3, max_tokens: int = 160) -> dict:
    """Speed-up against acceptance with a draft model on SmolLM2: draft models scripted on SmolLM2's own
    tokenizer write SmolLM2's greedy answer to the copy task, in the very tokens SmolLM2 writes it, with a
    share of those tokens wrong (told the right one, each goes on with the answer). Such drafts are tiny (what
    they cost is mostly a pass over the output layer per drafted token), so this is mostly the target's side:
    what verifying costs on this machine, and the acceptance rate at which drafting starts to pay. (The copy task, because SmolLM2's answer to it has wide margins: on prose,
    near-ties flip with the batch shape and the target leaves any script within a few tokens.)"""
    from edge_server.devtools import synthetic
    from edge_server.devtools.assets import fetch
    from edge_server.ggufmeta import read_gguf_metadata

    model = fetch("model:smollm2")
    template = read_gguf_metadata(model, arrays=False)["tokenizer.chat_template"]
    vocab = synthetic.read_vocab(model, "none")
    DRAFT_DIR.mkdir(parents=True, exist_ok=True)
    flags = ["--threads", str(threads), "--parallel", "1", "--flash-attn", "off"]
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        port = free_port()
        servers["plain"] = (start_server(model, port=port, log_path=out / "server-draft-plain.log", flags=flags),
                            f"http://127.0.0.1:{port}")
        body = {"model": "bench", "messages": SPEC_COPY, "max_tokens": max_tokens, "temperature": 0.0,
                "logprobs": True}
        answer = requests.post(servers["plain"][1] + "/v1/chat/completions", json=body, timeout=600).json()
        pieces = [bytes(t["bytes"]) for t in answer["choices"][0]["logprobs"]["content"]]
        ids = [synthetic.tokenize(vocab, piece.decode("utf-8"), special=False) for piece in pieces]
        if any(len(token) != 1 for token in ids):
            raise SystemExit("the draft table needs SmolLM2's answer in whole tokens")
        wrong_id, = synthetic.tokenize(vocab, " banana", special=False)
        text, split = b"".join(pieces).decode("utf-8"), [token[0] for token in ids]
        for share in DRAFT_WRONG_TOKENS:
            wrong = {round(i / share): wrong_id for i in range(int(len(ids) * share))} if share else {}
            draft = synthetic.write_scripted_vocab_model(DRAFT_DIR / f"draft-{share:.2f}.gguf", model, template, text,
                                                         added_tokens="none", split=split, order=8, replace=wrong)
            port = free_port()
            servers[f"{share:.2f}"] = (start_server(model, port=port, log_path=out / f"server-draft-{share:.2f}.log",
                                                    flags=[*flags, "--spec-draft-model", str(draft)]),
                                       f"http://127.0.0.1:{port}")
        rates: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(runs):
            for name, (_, url) in servers.items():
                rates[name] += [s.decode_rate for s in _spec_runs(url, SPEC_COPY, 1, max_tokens)]
        acceptance = {name: _drafts(url) for name, (_, url) in servers.items() if name != "plain"}
    finally:
        stop([process for process, _ in servers.values()])
    plain = statistics.median(rates["plain"])
    rows = []
    for share in DRAFT_WRONG_TOKENS:
        drafted, accepted = acceptance[f"{share:.2f}"]
        rows.append({"wrong_tokens": share, "acceptance": accepted / drafted if drafted else 0.0,
                     "drafted": drafted, "decode_tok_s": statistics.median(rates[f"{share:.2f}"]),
                     "speed_up": statistics.median(rates[f"{share:.2f}"]) / plain})
    rows.sort(key=lambda row: row["acceptance"])
    break_even = None
    for low, high in zip(rows, rows[1:]):
        if low["speed_up"] < 1 <= high["speed_up"] and high["acceptance"] > low["acceptance"]:
            break_even = low["acceptance"] + (1 - low["speed_up"]) * (high["acceptance"] - low["acceptance"]) \
                / (high["speed_up"] - low["speed_up"])
    return {"plain_decode_tok_s": plain, "rows": rows, "break_even_acceptance": break_even}


def draft_markdown(results: dict) -> str:
    """The draft-model table."""
    lines = ["Draft model: scripted on SmolLM2's tokenizer, writing SmolLM2's own greedy answer to the copy task "
             "in its own tokens, a share of them wrong (the drafts are tiny: what they cost is mostly a pass over the "
             "49k-token output layer per drafted token, the rest is verifying). Decode only, "
             f"medians of runs alternating with the plain server ({results['plain_decode_tok_s']:.1f} tok/s).", "",
             "| draft tokens replaced | acceptance | decode | speed-up |", "|---|---|---|---|"]
    for row in results["rows"]:
        lines.append(f"| {row['wrong_tokens']:.0%} | {row['acceptance']:.0%} | {row['decode_tok_s']:.1f} tok/s | "
                     f"{row['speed_up']:.2f}x |")
    if results["break_even_acceptance"] is not None:
        lines += ["", f"Break-even acceptance on this machine: {results['break_even_acceptance']:.0%}."]
    return "\n".join(lines) + "\n"


def speculation_markdown(results: dict) -> str:
    """The speculative decoding figures as tables."""
    ours, plain = results["ours"], results["ours"]["plain"]
    lines = [f"`{results['model']}` writing a {plain['copy_tokens']}-token Python class again, unchanged (greedy; "
             "the same request every run), and writing a story (a new subject every run). Decode only: tokens after "
             "the first / their time; end to end: all tokens / request to `[DONE]`. Medians of "
             f"{results['runs']} runs, alternating between the servers.", "",
             "| | copy: decode | copy: end to end | copy faithful | acceptance | prose: decode | "
             "4 copy streams: aggregate decode | copy then explain (200 tokens): decode |",
             "|---|---|---|---|---|---|---|---|"]

    def ratio(row: dict, key: str) -> str:
        return f" ({row[key] / plain[key]:.2f}x)" if row is not plain else ""

    for label, row in ours.items():
        acceptance = f"{row['acceptance']:.0%}" if row["acceptance"] is not None else "-"
        lines.append(f"| edge-server, {label} | {row['copy_decode_tok_s']:.1f} tok/s{ratio(row, 'copy_decode_tok_s')} | "
                     f"{row['copy_end_to_end_tok_s']:.1f} tok/s{ratio(row, 'copy_end_to_end_tok_s')} | "
                     f"{'yes' if row['copy_faithful'] else 'NO'} | {acceptance} | "
                     f"{row['prose_decode_tok_s']:.1f} tok/s{ratio(row, 'prose_decode_tok_s')} | "
                     f"{row['four_streams_decode_tok_s']:.1f} tok/s{ratio(row, 'four_streams_decode_tok_s')} | "
                     f"{row['mixed_decode_tok_s']:.1f} tok/s{ratio(row, 'mixed_decode_tok_s')} |")
    peer_plain = results["peer"].get("plain")
    for mode, row in results["peer"].items():
        versus = f" ({row['copy_decode_tok_s'] / peer_plain['copy_decode_tok_s']:.2f}x)" if row is not peer_plain else ""
        mixed_versus = f" ({row['mixed_decode_tok_s'] / peer_plain['mixed_decode_tok_s']:.2f}x)" \
            if row is not peer_plain else ""
        lines.append(f"| llama-server, {mode} | {row['copy_decode_tok_s']:.1f} tok/s{versus} | "
                     f"{row['copy_end_to_end_tok_s']:.1f} tok/s | {'yes' if row['copy_faithful'] else 'NO'} | | | | "
                     f"{row['mixed_decode_tok_s']:.1f} tok/s{mixed_versus} |")
    if "draft_model" in results:
        lines += ["", draft_markdown(results["draft_model"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


# ---- side by side with a peer (llama-server) ---------------------------------------------------

PEER_SCENARIOS = ("single", "cold4", "shared", "decode")


def decode_streams(parallel: int) -> list[int]:
    """Stream counts of the decode scenario."""
    return sorted({1, 2, parallel, 2 * parallel})
SIDE_BY_SIDE_HEADING = "## Side by side with llama-server"


def start_peer(binary: Path, model: Path, *, port: int, threads: int, parallel: int, n_ctx: int,
               log_path: Path, extra: list[str] = ()) -> subprocess.Popen:
    """llama-server with our server's settings (`parallel` slots of `n_ctx` each, flash attention off) and
    `extra` flags; returns once its /health is 200 (it answers 503 while loading)."""
    from edge_server.devtools.peer import command

    argv = command(model, port=port, threads=threads, parallel=parallel, n_ctx=n_ctx, extra=extra)
    argv[0] = str(binary)
    return start_until_healthy(argv, port=port, log_path=log_path, name="llama-server")


def side_scenarios(base_url: str, pid: int, prompt: str, bias: dict[str, float], *, parallel: int, max_tokens: int,
                   scenarios: tuple[str, ...]) -> dict:
    """The peer-neutral scenarios against one server (ours or llama-server), in one of its lifetimes."""

    def body(user: str, system: str, tokens: int = max_tokens) -> dict:
        return {"model": "bench", "messages": messages(system, user), "max_tokens": tokens, "temperature": 0.0,
                "logit_bias": bias}

    def fresh() -> str:
        return f"Session {uuid.uuid4().hex}. " + prompt

    def tokens(streams: list[Stream]) -> int:
        return sum(s.usage.get("completion_tokens", 0) for s in streams)

    result: dict = {}
    if "single" in scenarios:
        # One stream: the first with a cold prompt (its TTFT), then the same prompt cached (decode-only rate,
        # and end to end = completion tokens / request-to-[DONE]).
        system = fresh()
        runs = [Stream(base_url, body("Summarise the notes.", system)).run() for _ in range(3)]
        warm = runs[1:]
        result["single"] = {
            "cold_ttft_s": runs[0].ttft,
            "warm_ttft_s": statistics.median(s.ttft for s in warm),
            "decode_tok_s": max(s.decode_rate for s in warm),
            "end_to_end_tok_s": max(s.usage["completion_tokens"] / (s.done - s.sent) for s in warm),
            "cold_end_to_end_tok_s": runs[0].usage["completion_tokens"] / (runs[0].done - runs[0].sent),
        }
    if "cold4" in scenarios:
        # The same fresh prompt from `parallel` clients at once, two rounds (the first cold), against one client
        # sending a fresh prompt twice: aggregate end-to-end tok/s over both rounds, cold round included.
        def rounds(clients: int) -> dict:
            system, walls, ttfts, done = fresh(), [], [], 0
            for _ in range(2):
                streams, wall = run_together(base_url, [body("Summarise the notes.", system) for _ in range(clients)])
                walls.append(wall)
                ttfts.append(statistics.median(s.ttft for s in streams))
                done += tokens(streams)
            return {"end_to_end_tok_s": done / sum(walls), "round_walls_s": walls, "median_ttft_s": ttfts}

        one, many = rounds(1), rounds(parallel)
        result["cold4"] = {"clients": parallel, "one": one, "many": many,
                           "ratio": many["end_to_end_tok_s"] / one["end_to_end_tok_s"]}
    if "shared" in scenarios:
        result["shared"] = shared_system_prompt(base_url, prompt, bias, clients=parallel)
    if "decode" in scenarios:
        # Every slot holds the prompt first; then aggregate decode-only and end-to-end rates at 1, 2, `parallel`
        # and twice `parallel` streams (half of them wait for a slot: their TTFT counts the wait).
        system = fresh()
        run_together(base_url, [body(f"Warm-up {i}.", system, 4) for i in range(parallel)])
        rows = {}
        for n in decode_streams(parallel):
            streams, wall = run_together(base_url, [body(f"Question {i} of {n}.", system) for i in range(n)])
            ttfts = sorted(s.ttft for s in streams)
            rows[n] = {"decode_tok_s": decode_throughput(streams), "end_to_end_tok_s": tokens(streams) / wall,
                       "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": ttfts[math.ceil(0.99 * n) - 1]}
        result["decode"] = rows
        result["decode_ratio"] = rows[parallel]["decode_tok_s"] / rows[1]["decode_tok_s"]
    result["rss_mb"] = {"now": memory_mb(pid), "peak": peak_rss_mb(pid)}
    return result


def side_by_side(model: Path, peer: Path, *, threads: int, parallel: int, max_tokens: int, out: Path,
                 scenarios: tuple[str, ...] = PEER_SCENARIOS, repetitions: int = 2) -> dict:
    """Our server and llama-server on the same model, prompts and load, alternating (ours, peer, ours, peer, ...),
    each started fresh per repetition with `parallel` slots of 4096 tokens and flash attention off."""
    vocab = load_vocab(model)
    bias, prompt, n_ctx = end_of_turn_bias(vocab), shared_prompt(vocab), 4096
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {"ours": [], "llama-server": []}
    for rep in range(repetitions):
        for side in runs:
            print(f"side by side, repetition {rep + 1}/{repetitions}: {side} ...", flush=True)
            port = free_port()
            if side == "ours":
                server = start_server(model, port=port, log_path=out / "side-ours.log",
                                      flags=["--threads", str(threads), "--parallel", str(parallel), "--n-ctx",
                                             str(n_ctx), "--max-queue", "64", "--flash-attn", "off"])
            else:
                server = start_peer(peer, model, port=port, threads=threads, parallel=parallel, n_ctx=n_ctx,
                                    log_path=out / "side-llama-server.log")
            try:
                runs[side].append(side_scenarios(f"http://127.0.0.1:{port}", server.pid, prompt, bias,
                                                 parallel=parallel, max_tokens=max_tokens, scenarios=scenarios))
            finally:
                server.terminate()
                server.wait(timeout=30)
    raw = raw_batched_decode(model, threads=threads, n_ctx=n_ctx, parallel=parallel) if "decode" in scenarios else {}
    return {"model": str(model), "peer": str(peer), "threads": threads, "parallel": parallel, "n_ctx": n_ctx,
            "max_tokens": max_tokens, "repetitions": repetitions, "scenarios": list(scenarios), "runs": runs,
            "raw_batched": raw}


def side_by_side_markdown(results: dict) -> str:
    """The side-by-side figures: per side, the range over repetitions (min-max) or the single value."""
    runs = results["runs"]

    def span(side: str, *keys, fmt: str = "{:.2f}") -> str:
        values = []
        for run in runs[side]:
            value = run
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
                if value is None:
                    break
            if isinstance(value, (int, float)):
                values.append(float(value))
        if not values:
            return "-"
        low, high = min(values), max(values)
        if len(values) == 1 or fmt.format(low) == fmt.format(high):
            return fmt.format(low)
        return f"{fmt.format(low)}–{fmt.format(high)}"

    def row(label: str, *keys, fmt: str = "{:.2f}") -> str:
        return f"| {label} | {span('ours', *keys, fmt=fmt)} | {span('llama-server', *keys, fmt=fmt)} |"

    p = results["parallel"]
    lines = [
        f"Side by side with llama-server built from the same vendored llama.cpp (`{Path(results['peer']).name}`), "
        f"model `{Path(results['model']).name}`, {results['threads']} threads, {p} slots of {results['n_ctx']} tokens "
        f"(llama-server `-np {p} -c {p * results['n_ctx']}`), flash attention off, {results['max_tokens']} tokens per "
        f"stream unless said, servers alternating, {results['repetitions']} repetition(s) (min–max). "
        "*End to end* counts from request to `[DONE]`; *decode only* from each stream's first token to its last.",
        "",
        "| measure | ours | llama-server |",
        "|---|---|---|",
    ]
    scen = results["scenarios"]
    if "single" in scen:
        lines += [row("1 stream, cached prompt: decode only (tok/s)", "single", "decode_tok_s"),
                  row("1 stream, cached prompt: end to end (tok/s)", "single", "end_to_end_tok_s"),
                  row("1 stream, cold prompt: TTFT (s)", "single", "cold_ttft_s"),
                  row("1 stream, cold prompt: end to end (tok/s)", "single", "cold_end_to_end_tok_s")]
    if "cold4" in scen:
        lines += [row("same cold prompt, 1 client, 2 rounds: end to end (tok/s)", "cold4", "one", "end_to_end_tok_s"),
                  row(f"same cold prompt, {p} clients, 2 rounds: end to end aggregate (tok/s)", "cold4", "many",
                      "end_to_end_tok_s"),
                  row(f"same cold prompt: {p} clients / 1 client, end to end, cold round included", "cold4", "ratio")]
    if "shared" in scen:
        lines += [row("shared fresh system prompt: 1 client TTFT (s)", "shared", "alone_ttft_s"),
                  row(f"shared fresh system prompt: {p} clients median TTFT (s)", "shared", "together_median_ttft_s"),
                  row(f"shared fresh system prompt: {p} clients / 1 client TTFT", "shared", "ratio")]
    if "decode" in scen:
        for n in decode_streams(p):
            lines += [row(f"{n} stream(s), cached prompt: aggregate decode only (tok/s)", "decode", n, "decode_tok_s"),
                      row(f"{n} stream(s), cached prompt: aggregate end to end (tok/s)", "decode", n,
                          "end_to_end_tok_s"),
                      f"| {n} stream(s), cached prompt: TTFT p50 / p99 (s) | "
                      + " | ".join(f"{span(side, 'decode', n, 'ttft_p50_s')} / {span(side, 'decode', n, 'ttft_p99_s')}"
                                   for side in ("ours", "llama-server")) + " |"]
        lines.append(row(f"{p} streams / 1 stream, aggregate decode only", "decode_ratio"))
    lines += [row("resident memory at the end (MB)", "rss_mb", "now", fmt="{:.0f}"),
              row("peak resident memory (MB)", "rss_mb", "peak", fmt="{:.0f}")]
    if raw := results.get("raw_batched"):
        rates = " / ".join(f"{raw[n]:.1f}" for n in sorted(raw))
        lines += ["", f"Raw llama-cpp-python on the same model, no server and no sampling, one `llama_decode` per step "
                      f"with a token of {' / '.join(str(n) for n in sorted(raw))} sequence(s) holding 700 tokens each: "
                      f"{rates} tok/s ({max(raw)} / 1: {raw[max(raw)] / raw[1]:.2f}x). That is what batching gives on "
                      "this machine and model at most; a server's streams share it."]
    return "\n".join(lines) + "\n"


# ---- the run ---------------------------------------------------------------------------------

def bench(model: Path, *, threads: int, parallel: int, max_tokens: int, out: Path) -> dict:
    """Measure everything in one run and return the results."""
    vocab = load_vocab(model)
    bias = end_of_turn_bias(vocab)
    prompt = shared_prompt(vocab)
    n_ctx = 4096
    print("raw llama-cpp-python ...", flush=True)
    raw_runner = RawRunner(model, threads=threads, n_ctx=n_ctx * parallel, max_tokens=max_tokens, bias=bias,
                           system=prompt)
    raw_runs = [raw_runner.run()]  # cold: its TTFT is the one reported
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    # The raw run's settings: flash attention off, as `Llama`'s default.
    server = start_server(model, port=port, log_path=out / "server.log",
                          flags=["--threads", str(threads), "--parallel", str(parallel), "--max-queue", "64",
                                 "--flash-attn", "off"])
    base_url = f"http://127.0.0.1:{port}"

    def body(user: str, system: str = prompt) -> dict:
        return {"model": "bench", "messages": messages(system, user), "max_tokens": max_tokens,
                "temperature": 0.0, "logit_bias": bias}

    try:
        print("server, one stream ...", flush=True)
        singles = []
        for _ in range(DECODE_RUNS):
            singles.append(Stream(base_url, body("Summarise the notes.")).run())
            if len(raw_runs) < DECODE_RUNS:
                raw_runs.append(raw_runner.run())
        single = singles[0]  # cold: its TTFT is the one reported
        print("server, concurrency ...", flush=True)
        run_together(base_url, [body(f"Warm-up {i}.") for i in range(parallel)])  # every slot caches the prompt
        concurrency, finish_reasons = {}, {}
        for n in (1, 2, 4, 8):
            streams, wall = run_together(base_url, [body(f"Question {i} of {n}.") for i in range(n)])
            concurrency[n] = {"decode_tok_s": decode_throughput(streams),
                              "end_to_end_tok_s": sum(s.usage["completion_tokens"] for s in streams) / wall,
                              "mean_ttft_s": sum(s.ttft for s in streams) / n}
            for s in streams:
                finish_reasons[s.finish] = finish_reasons.get(s.finish, 0) + 1
            if n == 4:
                rss_at_4 = peak_rss_mb(server.pid)
        print("server, shared system prompt ...", flush=True)
        shared = shared_system_prompt(base_url, prompt, bias, clients=parallel)
        print("server, prefix cache ...", flush=True)
        fresh = f"Session {uuid.uuid4().hex}. " + prompt  # a prefix no slot holds
        cold = Stream(base_url, body("First question.", fresh)).run()
        warm = Stream(base_url, body("Second question.", fresh)).run()
        server_rss = peak_rss_mb(server.pid)
        threads_in_use = requests.get(base_url + "/health", timeout=5).json()["threads_in_use"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    print("beside a busy core ...", flush=True)
    busy = beside_a_busy_core(model, threads=threads, body=body("Summarise the notes."), raw_runner=raw_runner,
                              out=out)
    raw_runner.close()
    print("KV cache memory ...", flush=True)
    kv_rss = kv_memory(model, threads=threads, parallel=parallel, body=body("Summarise the notes."), out=out)
    print("split over two loopback RPC workers ...", flush=True)
    split = split_over_workers(model, threads=threads, max_tokens=max_tokens, prompt=prompt, bias=bias, out=out)
    raw = {**raw_runs[0], "decode_tok_s": max(r["decode_tok_s"] for r in raw_runs),
           "decode_runs_tok_s": [r["decode_tok_s"] for r in raw_runs],
           "peak_rss_mb": max(r["peak_rss_mb"] for r in raw_runs)}
    results = {
        "model": str(model), "threads": threads, "parallel": parallel, "max_tokens": max_tokens,
        "prompt_tokens": raw["prompt_tokens"], "raw": raw,
        "server_single": {"ttft_s": single.ttft, "decode_tok_s": max(s.decode_rate for s in singles),
                          "decode_runs_tok_s": [s.decode_rate for s in singles],
                          "completion_tokens": single.usage["completion_tokens"]},
        "concurrency": concurrency,
        "prefix_cache": {"cold_ttft_s": cold.ttft, "warm_ttft_s": warm.ttft},
        "shared_system_prompt": shared,
        "rss_mb": {"raw_peak": raw["peak_rss_mb"], "server_peak_at_4_streams": rss_at_4, "server_peak": server_rss},
        "finish_reasons": finish_reasons,
        "threads_in_use_unloaded": threads_in_use,
        "beside_a_busy_core": busy,
        "kv_rss_mb": kv_rss,
        "split_over_workers": split,
        # What batching gives at most here: raw llama.cpp's own 4-sequence step against a 1-sequence one.
        "raw_batched_decode_tok_s": raw_batched_decode(model, threads=threads, n_ctx=n_ctx, parallel=parallel),
    }
    results["checks"] = {
        "decode_ratio": max(s.decode_rate for s in singles) / raw["decode_tok_s"],
        "aggregate_4_over_1": concurrency[4]["decode_tok_s"] / concurrency[1]["decode_tok_s"],
        "warm_over_cold_ttft": warm.ttft / cold.ttft,
        "shared_prompt_ttft_ratio": shared["ratio"],
        "rss_over_raw_mb": rss_at_4 - raw["peak_rss_mb"],
        "all_streams_ran_to_max_tokens": set(finish_reasons) == {"length"},
    }
    results["targets"] = TARGETS
    return results


def markdown(results: dict) -> str:
    """The results as a markdown table."""
    raw, single, checks = results["raw"], results["server_single"], results["checks"]
    batched, parallel = results["raw_batched_decode_tok_s"], results["parallel"]
    lines = [
        f"Model `{Path(results['model']).name}`, {results['prompt_tokens']}-token prompt, "
        f"{results['max_tokens']} tokens per stream, {results['threads']} threads, --parallel {results['parallel']}.",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| raw llama-cpp-python decode | {raw['decode_tok_s']:.2f} tok/s | |",
        f"| raw TTFT | {raw['ttft_s']:.2f} s | |",
        f"| server single-stream decode | {single['decode_tok_s']:.2f} tok/s | |",
        f"| server TTFT (cold prompt) | {single['ttft_s']:.2f} s | |",
        f"| server / raw decode | {checks['decode_ratio']:.3f} | >= {TARGETS['decode_ratio_min']} |",
    ]
    for n, row in results["concurrency"].items():
        lines.append(f"| {n} streams: aggregate decode | {row['decode_tok_s']:.2f} tok/s "
                     f"(end to end {row['end_to_end_tok_s']:.2f}) | |")
    lines += [
        f"| 4 streams / 1 stream | {checks['aggregate_4_over_1']:.2f} | >= {TARGETS['aggregate_4_over_1_min']} |",
        f"| raw llama-cpp-python, {parallel} sequences per `llama_decode` / 1 (what batching gives here at most) | "
        f"{batched[parallel] / batched[1]:.2f} ({batched[1]:.1f} / {batched[parallel]:.1f} tok/s) | |",
        f"| cold / warm prefix TTFT | {results['prefix_cache']['cold_ttft_s']:.2f} s / "
        f"{results['prefix_cache']['warm_ttft_s']:.3f} s | |",
        f"| warm / cold TTFT | {checks['warm_over_cold_ttft']:.3f} | <= {TARGETS['warm_over_cold_ttft_max']} |",
        f"| shared fresh system prompt, {results['shared_system_prompt']['clients']} clients: median TTFT / one "
        f"client's | {results['shared_system_prompt']['together_median_ttft_s']:.2f} s / "
        f"{results['shared_system_prompt']['alone_ttft_s']:.2f} s = {checks['shared_prompt_ttft_ratio']:.2f} | "
        f"<= {TARGETS['shared_prompt_ttft_ratio_max']} |",
        f"| peak RSS raw / server at 4 streams | {results['rss_mb']['raw_peak']:.0f} MB / "
        f"{results['rss_mb']['server_peak_at_4_streams']:.0f} MB | |",
        f"| server RSS over raw | {checks['rss_over_raw_mb']:.0f} MB | <= {TARGETS['rss_over_raw_max_mb']} MB |",
        f"| finish reasons | {results['finish_reasons']} | all `length` |",
        f"| threads in use after the run (unloaded machine) | {results['threads_in_use_unloaded']} | |",
    ]
    lines += ["", f"Server RSS after one request, `--parallel {results['parallel']}`, by KV cache configuration:", "",
              "| KV cache | RSS |", "|---|---|"]
    lines += [f"| {label} | {mb:.0f} MB |" for label, mb in results["kv_rss_mb"].items()]
    busy = results["beside_a_busy_core"]
    lines += [
        "",
        "Single-stream decode with one core kept busy by another process (`while True: pass`):",
        "",
        "| side | decode | threads in use |",
        "|---|---|---|",
        f"| raw llama-cpp-python, {results['threads']} threads | {busy['raw_decode_tok_s']:.2f} tok/s | "
        f"{results['threads']} |",
        f"| server, default (adaptive) | {busy['server_adaptive_decode_tok_s']:.2f} tok/s | "
        f"{busy['server_adaptive_threads_in_use']} |",
        f"| server, --fixed-threads | {busy['server_fixed_decode_tok_s']:.2f} tok/s | "
        f"{busy['server_fixed_threads_in_use']} |",
    ]
    if "split_over_workers" in results:
        lines += ["", RPC_HEADING, "", split_markdown(results["split_over_workers"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Aggregate throughput against concurrency, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [int(n) for n in results["concurrency"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ns, [results["concurrency"][n]["decode_tok_s"] for n in results["concurrency"]], "o-",
            label="aggregate decode")
    ax.plot(ns, [results["concurrency"][n]["end_to_end_tok_s"] for n in results["concurrency"]], "s--",
            label="end to end (with prefill)")
    ax.axhline(results["raw"]["decode_tok_s"], color="grey", linestyle=":", label="raw llama-cpp-python, 1 stream")
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("tokens / s")
    ax.set_xticks(ns)
    ax.set_title(f"edge-server throughput ({results['threads']} threads, --parallel {results['parallel']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _replace_section(text: str, heading: str, body: str) -> str:
    """`text` (markdown) with the section under `heading` replaced by `body` (appended when absent)."""
    before, _, after = text.partition(heading)
    rest = after[after.find("\n## "):] if "\n## " in after else ""
    return before.rstrip("\n") + "\n\n" + heading + "\n\n" + body.rstrip("\n") + "\n" + rest


def _write_section(out: Path, text: str, name: str, results: dict, heading: str, markdown) -> None:
    """Keep one mode's `results` in `out`/results-`name`.json and its `markdown` under `heading` in results.md."""
    (out / f"results-{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(_replace_section(text, heading, markdown(results)).lstrip("\n"))
    print(markdown(results))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with --raw-worker, only the raw llama-cpp-python measurement)."""
    parser = argparse.ArgumentParser(prog="python -m edge_server.devtools.bench", description=__doc__)
    parser.add_argument("--model", type=Path, help="GGUF to measure (default: the generated 0.5B-shape model)")
    parser.add_argument("--threads", type=int, default=available_cores())
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument("--shared-prompt-at", metavar="URL",
                        help="only the shared-system-prompt scenario, against a server already running at URL "
                             "(ours or a peer such as llama-server, on the same model); prints JSON")
    parser.add_argument("--peer", metavar="BINARY|llama-server",
                        help="also run the scenarios side by side with llama-server: a binary's path, or "
                             "`llama-server` for the one built (once) from the pinned sdist by devtools/peer.py")
    parser.add_argument("--peer-only", action="store_true",
                        help="with --peer: only the side-by-side run (updates its section of results.md)")
    parser.add_argument("--scenarios", default=",".join(PEER_SCENARIOS),
                        help=f"side-by-side scenarios, comma-separated, from {','.join(PEER_SCENARIOS)} "
                             "(resident memory is always reported)")
    parser.add_argument("--spec-only", action="store_true",
                        help="only the speculative decoding measurement (with --peer: llama-server's n-gram modes too)")
    parser.add_argument("--multiturn-only", action="store_true",
                        help="only the multi-turn chats (context checkpoints) and speculation on the hybrid model")
    parser.add_argument("--vision-only", action="store_true",
                        help="only image encode times and their effect on another stream (bench_vision.py)")
    parser.add_argument("--structured-only", action="store_true",
                        help="only structured output: constrained vs plain decode (with --peer: llama-server's grammar "
                             "path too), per-step mask and compile times (devtools/bench_structured.py)")
    parser.add_argument("--maskbench", type=Path, metavar="DIR",
                        help="with --structured-only: MaskBench's maskbench/data, for compile and mask times over the "
                             "test tier's sample (else a fixed set of schemas)")
    parser.add_argument("--rpc-only", action="store_true",
                        help="only the split-over-two-loopback-workers measurement (updates its section of results.md)")
    parser.add_argument("--repetitions", type=int, default=2, help="side-by-side repetitions (servers alternate)")
    parser.add_argument("--raw-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--raw-batch-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n-ctx", type=int, default=4096, help=argparse.SUPPRESS)
    parser.add_argument("--bias", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--system", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.raw_batch_worker:
        raw_batched_worker(args.raw_batch_worker, threads=args.threads, n_ctx=args.n_ctx, parallel=args.parallel)
        return 0
    if args.raw_worker:
        raw_worker(args.raw_worker, threads=args.threads, n_ctx=args.n_ctx, max_tokens=args.max_tokens,
                   bias=json.loads(args.bias), system=args.system)
        return 0
    model = args.model or ensure_bench_model()
    if args.shared_prompt_at:
        vocab = load_vocab(model)
        shared = shared_system_prompt(args.shared_prompt_at.rstrip("/"), shared_prompt(vocab), end_of_turn_bias(vocab),
                                      clients=args.parallel)
        print(json.dumps(shared, indent=2))
        return 0
    if args.peer_only and not args.peer:
        parser.error("--peer-only needs --peer")
    scenarios = tuple(name for name in args.scenarios.split(",") if name)
    if unknown := set(scenarios) - set(PEER_SCENARIOS):
        parser.error(f"unknown scenarios: {sorted(unknown)}")
    peer = None
    if args.peer:
        from edge_server.devtools import peer as peer_build

        peer = peer_build.build() if args.peer == "llama-server" else Path(args.peer)
    args.out.mkdir(parents=True, exist_ok=True)
    text = (args.out / "results.md").read_text() if (args.out / "results.md").is_file() else ""
    if args.spec_only:
        spec = speculative_decoding(threads=args.threads, out=args.out, peer=peer)
        spec["draft_model"] = draft_model_table(threads=args.threads, out=args.out)
        (args.out / "results-spec.json").write_text(json.dumps(spec, indent=2) + "\n")
        text = _replace_section(text, SPEC_HEADING, speculation_markdown(spec))
        (args.out / "results.md").write_text(text.lstrip("\n"))
        print(speculation_markdown(spec))
        return 0
    if args.multiturn_only:
        from edge_server.devtools import bench_multiturn

        turns = bench_multiturn.multiturn(threads=args.threads, out=args.out, peer=peer)
        _write_section(args.out, text, "multiturn", turns, bench_multiturn.MULTITURN_HEADING, bench_multiturn.markdown)
        return 0
    if args.vision_only:
        from edge_server.devtools import bench_vision

        seen = bench_vision.vision(threads=args.threads, out=args.out, peer=peer)
        _write_section(args.out, text, "vision", seen, bench_vision.VISION_HEADING, bench_vision.markdown)
        return 0
    if args.structured_only:
        from edge_server.devtools import bench_structured

        text = bench_structured.main_structured(threads=args.threads, out=args.out, peer=peer,
                                                maskbench=args.maskbench, text=text)
        (args.out / "results.md").write_text(text.lstrip("\n"))
        return 0
    if args.rpc_only:
        vocab = load_vocab(model)
        split = split_over_workers(model, threads=args.threads, max_tokens=args.max_tokens, prompt=shared_prompt(vocab),
                                   bias=end_of_turn_bias(vocab), out=args.out)
        (args.out / "results-rpc.json").write_text(json.dumps(split, indent=2) + "\n")
        text = _replace_section(text, RPC_HEADING, split_markdown(split))
        (args.out / "results.md").write_text(text.lstrip("\n"))
        print(split_markdown(split))
        return 0
    if not args.peer_only:
        results = bench(model, threads=args.threads, parallel=args.parallel, max_tokens=args.max_tokens, out=args.out)
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        text = markdown(results)
        plot(results, args.out / "throughput.png")
    if peer:
        side = side_by_side(model, peer, threads=args.threads, parallel=args.parallel, max_tokens=args.max_tokens,
                            out=args.out, scenarios=scenarios, repetitions=args.repetitions)
        (args.out / "results-peer.json").write_text(json.dumps(side, indent=2) + "\n")
        text = text.split(SIDE_BY_SIDE_HEADING)[0].rstrip("\n") + "\n\n" + SIDE_BY_SIDE_HEADING + "\n\n" \
            + side_by_side_markdown(side)
    (args.out / "results.md").write_text(text.lstrip("\n"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
