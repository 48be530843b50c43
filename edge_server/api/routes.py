"""The HTTP API blueprint: thin views that validate, submit (api/submit.py) and serialise."""

from __future__ import annotations

from flask import Blueprint, jsonify
from flask import request as raw_request

from edge_server.api.declaration import Reply, documented
from edge_server.api.docs import CHAT_EVENTS, CHAT_EXAMPLES, COMPLETION_EVENTS, COMPLETION_EXAMPLES
from edge_server.api.errors import APIError
from edge_server.api.observability import Accounting
from edge_server.api.serialize import chat_answer, chat_stream, text_answer, text_stream
from edge_server.api.openapi import Health, HealthUnavailable
from edge_server.api.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, parse_body
from edge_server.api.schemas import ChatCompletion, ChatCompletionChunk, TextCompletion
from edge_server.api.state import ServedModel, state_of
from edge_server.api.submit import (context_check, event_stream, log_unknown_fields, refuse_unfittable,
                                    served_model, start_chat, start_generation, whole_answer)

api = Blueprint("api", __name__)


@api.get("/health")
@documented("health", "operations", "Readiness and load", {200: Reply("The model is loaded.", Health),
                                                          503: Reply("Loading or shutting down.", HealthUnavailable)})
def health():
    """Readiness: 503 while loading or shutting down, else the engine's state."""
    state = state_of()
    if state.shutting_down:
        return jsonify({"status": "shutting_down"}), 503
    if state.served is None:
        return jsonify({"status": "loading"}), 503
    engine = state.served.engine
    info = engine.info
    return jsonify({
        "status": "ok",
        "model": state.served.model_id,
        "demo": state.served.demo_warning is not None,
        "backend": info.backend,
        "gpu_layers": info.gpu_layers,
        "n_ctx": info.n_ctx,
        "threads": info.threads,
        "threads_in_use": engine.threads_in_use,
        "parallel": engine.parallel,
        "running": engine.running,
        "queued": engine.queued,
        "prefix_cache_tokens": engine.reused_tokens,
    })


def _model_card(served: ServedModel) -> ModelCard:
    info = served.engine.info
    meta = {
        "file": info.path.name,
        "n_ctx": info.n_ctx,
        "n_ctx_train": info.n_ctx_train,
        "n_vocab": info.n_vocab,
        "backend": info.backend,
        "chat_template": served.renderer.template.label,
        "thinking": served.renderer.thinks,
    }
    if served.demo_warning:
        meta.update(demo=True, warning=served.demo_warning)
    return ModelCard(id=served.model_id, created=int(info.path.stat().st_mtime), meta=meta)


@api.get("/v1/models")
@documented("listModels", "models", "The served model", {200: Reply("The one served model.", ModelList)}, errors=(503,))
def list_models():
    """The served model (OpenAI `models.list`)."""
    return ModelList(data=[_model_card(served_model())]).model_dump()


@api.get("/v1/models/<path:model_id>")
@documented("getModel", "models", "One model by id", {200: Reply("The model.", ModelCard)}, errors=(404, 503),
            params={"model_id": "the served model's id (--model-alias); may contain '/'"})
def get_model(model_id: str):
    """One model by id, or a 404 envelope."""
    served = served_model()
    if model_id != served.model_id:
        raise APIError(f"The model '{model_id}' does not exist; this server serves '{served.model_id}'.",
                       status=404, param="model", code="model_not_found")
    return _model_card(served).model_dump()


@api.post("/v1/chat/completions")
@documented("createChatCompletion", "generation", "Chat completion", {200: Reply(
    "The answer: `application/json` (`chat.completion`), or `text/event-stream` when `stream` is true.",
    ChatCompletion, stream=ChatCompletionChunk, events=CHAT_EVENTS)},
    body=ChatCompletionRequest, examples=CHAT_EXAMPLES, errors=(429, 503))
def chat_completions():
    """Chat completion, streamed (SSE) or whole, with tools and structured output."""
    request = parse_body(ChatCompletionRequest, raw_request.get_data(cache=False))
    run = start_chat(request)
    generation, plan, model, account = run.generation, run.plan, run.model, Accounting()
    settings = state_of().settings
    if request.stream:
        return event_stream(chat_stream(generation, model, account, include_usage=request.include_usage(),
                                         heartbeat_seconds=settings.heartbeat_seconds, legacy_functions=plan.legacy,
                                         fingerprint=run.fingerprint))
    return whole_answer(lambda: chat_answer(generation, model, account, legacy_functions=plan.legacy,
                                            fingerprint=run.fingerprint))


@api.post("/v1/completions")
@documented("createCompletion", "generation", "Legacy prompt completion", {200: Reply(
    "The answer: `application/json` (`text_completion`), or `text/event-stream` when `stream` is true.",
    TextCompletion, stream=TextCompletion, events=COMPLETION_EVENTS)},
    body=CompletionRequest, examples=COMPLETION_EXAMPLES, errors=(429, 503))
def completions():
    """Legacy prompt completion, streamed (SSE) or whole."""
    request = parse_body(CompletionRequest, raw_request.get_data(cache=False))
    log_unknown_fields(request)
    if request.suffix:
        raise APIError("'suffix' (fill-in-the-middle) is not supported by this server.", param="suffix",
                       code="unsupported_parameter")
    served = served_model()
    prompt_text = request.prompt_text()
    if not prompt_text:
        raise APIError("'prompt' must not be empty.", param="prompt", code="invalid_value")
    refuse_unfittable(len(prompt_text), served)
    with context_check(served):
        prompt = served.renderer.text_tokens(prompt_text)
    generation = start_generation(served, request, prompt, request.token_limit())
    model, account = request.model or served.model_id, Accounting()
    echo = prompt_text if request.echo else ""
    settings = state_of().settings
    if request.stream:
        return event_stream(text_stream(generation, model, account, include_usage=request.include_usage(),
                                         heartbeat_seconds=settings.heartbeat_seconds, echo_prefix=echo,
                                         fingerprint=served.fingerprint))
    return whole_answer(lambda: text_answer(generation, model, account, echo_prefix=echo,
                                            fingerprint=served.fingerprint))
