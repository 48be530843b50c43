"""Qwen3.5's hybrid memory (Gated DeltaNet + attention) through the real server: context checkpoints keep
multi-turn chats cached, answers equal those without checkpoints, checkpoints stay bounded, two slots and a
cancelled prompt keep working, and speculation and a grammar's fast-forward on the hybrid model give the plain
answers."""

from __future__ import annotations

import random
import time

import pytest
import requests

from edge_server.devtools import assets
from tests.conftest import or_fail
from tests.e2e.conftest import RANDOM_MODEL_NOISE, assert_same_greedy_answer, order_body, without_and_with_fast_forward

WORDS = ("river stone lantern orchard copper meadow violet harbor signal canvas ember thistle quartz "
         "falcon mosaic juniper cobalt prairie velvet summit").split()


@pytest.fixture(scope="session")
def qwen35_model():
    """The random-weight qwen35 model with the real Qwen3.5 tokenizer and template."""
    return or_fail(assets.qwen35_model)


@pytest.fixture(scope="module")
def hybrid(start_server, qwen35_model):
    """A server on the hybrid model with the defaults and one slot, shared by the tests below (they read its
    checkpoint counters as differences)."""
    return start_server("--model", str(qwen35_model), "--parallel", "1")


def system_prompt(words: int = 1200, seed: int = 0) -> str:
    """About 1,500 tokens of a system prompt (ordinary words)."""
    rng = random.Random(seed)
    return "You are a careful assistant. " + " ".join(rng.choice(WORDS) for _ in range(words))


def chat_turn(base_url: str, messages: list[dict], **fields) -> dict:
    """One greedy chat completion (the answer's logprobs with the two likeliest), parsed."""
    body = {"model": "m", "messages": messages, "max_tokens": 12, "temperature": 0, "logprobs": True,
            "top_logprobs": 2, **fields}
    response = requests.post(base_url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def conversation(base_url: str, turns: int, *, seed: int = 0, words: int = 1200, **fields) -> list[dict]:
    """A `turns`-turn chat as a client keeps it: each turn sends the history back as the server returned it."""
    messages = [{"role": "system", "content": system_prompt(words, seed=seed)}]
    replies = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn + 1} of conversation {seed}: what next?"})
        reply = chat_turn(base_url, messages, **fields)
        replies.append(reply)
        message = reply["choices"][0]["message"]
        messages.append({key: message[key] for key in ("role", "content", "reasoning_content") if message.get(key)})
    return replies


def cached_share(reply: dict) -> float:
    usage = reply["usage"]
    return usage["prompt_tokens_details"]["cached_tokens"] / usage["prompt_tokens"]


def answer_tokens(reply: dict) -> list[dict]:
    return reply["choices"][0]["logprobs"]["content"]


def checkpoint_figures(base_url: str) -> dict:
    return requests.get(base_url + "/health", timeout=5).json()["ctx_checkpoints"]


def test_a_six_turn_chat_reuses_the_conversation_every_turn(hybrid):
    before = checkpoint_figures(hybrid.base_url)
    replies = conversation(hybrid.base_url, 6)
    assert replies[0]["usage"]["prompt_tokens"] > 1400
    shares = [cached_share(reply) for reply in replies[1:]]
    assert min(shares) >= 0.95, shares
    figures = checkpoint_figures(hybrid.base_url)
    assert figures["restored"] - before["restored"] == 5 and figures["misses"] == before["misses"], figures
    assert "no context checkpoint" not in hybrid.log()
    metrics = requests.get(hybrid.base_url + "/metrics", timeout=5).text
    assert f"edge_ctx_checkpoints_restored {float(figures['restored'])}" in metrics


def test_greedy_answers_are_the_same_with_checkpoints_on_and_off(start_server, qwen35_model, hybrid):
    on = hybrid
    off = start_server("--model", str(qwen35_model), "--parallel", "1", "--ctx-checkpoints", "0")
    with_checkpoints = conversation(on.base_url, 3, seed=1)
    without = conversation(off.base_url, 3, seed=1)
    for turn, (a, b) in enumerate(zip(without, with_checkpoints)):
        assert_same_greedy_answer(answer_tokens(a), answer_tokens(b))
        if turn:
            assert cached_share(b) >= 0.95 and cached_share(a) == 0.0  # off: the whole conversation again
    assert "no context checkpoint" in off.log()  # ... and the log says so


