"""The Flask app before a model is attached: readiness and the error envelope (Flask test client)."""

from __future__ import annotations

import pytest

from edge_server.api.app import create_app
from edge_server.settings import Settings


@pytest.fixture
def client():
    return create_app(Settings(threads=1)).test_client()


def test_health_is_503_loading_until_a_model_is_attached(client):
    response = client.get("/health")
    assert response.status_code == 503
    assert response.get_json() == {"status": "loading"}


def test_generation_while_loading_is_a_503_envelope_with_retry_after(client):
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert response.get_json()["error"]["code"] == "model_loading"


def test_every_response_carries_a_request_id(client):
    assert client.get("/nope").headers["X-Request-Id"].startswith("req_")
    assert client.get("/health", headers={"X-Request-Id": "abc"}).headers["X-Request-Id"] == "abc"


def test_bad_request_is_rejected_before_the_model_is_needed(client):
    response = client.post("/v1/chat/completions", json={"messages": []})
    assert response.status_code == 400
    assert response.get_json()["error"]["param"] == "messages"
