"""Operating the server: model listing and pulling, API keys, CORS, bind warnings, logs, metrics."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import requests

from tests.conftest import ROOT
from tests.e2e.conftest import chat


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_server", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_models_lists_local_ggufs_from_their_metadata(tmp_path, tiny_model):
    (tmp_path / "renamed-q8_0.gguf").write_bytes(tiny_model.read_bytes())  # the name lies; metadata does not
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf")
    result = cli("models", "--models-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("renamed-q8_0.gguf"))
    assert row.split()[3:] == ["qwen2", "F16", "4096", "yes"]
    assert "not a readable GGUF" in next(line for line in result.stdout.splitlines() if line.startswith("broken"))


def test_pull_offline_fails_fast_with_one_line_and_status_2(tmp_path):
    result = cli("pull", "--models-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "offline" in result.stderr
    assert "Traceback" not in result.stderr


def test_api_key_file_protects_v1_routes(start_server, tiny_model, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    server = start_server("--model", str(tiny_model), "--api-key-file", str(key_file))
    assert requests.get(server.base_url + "/v1/models", timeout=5).status_code == 401
    ok = requests.get(server.base_url + "/v1/models", headers={"Authorization": "Bearer from-a-file"}, timeout=5)
    assert ok.status_code == 200


def test_unreadable_api_key_file_exits_2(tiny_model, tmp_path):
    result = cli("--model", str(tiny_model), "--api-key-file", str(tmp_path / "missing"))
    assert result.returncode == 2 and "api-key-file" in result.stderr


def test_cors_is_off_by_default(base_url):
    response = requests.get(base_url + "/v1/models", headers={"Origin": "http://evil.example"}, timeout=5)
    assert "Access-Control-Allow-Origin" not in response.headers


def test_cors_allowlist_answers_preflight_for_allowed_origins_only(start_server, tiny_model):
    server = start_server("--model", str(tiny_model), "--cors-origin", "http://app.example", "--api-key", "k")
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    allowed = requests.options(server.base_url + "/v1/chat/completions", headers=preflight, timeout=5)
    assert allowed.status_code == 204
    assert allowed.headers["Access-Control-Allow-Origin"] == "http://app.example"
    assert "Authorization" in allowed.headers["Access-Control-Allow-Headers"]
    denied = requests.options(server.base_url + "/v1/chat/completions",
                              headers={**preflight, "Origin": "http://evil.example"}, timeout=5)
    assert "Access-Control-Allow-Origin" not in denied.headers
    answer = requests.post(server.base_url + "/v1/chat/completions", timeout=30,
                           headers={"Origin": "http://app.example", "Authorization": "Bearer k"},
                           json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert answer.status_code == 200 and answer.headers["Access-Control-Allow-Origin"] == "http://app.example"


def test_public_bind_without_key_is_warned_about(start_server, tiny_model):
    server = start_server("--model", str(tiny_model), "--host", "0.0.0.0")
    assert "without an API key" in server.log()


def test_every_request_has_an_id_and_an_access_log_line(server, base_url):
    response = chat(base_url, max_tokens=3, temperature=0)
    request_id = response.headers["X-Request-Id"]
    missing = requests.get(base_url + "/nope", timeout=5)
    lines = server.log()
    assert re.search(rf"{request_id} POST /v1/chat/completions 200 prompt=\d+ completion=3 ttft=\d+ms "
                     r"rate=[\d.]+tok/s finish=length", lines)
    assert f"{missing.headers['X-Request-Id']} GET /nope 404" in lines


def test_metrics_count_requests_tokens_and_latency(base_url):
    chat(base_url, max_tokens=4, temperature=0)
    text = requests.get(base_url + "/metrics", timeout=5).text
    assert re.search(r'edge_requests_total\{route="/v1/chat/completions",status="200"\} [1-9]', text)
    assert re.search(r"edge_completion_tokens_total [1-9]", text)
    assert re.search(r"edge_time_to_first_token_seconds_count [1-9]", text)
    assert re.search(r"edge_decode_tokens_per_second_bucket", text)
    assert "edge_queue_depth 0.0" in text and "edge_busy_slots 0.0" in text
