"""Messages (+ tools) -> prompt tokens through the model's own GGUF chat template."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import jinja2
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from edge_server.engine.chat_templates import ChatTemplate, apply_builtin_template
from edge_server.engine.types import ImageChunk, ImageInput
from edge_server.generation.reasoning import prompt_opens_reasoning, template_thinks


# Used only when a GGUF carries no template: Qwen models speak ChatML.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

if TYPE_CHECKING:
    from edge_server.api.schemas import ChatMessage

Tokenize = Callable[[bytes, bool, bool], list[int]]
log = logging.getLogger("edge_server")


class TokenizeImages(Protocol):
    """(text with IMAGE_MARKERs, add_bos, images) -> tokens with image placeholders, and the images' chunks
    (their embeddings too unless `encode` is False)."""

    def __call__(self, text: bytes, add_bos: bool, images: Sequence[ImageInput], *,
                 encode: bool = True) -> tuple[list[int], tuple[ImageChunk, ...]]: ...


def template_message(message: ChatMessage) -> dict[str, Any]:
    """The dict a Hugging Face style chat template expects for one message."""
    # Templates know system/user/assistant/tool: the newer "developer" and the legacy "function" map onto them.
    role = {"developer": "system", "function": "tool"}.get(message.role, message.role)
    rendered: dict[str, Any] = {"role": role, "content": message.text()}
    if message.name is not None:
        rendered["name"] = message.name
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    reasoning = message.reasoning_content if message.reasoning_content is not None else message.reasoning
    if reasoning is not None:
        rendered["reasoning_content"] = reasoning  # Qwen3 / Qwen3.5 templates read this name
    calls = message.tool_calls or ([{"type": "function", "function": message.function_call}] if message.function_call else [])
    if calls and message.role == "assistant":  # only an assistant's calls are checked, and templates render no others
        rendered["tool_calls"] = [_with_parsed_arguments(call) for call in calls]
    return rendered


def _with_parsed_arguments(call: dict[str, Any]) -> dict[str, Any]:
    # Clients send arguments as a JSON string; templates render them with tojson (which would encode
    # twice) or iterate them with `|items` (Qwen3-Coder, Qwen3.5): they need the mapping.
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except (json.JSONDecodeError, RecursionError):  # not JSON, or nested too deep to render: keep the text
            pass
    return {**call, "function": function}


def merged_system_messages(rendered: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Template messages with every system message's text joined, in order, into one leading system message."""
    system = [m["content"] for m in rendered if m["role"] == "system" and m["content"]]
    others = [m for m in rendered if m["role"] != "system"]
    return ([{"role": "system", "content": "\n\n".join(system)}] if system else []) + others


def _shown(content: str, text: str) -> bool:
    return content.strip() in text


class TemplateRefused(ValueError):
    """The model's chat template raised on these messages (a client error: the conversation's shape)."""


# Variables the renderer itself sets: a request's chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_VARIABLES = frozenset({
    "messages", "tools", "functions", "tool_choice", "function_call", "add_generation_prompt",
    "bos_token", "eos_token", "raise_exception", "strftime_now",
})


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered conversation: its text, its tokens, and whether it ends inside a `<think>` block."""

    text: str
    tokens: list[int]
    opens_reasoning: bool
    images: tuple[ImageChunk, ...] = ()  # where `tokens` holds images (placeholders) and their embeddings


class PromptRenderer:
    """Render conversations with the model's chat template and tokenize them."""

    def __init__(self, template: ChatTemplate | str | None, *, bos_token: str, eos_token: str, add_bos: bool,
                 tokenize: Tokenize, tokenize_images: TokenizeImages | None = None):
        if not isinstance(template, ChatTemplate):
            template = ChatTemplate(label="gguf", jinja=template) if template else ChatTemplate(label="chatml-fallback")
        self.template = template
        self.has_own_template = template.label == "gguf"
        # The template text in use: dialects (tool calls, thinking) are read from it.
        self.template_source = template.jinja or ("" if template.builtin else CHATML_TEMPLATE)
        self.thinks = template_thinks(self.template_source)
        self._formatter = Jinja2ChatFormatter(
            template=template.jinja or CHATML_TEMPLATE, eos_token=eos_token, bos_token=bos_token
        )
        self._add_bos = add_bos
        self._tokenize = tokenize
        self._tokenize_images = tokenize_images  # a model with a projector: prompts with images

    def chat_text(self, messages: Sequence[ChatMessage], tools: list[dict[str, Any]] | None = None,
                  template_kwargs: Mapping[str, Any] | None = None) -> str:
        """The prompt text for a conversation, ending with the assistant's generation prompt.

        System messages after the first message are rendered where they stand when the template renders
        them there; a template that refuses them or leaves them out gets them merged into the leading
        system message instead, so no instruction is ever dropped."""
        rendered = [template_message(m) for m in messages]
        late = [i for i, m in enumerate(rendered) if i > 0 and m["role"] == "system"]
        if not late:
            return self._render(rendered, tools, template_kwargs)
        try:
            text = self._render(rendered, tools, template_kwargs)
        except TemplateRefused:
            text = None
        if text is not None and all(_shown(rendered[i]["content"], text) for i in late):
            return text
        log.debug("the chat template does not render system messages after the first: merged into the system prompt")
        return self._render(merged_system_messages(rendered), tools, template_kwargs)

    def _render(self, rendered: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                template_kwargs: Mapping[str, Any] | None) -> str:
        try:
            if self.template.builtin is not None:
                # llama.cpp's built-in templates know roles and texts only.
                return apply_builtin_template(self.template.builtin, [
                    {"role": m["role"], "content": m["content"]} for m in rendered])
            return self._formatter(messages=rendered, tools=tools, **dict(template_kwargs or {})).prompt
        except (jinja2.TemplateError, ValueError, TypeError, RecursionError) as error:
            raise TemplateRefused(f"The model's chat template rejected these messages: {error}") from None

    def chat_prompt(self, messages: Sequence[ChatMessage], tools: list[dict[str, Any]] | None = None,
                    template_kwargs: Mapping[str, Any] | None = None, *,
                    images: Sequence[ImageInput] = (), encode: bool = True) -> ChatPrompt:
        """The rendered and tokenized prompt (control tokens of the template parsed as such), with `images`
        where the messages' image parts put them (a model with a projector only); without `encode`, only their
        tokens are counted (no embeddings: a prompt to count, not to run)."""
        text = self.chat_text(messages, tools, template_kwargs)
        # The template already wrote any BOS it wants; adding one again would double it.
        add_bos = self._add_bos and not self._starts_with_bos(text)
        if images:
            tokens, chunks = self._tokenize_images(text.encode("utf-8"), add_bos, images, encode=encode)
            return ChatPrompt(text, tokens, self.thinks and prompt_opens_reasoning(text), chunks)
        tokens = self._tokenize(text.encode("utf-8"), add_bos, True)
        return ChatPrompt(text, tokens, self.thinks and prompt_opens_reasoning(text))

    def chat_tokens(self, messages: Sequence[ChatMessage], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Prompt tokens for a conversation."""
        return self.chat_prompt(messages, tools).tokens

    def text_tokens(self, prompt: str) -> list[int]:
        """Prompt tokens for a legacy completion: the text as is, control tokens included."""
        return self._tokenize(prompt.encode("utf-8"), self._add_bos, True)

    def _starts_with_bos(self, text: str) -> bool:
        bos = self._formatter.bos_token
        return bool(bos) and text.startswith(bos)
