"""Several models in one server: routing by `model`, loading on first use within --max-loaded, the least
recently used idle model unloaded, --idle-unload, failed loads visible; real engine, real processes."""

from __future__ import annotations

import concurrent.futures
import math
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import SCRIPT_TEXT
from tests.e2e.conftest import chat, write_unloadable_gguf


def ask(base_url: str, model: str | None, **fields) -> requests.Response:
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 30, "temperature": 0, **fields}
    if model is not None:
        body["model"] = model
    return requests.post(base_url + "/v1/chat/completions", json=body, timeout=60)


def states(base_url: str) -> dict[str, str]:
    return {m["id"]: m["state"] for m in requests.get(base_url + "/health", timeout=10).json()["models"]}


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def two_models(start_server, tiny_model, scripted_model):
    return start_server("--model", str(tiny_model), "--model", str(scripted_model),
                        "--model-alias", "tiny", "--model-alias", "scripted")


def test_each_request_picks_its_model_and_models_lists_both(two_models):
    base_url = two_models.base_url
    assert ask(base_url, "scripted").json()["choices"][0]["message"]["content"] == SCRIPT_TEXT
    tiny = ask(base_url, "tiny").json()
    assert tiny["model"] == "tiny" and tiny["choices"][0]["message"]["content"] != SCRIPT_TEXT
    assert ask(base_url, None).json()["choices"][0]["message"]["content"] == tiny["choices"][0]["message"]["content"]
    cards = requests.get(base_url + "/v1/models", timeout=10).json()["data"]
    assert [(c["id"], c["meta"]["role"], c["meta"]["loaded"]) for c in cards] == [("tiny", "chat", True),
                                                                              ("scripted", "chat", True)]
    assert requests.get(base_url + "/v1/models/scripted", timeout=10).json()["id"] == "scripted"
    assert states(base_url) == {"tiny": "ready", "scripted": "ready"}


def test_an_unknown_model_is_a_404_when_several_are_served(two_models):
    for response in (ask(two_models.base_url, "gpt-3.5-turbo"),
                     requests.get(two_models.base_url + "/v1/models/gpt-3.5-turbo", timeout=10)):
        assert response.status_code == 404
        error = response.json()["error"]
        assert error["code"] == "model_not_found" and "'tiny'" in error["message"] and "'scripted'" in error["message"]


def test_one_model_still_answers_to_any_name(server):
    response = chat(server.base_url, model="gpt-3.5-turbo", max_tokens=2)
    assert response.status_code == 200 and response.json()["model"] == "gpt-3.5-turbo"


def test_max_loaded_one_swaps_the_least_recently_used_idle_model(start_server, tiny_model, scripted_model):
    server = start_server("--model", str(tiny_model), "--model", str(scripted_model),
                          "--model-alias", "tiny", "--model-alias", "scripted", "--max-loaded", "1")
    base_url = server.base_url
    assert states(base_url) == {"tiny": "ready", "scripted": "unloaded"}
    assert ask(base_url, "scripted").json()["choices"][0]["message"]["content"] == SCRIPT_TEXT  # loaded on first use
    assert states(base_url) == {"tiny": "unloaded", "scripted": "ready"}
    time.sleep(2.5)  # a model chosen in the last 2 s may be about to submit: never evicted
    assert ask(base_url, "tiny").status_code == 200
    assert states(base_url) == {"tiny": "ready", "scripted": "unloaded"}
    metrics = requests.get(base_url + "/metrics", timeout=10).text
    assert 'edge_model_events_total{event="unloaded",model="tiny"} 1.0' in metrics
    assert 'edge_model_events_total{event="loaded",model="scripted"} 1.0' in metrics
    assert "edge_models_loaded 1.0" in metrics
    assert "model scripted loaded" in server.log() and "model tiny unloaded (evicted for scripted)" in server.log()


