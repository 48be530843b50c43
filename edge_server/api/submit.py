"""Request -> running generation: the one path every generation endpoint submits through (chat, legacy
completions, and the APIs translated onto chat), with its context, template and grammar refusals."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from flask import Response, g, jsonify
from pydantic import BaseModel

from edge_server.api.errors import APIError
from edge_server.api.imagefetch import ImageFetcher, parse_networks
from edge_server.api.images import MAX_IMAGE_BYTES, decode_images, find_images
from edge_server.api.observability import log_safe
from edge_server.api.schemas import ChatCompletionRequest, ChatMessage, GenerationRequest
from edge_server.api.registry import ModelRegistry
from edge_server.api.state import ServedModel, client_gone, state_of
from edge_server.api.toolplan import ToolPlan, plan_tools
from edge_server.dialects.calls import OPEN_TAG as CALL_OPEN_TAG
from edge_server.dialects.constraints import after_reasoning
from edge_server.engine.protocol import CompiledGrammarHandle
from edge_server.engine.types import (FinishReason, GrammarRejected, ImageChunk, ImageInput, ImageRefused, Job,
                                      PromptTooLong, ReasoningBudget, RequestTooLarge)
from edge_server.generation.pipeline import ClientGone, Generation
from edge_server.generation.prompt import ChatPrompt
from edge_server.generation.reasoning import CLOSE_TAG, OPEN_TAG, ReasoningSplitter

log = logging.getLogger("edge_server")


def serving_registry() -> ModelRegistry:
    """The configured models, or the 503 while the server resolves them or shuts down (nothing is loaded)."""
    state = state_of()
    if state.shutting_down:
        raise APIError("The server is shutting down; retry against its next start.", status=503,
                       code="shutting_down", headers={"Retry-After": "5"})
    if state.registry is None:
        raise APIError("The model is still loading; retry shortly (GET /health turns 200 when ready).",
                       status=503, code="model_loading", headers={"Retry-After": "2"})
    return state.registry


def served_model(name: str | None = None, *, role: str | None = None) -> ServedModel:
    """The model a request names (loaded on first use), or the API's 404 for an unknown one, 400 for one
    of the wrong `role`, 503 while loading or shutting down."""
    registry = serving_registry()
    spec = registry.spec(registry.entry_id(name))
    if role is not None and spec.role != role:
        raise APIError(f"The model '{spec.id}' is for {spec.role}; this endpoint needs a {role} model.",
                       param="model", code="wrong_model_type")
    served = registry.get(name)
    g.setdefault("borrowed_models", []).append(served)  # held until the request ends (`give_back_models`)
    return served


def give_back_models(error: BaseException | None = None) -> None:
    """Teardown of every request: the models it was lent may be unloaded again. By then its jobs are in the
    engine (a streamed answer only reads their token streams), which keeps the model busy while they run."""
    registry = state_of().registry
    for served in g.pop("borrowed_models", ()):
        registry.give_back(served)


@dataclass
class ChatRun:
    """A submitted chat request: a generation per choice (`n`), the tool plan they run under, and the model
    name to answer with."""

    generations: list[Generation]
    plan: ToolPlan
    model: str
    fingerprint: str

    @property
    def generation(self) -> Generation:
        """The first (for APIs with one choice, the only) generation."""
        return self.generations[0]


@dataclass
class RenderedChat:
    """A chat request rendered for its model: the model, the tool plan, the prompt."""

    served: ServedModel
    plan: ToolPlan
    prompt: ChatPrompt


def render_chat(request: ChatCompletionRequest, *, encode: bool = True) -> RenderedChat:
    """Pick the model, plan tools and render the prompt; raises the API's 4xx/503 errors (nothing is generated).
    Without `encode` images are counted, not encoded (a prompt to count)."""
    log_unknown_fields(request)
    served = served_model(request.model, role="chat")
    refuse_unfittable(rendered_characters(request), served)
    plan = plan_tools(request, served.dialect)
    images = chat_images(request.messages, served)
    with context_check(served), image_check():
        prompt = served.renderer.chat_prompt(request.messages, tools=plan.template_tools,
                                             template_kwargs=request.template_kwargs(state_of().settings.reasoning),
                                             images=images, encode=encode)
    return RenderedChat(served, plan, prompt)


def chat_images(messages: Sequence[ChatMessage], served: ServedModel) -> list[ImageInput]:
    """The messages' images, fetched (with --allow-image-urls), decoded and checked; a 400 when there are any
    and the model cannot see them."""
    found = find_images(messages)
    if found and not served.engine.info.vision:
        raise APIError(f"The model '{served.model_id}' cannot see images: it was started without a projector "
                       f"(--mmproj). Send text only, or ask a model whose /v1/models meta says vision.",
                       param=found[0][0], code="model_not_multimodal")
    return decode_images(found, image_fetcher())


def image_fetcher() -> ImageFetcher | None:
    """What fetches image URLs on this request's thread, or None without --allow-image-urls."""
    settings = state_of().settings
    if not settings.allow_image_urls:
        return None
    return ImageFetcher(max_bytes=MAX_IMAGE_BYTES, timeout=settings.image_url_timeout,
                        allowed_networks=parse_networks(settings.image_url_networks))


