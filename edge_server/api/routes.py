"""The HTTP API blueprint: thin views that validate, submit (api/submit.py) and serialise."""

from __future__ import annotations

from pathlib import Path

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
from edge_server.api.registry import ModelSpec
from edge_server.api.state import ServedModel, state_of
from edge_server.dialects.constraints import gbnf_grammar
from edge_server.api.submit import (compiled_grammar, context_check, event_stream, log_unknown_fields,
                                    refuse_unfittable, served_model, serving_registry, start_chat, start_generations,
                                    whole_answer)

api = Blueprint("api", __name__)


@api.get("/health")
@documented("health", "operations", "Readiness and load", {200: Reply("The model is loaded.", Health),
                                                          503: Reply("Loading, shutting down, or the backend failed.", HealthUnavailable)})
def health():
    """Readiness: 503 while loading or shutting down, else the engine's state."""
    state = state_of()
    if state.failure:
        return jsonify({"status": "failed", "error": state.failure}), 503
    if state.shutting_down:
        return jsonify({"status": "shutting_down"}), 503
    registry = state.registry
    if registry is None or not registry.started:
        return jsonify({"status": "loading"}), 503
    loaded = registry.loaded()
    # The figures of the default model, or of another in memory while the default is unloaded.
    served = registry.default() or (loaded[0] if loaded else None)
    engine = served.engine if served else None
    info = engine.info if engine else None
    return jsonify({
        "status": "ok",
        "model": registry.default_id,
        "demo": registry.spec(registry.default_id).demo_warning is not None,
        "backend": info.backend if info else None,
        "gpu_layers": info.gpu_layers if info else None,
        "devices": [share.as_dict() for share in info.devices] if info else [],
        "n_ctx": info.n_ctx if info else None,
        "threads": info.threads if info else None,
        "threads_in_use": engine.threads_in_use if engine else None,
        "parallel": engine.parallel if engine else None,
        "running": state.running(),
        "queued": state.queued(),
        "prefix_cache_tokens": sum(s.engine.reused_tokens for s in loaded),
        "ctx_checkpoints": state.checkpoint_stats(),
        "models": registry.status(),
    })


def _model_card(spec: ModelSpec, served: ServedModel | None) -> ModelCard:
    if served is None:  # configured, not in memory: what the file says
        return ModelCard(id=spec.id, created=_mtime(spec.path),
                         meta={"file": spec.path.name, "role": spec.role, "loaded": False,
                               "vision": spec.mmproj is not None})
    info = served.engine.info
    meta = {
        "role": spec.role,
        "loaded": True,
        "file": info.path.name,
        "n_ctx": info.n_ctx,
        "n_ctx_train": info.n_ctx_train,
        "n_vocab": info.n_vocab,
        "backend": info.backend,
        "devices": [share.as_dict() for share in info.devices],
        "chat_template": served.renderer.template.label,
        "thinking": served.renderer.thinks,
        **_output_limits(),
        "vision": info.vision,  # a projector (--mmproj) lets it see images
    }
    if served.demo_warning:
        meta.update(demo=True, warning=served.demo_warning)
    return ModelCard(id=spec.id, created=_mtime(info.path), meta=meta)


def _output_limits() -> dict[str, int | None]:
    """--n-predict (the limit of requests without one) and --n-predict-max (the ceiling); null: none."""
    settings = state_of().settings
    return {"n_predict": settings.n_predict if settings.n_predict > 0 else None,
            "n_predict_max": settings.n_predict_max if settings.n_predict_max > 0 else None}


def _mtime(path: Path) -> int:
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return 0


def _cards(ids: list[str]) -> list[ModelCard]:
    # From the registry as it is now: listing never loads, evicts or waits for a model.
    registry = serving_registry()  # 503 while the server resolves its models or shuts down
    loaded = {served.model_id: served for served in registry.loaded()}
    return [_model_card(registry.spec(model_id), loaded.get(model_id)) for model_id in ids]


@api.get("/v1/models")
@documented("listModels", "models", "The served models", {200: Reply("Every configured model, the default first.",
                                                                      ModelList)}, errors=(503,))
def list_models():
    """Every configured model, loaded or not (OpenAI `models.list`)."""
    return ModelList(data=_cards(state_of().registry.ids if state_of().registry else [])).model_dump()


@api.get("/v1/models/<path:model_id>")
@documented("getModel", "models", "One model by id", {200: Reply("The model.", ModelCard)}, errors=(404, 503),
            params={"model_id": "a served model's id (--model-alias); may contain '/'"})
def get_model(model_id: str):
    """One model by id, or a 404 envelope."""
    registry = state_of().registry
    if registry is not None and registry.spec(model_id) is None:
        raise APIError(f"The model '{model_id}' does not exist; this server serves "
                       f"{', '.join(map(repr, registry.ids))}.", status=404, param="model", code="model_not_found")
    return _cards([model_id])[0].model_dump()


@api.post("/v1/chat/completions")
@documented("createChatCompletion", "generation", "Chat completion", {200: Reply(
    "The answer: `application/json` (`chat.completion`), or `text/event-stream` when `stream` is true.",
    ChatCompletion, stream=ChatCompletionChunk, events=CHAT_EVENTS)},
    body=ChatCompletionRequest, examples=CHAT_EXAMPLES, errors=(429, 503))
def chat_completions():
    """Chat completion, streamed (SSE) or whole, with tools and structured output."""
    request = parse_body(ChatCompletionRequest, raw_request.get_data(cache=False))
    run = start_chat(request)
    generations, plan, model, account = run.generations, run.plan, run.model, Accounting()
    settings = state_of().settings
    if request.stream:
        return event_stream(chat_stream(generations, model, account, include_usage=request.include_usage(),
                                         heartbeat_seconds=settings.heartbeat_seconds, legacy_functions=plan.legacy,
                                         fingerprint=run.fingerprint))
    return whole_answer(lambda: chat_answer(generations, model, account, legacy_functions=plan.legacy,
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
    lark = gbnf_grammar(request.grammar) if request.grammar else None  # read before any prompt work
    served = served_model(request.model, role="chat")
    engine = served.engine
    prompts: list[list[int]] = []
    echoes: list[str] = []
    for prompt in request.prompt_list():
        if isinstance(prompt, str):
            refuse_unfittable(len(prompt), served)
            with context_check(served):
                prompts.append(served.renderer.text_tokens(prompt))
        else:
            if (bad := next((t for t in prompt if t >= engine.info.n_vocab), None)) is not None:
                raise APIError(f"prompt names token {bad}, but the vocabulary has {engine.info.n_vocab} tokens.",
                               param="prompt", code="invalid_value")
            prompts.append(list(prompt))
        if request.echo:
            text = prompt if isinstance(prompt, str) else engine.detokenize(prompt).decode("utf-8", "replace")
            echoes += [text] * request.n
    if not any(prompts):
        raise APIError("'prompt' must not be empty.", param="prompt", code="invalid_value")
    echoes = echoes or [""] * (len(prompts) * request.n)
    grammar = compiled_grammar(served, lark, param="grammar") if lark else None
    generations = start_generations(served, request, prompts, request.token_limit(), grammar=grammar)
    model, account = request.model or served.model_id, Accounting()
    settings = state_of().settings
    if request.stream:
        return event_stream(text_stream(generations, model, account, include_usage=request.include_usage(),
                                         heartbeat_seconds=settings.heartbeat_seconds, echo_prefixes=echoes,
                                         fingerprint=served.fingerprint))
    return whole_answer(lambda: text_answer(generations, model, account, echo_prefixes=echoes,
                                            fingerprint=served.fingerprint))