def test_idle_models_are_unloaded_and_come_back_on_use(start_server, slow_model):
    server = start_server("--model", str(slow_model), "--model-alias", "slow", "--idle-unload", "1")
    before = rss_kb(server.process.pid)
    wait_for(lambda: states(server.base_url) == {"slow": "unloaded"})
    after = rss_kb(server.process.pid)
    assert before - after > 20_000, (before, after)  # the weights and the KV cache went back to the system
    assert ask(server.base_url, "slow", max_tokens=3).status_code == 200  # loaded again, transparently
    assert states(server.base_url)["slow"] in ("ready", "unloaded")


def test_a_model_that_fails_to_load_is_a_503_and_shows_in_health(start_server, tiny_model, tmp_path):
    alien = write_unloadable_gguf(tmp_path / "alien.gguf")
    server = start_server("--model", str(tiny_model), "--model", str(alien), "--model-alias", "tiny",
                          "--model-alias", "alien")
    wait_for(lambda: states(server.base_url)["alien"] == "failed")
    response = ask(server.base_url, "alien")
    assert response.status_code == 503 and response.json()["error"]["code"] == "model_load_failed"
    health = requests.get(server.base_url + "/health", timeout=10).json()
    assert health["status"] == "ok" and "alien.gguf" in next(m for m in health["models"] if m["id"] == "alien")["error"]
    assert ask(server.base_url, "tiny").status_code == 200


def test_an_embedding_model_beside_a_chat_model(start_server, tiny_model, tmp_path):
    from edge_server.devtools.synthetic import write_embedding_model

    embedder = write_embedding_model(tmp_path / "embed.gguf")
    server = start_server("--model", str(tiny_model), "--model", str(embedder), "--model-alias", "chat",
                          "--model-alias", "embed")
    cards = {c["id"]: c["meta"]["role"] for c in requests.get(server.base_url + "/v1/models", timeout=10).json()["data"]}
    assert cards == {"chat": "chat", "embed": "embedding"}
    refused = ask(server.base_url, "embed")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "wrong_model_type"
    vectors = requests.post(server.base_url + "/v1/embeddings", json={"model": "embed", "input": ["a", "b"]},
                            timeout=30).json()
    assert vectors["model"] == "embed" and len(vectors["data"]) == 2
    assert ask(server.base_url, "chat").status_code == 200


def test_a_models_file_lists_models_with_settings_of_their_own(start_server, tiny_model, scripted_model, tmp_path):
    listing = tmp_path / "models.toml"
    listing.write_text(f'[[models]]\nid = "small"\nmodel = "{tiny_model}"\nn_ctx = 256\n\n'
                       f'[[models]]\nid = "script"\nmodel = "{scripted_model}"\nparallel = 1\n')
    server = start_server("--models-file", str(listing))
    cards = {c["id"]: c["meta"] for c in requests.get(server.base_url + "/v1/models", timeout=10).json()["data"]}
    assert list(cards) == ["small", "script"] and cards["small"]["n_ctx"] == 256
    assert ask(server.base_url, "script").json()["choices"][0]["message"]["content"] == SCRIPT_TEXT
    assert requests.get(server.base_url + "/health", timeout=10).json()["n_ctx"] == 256  # the default's own


@pytest.mark.parametrize("content,words", [
    ('[{"id": "x", "model": "MODEL", "n_ctx": 2}]', "n_ctx"),
    ('[{"id": "x", "model": "MODEL", "colour": "red"}]', "colour"),
    ('{"models": []}', "no models"),
    ("not json", "models-file"),
])
def test_a_bad_models_file_exits_2_saying_why(tiny_model, tmp_path, content, words):
    from tests.e2e.test_startup import run_to_exit
    from tests.e2e.conftest import free_port

    listing = tmp_path / "models.json"
    listing.write_text(content.replace("MODEL", str(tiny_model)))
    result = run_to_exit("--models-file", str(listing), "--port", str(free_port()))
    assert result.returncode == 2 and words in result.stderr, result.stderr


