"""llama.cpp's built-in chat templates (C++ code, not Jinja), for GGUFs that carry no template of their own."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

# GGUF `general.architecture` -> the built-in template that family was trained with. Only families
# whose architecture alone decides it ("llama", Llama 2 or 3, is told apart by its vocabulary);
# Qwen and the rest speak ChatML, the fallback.
_ARCHITECTURE_TEMPLATES = {
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma",
    "phi3": "phi3", "phi4": "phi4", "command-r": "command-r", "cohere2": "command-r",
    "granite": "granite", "exaone": "exaone3", "exaone4": "exaone4", "chatglm": "chatglm4",
    "minicpm": "minicpm", "deepseek2": "deepseek2",
}
_LLAMA3_VOCAB = 128256


@dataclass(frozen=True)
class ChatTemplate:
    """The template a model's chats are rendered with: Jinja source, or the name of a built-in one."""

    label: str  # what /v1/models and the start-up line show: gguf, file:NAME, builtin:NAME, chatml-fallback
    jinja: str | None = None
    builtin: str | None = None


def template_override(value: str) -> ChatTemplate:
    """`--chat-template NAME|FILE`: a Jinja file, or a llama.cpp built-in name; ValueError otherwise."""
    path = Path(value).expanduser()
    if path.is_file():
        try:
            return ChatTemplate(label=f"file:{path.name}", jinja=path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read the chat template file {value}: {error}") from None
    if value in builtin_template_names():
        return ChatTemplate(label=f"builtin:{value}", builtin=value)
    raise ValueError(f"{value!r} is neither a template file nor a llama.cpp built-in template "
                     f"({', '.join(builtin_template_names())})")


def choose_chat_template(gguf_template: str | None, *, architecture: str, n_vocab: int,
                         override: ChatTemplate | None = None) -> ChatTemplate:
    """The override, else the GGUF's own template, else the architecture's built-in, else ChatML."""
    if override is not None:
        return override
    if gguf_template:
        return ChatTemplate(label="gguf", jinja=gguf_template)
    builtin = builtin_template_for(architecture, n_vocab)
    if builtin is not None:
        return ChatTemplate(label=f"builtin:{builtin}", builtin=builtin)
    return ChatTemplate(label="chatml-fallback")


@functools.cache
def builtin_template_names() -> tuple[str, ...]:
    """The names llama.cpp's `llama_chat_apply_template` knows."""
    count = llama_cpp.llama_chat_builtin_templates((ctypes.c_char_p * 0)(), 0)
    names = (ctypes.c_char_p * count)()
    llama_cpp.llama_chat_builtin_templates(names, count)
    return tuple(name.decode() for name in names)


def builtin_template_for(architecture: str, n_vocab: int) -> str | None:
    """The built-in template matching a model's architecture, or None when llama.cpp has none for it."""
    if architecture == "llama":  # Llama 3's vocabulary tells it apart; other llama-shaped models vary
        name = "llama3" if n_vocab == _LLAMA3_VOCAB else None
    else:
        name = _ARCHITECTURE_TEMPLATES.get(architecture)
    return name if name in builtin_template_names() else None


def apply_builtin_template(name: str, messages: Sequence[Mapping[str, str]], *, add_assistant: bool = True) -> str:
    """Render role/content messages with the built-in template `name`; ValueError when llama.cpp refuses."""
    encoded = [(m["role"].encode("utf-8"), m["content"].encode("utf-8")) for m in messages]
    chat = (llama_cpp.llama_chat_message * len(encoded))(
        *(llama_cpp.llama_chat_message(role=role, content=content) for role, content in encoded)
    )
    size = 2 * sum(len(role) + len(content) for role, content in encoded) + 1024
    while True:
        buffer = ctypes.create_string_buffer(size)
        needed = llama_cpp.llama_chat_apply_template(name.encode(), chat, len(encoded), add_assistant, buffer, size)
        if needed < 0:
            raise ValueError(f"llama.cpp's built-in template {name!r} cannot render these messages")
        if needed <= size:
            return buffer.raw[:needed].decode("utf-8", errors="replace")
        size = needed
