"""POST /v1/embeddings through the real server with the real SDKs (openai for Python and for node), against
llama-cpp-python's own `Llama(embedding=True).embed` on the same GGUF as the oracle."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import requests
from openai import BadRequestError, OpenAI

from edge_server.devtools.assets import assets_dir
from edge_server.devtools.synthetic import write_embedding_model
from tests.e2e.conftest import stream_chat
from tests.unit.test_embeddings import assert_same, oracle
from tests.unit.test_openapi import check_response

KEY = "embed-key"
TEXTS = ["hello world", "The quick brown fox jumps over the lazy dog.", "a", "你好，世界！"]
NODE_OPENAI = "4.104.0"  # the openai npm package the node test installs (once, into the user's cache)


@pytest.fixture(scope="module")
def embedding_model(tmp_path_factory) -> Path:
    return write_embedding_model(tmp_path_factory.mktemp("models") / "embed.gguf", pooling="last")


@pytest.fixture(scope="module")
def embedding_server(start_server, embedding_model):
    return start_server("--model", str(embedding_model), "--api-key", KEY, "--model-alias", "tiny-embed")


def client_for(base_url: str, key: str = "none") -> OpenAI:
    return OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_openai_sdk_float_base64_and_dimensions(embedding_server, embedding_model):
    client = client_for(embedding_server.base_url, KEY)
    expected = oracle(embedding_model, llama_cpp.LLAMA_POOLING_TYPE_LAST, TEXTS)
    floats = client.embeddings.create(model="tiny-embed", input=TEXTS, encoding_format="float")
    assert [item.index for item in floats.data] == [0, 1, 2, 3]
    assert floats.model == "tiny-embed" and floats.usage.prompt_tokens == floats.usage.total_tokens > len(TEXTS)
    assert_same([item.embedding for item in floats.data], expected)
    # Without encoding_format the SDK asks for base64 and decodes it itself.
    default = client.embeddings.create(model="tiny-embed", input=TEXTS)
    np.testing.assert_array_equal(np.array([item.embedding for item in default.data], dtype=np.float32),
                                  np.array([item.embedding for item in floats.data], dtype=np.float32))
    short = client.embeddings.create(model="tiny-embed", input=TEXTS[0], dimensions=16)
    prefix = expected[0, :16] / np.linalg.norm(expected[0, :16])
    np.testing.assert_allclose(short.data[0].embedding, prefix, atol=2e-3)
    ids = client.embeddings.create(model="tiny-embed", input=[[361, 75, 304], [5, 6]], encoding_format="float")
    assert ids.usage.prompt_tokens == 5 and len(ids.data) == 2


def test_answers_and_refusals_match_the_document(embedding_server):
    base = embedding_server.base_url
    document = requests.get(base + "/openapi.json", timeout=10).json()
    headers = {"Authorization": f"Bearer {KEY}"}
    cases = [({"input": ["a", "b"], "encoding_format": "base64"}, 200, None),
             ({"input": "hello " * 600}, 400, "context_length_exceeded"),
             ({"input": [3, 99999]}, 400, "invalid_value"),
             ({"input": "a", "dimensions": 65}, 400, "invalid_value"),
             ({"input": []}, 400, "invalid_value")]
    for body, status, code in cases:
        response = requests.post(base + "/v1/embeddings", json=body, headers=headers, timeout=60)
        assert response.status_code == status, response.text
        check_response(document, "/v1/embeddings", "post", status, response.headers["Content-Type"],
                       response.headers, response.json())
        if code:
            assert response.json()["error"]["code"] == code
    unauthorized = requests.post(base + "/v1/embeddings", json={"input": "a"}, timeout=10)
    assert unauthorized.status_code == 401
    assert "POST /v1/embeddings 200 inputs=2 prompt=" in embedding_server.log()


def test_sdk_raises_the_context_length_error(embedding_server):
    with pytest.raises(BadRequestError) as raised:
        client_for(embedding_server.base_url, KEY).embeddings.create(model="tiny-embed", input="hello " * 600)
    assert raised.value.code == "context_length_exceeded"


def test_a_chat_model_embeds_beside_its_chat_streams(server, tiny_model):
    client = client_for(server.base_url)
    expected = oracle(tiny_model, llama_cpp.LLAMA_POOLING_TYPE_MEAN, TEXTS)
    streams: list[list] = []
    chatting = [threading.Thread(target=lambda: streams.append(stream_chat(server.base_url, max_tokens=60)))
                for _ in range(2)]
    for thread in chatting:
        thread.start()
    for _ in range(3):
        answer = client.embeddings.create(model="anything", input=TEXTS, encoding_format="float")
        assert_same([item.embedding for item in answer.data], expected)
    for thread in chatting:
        thread.join(timeout=60)
    assert len(streams) == 2 and all(events[-1] == "[DONE]" for events in streams)


NODE_SCRIPT = """
const OpenAI = require("openai");
const client = new OpenAI({baseURL: process.argv[2], apiKey: process.argv[3], maxRetries: 0});
(async () => {
  const texts = JSON.parse(process.argv[4]);
  const floats = await client.embeddings.create({model: "tiny-embed", input: texts, encoding_format: "float"});
  const base64 = await client.embeddings.create({model: "tiny-embed", input: texts});
  console.log(JSON.stringify({floats: floats.data.map(d => d.embedding), base64: base64.data.map(d => d.embedding),
                              usage: floats.usage}));
})().catch(error => { console.error(error); process.exit(1); });
"""


def _node_openai() -> Path:
    """The openai npm package (pinned), installed once into the test-asset cache; returns its node_modules' parent."""
    home = assets_dir() / f"node-openai-{NODE_OPENAI}"
    if not (home / "node_modules" / "openai" / "package.json").is_file():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm is needed to install the openai node package", pytrace=False)
        home.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--no-package-lock", "--prefix", str(home),
                               f"openai@{NODE_OPENAI}"], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.fail(f"npm install openai@{NODE_OPENAI} failed:\n{(done.stdout + done.stderr)[-3000:]}",
                        pytrace=False)
    return home


