"""POST /v1/embeddings in process on real llama.cpp engines (generated GGUFs), against llama-cpp-python's own
`Llama(embedding=True).embed` on the same file as the oracle; the request checks; document and server agree."""

from __future__ import annotations

import base64
import threading
from types import SimpleNamespace

import llama_cpp
import numpy as np
import pytest

from edge_server.api.app import create_app
from edge_server.api.embeddings import MAX_INPUTS
from edge_server.api.state import ServedModel
from edge_server.devtools.synthetic import write_embedding_model
from edge_server.engine import embedder as embedder_module
from edge_server.engine.embedder import Embedder, EmbeddingUnsupported, Pooling, longest_input, truncated
from edge_server.engine.loader import load_engine
from edge_server.settings import Settings
from tests.unit.test_openapi import schema_validator

TEXTS = ["hello world", "The quick brown fox jumps over the lazy dog.", "a",
         "Paris is the capital and the largest city of France. " * 6, "你好，世界！"]


@pytest.fixture(scope="module")
def embedding_model(tmp_path_factory):
    """A Qwen3-Embedding-shaped model: last-token pooling, <|endoftext|> appended to every text."""
    return write_embedding_model(tmp_path_factory.mktemp("models") / "embed-last.gguf", pooling="last")


@pytest.fixture(scope="module")
def mean_model(tmp_path_factory):
    return write_embedding_model(tmp_path_factory.mktemp("models") / "embed-mean.gguf", pooling="mean", seed=3)


def serve(path, **settings):
    engine = load_engine(path, threads=2, parallel=1)
    app = create_app(Settings(threads=1, **settings), ServedModel.of(engine, "model-id"))
    return engine, app.test_client()


@pytest.fixture(scope="module")
def embedding_server(embedding_model):
    engine, client = serve(embedding_model)
    yield client
    engine.close()


@pytest.fixture(scope="module")
def chat_server(tiny_model):
    engine, client = serve(tiny_model)
    yield client
    engine.close()


def served_vectors(path, texts: list[str]) -> np.ndarray:
    """The vectors of `texts` from a server of its own on `path`."""
    engine, client = serve(path)
    try:
        return vectors(embed(client, input=texts))
    finally:
        engine.close()


def oracle(path, pooling: int, texts: list[str]) -> np.ndarray:
    """llama-cpp-python's own embeddings of `texts`, L2-normalized."""
    llama = llama_cpp.Llama(str(path), embedding=True, pooling_type=pooling, n_ctx=512, n_batch=512, verbose=False)
    vectors = np.array(llama.embed(texts), dtype=np.float64)
    llama.close()
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def embed(client, **body) -> list:
    response = client.post("/v1/embeddings", json={"model": "m", **body})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def vectors(answer) -> np.ndarray:
    return np.array([item["embedding"] for item in answer["data"]])


