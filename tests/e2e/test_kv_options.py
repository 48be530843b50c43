"""KV memory options through the real server: quantized caches, one unified pool and what happens when it is full."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.conftest import ROOT
from tests.e2e.conftest import chat


def run_server(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_server", "--port", "0", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={"HF_HUB_OFFLINE": "1", "PATH": ""})


def test_a_quantized_cache_serves_the_same_greedy_text_twice(start_server, slow_model):
    server = start_server("--model", str(slow_model), "--cache-type-k", "q8_0", "--cache-type-v", "q8_0")
    first = chat(server.base_url, "Tell me a story", max_tokens=16, temperature=0)
    assert first.status_code == 200, first.text
    again = chat(server.base_url, "Tell me a story", max_tokens=16, temperature=0)
    assert again.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    assert again.json()["usage"]["completion_tokens"] == 16


def test_quantized_values_without_flash_attention_are_refused_before_loading(slow_model):
    result = run_server("--model", str(slow_model), "--cache-type-v", "q4_0", "--flash-attn", "off")
    assert result.returncode == 2
    assert "needs flash attention" in result.stderr


def test_a_model_whose_heads_a_quantized_cache_cannot_hold_fails_to_load_with_the_reason(tiny_model):
    result = run_server("--model", str(tiny_model), "--cache-type-k", "q8_0")  # its heads are 16 wide
    assert result.returncode == 2
    assert "multiple of 32" in result.stderr + result.stdout


def test_a_full_unified_pool_shortens_or_refuses_the_newest_requests_and_keeps_serving(start_server, slow_model):
    # 256 cells for all four slots: each request fits alone, four together need about four times that.
    server = start_server("--model", str(slow_model), "--parallel", "4", "--kv-unified", "--n-ctx", "256")
    barrier = threading.Barrier(4)

    def one(i: int) -> requests.Response:
        barrier.wait()
        return chat(server.base_url, f"Story {i} " * 20, max_tokens=150, temperature=0,
                    logit_bias={"3256": -100, "3258": -100})  # no end of turn: each would run to 150

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(one, range(4)))
    shortened = refused = whole = 0
    for response in responses:
        if response.status_code == 200:
            body = response.json()
            if body["usage"]["completion_tokens"] == 150:
                whole += 1
            else:
                assert body["choices"][0]["finish_reason"] == "length"
                shortened += 1
        else:
            assert response.status_code == 503 and response.headers["Retry-After"], response.text
            assert response.json()["error"]["code"] == "kv_cache_full", response.text
            refused += 1
    assert whole >= 1 and shortened + refused >= 1, (whole, shortened, refused)
    server.wait_idle(timeout=10)
    after = chat(server.base_url, "Hello again", max_tokens=150, temperature=0)
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] >= 1