@contextmanager
def image_check() -> Iterator[None]:
    """Turn an image the projector refused into a 400."""
    try:
        yield
    except ImageRefused as error:
        raise APIError(f"The model's projector cannot take this request's images: {error}.", param="messages",
                       code="invalid_image") from None


def start_chat(request: ChatCompletionRequest, *, reasoning_budget: int | None = None) -> ChatRun:
    """Render, compile the grammar and submit `request`; raises the API's 4xx/429/503 errors.
    `reasoning_budget`: the thinking block is closed after that many tokens (Anthropic's `budget_tokens`)."""
    served, plan, prompt = (rendered := render_chat(request)).served, rendered.plan, rendered.prompt
    settings = state_of().settings
    grammar = None
    if plan.grammar is not None:
        # A prompt that opened <think> lets the model reason before the constrained answer.
        grammar = compiled_grammar(served, after_reasoning(plan.grammar) if prompt.opens_reasoning else plan.grammar,
                                   param=plan.grammar_param)
    split_reasoning = served.renderer.thinks and settings.reasoning_format == "separate"

    def choice_options() -> dict:  # each choice reads its own output
        return {"extractor": plan.extractor(incremental=request.stream),
                "reasoning": ReasoningSplitter(opened_in_prompt=prompt.opens_reasoning,
                                               answer_openers=(CALL_OPEN_TAG,) if plan.callable_names else ())
                if split_reasoning else None,
                "call_finish_reason": FinishReason.FUNCTION_CALL if plan.legacy else FinishReason.TOOL_CALLS}

    budget = thinking_budget(served, reasoning_budget, opened=prompt.opens_reasoning,
                             answer_openers=(CALL_OPEN_TAG,) if plan.callable_names else ())
    generations = start_generations(served, request, [prompt.tokens], request.token_limit(), grammar=grammar,
                                    options=choice_options, budget=budget,
                                    images=prompt.images)
    return ChatRun(generations, plan, request.model or served.model_id, served.fingerprint)


def compiled_grammar(served: ServedModel, grammar: str, *, param: str) -> CompiledGrammarHandle:
    """`grammar` compiled for the served model's vocabulary (on this thread); a 400 naming `param` if it cannot be."""
    try:
        return served.engine.compile_grammar(grammar)
    except GrammarRejected as error:
        raise APIError(str(error), param=param, code="invalid_grammar") from None


def thinking_budget(served: ServedModel, tokens: int | None, *, opened: bool,
                    answer_openers: tuple[str, ...]) -> ReasoningBudget | None:
    """The sampler's thinking budget for a model whose template thinks, or None (no budget, or no thinking)."""
    if tokens is None or not served.renderer.thinks:
        return None

    def ids(text: str) -> tuple[int, ...]:
        return tuple(served.engine.tokenize(text.encode(), False, True))

    def single(tag: str) -> int:  # the tag's token, where it is one (-1 never matches)
        found = ids(tag)
        return found[0] if len(found) == 1 else -1

    ends = tuple(token for token in map(single, (CLOSE_TAG, *answer_openers)) if token >= 0)
    return ReasoningBudget(tokens=tokens, opened=opened, open=single(OPEN_TAG), ends=ends,
                           close=ids(f"\n{CLOSE_TAG}\n\n"))


def start_generations(served: ServedModel, request: GenerationRequest, prompts: list[list[int]], limit: int | None, *,
                      grammar: CompiledGrammarHandle | None = None, options: Callable[[], dict] = dict,
                      budget: ReasoningBudget | None = None,
                      images: tuple[ImageChunk, ...] = ()) -> list[Generation]:
    """Submit `request.n` choices of every prompt (choice i samples with seed + i when a seed is given);
    none is left running when one cannot be submitted. `n` above `--parallel` is a 400."""
    parallel = served.engine.parallel
    if request.n > parallel:
        raise APIError(f"n={request.n} is more than the {parallel} requests this server decodes together "
                       f"(--parallel); ask for at most {parallel} choices.", param="n", code="invalid_value")
    generations: list[Generation] = []
    group = len(prompts) * request.n
    try:
        for prompt in prompts:
            for choice in range(request.n):
                seed = None if request.seed is None else (request.seed + choice) % 2**64
                generations.append(start_generation(served, request, prompt, limit, grammar=grammar, seed=seed,
                                                    budget=budget, group=group, images=images,
                                                    **options()))
    except RequestTooLarge as error:
        for generation in generations:
            generation.cancel()
        raise APIError(f"This request asks for {group} generations ({len(prompts)} prompts x n={request.n}), more "
                       f"than this server can ever hold at once: {error.limit} (--parallel {parallel} + --max-queue "
                       f"{error.limit - parallel}). Send at most {error.limit} per request.", param="prompt",
                       code="request_too_large") from None
    except BaseException:
        for generation in generations:
            generation.cancel()
        raise
    return generations


