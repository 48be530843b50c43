"""The tool-call dialect interface, and which dialect a chat template speaks (pure).

A dialect is one module of this package with a module-level `DIALECT` (a `ToolDialect`): adding a
dialect is adding that module, nothing else. `detect_dialect` reads the chat template's text (never
the file name) and picks the matching dialect of highest `priority`; Hermes matches everything at
priority 0, so it is the fallback.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_server.dialects.calls import CallExtractor, Functions

Signatures = list[tuple[str, "dict[str, Any] | None"]]  # (function name, parameters schema), in request order


@dataclass(frozen=True, repr=False)
class ToolDialect:
    """How one model family writes tool calls: reading them from the output, and forcing them by grammar."""

    name: str
    priority: int  # the highest-priority dialect whose `matches` holds is chosen
    matches: Callable[[str], bool]  # whether a chat template with this text asks for this dialect's calls
    extractor_type: Callable[..., CallExtractor]  # (functions, *, max_calls, incremental)
    grammar: Callable[..., str]  # (signatures, *, several, param, answer)

    def extractor(self, functions: Functions, *, max_calls: int | None, incremental: bool) -> CallExtractor:
        """A fresh streaming extractor for calls to `functions` (name -> parameters schema)."""
        return self.extractor_type(functions, max_calls=max_calls, incremental=incremental)

    def call_grammar(self, signatures: Signatures, *, several: bool, param: str,
                     answer: tuple[dict[str, Any], str] | None = None) -> str:
        """An llguidance grammar for calls in this dialect to one of `signatures` (several in a row with `several`).

        Every schema is checked against `schemalimits` first (`SchemaRefused` names `param`). With
        `answer` (a schema and the request field it came from) the output may instead be one JSON
        value of that schema (tools in `auto` mode beside a structured answer).
        """
        return self.grammar(signatures, several=several, param=param, answer=answer)

    def __repr__(self) -> str:
        return f"<tool dialect {self.name}>"


@functools.lru_cache(maxsize=16)
def detect_dialect(template_source: str) -> ToolDialect:
    """The dialect the chat template `template_source` asks the model to write its calls in."""
    return max((d for d in all_dialects() if d.matches(template_source)), key=lambda d: d.priority)


@functools.cache
def all_dialects() -> tuple[ToolDialect, ...]:
    """Every dialect module's `DIALECT`, by priority (highest first)."""
    package = importlib.import_module(__package__)
    found = []
    for module in pkgutil.iter_modules(package.__path__):
        dialect = getattr(importlib.import_module(f"{__package__}.{module.name}"), "DIALECT", None)
        if isinstance(dialect, ToolDialect):
            found.append(dialect)
    return tuple(sorted(found, key=lambda d: -d.priority))
