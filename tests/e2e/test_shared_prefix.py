"""Prompt prefixes shared across slots through the real server: copied or waited for, never leaking."""

from __future__ import annotations

import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.e2e.conftest import sse_events, streamed_text

# A random model's greedy answer to a long system prompt hardly depends on a short question, and
# batches of other shapes round its logits differently (by ~0.02): these questions were picked for four
# different answers whose best token leads the next by over 0.18 at each of the first 16 tokens.
WORDS = "harbour mountain river note desk lamp answer careful short cite window paper stone bridge clock tower".split()
SYSTEM = " ".join(random.Random(5).choice(WORDS) for _ in range(300)) + "."
QUESTIONS = [
    "no quick over lazy no yes garden garden yes ocean yes piano seven apple lazy piano piano no river river tiger "
    "dog forty over number jump river lazy apple yes no forty river quick piano lazy over seven",
    "number garden seven tiger seven blue no garden garden number silver blue seven over quick seven number dog "
    "jump forty lazy piano over quick lazy apple over garden tiger quick blue ocean jump",
    "apple silver yes no dog jump river river silver silver dog ocean apple yes quick tiger no dog lazy no silver "
    "yes quick jump river",
    "apple quick apple no jump garden blue number silver quick quick number quick river number silver no lazy "
    "seven seven silver yes river apple ocean jump number yes garden forty apple dog dog dog ocean",
]
TOKENS = 16


@pytest.fixture(scope="module", params=["apart", "unified"])
def shared_server(request, start_server, slow_model):
    """Four slots on the wider random model (its prompts take long enough for others to arrive meanwhile),
    each with its own cells (copies are of whole per-sequence buffers) or in one pool (cells are shared)."""
    unified = ("--kv-unified", "--n-ctx", "4096") if request.param == "unified" else ()
    return start_server("--model", str(slow_model), "--parallel", "4", *unified)


def messages(question: str, system: str = SYSTEM) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def ask(server, question: str, system: str = SYSTEM, max_tokens: int = TOKENS) -> dict:
    body = {"messages": messages(question, system), "max_tokens": max_tokens, "temperature": 0}
    response = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def text_of(answer: dict) -> str:
    return answer["choices"][0]["message"]["content"]


def evict(server) -> None:
    """Four unrelated prompts at once overwrite every slot's cells."""
    barrier = threading.Barrier(4)

    def one(i: int) -> None:
        barrier.wait()
        ask(server, "unrelated", system=f"{i} Something else entirely, number {i}. " * 30, max_tokens=2)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(4)))


def test_jobs_arriving_together_evaluate_their_shared_prefix_once_and_answer_as_alone(shared_server):
    questions = QUESTIONS
    alone = []
    for question in questions:
        evict(shared_server)
        alone.append(ask(shared_server, question))
    assert len({text_of(a) for a in alone}) == len(alone)
    evict(shared_server)
    before = shared_server.health()["prefix_cache_tokens"]
    barrier = threading.Barrier(len(questions))

    def together(question: str) -> dict:
        barrier.wait()
        return ask(shared_server, question)

    with ThreadPoolExecutor(len(questions)) as pool:
        answers = list(pool.map(together, questions))
    assert [text_of(a) for a in answers] == [text_of(a) for a in alone]
    cached = sorted(a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers)
    prompt_tokens = min(a["usage"]["prompt_tokens"] for a in answers)
    # One job evaluates the system prompt; the other three take its cells (copied, not evaluated).
    assert all(c >= prompt_tokens * 0.8 for c in cached[1:]), (cached, prompt_tokens)
    assert shared_server.health()["prefix_cache_tokens"] - before >= sum(cached[1:])
    shared_server.wait_idle(timeout=10)


def stream_until(server, question: str, stop_after: int | None) -> str:
    """Stream the answer; leave after `stop_after` events (None: read it all). Returns the text received."""
    body = {"messages": messages(question), "max_tokens": TOKENS, "temperature": 0, "stream": True}
    with requests.post(server.base_url + "/v1/chat/completions", json=body, stream=True, timeout=120) as response:
        assert response.status_code == 200, response.text
        if stop_after is None:
            return streamed_text(sse_events(response))
        received = []
        for line in response.iter_lines():
            if line.startswith(b"data: {"):
                received.append(line)
                if len(received) >= stop_after:
                    break
        return streamed_text([json.loads(line[6:]) for line in received])


def test_diverging_prompts_interleaved_and_cancelled_never_leak_into_each_other(shared_server):
    first, second = QUESTIONS[:2]  # a long shared prefix (the system prompt), then different questions
    reference = {q: text_of(ask(shared_server, q)) for q in (first, second)}
    assert reference[first] != reference[second]
    chooser = random.Random(12)
    for _ in range(4):
        plan = [(chooser.choice((first, second)), chooser.choice((None, 1, 3, 6, 10))) for _ in range(6)]
        barrier = threading.Barrier(len(plan))

        def run(item: tuple[str, int | None]) -> tuple[str, int | None, str]:
            question, stop_after = item
            barrier.wait()
            return question, stop_after, stream_until(shared_server, question, stop_after)

        with ThreadPoolExecutor(len(plan)) as pool:
            for question, stop_after, text in pool.map(run, plan):
                if stop_after is None:
                    assert text == reference[question], (question, text)
                else:
                    assert reference[question].startswith(text), (question, stop_after, text)
        shared_server.wait_idle(timeout=10)
    # What the cancelled jobs left in the slots serves the next ones exactly.
    for question in (first, second, first):
        assert text_of(ask(shared_server, question)) == reference[question]
