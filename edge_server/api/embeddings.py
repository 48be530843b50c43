"""POST /v1/embeddings (OpenAI's embeddings API): wire models, input checks, the route and its serialisation.

The vectors come from the served model's embedding context (engine/embedder.py): an embedding GGUF pooled
as its metadata says, a chat model mean-pooled; unit length (L2), Matryoshka-truncated by `dimensions`.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Literal

import numpy as np
from flask import Blueprint, Response, g, jsonify
from flask import request as raw_request
from pydantic import BaseModel, Field, field_validator

from edge_server.api.declaration import Reply, documented
from edge_server.api.errors import APIError
from edge_server.api.observability import access_log, metrics_of
from edge_server.api.schemas import RequestModel, parse_body, whole_int
from edge_server.api.state import client_gone, state_of
from edge_server.api.submit import log_unknown_fields, served_model
from edge_server.engine.embedder import Embedder, EmbeddingUnsupported, truncated
from edge_server.engine.types import PromptTooLong

log = logging.getLogger("edge_server")

embeddings_api = Blueprint("embeddings", __name__)

MAX_INPUTS = 2048  # inputs per request, as OpenAI
MAX_TOTAL_TOKENS = 300_000  # tokens per request, as OpenAI

_TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}


class EmbeddingRequest(RequestModel):
    """Body of POST /v1/embeddings."""

    input: str | list[str] | list[int] | list[list[int]] = Field(json_schema_extra={"anyOf": [  # `_inputs`
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_INPUTS},
        _TOKENS,
        {"type": "array", "items": _TOKENS, "minItems": 1, "maxItems": MAX_INPUTS}]},
        description=f"a text, up to {MAX_INPUTS} texts, a list of token ids, or up to {MAX_INPUTS} such lists; "
                    "none empty")
    model: str | None = None
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="`base64`: each vector's little-endian float32 bytes, base64-encoded")
    dimensions: whole_int(ge=1) | None = Field(
        None, description="keep the first N dimensions, renormalized (Matryoshka); at most the model's size")
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _inputs(cls, value: str | list) -> str | list:
        if isinstance(value, str):
            if not value:
                raise ValueError("must not be an empty string")
            return value
        if not value:
            raise ValueError("must not be an empty list")
        if isinstance(value[0], list):
            if len(value) > MAX_INPUTS:
                raise ValueError(f"at most {MAX_INPUTS} inputs per request")
            if not all(value):
                raise ValueError("must not hold an empty list of token ids")
        elif isinstance(value[0], str):
            if len(value) > MAX_INPUTS:
                raise ValueError(f"at most {MAX_INPUTS} inputs per request")
            if not all(value):
                raise ValueError("must not hold an empty string")
        if any(isinstance(token, int) and token < 0 for token in value):
            raise ValueError("token ids must not be negative")
        if any(isinstance(item, list) and any(token < 0 for token in item) for item in value):
            raise ValueError("token ids must not be negative")
        return value

    def inputs(self) -> list[str] | list[list[int]]:
        """Each input: texts, or token-id lists."""
        if isinstance(self.input, str):
            return [self.input]
        if isinstance(self.input[0], int):
            return [self.input]
        return self.input


class Embedding(BaseModel):
    """One input's vector: floats, or a base64 string of little-endian float32 (`encoding_format`)."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    """Tokens embedded (every one a prompt token)."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    """The answer of POST /v1/embeddings, in input order."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


EMBEDDING_EXAMPLES = {
    "text": {"summary": "One text", "value": {"model": "qwen", "input": "The food was delicious."}},
    "batch": {"summary": "Several texts, base64, truncated", "value": {
        "input": ["first text", "second text"], "encoding_format": "base64", "dimensions": 32}},
    "tokens": {"summary": "Token ids", "value": {"input": [[9707, 1879], [785, 3974]]}},
}


def _too_long(index: int, tokens: str, limit: int) -> APIError:
    return APIError(
        f"Input {index} has {tokens} tokens; this model embeds at most {limit} tokens per input. Shorten or "
        f"split it (nothing is truncated silently).", param="input", code="context_length_exceeded")