def assert_same(got, expected: np.ndarray, *, cosine: float = 0.9999, atol: float = 2e-3) -> None:
    """Cosine above `cosine` and close, input by input."""
    got = np.asarray(got, dtype=np.float64)
    cosines = np.sum(got * expected, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosines.min() > cosine, cosines
    np.testing.assert_allclose(got, expected, atol=atol)


# ---- the vectors ----------------------------------------------------------------------------------

def test_embedding_model_matches_llama_cpp_python_with_its_gguf_pooling(embedding_server, embedding_model):
    answer = embed(embedding_server, input=TEXTS)
    assert answer["object"] == "list" and answer["model"] == "m"
    assert [item["index"] for item in answer["data"]] == list(range(len(TEXTS)))
    assert {item["object"] for item in answer["data"]} == {"embedding"}
    got = vectors(answer)
    assert got.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # unit length
    assert_same(got, oracle(embedding_model, llama_cpp.LLAMA_POOLING_TYPE_LAST, TEXTS))


def test_mean_pooling_from_the_gguf(mean_model):
    got = served_vectors(mean_model, TEXTS)
    assert_same(got, oracle(mean_model, llama_cpp.LLAMA_POOLING_TYPE_MEAN, TEXTS))
    # The GGUF's pooling decides: last-token pooling of the same file is something else.
    assert not np.allclose(got, oracle(mean_model, llama_cpp.LLAMA_POOLING_TYPE_LAST, TEXTS), atol=1e-2)


def test_chat_model_is_mean_pooled_like_ollama(chat_server, tiny_model):
    got = vectors(embed(chat_server, input=TEXTS))
    assert_same(got, oracle(tiny_model, llama_cpp.LLAMA_POOLING_TYPE_MEAN, TEXTS))


def test_many_inputs_batched_per_decode_equal_each_alone(embedding_server):
    texts = [f"{word} number {i}" for i, word in enumerate(("apple", "river", "coffee", "music") * 5)]
    together = vectors(embed(embedding_server, input=texts))
    alone = np.array([vectors(embed(embedding_server, input=text))[0] for text in texts[:6]])
    np.testing.assert_allclose(together[:6], alone, atol=1e-5)
    assert len(together) == 20 > embedder_module.SEQUENCES_PER_DECODE


def test_token_ids_equal_their_text(embedding_server, embedding_model):
    llama = llama_cpp.Llama(str(embedding_model), vocab_only=True, verbose=False)
    ids = [llama.tokenize(text.encode()) for text in TEXTS[:3]]  # with the closing <|endoftext|>
    by_text = embed(embedding_server, input=TEXTS[:3])
    by_ids = embed(embedding_server, input=ids)
    np.testing.assert_allclose(vectors(by_ids), vectors(by_text), atol=1e-6)
    count = sum(map(len, ids))
    assert by_ids["usage"] == by_text["usage"] == {"prompt_tokens": count, "total_tokens": count}
    one = embed(embedding_server, input=ids[1])  # a single list of ids is one input
    np.testing.assert_allclose(vectors(one)[0], vectors(by_text)[1], atol=1e-6)


def test_base64_is_little_endian_float32_of_the_same_vectors(embedding_server):
    floats = vectors(embed(embedding_server, input=TEXTS[:2]))
    encoded = embed(embedding_server, input=TEXTS[:2], encoding_format="base64")
    decoded = np.array([np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
                        for item in encoded["data"]])
    np.testing.assert_array_equal(decoded, floats.astype(np.float32))


def test_dimensions_truncate_and_renormalize(embedding_server):
    full = vectors(embed(embedding_server, input=TEXTS[:2]))
    short = vectors(embed(embedding_server, input=TEXTS[:2], dimensions=16))
    assert short.shape == (2, 16)
    expected = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(short, expected, atol=1e-6)
    assert vectors(embed(embedding_server, input="x", dimensions=64)).shape == (1, 64)  # the model's size


def test_embeddings_while_the_chat_engine_generates(chat_server):
    alone = vectors(embed(chat_server, input=TEXTS))
    errors: list[object] = []

    def chat():
        for _ in range(3):
            response = chat_server.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40, "stream": True})
            if response.status_code != 200 or b"[DONE]" not in response.data:
                errors.append(response.data[-200:])

    threads = [threading.Thread(target=chat) for _ in range(2)]
    for thread in threads:
        thread.start()
    for _ in range(4):
        np.testing.assert_allclose(vectors(embed(chat_server, input=TEXTS)), alone, atol=1e-6)
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []


# ---- refusals -------------------------------------------------------------------------------------

