"""The `<think>` splitter: whole and in every chunking, tags never leak, whitespace trimmed as templates do."""

from __future__ import annotations

import random

import pytest

from edge_server.generation.reasoning import ReasoningSplitter, prompt_opens_reasoning, template_thinks


def split(chunks: list[str], *, opened: bool) -> tuple[str, str, list[tuple[str, str]]]:
    splitter = ReasoningSplitter(opened_in_prompt=opened)
    pieces = [splitter.push(chunk) for chunk in chunks] + [splitter.finish()]
    return "".join(r for r, _ in pieces), "".join(a for _, a in pieces), pieces


def chunkings(text: str, seed: int = 0):
    yield [text]
    yield list(text)
    rng = random.Random(seed)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


CASES = [
    # (output text, opened in prompt, reasoning, answer)
    ("<think>\nLet me see.\n</think>\n\nParis.", False, "Let me see.", "Paris."),
    ("Let me see.\n</think>\n\nParis.", True, "Let me see.", "Paris."),
    ("\n\nParis.", False, "", "\n\nParis."),  # no block: the answer keeps its text as is
    ("Paris.", False, "", "Paris."),
    ("<thinking> is a tag.", False, "", "<thinking> is a tag."),
    ("<thin", False, "", "<thin"),
    ("<think>\n\n</think>\n\nParis.", False, "", "Paris."),
    ("I think a < b and </thin k.\n</think>A", True, "I think a < b and </thin k.", "A"),
    ("Still thinking at the limit </thi", True, "Still thinking at the limit", ""),  # cut while writing the tag
    ("Paris. <think>not a block</think>", False, "", "Paris. <think>not a block</think>"),
    ("<think>a</think>b</think>c", False, "a", "b</think>c"),
    ("  two  spaces  \n</think>  answer  ", True, "two  spaces", "answer  "),
]


@pytest.mark.parametrize("text,opened,reasoning,answer", CASES)
def test_split_is_the_same_in_every_chunking(text, opened, reasoning, answer):
    for chunks in chunkings(text):
        got_reasoning, got_answer, _ = split(chunks, opened=opened)
        assert (got_reasoning, got_answer) == (reasoning, answer), chunks


@pytest.mark.parametrize("text,opened,reasoning,answer", CASES)
def test_no_tag_fragment_is_released_early(text, opened, reasoning, answer):
    """Every release is final: the answer released so far is always a prefix of the whole answer."""
    for chunks in chunkings(text, seed=1):
        _, _, pieces = split(chunks, opened=opened)
        released_answer = released_reasoning = ""
        for thought, words in pieces:
            released_reasoning += thought
            released_answer += words
            assert answer.startswith(released_answer)
            assert reasoning.startswith(released_reasoning)


def test_reasoning_streams_before_the_block_ends():
    splitter = ReasoningSplitter(opened_in_prompt=True)
    assert splitter.push("First step") == ("First step", "")
    assert splitter.push(", second step.\n") == (", second step.", "")
    assert splitter.in_block and splitter.reasoned
    assert splitter.push("</think>\n\nDone") == ("", "Done")
    assert not splitter.in_block and splitter.reasoned


def test_prompt_opens_reasoning_reads_the_rendered_prompt():
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")


def test_template_thinks():
    assert template_thinks("{{ '<think>\\n' }}")
    assert not template_thinks("{{ '<|im_start|>assistant\\n' }}")


def test_a_tool_call_opener_ends_an_unclosed_block_when_asked():
    text = "I should call it.\n<tool_call>\n<function=f>\n</function>\n</tool_call>"
    for chunks in chunkings(text):
        splitter = ReasoningSplitter(opened_in_prompt=True, answer_openers=("<tool_call>",))
        pieces = [splitter.push(chunk) for chunk in chunks] + [splitter.finish()]
        assert "".join(r for r, _ in pieces) == "I should call it."
        assert "".join(a for _, a in pieces) == "<tool_call>\n<function=f>\n</function>\n</tool_call>"
    reasoning, answer, _ = split([text], opened=True)  # without the opener it is all reasoning
    assert answer == "" and reasoning.startswith("I should call it.\n<tool_call>")
