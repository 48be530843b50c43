"""`make soak`: many mixed clients against the real server for a while; fails on any broken promise."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import requests

from edge_server.devtools.harness import ROOT, free_port, memory_mb, start_server

PROMPTS = [f"Tell me about the harbour number {i}" for i in range(8)]
SAMPLE_TOKENS = 32
TOOL = {"type": "function", "function": {"name": "set_mode", "parameters": {
    "type": "object", "properties": {"mode": {"enum": ["eco", "fast"]}, "on": {"type": "boolean"}},
    "required": ["mode", "on"], "additionalProperties": False}}}  # closed: extra keys would be allowed, as written
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["s", "m", "l"]}},
          "required": ["ok", "size"], "additionalProperties": False}


@dataclass
class Report:
    """What the clients saw."""

    requests: int = 0
    tokens: int = 0
    statuses: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, message: str) -> None:
        with self.lock:
            if len(self.failures) < 50:
                self.failures.append(message)


class Soak:
    """Mixed traffic against one server; each method is one kind of client request."""

    def __init__(self, base_url: str, report: Report, seed: int):
        self.url = base_url + "/v1/chat/completions"
        self.report = report
        self.random = random.Random(seed)
        self.references: dict[str, str] = {}

    def reference(self, prompt: str) -> str:
        """The greedy answer to `prompt` alone (asked before the load starts)."""
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": SAMPLE_TOKENS, "temperature": 0}
        return requests.post(self.url, json=body, timeout=60).json()["choices"][0]["message"]["content"]

    def _count(self, kind: str, status: int, tokens: int = 0) -> None:
        with self.report.lock:
            self.report.requests += 1
            self.report.tokens += tokens
            self.report.statuses[status] += 1
            self.report.kinds[kind] += 1
        if status >= 500:
            self.report.fail(f"{kind}: HTTP {status}")

    def stream(self, body: dict, *, kind: str, leave_after: int | None = None) -> tuple[str, list[dict]] | None:
        """Stream `body`; check the stream's shape unless we leave early. Returns (text, chunks)."""
        started = time.perf_counter()
        with requests.post(self.url, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                           stream=True, timeout=120) as response:
            if response.status_code != 200:
                self._count(kind, response.status_code)
                return None
            chunks, done, text = [], False, ""
            for line in response.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    self.report.fail(f"{kind}: error event {chunk['error']}")
                    break
                chunks.append(chunk)
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        if not text:
                            with self.report.lock:
                                self.report.ttfts.append(time.perf_counter() - started)
                        text += choice["delta"]["content"]
                if leave_after is not None and len(chunks) >= leave_after:
                    self._count(kind, 200)
                    return None
        usage = next((c["usage"] for c in chunks if c.get("usage")), {})
        self._count(kind, 200, usage.get("completion_tokens", 0))
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        if not done or len(finishes) != 1:
            self.report.fail(f"{kind}: [DONE]={done}, finish reasons {finishes}")
        return text, chunks

    def one_request(self) -> None:
        """Pick a kind of client at random and act it out."""
        prompt = self.random.choice(PROMPTS)
        messages = [{"role": "user", "content": prompt}]
        kind = self.random.choice(["sample", "sample", "stream", "whole", "stop", "tool", "json", "leave", "timeout"])
        if kind == "sample":  # the crosstalk check: greedy text must equal the text asked alone
            result = self.stream({"messages": messages, "max_tokens": SAMPLE_TOKENS, "temperature": 0}, kind=kind)
            if result and result[0] != self.references[prompt]:
                self.report.fail(f"crosstalk: {prompt!r} gave {result[0][:60]!r}, alone {self.references[prompt][:60]!r}")
        elif kind == "stream":
            self.stream({"messages": messages, "max_tokens": self.random.randint(4, 64), "temperature": 0.9,
                         "seed": self.random.randint(0, 9999)}, kind=kind)
        elif kind == "whole":
            response = requests.post(self.url, json={"messages": messages, "max_tokens": self.random.randint(4, 64)},
                                     timeout=120)
            body = response.json()
            self._count(kind, response.status_code, body.get("usage", {}).get("completion_tokens", 0))
        elif kind == "stop":
            reference = self.references[prompt]
            stop = reference[12:16]
            result = self.stream({"messages": messages, "max_tokens": SAMPLE_TOKENS, "temperature": 0, "stop": stop},
                                 kind=kind)
            if result and stop and result[0] != reference[: reference.find(stop)]:
                self.report.fail(f"stop {stop!r}: got {result[0]!r}")
        elif kind == "tool":
            result = self.stream({"messages": messages, "tools": [TOOL], "temperature": 0.8,
                                  "tool_choice": {"type": "function", "function": {"name": "set_mode"}},
                                  "max_tokens": 100}, kind=kind)
            if result:
                arguments = "".join(d["function"].get("arguments", "") for c in result[1] for ch in c["choices"]
                                    for d in ch["delta"].get("tool_calls", []))
                if set(json.loads(arguments)) != {"mode", "on"}:
                    self.report.fail(f"tool call arguments {arguments!r}")
        elif kind == "json":
            response = requests.post(self.url, timeout=120, json={
                "messages": messages, "max_tokens": 60, "temperature": 0.9,
                "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}})
            self._count(kind, response.status_code, response.json().get("usage", {}).get("completion_tokens", 0))
            content = response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else None
            if content is not None and set(json.loads(content)) != {"ok", "size"}:
                self.report.fail("json_schema output does not match")
        elif kind == "leave":
            self.stream({"messages": messages, "max_tokens": 2000, "temperature": 0}, kind=kind, leave_after=3)
        else:
            try:
                requests.post(self.url, json={"messages": messages, "max_tokens": 2000}, timeout=0.05)
                self._count(kind, 200)
            except requests.exceptions.Timeout:
                self._count(kind, 0)


def soak(base_url: str, pid: int, *, seconds: float, clients: int) -> dict:
    """Run the load; return the figures and the failures found."""
    report = Report()
    driver = Soak(base_url, report, seed=0)
    driver.references = {prompt: driver.reference(prompt) for prompt in PROMPTS}
    deadline = time.monotonic() + seconds
    warmed: dict[str, float] = {}

    def client(number: int) -> None:
        worker = Soak(base_url, report, seed=number + 1)
        worker.references = driver.references
        while time.monotonic() < deadline:
            try:
                worker.one_request()
            except Exception as error:  # a client-side surprise is a finding, not a crash of the soak
                report.fail(f"client {number}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(seconds * 0.25)
    warmed["rss_mb"] = memory_mb(pid)
    for thread in threads:
        thread.join()
    time.sleep(0.5)
    health = requests.get(base_url + "/health", timeout=10).json()
    final_rss = memory_mb(pid)
    ttfts = sorted(report.ttfts)
    figures = {
        "seconds": seconds, "clients": clients, "requests": report.requests, "tokens": report.tokens,
        "statuses": {str(k): v for k, v in sorted(report.statuses.items())}, "kinds": dict(report.kinds),
        "server_errors": sum(v for k, v in report.statuses.items() if k >= 500),
        "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
        "ttft_p99_s": ttfts[int(len(ttfts) * 0.99)] if ttfts else None,
        "rss_after_warmup_mb": warmed["rss_mb"], "rss_end_mb": final_rss,
        "rss_growth": final_rss / warmed["rss_mb"] - 1,
        "health_after": {"running": health.get("running"), "queued": health.get("queued")},
        "failures": report.failures,
    }
    if figures["rss_growth"] >= 0.05:
        report.failures.append(f"RSS grew {figures['rss_growth']:.1%} after warm-up")
    if health.get("running") or health.get("queued"):
        report.failures.append(f"server not idle afterwards: {health}")
    return figures


def main(argv: list[str] | None = None) -> int:
    """Start a server on the generated test model, soak it, print the figures; exit 1 on failures."""
    parser = argparse.ArgumentParser(prog="python -m edge_server.devtools.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=90)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "generated" / "tiny-test.gguf")
    args = parser.parse_args(argv)
    port = free_port()
    log_path = Path(tempfile.gettempdir()) / f"edge-soak-{port}.log"
    server = start_server(args.model, port=port, log_path=log_path, flags=["--log-level", "warning"])
    base_url = f"http://127.0.0.1:{port}"
    try:
        figures = soak(base_url, server.pid, seconds=args.seconds, clients=args.clients)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(json.dumps(figures, indent=2))
    print(f"server log: {log_path}")
    return 1 if figures["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
