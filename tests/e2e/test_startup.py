"""Starting the server: offline demo fallback, configuration from flags and env, clear fatal errors."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import requests

from tests.conftest import ROOT
from tests.e2e.conftest import chat, free_port, write_unloadable_gguf


def run_to_exit(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "edge_server", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def test_offline_with_no_model_serves_the_demo_model_loudly(start_server, tmp_path):
    server = start_server("--models-dir", str(tmp_path / "empty-models"))
    log = server.log()
    reason_lines = [line for line in log.splitlines() if "could not download the default model" in line]
    assert len(reason_lines) == 1 and "offline" in reason_lines[0]
    assert "OFFLINE DEMO MODEL" in log
    models = requests.get(server.base_url + "/v1/models", timeout=10).json()["data"]
    assert models[0]["id"] == "edge-server-demo"
    assert models[0]["meta"]["demo"] is True and "OFFLINE DEMO MODEL" in models[0]["meta"]["warning"]
    from edge_server.devtools.synthetic import DEMO_SCRIPT

    answer = chat(server.base_url, temperature=0).json()["choices"][0]["message"]["content"]
    assert answer == b"".join(DEMO_SCRIPT).decode()


def test_environment_configures_and_flags_override_it(start_server, tiny_model):
    server = start_server("--model-alias", "from-flag",
                          env={"EDGE_MODEL": str(tiny_model), "EDGE_MODEL_ALIAS": "from-env", "EDGE_N_CTX": "256"})
    health = server.health()
    assert health["model"] == "from-flag"
    assert health["n_ctx"] == 256
    assert health["threads"] == 2


def test_api_key_is_required_on_v1_routes_but_not_on_health(start_server, tiny_model):
    server = start_server("--model", str(tiny_model), "--api-key", "s3cret")
    assert requests.get(server.base_url + "/health", timeout=5).status_code == 200
    denied = requests.get(server.base_url + "/v1/models", timeout=5)
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    wrong = requests.get(server.base_url + "/v1/models", headers={"Authorization": "Bearer nope"}, timeout=5)
    assert wrong.status_code == 401
    allowed = requests.get(server.base_url + "/v1/models", headers={"Authorization": "Bearer s3cret"}, timeout=5)
    assert allowed.status_code == 200


@pytest.mark.parametrize("content, words", [
    (None, "not found"),
    (b"this is not a model", "not a GGUF"),
    (b"GGUF\x03\x00\x00\x00" + b"\x00" * 20, "GGUF"),  # truncated
])
def test_unusable_model_file_exits_2_with_one_clear_line(tmp_path, content, words):
    path = tmp_path / "broken.gguf"
    if content is not None:
        path.write_bytes(content)
    result = run_to_exit("--model", str(path), "--port", str(free_port()))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and words in errors[0], result.stderr


def test_architecture_llama_cpp_cannot_load_exits_2_with_one_clear_line(tmp_path):
    path = write_unloadable_gguf(tmp_path / "alien.gguf")
    result = run_to_exit("--model", str(path), "--port", str(free_port()))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "alien.gguf" in errors[0] and "Traceback" not in result.stderr


def test_port_in_use_exits_2(tiny_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_to_exit("--model", str(tiny_model), "--port", str(taken.getsockname()[1]))
    assert result.returncode == 2
    assert "cannot listen" in result.stderr and "Traceback" not in result.stderr


def test_invalid_flag_value_exits_2(tiny_model):
    result = run_to_exit("--model", str(tiny_model), "--port", "99999")
    assert result.returncode == 2
    assert "--port" in result.stderr


def test_default_context_is_the_models_own_when_smaller_than_4096(start_server, tmp_path):
    from edge_server.devtools.synthetic import write_random_model

    model = write_random_model(tmp_path / "short-context.gguf", context_length=1024)
    assert start_server("--model", str(model)).health()["n_ctx"] == 1024


def _prompt_tokens(base_url: str, messages: list[dict]) -> int:
    body = {"messages": messages, "max_tokens": 1, "temperature": 0}
    response = requests.post(base_url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens"]


def test_chat_template_flag_takes_a_built_in_name(start_server, tiny_model):
    from edge_server.engine.chat_templates import apply_builtin_template
    from llama_cpp import Llama

    server = start_server("--model", str(tiny_model), "--chat-template", "gemma")
    card = requests.get(server.base_url + "/v1/models", timeout=10).json()["data"][0]
    assert card["meta"]["chat_template"] == "builtin:gemma"
    assert "chat_template=builtin:gemma" in server.log()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    expected = apply_builtin_template("gemma", messages)
    assert expected.startswith("<start_of_turn>user\nBe brief.")  # gemma folds the system text into the turn
    vocab = Llama(str(tiny_model), vocab_only=True, verbose=False)
    assert _prompt_tokens(server.base_url, messages) == len(vocab.tokenize(expected.encode(), add_bos=False,
                                                                               special=True))


def test_chat_template_flag_takes_a_jinja_file(start_server, tiny_model, tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:")
    server = start_server("--model", str(tiny_model), "--chat-template", str(template))
    card = requests.get(server.base_url + "/v1/models", timeout=10).json()["data"][0]
    assert card["meta"]["chat_template"] == "file:plain.jinja"
    from llama_cpp import Llama

    vocab = Llama(str(tiny_model), vocab_only=True, verbose=False)
    expected = vocab.tokenize(b"user: Hello there\nassistant:", add_bos=False, special=True)
    assert _prompt_tokens(server.base_url, [{"role": "user", "content": "Hello there"}]) == len(expected)


def test_unknown_chat_template_exits_2_naming_the_choices(tiny_model):
    result = run_to_exit("--model", str(tiny_model), "--chat-template", "no-such-template", "--port", str(free_port()))
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "--chat-template" in line and "no-such-template" in line and "gemma" in line
