"""The HTTP API blueprint: thin views that validate, submit and serialise."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flask import Blueprint, Response, g, jsonify
from flask import request as raw_request

from edge_server.engine.protocol import CompiledGrammarHandle
from edge_server.engine.types import FinishReason, GrammarRejected, Job, PromptTooLong
from edge_server.api.errors import APIError
from edge_server.generation.pipeline import ClientGone, Generation, Outcome
from edge_server.api.observability import defer_access_log, log_safe, metrics_of
from edge_server.api.serialize import chat_answer, chat_stream, log_outcome, text_answer, text_stream
from edge_server.api.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, GenerationRequest, parse_body
from edge_server.api.state import ServedModel, state_of
from edge_server.api.toolplan import plan_tools

log = logging.getLogger("edge_server")
api = Blueprint("api", __name__)


def served_model() -> ServedModel:
    """The loaded model, or a 503 while it is still loading or the server is shutting down."""
    if state_of().shutting_down:
        raise APIError("The server is shutting down; retry against its next start.", status=503,
                       code="shutting_down", headers={"Retry-After": "5"})
    served = state_of().served
    if served is None:
        raise APIError("The model is still loading; retry shortly (GET /health turns 200 when ready).",
                       status=503, code="model_loading", headers={"Retry-After": "2"})
    return served


@api.get("/health")
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
        "chat_template": "gguf" if served.renderer.has_own_template else "chatml-fallback",
    }
    if served.demo_warning:
        meta.update(demo=True, warning=served.demo_warning)
    return ModelCard(id=served.model_id, created=int(info.path.stat().st_mtime), meta=meta)


@api.get("/v1/models")
def list_models():
    """The served model (OpenAI `models.list`)."""
    return ModelList(data=[_model_card(served_model())]).model_dump()


@api.get("/v1/models/<path:model_id>")
def get_model(model_id: str):
    """One model by id, or a 404 envelope."""
    served = served_model()
    if model_id != served.model_id:
        raise APIError(f"The model '{model_id}' does not exist; this server serves '{served.model_id}'.",
                       status=404, param="model", code="model_not_found")
    return _model_card(served).model_dump()


@api.post("/v1/chat/completions")
def chat_completions():
    """Chat completion, streamed (SSE) or whole, with tools and structured output."""
    request = parse_body(ChatCompletionRequest, raw_request.get_data(cache=False))
    _log_unknown_fields(request)
    served = served_model()
    _refuse_unfittable(_rendered_characters(request), served)
    plan = plan_tools(request)
    with _context_check(served):
        prompt = served.renderer.chat_tokens(request.messages, tools=plan.template_tools)
    grammar = None
    if plan.grammar is not None:
        try:
            grammar = served.engine.compile_grammar(plan.grammar)
        except GrammarRejected as error:
            raise APIError(str(error), param="tools" if plan.callable_names else "response_format",
                           code="invalid_grammar") from None
    generation = _start(served, request, prompt, request.token_limit(), grammar=grammar,
                        extractor=plan.extractor(incremental=request.stream),
                        call_finish_reason=FinishReason.FUNCTION_CALL if plan.legacy else FinishReason.TOOL_CALLS)
    model = request.model or served.model_id
    settings = state_of().settings
    if request.stream:
        return _event_stream(chat_stream(generation, model, include_usage=request.include_usage(),
                                         heartbeat_seconds=settings.heartbeat_seconds, legacy_functions=plan.legacy,
                                         on_end=_access_logger(200)))
    return _whole_answer(lambda: chat_answer(generation, model, legacy_functions=plan.legacy).model_dump(), generation)


@api.post("/v1/completions")
def completions():
    """Legacy prompt completion, streamed (SSE) or whole."""
    request = parse_body(CompletionRequest, raw_request.get_data(cache=False))
    _log_unknown_fields(request)
    if request.suffix:
        raise APIError("'suffix' (fill-in-the-middle) is not supported by this server.", param="suffix",
                       code="unsupported_parameter")
    served = served_model()
    prompt_text = request.prompt_text()
    if not prompt_text:
        raise APIError("'prompt' must not be empty.", param="prompt", code="invalid_value")
    _refuse_unfittable(len(prompt_text), served)
    with _context_check(served):
        prompt = served.renderer.text_tokens(prompt_text)
    generation = _start(served, request, prompt, request.token_limit())
    model = request.model or served.model_id
    echo = prompt_text if request.echo else ""
    settings = state_of().settings
    if request.stream:
        return _event_stream(text_stream(generation, model, include_usage=request.include_usage(),
                                         heartbeat_seconds=settings.heartbeat_seconds, echo_prefix=echo,
                                         on_end=_access_logger(200)))
    return _whole_answer(lambda: text_answer(generation, model, echo_prefix=echo).model_dump(), generation)


# ---- helpers ---------------------------------------------------------------------------------

def _start(served: ServedModel, request: GenerationRequest, prompt: list[int], limit: int | None, *,
           grammar: CompiledGrammarHandle | None = None, **options) -> Generation:
    info = served.engine.info
    room = info.n_ctx - len(prompt)
    if room < 1:
        raise _context_exceeded(info.n_ctx, f"{len(prompt)} prompt tokens")
    sampling = request.sampling(info.n_vocab, grammar)
    job = Job(prompt=prompt, max_tokens=min(limit or room, room), sampling=sampling)
    client_gone = raw_request.environ.get("waitress.client_disconnected") or (lambda: False)
    return Generation.start(served.engine, job, stops=request.stop_list(), client_gone=client_gone, **options)


def _context_exceeded(n_ctx: int, prompt_size: str) -> APIError:
    return APIError(
        f"This model's maximum context length is {n_ctx} tokens. However, your request has {prompt_size}, "
        f"leaving no room for a completion. Shorten the messages or start the server with a larger --n-ctx.",
        param="messages", code="context_length_exceeded",
    )


def _rendered_characters(request: ChatCompletionRequest) -> int:
    """Characters of everything the chat template renders: texts, names, tool calls and tool definitions."""
    total = 0
    for message in request.messages:
        total += len(message.text()) + len(message.name or "") + len(message.tool_call_id or "")
        total += sum(len(json.dumps(call)) for call in message.tool_calls or [])
        total += len(json.dumps(message.function_call)) if message.function_call else 0
    return total + sum(len(json.dumps(f.parameters)) + len(f.description or "") for f in request.function_definitions())


def _refuse_unfittable(characters: int, served: ServedModel) -> None:
    """Refuse a text that cannot fit before it is rendered and tokenized (which cost memory in proportion)."""
    info = served.engine.info
    # No token is longer than max_token_bytes, and a character is at least one byte.
    fewest_tokens = characters // info.max_token_bytes
    if fewest_tokens >= info.n_ctx:
        raise _context_exceeded(info.n_ctx, f"at least {fewest_tokens} prompt tokens ({characters} characters)")


@contextmanager
def _context_check(served: ServedModel) -> Iterator[None]:
    """Turn a tokenization that overflowed the context into the context_length_exceeded 400."""
    try:
        yield
    except PromptTooLong as error:
        count = f"at least {error.tokens}" if error.at_least else str(error.tokens)
        raise _context_exceeded(served.engine.info.n_ctx, f"{count} prompt tokens") from None


def _log_unknown_fields(request: GenerationRequest) -> None:
    if request.model_extra:
        log.debug("ignoring unknown request fields: %s", log_safe(", ".join(sorted(request.model_extra))))


def _access_logger(status: int) -> Callable[[Outcome], None]:
    defer_access_log()
    request_id, route, started = g.request_id, raw_request.path, time.monotonic()
    metrics = metrics_of()

    def on_end(outcome: Outcome) -> None:
        rate = log_outcome(request_id, route, status, outcome, time.monotonic() - started)
        metrics.observe_generation(outcome.prompt_tokens, outcome.completion_tokens, outcome.first_token_seconds,
                                   rate)

    return on_end


def _event_stream(events: Iterator[bytes]) -> Response:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(events, mimetype="text/event-stream", headers=headers)


def _whole_answer(answer: Callable[[], dict], generation: Generation) -> Response:
    on_end = _access_logger(200)
    try:
        body = answer()
    except ClientGone:
        # Nobody is left to read an answer; the status only shows in our own access log.
        generation.outcome.finish_reason = FinishReason.CANCELLED
        _access_logger(499)(generation.outcome)
        return Response(status=499)
    except APIError:
        on_end(generation.outcome)
        raise
    on_end(generation.outcome)
    return jsonify(body)