BAD = {
    "empty string": ({"input": ""}, "input", "invalid_value"),
    "empty list": ({"input": []}, "input", "invalid_value"),
    "empty string in list": ({"input": ["a", ""]}, "input", "invalid_value"),
    "empty token list": ({"input": [[1], []]}, "input", "invalid_value"),
    "negative id": ({"input": [1, -1]}, "input", "invalid_value"),
    "id beyond the vocabulary": ({"input": [5, 10**9]}, "input", "invalid_value"),
    "nested id beyond the vocabulary": ({"input": [[5], [3261]]}, "input", "invalid_value"),
    "mixed list": ({"input": ["a", 1]}, "input", "invalid_value"),
    "ids and lists mixed": ({"input": [[1], 2]}, "input", "invalid_value"),
    "boolean": ({"input": True}, "input", "invalid_value"),
    "object": ({"input": {"text": "a"}}, "input", "invalid_value"),
    "float ids": ({"input": [1.5, 2]}, "input", "invalid_value"),
    "missing input": ({"model": "m"}, "input", "invalid_value"),
    "too many inputs": ({"input": ["a"] * (MAX_INPUTS + 1)}, "input", "invalid_value"),
    "unknown format": ({"input": "a", "encoding_format": "hex"}, "encoding_format", "invalid_value"),
    "dimensions 0": ({"input": "a", "dimensions": 0}, "dimensions", "invalid_value"),
    "dimensions beyond the model": ({"input": "a", "dimensions": 65}, "dimensions", "invalid_value"),
    "dimensions a string": ({"input": "a", "dimensions": "8"}, "dimensions", "invalid_value"),
    "text past the context": ({"input": "hello " * 600}, "input", "context_length_exceeded"),
    "long text refused untokenized": ({"input": "x" * 200_000}, "input", "context_length_exceeded"),
    "ids past the context": ({"input": [[5] * 513]}, "input", "context_length_exceeded"),
}


@pytest.mark.parametrize("body, param, code", BAD.values(), ids=BAD.keys())
def test_bad_requests_are_400_envelopes(embedding_server, body, param, code):
    response = embedding_server.post("/v1/embeddings", json=body)
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error"), error


def test_context_length_message_names_the_input_and_the_limit(embedding_server):
    error = embedding_server.post("/v1/embeddings", json={"input": ["ok", "hello " * 600]}).get_json()["error"]
    assert "Input 1 has" in error["message"] and "at most 512 tokens" in error["message"]


def test_malformed_bodies_are_400(embedding_server):
    for raw in (b"", b"{", b"[1]", b"\xff", b'{"input": "\\ud800"}', b'{"input": ' + b"[" * 100 + b"]" * 100 + b"}"):
        response = embedding_server.post("/v1/embeddings", data=raw, content_type="application/json")
        assert response.status_code == 400, (raw, response.get_json())


def test_waiting_requests_beyond_the_queue_are_429(embedding_model):
    engine, client = serve(embedding_model, max_queue=0)
    try:
        response = client.post("/v1/embeddings", json={"input": "a"})
        assert response.status_code == 429 and response.headers["Retry-After"] == "1"
        assert response.get_json()["error"]["code"] == "queue_full"
    finally:
        engine.close()


def test_no_model_yet_is_503():
    response = create_app(Settings(threads=1)).test_client().post("/v1/embeddings", json={"input": "a"})
    assert response.status_code == 503 and response.get_json()["error"]["code"] == "model_loading"


def test_metrics_count_the_prompt_tokens(embedding_server):
    before = _prompt_tokens(embedding_server)
    answer = embed(embedding_server, input=["hello", "world"])
    assert _prompt_tokens(embedding_server) == before + answer["usage"]["prompt_tokens"]


def _prompt_tokens(client) -> float:
    text = client.get("/metrics").get_data(as_text=True)
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("edge_prompt_tokens_total")))


# ---- the embedder's rules -------------------------------------------------------------------------

def test_pooling_comes_from_the_gguf_else_mean():
    assert Pooling.of({"general.architecture": "qwen3", "qwen3.pooling_type": "3"}) == Pooling(3, declared=True)
    assert Pooling.of({"general.architecture": "bert", "bert.pooling_type": "2"}).name == "cls"
    assert Pooling.of({"general.architecture": "bert", "bert.pooling_type": "0"}).name == "mean"  # one vector
    assert Pooling.of({"general.architecture": "qwen2"}) == Pooling(1, declared=False)


def test_a_reranker_cannot_embed():
    info = SimpleNamespace(metadata={"general.architecture": "bert", "bert.pooling_type": "4"})
    with pytest.raises(EmbeddingUnsupported, match="reranker"):
        Embedder(None, info)