def input_tokens(request: EmbeddingRequest, embedder: Embedder, engine) -> list[list[int]]:
    """Each input as token ids, checked against the vocabulary and the per-input and per-request limits."""
    limit, info = embedder.max_tokens, engine.info
    inputs, total = [], 0
    for index, item in enumerate(request.inputs()):
        if isinstance(item, str):
            text = item.encode("utf-8")
            fewest = len(text) // info.max_token_bytes  # no token is longer: refused before tokenizing
            if fewest > limit:
                raise _too_long(index, f"at least {fewest}", limit)
            try:
                # As llama.cpp's own embed(): the model's special tokens added (Qwen3-Embedding's closing
                # <|endoftext|>, BERT's [CLS]/[SEP]), special-token text in the input not parsed.
                tokens = engine.tokenize(text, True, False, max_tokens=limit)
            except PromptTooLong as error:
                raise _too_long(index, f"{'at least ' if error.at_least else ''}{error.tokens}", limit) from None
            if not tokens:
                raise APIError(f"Input {index} has no tokens.", param="input", code="invalid_value")
        else:
            tokens = item
            if len(tokens) > limit:
                raise _too_long(index, str(len(tokens)), limit)
            beyond = next((token for token in tokens if token >= embedder.n_vocab), None)
            if beyond is not None:
                raise APIError(f"Input {index} has token id {beyond}; this model's vocabulary has {embedder.n_vocab} "
                               f"tokens (0..{embedder.n_vocab - 1}).", param="input", code="invalid_value")
        total += len(tokens)
        if total > MAX_TOTAL_TOKENS:
            raise APIError(f"The inputs have more than {MAX_TOTAL_TOKENS} tokens together; send fewer per request.",
                           param="input", code="invalid_value")
        inputs.append(list(tokens))
    return inputs


def _encoded(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


@embeddings_api.post("/v1/embeddings")
@documented("createEmbedding", "embeddings", "Embeddings of texts or token ids", {200: Reply(
    "One unit-length vector per input, in order.", EmbeddingList)},
    body=EmbeddingRequest, examples=EMBEDDING_EXAMPLES, errors=(404, 429, 503))
def create_embedding():
    """Embeddings of one or more inputs with the served (or named) model."""
    started = time.monotonic()
    request = parse_body(EmbeddingRequest, raw_request.get_data(cache=False))
    log_unknown_fields(request)
    served = served_model(request.model)
    try:
        embedder = served.embedder()
    except EmbeddingUnsupported as error:
        raise APIError(f"The model '{served.model_id}' cannot embed: {error}.", param="model",
                       code="model_not_supported") from None
    except (ValueError, RuntimeError) as error:  # llama.cpp could not make the context (memory)
        log.error("creating the embedding context of %s failed: %s", served.model_id, error)
        raise APIError(f"The embedding context of '{served.model_id}' could not be created.", status=500,
                       type="server_error", code="embedding_context_failed") from None
    if request.dimensions is not None and request.dimensions > embedder.dimensions:
        raise APIError(f"'dimensions' is {request.dimensions}; this model's embeddings have {embedder.dimensions}.",
                       param="dimensions", code="invalid_value")
    inputs = input_tokens(request, embedder, served.engine)
    if embedder.waiting >= state_of().settings.max_queue:
        raise APIError("The server is busy: too many embedding requests are waiting. Retry shortly.", status=429,
                       code="queue_full", headers={"Retry-After": "1"})
    vectors = embedder.embed(inputs, cancelled=client_gone())
    if vectors is None:
        return Response(status=499)  # the client left; only our access log sees this
    tokens = sum(map(len, inputs))
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": index,
                  "embedding": _encoded(truncated(vector, request.dimensions), request.encoding_format)}
                 for index, vector in enumerate(vectors)],
        "model": request.model or served.model_id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    metrics_of().prompt_tokens.inc(tokens)
    g.access_log_deferred = True
    access_log.info("%s POST /v1/embeddings 200 inputs=%d prompt=%d dimensions=%d pooling=%s %.0fms", g.request_id,
                    len(inputs), tokens, request.dimensions or embedder.dimensions, embedder.pooling.name,
                    (time.monotonic() - started) * 1000)
    return jsonify(body)