def test_checkpoints_are_bounded_in_count_and_bytes(start_server, qwen35_model, hybrid):
    # The first turn takes two checkpoints (516 and 4 tokens before its prompt's end), each later one a third
    # (4 before its end: it evaluates fewer than 516 tokens), and the earlier ones stay (8 per slot by default).
    many = hybrid
    by_count = start_server("--model", str(qwen35_model), "--parallel", "1", "--ctx-checkpoints", "2")
    bound = 0.05  # MiB: three of this model's ~17 KB checkpoints
    by_bytes = start_server("--model", str(qwen35_model), "--parallel", "1", "--ctx-checkpoint-mib", str(bound))
    figures = {}
    for name, server in (("many", many), ("count", by_count), ("bytes", by_bytes)):
        before = checkpoint_figures(server.base_url)
        conversation(server.base_url, 5, seed=10)  # its first turn leaves what the slot held: nothing restores
        after = checkpoint_figures(server.base_url)
        figures[name] = {**after, "restored": after["restored"] - before["restored"],
                         "misses": after["misses"] - before["misses"]}
    assert figures["many"]["count"] == 6, figures
    assert figures["count"]["count"] == 2, figures
    assert 0 < figures["bytes"]["bytes"] <= bound * (1 << 20) < figures["many"]["bytes"], figures
    for name in ("many", "count", "bytes"):  # bounded, and every turn still resumes from one
        assert figures[name]["restored"] == 4 and figures[name]["misses"] == 0, figures


def test_two_slots_keep_two_conversations_cached(start_server, qwen35_model):
    import concurrent.futures

    server = start_server("--model", str(qwen35_model), "--parallel", "2")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda seed: conversation(server.base_url, 4, seed=seed), (31, 32)))
    for replies in runs:
        shares = [cached_share(reply) for reply in replies[1:]]
        assert min(shares) >= 0.95, shares


def test_a_prompt_cancelled_mid_evaluation_leaves_the_next_request_right(start_server, qwen35_model, hybrid):
    server = start_server("--model", str(qwen35_model), "--parallel", "1")
    reference = hybrid
    messages = [{"role": "system", "content": system_prompt(words=3000, seed=41)},
                {"role": "user", "content": "Summarise."}]
    body = {"model": "m", "messages": messages, "max_tokens": 12, "stream": True}
    with requests.post(server.base_url + "/v1/chat/completions", json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200
        time.sleep(0.3)  # the prompt is still being evaluated: leave
    server.wait_idle(30)
    fresh = chat_turn(reference.base_url, messages)
    after = chat_turn(server.base_url, messages)
    assert_same_greedy_answer(answer_tokens(fresh), answer_tokens(after))
    again = conversation(server.base_url, 2, seed=41)
    assert cached_share(again[1]) >= 0.95


def draft_figures(base_url: str) -> tuple[float, float]:
    """(drafted, accepted) tokens since start, from /metrics."""
    text = requests.get(base_url + "/metrics", timeout=5).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith(("edge_draft_tokens_total ", "edge_draft_accepted_total "))}
    return values["edge_draft_tokens_total"], values["edge_draft_accepted_total"]