def test_node_openai_sdk_float_and_base64(embedding_server, embedding_model):
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is needed for the JavaScript SDK test", pytrace=False)
    home = _node_openai()
    script = home / "embeddings.js"
    script.write_text(NODE_SCRIPT, encoding="utf-8")
    done = subprocess.run([node, str(script), embedding_server.base_url + "/v1", KEY, json.dumps(TEXTS)],
                          capture_output=True, text=True, timeout=60, cwd=home)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    expected = oracle(embedding_model, llama_cpp.LLAMA_POOLING_TYPE_LAST, TEXTS)
    assert_same(answer["floats"], expected)
    assert_same(answer["base64"], expected)  # the node SDK decodes base64 itself too
    assert answer["usage"]["prompt_tokens"] == answer["usage"]["total_tokens"] > 0


def test_langchain_openai_embeddings(embedding_server, embedding_model):
    """LangChain's OpenAIEmbeddings, as a RAG pipeline builds it, against llama-cpp-python's own vectors."""
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length off: LangChain would otherwise fetch tiktoken's OpenAI vocabulary, and send
    # OpenAI token ids that mean nothing to this model.
    embeddings = OpenAIEmbeddings(model="tiny-embed", base_url=embedding_server.base_url + "/v1", api_key=KEY,
                                  check_embedding_ctx_length=False, max_retries=0)
    documents = embeddings.embed_documents(TEXTS)
    assert_same(documents, oracle(embedding_model, llama_cpp.LLAMA_POOLING_TYPE_LAST, TEXTS))
    query = embeddings.embed_query(TEXTS[1])
    assert_same([query], oracle(embedding_model, llama_cpp.LLAMA_POOLING_TYPE_LAST, [TEXTS[1]]))
