"""`CompiledGrammars`: a schema an application sends with every request is compiled once per vocabulary, and every
job still gets a matcher of its own."""

from __future__ import annotations

import llama_cpp
import pytest

from edge_server.dialects.constraints import schema_grammar
from edge_server.engine.sampler import CompiledGrammars
from edge_server.engine.types import GrammarRejected
from tests.unit.test_dialect_grammars import Vocab


@pytest.fixture(scope="module")
def tiny_vocab(tiny_model):
    loaded = Vocab(tiny_model)
    yield loaded
    llama_cpp.llama_model_free(loaded.model)


def grammar(n: int) -> str:
    return schema_grammar({"type": "object", "properties": {f"field{n}": {"type": "integer"}},
                           "required": [f"field{n}"], "additionalProperties": False}, param="p")


def test_the_same_grammar_is_compiled_once_and_each_job_walks_its_own_matcher(tiny_vocab):
    built = []
    grammars = CompiledGrammars(lambda: built.append(1) or tiny_vocab.tokenizer, capacity=2)
    first = grammars.get(grammar(1))
    assert grammars.get(grammar(1)) is first and len(built) == 1
    one, two = first.take(), first.take()
    assert one.consume_tokens(tiny_vocab.tokens('{"field1":')) and not one.is_accepting()
    assert two.consume_tokens(tiny_vocab.tokens('{"field1":7}')) and two.is_accepting()  # untouched by `one`
    fresh = first.take()
    assert not fresh.consume_tokens(tiny_vocab.tokens('{"field2":'))  # a copy starts at the grammar's start


def test_the_least_recently_used_grammar_goes_first(tiny_vocab):
    built = []
    grammars = CompiledGrammars(lambda: built.append(1) or tiny_vocab.tokenizer, capacity=2)
    first, second = grammars.get(grammar(1)), grammars.get(grammar(2))
    assert grammars.get(grammar(1)) is first  # now the most recent
    grammars.get(grammar(3))  # evicts grammar 2
    assert grammars.get(grammar(1)) is first and len(built) == 3
    assert grammars.get(grammar(2)) is not second and len(built) == 4


def test_a_grammar_that_cannot_compile_is_refused_every_time(tiny_vocab):
    grammars = CompiledGrammars(lambda: tiny_vocab.tokenizer)
    for _ in range(2):
        with pytest.raises(GrammarRejected):
            grammars.get("start: undefined_rule\n")