def test_concurrent_cold_requests_for_two_models_never_load_both_past_max_loaded(start_server, tiny_model,
                                                                               scripted_model):
    server = start_server("--model", str(tiny_model), "--model", str(scripted_model), "--model-alias", "tiny",
                          "--model-alias", "scripted", "--max-loaded", "1", "--idle-unload", "1")
    wait_for(lambda: states(server.base_url) == {"tiny": "unloaded", "scripted": "unloaded"})
    together = threading.Barrier(2)

    def cold(model: str) -> requests.Response:
        together.wait()
        return ask(server.base_url, model, max_tokens=2)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(cold, ["tiny", "scripted"]))
    assert [a.status_code for a in answers].count(200) >= 1, [a.text for a in answers]
    for answer in answers:  # the other waits for room, or hears that every loaded model is busy
        assert answer.status_code == 200 or answer.json()["error"]["code"] == "models_busy", answer.text
    assert "2 of at most 1" not in server.log()


def test_listing_models_answers_from_the_registry_without_loading_or_evicting(start_server, tiny_model,
                                                                              scripted_model):
    server = start_server("--model", str(tiny_model), "--model", str(scripted_model), "--model-alias", "tiny",
                          "--model-alias", "scripted", "--max-loaded", "1")
    assert ask(server.base_url, "scripted").status_code == 200  # evicts the default model
    listing = requests.get(server.base_url + "/v1/models", timeout=10)
    one = requests.get(server.base_url + "/v1/models/tiny", timeout=10)
    assert listing.status_code == 200 and one.status_code == 200, (listing.text, one.text)
    assert [(c["id"], c["meta"]["loaded"]) for c in listing.json()["data"]] == [("tiny", False), ("scripted", True)]
    assert one.json()["id"] == "tiny" and one.json()["meta"]["loaded"] is False
    assert states(server.base_url) == {"tiny": "unloaded", "scripted": "ready"}


def mappings(pid: int, path: Path) -> int:
    """How many memory mappings of the process are of `path`."""
    return Path(f"/proc/{pid}/maps").read_text().count(str(path.resolve()))


def test_unloading_gives_the_memory_back_even_after_an_embedding_ran_while_it_was_due(start_server, smollm2_model,
                                                                                      tiny_model):
    server = start_server("--model", str(smollm2_model), "--model", str(tiny_model), "--model-alias", "smol",
                          "--model-alias", "tiny", "--max-loaded", "1", "--idle-unload", "1")
    pid, unloaded = server.process.pid, {"smol": "unloaded", "tiny": "unloaded"}
    wait_for(lambda: states(server.base_url) == unloaded)
    baseline = rss_kb(pid)

    def embed(count: int) -> float:
        started = time.monotonic()
        answer = requests.post(server.base_url + "/v1/embeddings", timeout=300, json={
            "model": "smol", "input": ["The quick brown fox jumps over the lazy dog. " * 30] * count})  # ~300 tokens
        assert answer.status_code == 200 and len(answer.json()["data"]) == count, answer.text
        return time.monotonic() - started

    embed(1)  # loads the model and makes its embedding context
    count = min(64, max(2, math.ceil(6 / embed(1))))
    # About 6 s: the idle unloader looks at the model while the request runs (chosen over 2 s before).
    assert embed(count) > 3.5, count
    assert mappings(pid, smollm2_model) >= 1
    wait_for(lambda: states(server.base_url) == unloaded)
    assert mappings(pid, smollm2_model) == 0  # the weights, the embedding context, every copy: gone
    assert requests.post(server.base_url + "/v1/embeddings", json={"model": "smol", "input": "again"},
                         timeout=60).status_code == 200
    wait_for(lambda: states(server.base_url) == unloaded)
    assert ask(server.base_url, "tiny", max_tokens=2).status_code == 200
    wait_for(lambda: states(server.base_url) == unloaded)
    after = rss_kb(pid)
    assert mappings(pid, smollm2_model) == 0 and after <= baseline * 1.1, (baseline, after)
