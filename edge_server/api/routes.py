"""The HTTP API blueprint: thin views that validate, submit and serialise."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flask import Blueprint, Response, jsonify
from flask import request as raw_request
from pydantic import BaseModel

from edge_server.engine.protocol import CompiledGrammarHandle
from edge_server.engine.types import FinishReason, GrammarRejected, Job, PromptTooLong
from edge_server.api.declaration import Reply, documented
from edge_server.api.docs import CHAT_EVENTS, CHAT_EXAMPLES, COMPLETION_EVENTS, COMPLETION_EXAMPLES
from edge_server.api.errors import APIError
from edge_server.generation.pipeline import ClientGone, Generation
from edge_server.api.observability import Accounting, log_safe
from edge_server.api.serialize import chat_answer, chat_stream, text_answer, text_stream
from edge_server.api.openapi import Health, HealthUnavailable
from edge_server.api.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, GenerationRequest, parse_body
from edge_server.api.schemas import ChatCompletion, ChatCompletionChunk, TextCompletion
from edge_server.api.state import ServedModel, client_gone, state_of
from edge_server.generation.reasoning import ReasoningSplitter, grammar_after_reasoning
from edge_server.api.toolplan import plan_tools
from edge_server.dialects.calls import OPEN_TAG as CALL_OPEN_TAG

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
    _log_unknown_fields(request)
    served = served_model()
    _refuse_unfittable(_rendered_characters(request), served)
    plan = plan_tools(request, served.dialect)
    settings = state_of().settings
    with _context_check(served):
        prompt = served.renderer.chat_prompt(request.messages, tools=plan.template_tools,
                                             template_kwargs=request.template_kwargs(settings.reasoning))
    grammar = None
    if plan.grammar is not None:
        try:
            # A prompt that opened <think> lets the model reason before the constrained answer.
            grammar = served.engine.compile_grammar(
                grammar_after_reasoning(plan.grammar) if prompt.opens_reasoning else plan.grammar)
        except GrammarRejected as error:
            raise APIError(str(error), param="tools" if plan.callable_names else "response_format",
                           code="invalid_grammar") from None
    split_reasoning = served.renderer.thinks and settings.reasoning_format == "separate"
    generation = _start(served, request, prompt.tokens, request.token_limit(), grammar=grammar,
                        extractor=plan.extractor(incremental=request.stream),
                        reasoning=ReasoningSplitter(opened_in_prompt=prompt.opens_reasoning,
                                                    answer_openers=(CALL_OPEN_TAG,) if plan.callable_names else ())
                        if split_reasoning else None,
                        call_finish_reason=FinishReason.FUNCTION_CALL if plan.legacy else FinishReason.TOOL_CALLS)
    model, account = request.model or served.model_id, Accounting()
    if request.stream:
        return _event_stream(chat_stream(generation, model, account, include_usage=request.include_usage(),
                                         heartbeat_seconds=settings.heartbeat_seconds, legacy_functions=plan.legacy))
    return _whole_answer(lambda: chat_answer(generation, model, account, legacy_functions=plan.legacy))


@api.post("/v1/completions")
@documented("createCompletion", "generation", "Legacy prompt completion", {200: Reply(
    "The answer: `application/json` (`text_completion`), or `text/event-stream` when `stream` is true.",
    TextCompletion, stream=TextCompletion, events=COMPLETION_EVENTS)},
    body=CompletionRequest, examples=COMPLETION_EXAMPLES, errors=(429, 503))
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
    model, account = request.model or served.model_id, Accounting()
    echo = prompt_text if request.echo else ""
    settings = state_of().settings
    if request.stream:
        return _event_stream(text_stream(generation, model, account, include_usage=request.include_usage(),
                                         heartbeat_seconds=settings.heartbeat_seconds, echo_prefix=echo))
    return _whole_answer(lambda: text_answer(generation, model, account, echo_prefix=echo))


# ---- helpers ---------------------------------------------------------------------------------

def _start(served: ServedModel, request: GenerationRequest, prompt: list[int], limit: int | None, *,
           grammar: CompiledGrammarHandle | None = None, **options) -> Generation:
    info = served.engine.info
    room = info.n_ctx - len(prompt)
    if room < 1:
        raise _context_exceeded(info.n_ctx, f"{len(prompt)} prompt tokens")
    sampling = request.sampling(info.n_vocab, grammar)
    job = Job(prompt=prompt, max_tokens=min(limit or room, room), sampling=sampling)
    return Generation.start(served.engine, job, stops=request.stop_list(), client_gone=client_gone(), **options)


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
        total += len(message.reasoning_content or message.reasoning or "")
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


def _event_stream(events: Iterator[bytes]) -> Response:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(events, mimetype="text/event-stream", headers=headers)


def _whole_answer(answer: Callable[[], BaseModel]) -> Response:
    try:
        return jsonify(answer().model_dump())
    except ClientGone:
        # Nobody is left to read an answer; the status only shows in our own access log.
        return Response(status=499)

