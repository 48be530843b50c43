"""Token utilities: `POST /tokenize` (a text, or chat messages through the template) and `POST /detokenize`,
in llama-server's and vLLM's shape, so a client can count tokens before it sends a request."""

from __future__ import annotations

from flask import Blueprint
from flask import request as raw_request
from pydantic import BaseModel, Field, model_validator

from edge_server.api.declaration import Reply, documented
from edge_server.api.errors import APIError
from edge_server.api.schemas import (MAX_TOOLS, ChatMessage, ReasoningEffort, RequestModel, TemplateKwargs,
                                     ToolDefinition, parse_body, template_variables)
from edge_server.api.state import state_of
from edge_server.api.submit import chat_images, context_check, image_check, refuse_unfittable, served_model

IMAGE_TOKEN = -1  # how an image's token is shown: it has no id in the vocabulary

tokens_api = Blueprint("tokens", __name__)


class TokenizeRequest(RequestModel):
    """Body of POST /tokenize: `content` (a text as is) or `messages` (+ `tools`) rendered by the chat template."""

    model: str | None = None
    content: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS)
    chat_template_kwargs: TemplateKwargs | None = None
    reasoning_effort: ReasoningEffort | None = None
    add_special: bool = Field(False, description="add the model's BOS token to `content` if it uses one")
    with_pieces: bool = Field(False, description="each token as {id, piece} instead of its id")

    @model_validator(mode="after")
    def _one_source(self) -> TokenizeRequest:
        if (self.content is None) == (self.messages is None):
            raise ValueError("send either 'content' or 'messages'")
        return self


class TokenPiece(BaseModel):
    """One token with its text (a list of byte values when it is not whole UTF-8 on its own; null for an
    image's token, whose id is -1)."""

    id: int
    piece: str | list[int] | None


class TokenizeResponse(BaseModel):
    """The tokens (an image's tokens as -1 each), how many, and the context a request may fill."""

    tokens: list[int] | list[TokenPiece]
    count: int
    max_model_len: int


class DetokenizeRequest(RequestModel):
    """Body of POST /detokenize."""

    model: str | None = None
    tokens: list[int] = Field(min_length=0)


class DetokenizeResponse(BaseModel):
    """The text the tokens stand for (bytes that are not UTF-8 become U+FFFD)."""

    content: str


@tokens_api.post("/tokenize")
@documented("tokenize", "tokens", "Tokens of a text or of chat messages rendered by the chat template",
            {200: Reply("The tokens.", TokenizeResponse)}, body=TokenizeRequest, errors=(503,))
def tokenize():
    """Tokenize `content` as is, or `messages` exactly as a chat request would be rendered (images included)."""
    request = parse_body(TokenizeRequest, raw_request.get_data(cache=False))
    served = served_model(request.model)
    engine = served.engine
    if request.messages is not None:
        template_tools = [{"type": "function", "function": t.function.model_dump(exclude_none=True)}
                          for t in request.tools or []] or None
        variables = template_variables(state_of().settings.reasoning, request.reasoning_effort,
                                       request.chat_template_kwargs)
        refuse_unfittable(sum(len(m.text()) for m in request.messages), served)
        images = chat_images(request.messages, served)
        with context_check(served), image_check():
            prompt = served.renderer.chat_prompt(request.messages, tools=template_tools, template_kwargs=variables,
                                                 images=images, encode=False)
        ids = [IMAGE_TOKEN if token < 0 else token for token in prompt.tokens]
    else:
        refuse_unfittable(len(request.content), served)
        with context_check(served):
            ids = engine.tokenize(request.content.encode("utf-8"), request.add_special and engine.info.add_bos, True,
                                  max_tokens=engine.info.n_ctx)
    tokens: list[int] | list[TokenPiece] = ids
    if request.with_pieces:
        tokens = [TokenPiece(id=token, piece=None if token == IMAGE_TOKEN else _piece_text(engine.detokenize([token])))
                  for token in ids]
    return TokenizeResponse(tokens=tokens, count=len(ids), max_model_len=engine.info.n_ctx).model_dump()


@tokens_api.post("/detokenize")
@documented("detokenize", "tokens", "The text of token ids", {200: Reply("The text.", DetokenizeResponse)},
            body=DetokenizeRequest, errors=(503,))
def detokenize():
    """The text token ids stand for, special tokens written out."""
    request = parse_body(DetokenizeRequest, raw_request.get_data(cache=False))
    engine = served_model(request.model).engine
    n_vocab = engine.info.n_vocab
    bad = next((i for i, token in enumerate(request.tokens) if not 0 <= token < n_vocab), None)
    if bad is not None:
        raise APIError(f"tokens[{bad}] = {request.tokens[bad]} is not a token id of this model (0..{n_vocab - 1}).",
                       param=f"tokens.{bad}", code="invalid_value")
    text = engine.detokenize(request.tokens).decode("utf-8", errors="replace") if request.tokens else ""
    return DetokenizeResponse(content=text).model_dump()


def _piece_text(piece: bytes) -> str | list[int]:
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return list(piece)