def test_longest_input_is_bounded_by_context_cap_and_logits_budget():
    info = lambda n_ctx, n_vocab: SimpleNamespace(n_ctx=n_ctx, n_vocab=n_vocab)  # noqa: E731
    assert longest_input(info(512, 30522)) == 512
    assert longest_input(info(32768, 3000)) == 8192
    assert longest_input(info(4096, 49152)) == 1360  # 256 MiB of logits rows, a multiple of 8 sequences
    assert longest_input(info(4096, 151936)) == 512  # never under llama-server's default micro-batch
    assert longest_input(info(100, 3000)) == 96
    assert longest_input(info(5, 3000)) == 5


def test_a_context_that_is_no_multiple_of_the_sequences_works(tiny_model):
    # llama.cpp aborts the process creating a mean-pooling context whose n_ubatch n_seq_max does not divide.
    engine = load_engine(tiny_model, n_ctx=101, threads=2, parallel=1)
    try:
        client = create_app(Settings(threads=1), ServedModel.of(engine, "m")).test_client()
        answer = embed(client, input=["hello", "world"] * 6)
        assert len(answer["data"]) == 12
        assert client.post("/v1/embeddings", json={"input": [[5] * 97]}).get_json()["error"]["message"].endswith(
            "at most 96 tokens per input. Shorten or split it (nothing is truncated silently).")
    finally:
        engine.close()


def test_a_real_model_matches_llama_cpp_python(smollm2_model):
    got = served_vectors(smollm2_model, TEXTS)
    # Q4_1 weights: several inputs in one decode sum in another order than llama-cpp-python's one at a time.
    assert_same(got, oracle(smollm2_model, llama_cpp.LLAMA_POOLING_TYPE_MEAN, TEXTS), cosine=0.999, atol=2e-2)


def test_truncated_renormalizes():
    vector = np.array([3.0, 4.0, 12.0]) / 13.0
    np.testing.assert_allclose(truncated(vector, 2), [0.6, 0.8])
    assert truncated(vector, None) is vector and truncated(vector, 3) is vector


# ---- the document and the server agree ------------------------------------------------------------

VALID = {
    "text": {"input": "a"},
    "texts": {"input": ["a", "b"], "model": "m", "user": "u"},
    "ids": {"input": [1, 2, 3]},
    "lists of ids": {"input": [[1, 2], [3]]},
    "base64 and dimensions": {"input": "a", "encoding_format": "base64", "dimensions": 8},
    "nulls": {"input": "a", "encoding_format": None, "dimensions": None, "model": None},
    "whole float dimensions": {"input": "a", "dimensions": 8.0},
    "unknown field": {"input": "a", "frobnicate": 1},
}
INVALID = {key: body for key, (body, _, _) in BAD.items()
           if key not in ("id beyond the vocabulary", "nested id beyond the vocabulary", "dimensions beyond the model",
                          "text past the context", "long text refused untokenized", "ids past the context")}


@pytest.fixture(scope="module")
def document_and_client():
    client = create_app(Settings(threads=1)).test_client()
    return client.get("/openapi.json").get_json(), client


@pytest.mark.parametrize("body", VALID.values(), ids=VALID.keys())
def test_valid_bodies_pass_the_document_and_the_server(document_and_client, body):
    document, client = document_and_client
    assert schema_validator(document, "EmbeddingRequest").is_valid(body)
    assert client.post("/v1/embeddings", json=body).status_code == 503  # valid: stops at "model loading"


@pytest.mark.parametrize("body", INVALID.values(), ids=INVALID.keys())
def test_invalid_bodies_fail_the_document_and_the_server(document_and_client, body):
    document, client = document_and_client
    assert not schema_validator(document, "EmbeddingRequest").is_valid(body)
    assert client.post("/v1/embeddings", json=body).status_code == 400


def test_the_document_declares_the_route(document_and_client):
    document, _ = document_and_client
    operation = document["paths"]["/v1/embeddings"]["post"]
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/EmbeddingList"}
    assert {"400", "404", "429", "503"} <= set(operation["responses"])
    for name, example in operation["requestBody"]["content"]["application/json"]["examples"].items():
        assert schema_validator(document, "EmbeddingRequest").is_valid(example["value"]), name