@pytest.mark.parametrize("drafts", ["ngram-mod", "itself", "another"])
def test_speculation_on_the_hybrid_model_gives_the_plain_answers(start_server, qwen35_model, hybrid, drafts):
    """Drafts accepted (an earlier answer proposed again; the model drafting for itself) and rejected (another
    random model drafting: rolled back in the target's recurrent state and in the hybrid draft model's)."""
    flags = {"ngram-mod": ["--spec-type", "ngram-mod"],
             "itself": ["--spec-draft-model", str(qwen35_model), "--spec-draft-p-min", "0"],
             "another": ["--spec-draft-model", str(or_fail(assets.qwen35_model, seed=1)), "--spec-draft-p-min", "0"],
             }[drafts]
    plain = hybrid
    speculating = start_server("--model", str(qwen35_model), "--parallel", "1", *flags)
    assert "speculative decoding is off" not in speculating.log()
    messages = [{"role": "user", "content": "Tell me about " + " ".join(WORDS[:6])}]
    for max_tokens in (24, 48):  # the second time, ngram-mod proposes the first answer again
        a = chat_turn(plain.base_url, messages, max_tokens=max_tokens)
        b = chat_turn(speculating.base_url, messages, max_tokens=max_tokens)
        assert_same_greedy_answer(answer_tokens(a), answer_tokens(b))
    drafted, accepted = draft_figures(speculating.base_url)
    assert drafted >= 20, (drafted, accepted)
    if drafts == "another":
        assert accepted < drafted / 2, (drafted, accepted)  # mostly rejected: rolled back every step
    else:
        assert accepted >= drafted * 0.8, (drafted, accepted)


@pytest.mark.parametrize("settings", [{"temperature": 0}, {"temperature": 0.8, "seed": 5},
                                      {"temperature": 0.8, "seed": 5, "logprobs": True}],
                         ids=["greedy", "sampled", "logprobs"])
def test_fast_forward_on_the_hybrid_model_gives_the_plain_answers(hybrid, settings):
    """A grammar's forced tokens are decoded with the token before them on the recurrent memory too (never
    rejected, so no state is kept before them): the answer, whose later tokens read the state the forced ones
    left, equals the one decoded token by token."""
    body = order_body(max_tokens=80, chat_template_kwargs={"enable_thinking": False}, **settings)
    plain, fast = without_and_with_fast_forward(hybrid, body)
    assert plain["message"]["content"] == fast["message"]["content"]
    assert fast["message"]["content"].startswith('{"customer_reference_number":')
    if settings.get("logprobs"):  # several tokens in one step: logits move by batch-shape noise alone
        assert [t["logprob"] for t in plain["logprobs"]["content"]] == \
            pytest.approx([t["logprob"] for t in fast["logprobs"]["content"]], abs=RANDOM_MODEL_NOISE)


@pytest.mark.parametrize("pool", [(), ("--kv-unified",)], ids=["own-cells", "kv-unified"])
def test_clients_arriving_together_with_one_system_prompt_evaluate_it_once(start_server, qwen35_model, pool):
    """Three of four slots wait for the one evaluating the shared prefix, which checkpoints it where they
    copy it from (its recurrent state goes on past it)."""
    import concurrent.futures

    server = start_server("--model", str(qwen35_model), "--parallel", "4", *pool)
    system = {"role": "system", "content": system_prompt(seed=51)}
    questions = [[system, {"role": "user", "content": f"Question {i}: which word comes {i}th?"}] for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as clients:
        replies = list(clients.map(lambda messages: chat_turn(server.base_url, messages), questions))
    shares = sorted(cached_share(reply) for reply in replies)
    assert shares[0] < 0.5 and shares[1] >= 0.9, shares  # one evaluated the system prompt, the others copied it
    again = conversation(server.base_url, 2, seed=51)  # and a chat on it goes on from the cache too
    assert cached_share(again[1]) >= 0.95


def test_a_hybrid_model_unloaded_and_loaded_again_serves_and_caches_afresh(start_server, qwen35_model, tiny_model):
    """--max-loaded 1: the hybrid model's engine (and its checkpoints) goes with it, and comes back whole."""
    server = start_server("--model", str(qwen35_model), "--model", str(tiny_model), "--model-alias", "hybrid",
                          "--model-alias", "tiny", "--max-loaded", "1", "--parallel", "1")
    first = conversation(server.base_url, 2, seed=61, words=500, model="hybrid")
    assert cached_share(first[1]) >= 0.95
    time.sleep(2.5)  # a model just used counts as in use for 2 s (the registry's grace before evicting it)
    tiny = requests.post(server.base_url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert tiny.status_code == 200, tiny.text
    time.sleep(2.5)
    again = conversation(server.base_url, 2, seed=61, words=500, model="hybrid")
    assert_same_greedy_answer(answer_tokens(first[0]), answer_tokens(again[0]))
    assert again[0]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 and cached_share(again[1]) >= 0.95