def start_generation(served: ServedModel, request: GenerationRequest, prompt: list[int], limit: int | None, *,
                     grammar: CompiledGrammarHandle | None = None, seed: int | None = None,
                     budget: ReasoningBudget | None = None, group: int = 1,
                     images: tuple[ImageChunk, ...] = (), **options) -> Generation:
    """Submit prompt tokens with the request's sampling (`seed` for this choice), limited to what the context
    leaves and to the server's --n-predict (without a limit of the request's own) and --n-predict-max; `group`:
    the jobs the request submits together."""
    info = served.engine.info
    room = info.n_ctx - len(prompt)
    if room < 1:
        raise context_exceeded(info.n_ctx, f"{len(prompt)} prompt tokens")
    sampling = dataclasses.replace(request.sampling(info.n_vocab, grammar), seed=seed, reasoning_budget=budget)
    job = Job(prompt=prompt, max_tokens=output_limit(limit, room), sampling=sampling,
              speculative=request.speculative, group=group, images=images)
    return Generation.start(served.engine, job, stops=request.stop_list(), client_gone=client_gone(), **options)


def output_limit(requested: int | None, room: int) -> int:
    """The tokens a generation may write: the request's limit, else --n-predict; at most --n-predict-max and
    what the context leaves (a larger limit is clamped: the answer ends with finish_reason length)."""
    settings = state_of().settings
    limit = requested or (settings.n_predict if settings.n_predict > 0 else room)
    if settings.n_predict_max > 0:
        limit = min(limit, settings.n_predict_max)
    return min(limit, room)


def context_exceeded(n_ctx: int, prompt_size: str) -> APIError:
    """The context_length_exceeded 400."""
    return APIError(
        f"This model's maximum context length is {n_ctx} tokens. However, your request has {prompt_size}, "
        f"leaving no room for a completion. Shorten the messages or start the server with a larger --n-ctx.",
        param="messages", code="context_length_exceeded",
    )


def rendered_characters(request: ChatCompletionRequest) -> int:
    """Characters of everything the chat template renders: texts, names, tool calls and tool definitions."""
    total = 0
    for message in request.messages:
        total += len(message.text()) + len(message.name or "") + len(message.tool_call_id or "")
        total += len(message.reasoning_content or message.reasoning or "")
        total += sum(len(json.dumps(call)) for call in message.tool_calls or [])
        total += len(json.dumps(message.function_call)) if message.function_call else 0
    return total + sum(len(json.dumps(f.parameters)) + len(f.description or "") for f in request.function_definitions())


def refuse_unfittable(characters: int, served: ServedModel) -> None:
    """Refuse a text that cannot fit before it is rendered and tokenized (which cost memory in proportion)."""
    info = served.engine.info
    # No token is longer than max_token_bytes, and a character is at least one byte.
    fewest_tokens = characters // info.max_token_bytes
    if fewest_tokens >= info.n_ctx:
        raise context_exceeded(info.n_ctx, f"at least {fewest_tokens} prompt tokens ({characters} characters)")


@contextmanager
def context_check(served: ServedModel) -> Iterator[None]:
    """Turn a tokenization that overflowed the context into the context_length_exceeded 400."""
    try:
        yield
    except PromptTooLong as error:
        count = f"at least {error.tokens}" if error.at_least else str(error.tokens)
        raise context_exceeded(served.engine.info.n_ctx, f"{count} prompt tokens") from None


def log_unknown_fields(request: BaseModel) -> None:
    """Debug-log the fields a request carried that this server ignores."""
    if request.model_extra:
        log.debug("ignoring unknown request fields: %s", log_safe(", ".join(sorted(request.model_extra))))


def event_stream(events: Iterator[bytes]) -> Response:
    """A streamed `text/event-stream` response that proxies must not buffer."""
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(events, mimetype="text/event-stream", headers=headers)


def whole_answer(answer: Callable[[], BaseModel]) -> Response:
    """The JSON of a whole answer, or a bare 499 when the client left before it was ready."""
    try:
        return jsonify(answer().model_dump())
    except ClientGone:
        # Nobody is left to read an answer; the status only shows in our own access log.
        return Response(status=499)
