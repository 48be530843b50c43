"""The prefix cache's choices and records, with the memory operation recorded instead of performed."""

from __future__ import annotations

from edge_server.engine.prefixcache import MIN_SHARED, Plan, PrefixCache, common_prefix


class Memory:
    """Records cell removals and copies; can refuse partial removals like a recurrent model's memory."""

    def __init__(self, partial_ok: bool = True):
        self.partial_ok = partial_ok
        self.removed: list[tuple[int, int]] = []
        self.copied: list[tuple[int, int]] = []

    def remove(self, seq: int, start: int) -> bool:
        self.removed.append((seq, start))
        return self.partial_ok or start == 0

    def copy(self, source: int, destination: int) -> None:
        self.copied.append((source, destination))

    def cache(self, n_seq: int) -> PrefixCache:
        return PrefixCache(n_seq, self.remove, self.copy)


def filled(cache: PrefixCache, seq: int, tokens: list[int]) -> PrefixCache:
    cache.reuse(seq, tokens + [0])
    cache.extend(seq, tokens)
    return cache


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2]) == 2


def test_longest_prefix_wins_and_ties_go_to_the_least_recently_used():
    cache = Memory().cache(3)
    filled(cache, 0, [1, 2, 3])
    filled(cache, 1, [1, 2, 9, 9])
    assert cache.choose([0, 1, 2], [1, 2, 3, 4]) == 0
    assert cache.choose([1, 2], [1, 2, 3, 4]) == 1
    cache.release(2, now=5.0)
    cache.release(1, now=1.0)
    assert cache.choose([1, 2], [7, 7]) == 1  # no prefix anywhere: the one idle longest


def test_reuse_keeps_the_shared_cells_and_drops_the_rest():
    memory = Memory()
    cache = filled(memory.cache(1), 0, [1, 2, 3, 4])
    assert cache.reuse(0, [1, 2, 3, 9, 9]) == 3
    assert memory.removed[-1] == (0, 3) and cache.length(0) == 3
    assert cache.reused_tokens == 3


def test_one_prompt_token_is_always_left_to_evaluate():
    cache = filled(Memory().cache(1), 0, [1, 2, 3])
    assert cache.reuse(0, [1, 2, 3]) == 2  # the same prompt again: its last token is decoded anew
    assert cache.length(0) == 2


def test_a_memory_that_cannot_trim_loses_the_whole_sequence():
    memory = Memory(partial_ok=False)
    cache = filled(memory.cache(1), 0, [1, 2, 3, 4])
    assert cache.reuse(0, [1, 2, 3, 9]) == 0
    assert memory.removed[-2:] == [(0, 3), (0, 0)] and cache.length(0) == 0


def test_forget_drops_every_cell():
    memory = Memory()
    cache = filled(memory.cache(2), 1, [5, 6])
    cache.forget(1)
    assert memory.removed[-1] == (1, 0) and cache.length(1) == 0


SYSTEM = list(range(100, 100 + 2 * MIN_SHARED))  # a shared system prompt, long enough to copy


def test_a_prefix_held_by_another_sequence_is_copied_then_trimmed():
    memory = Memory()
    cache = filled(memory.cache(3), 1, SYSTEM + [1, 2, 3])
    plan = cache.plan(0, SYSTEM + [7, 8])
    assert plan == Plan(1, len(SYSTEM), True)
    assert cache.take(0, SYSTEM + [7, 8], plan) == len(SYSTEM)
    assert memory.copied == [(1, 0)] and memory.removed[-1] == (0, len(SYSTEM))
    assert cache.length(0) == len(SYSTEM) and cache.length(1) == len(SYSTEM) + 3
    assert cache.reused_tokens == len(SYSTEM)


def test_the_own_prefix_wins_unless_another_holds_min_shared_more():
    memory = Memory()
    cache = filled(memory.cache(2), 0, SYSTEM[:10])
    filled(cache, 1, SYSTEM[:10 + MIN_SHARED - 1])
    assert cache.plan(0, SYSTEM + [1]) == Plan(0, 10, True)  # a copy would spare too little
    cache.extend(1, SYSTEM[10 + MIN_SHARED - 1:])
    assert cache.plan(0, SYSTEM + [1]) == Plan(1, len(SYSTEM), True)


def test_the_copy_keeps_one_prompt_token_to_evaluate():
    cache = filled(Memory().cache(2), 1, SYSTEM + [1, 2])
    plan = cache.plan(0, SYSTEM)
    assert plan == Plan(1, len(SYSTEM) - 1, True)
    assert cache.take(0, SYSTEM, plan) == len(SYSTEM) - 1


def test_a_prefix_being_evaluated_is_waited_for_then_copied():
    cache = Memory().cache(3)
    prompt = SYSTEM + [1, 2]
    assert cache.reuse(0, prompt) == 0
    cache.promise(0, prompt)
    cache.extend(0, prompt[:5])  # a first chunk: the rest is still promised
    other = SYSTEM + [9]
    assert cache.plan(1, other) == Plan(0, len(SYSTEM), False)
    cache.extend(0, prompt[5:])
    assert cache.plan(1, other) == Plan(0, len(SYSTEM), True)


def test_a_promise_ends_with_its_job_and_nothing_is_waited_for_then():
    cache = Memory().cache(2)
    cache.promise(0, SYSTEM + [1])
    cache.extend(0, SYSTEM[:3])
    assert not cache.plan(1, SYSTEM + [2]).ready
    cache.release(0, now=1.0)  # cancelled mid-prompt: what it evaluated stays, nothing more comes
    assert cache.plan(1, SYSTEM + [2]) == Plan(1, 0, True)


def test_a_copy_into_a_memory_that_cannot_trim_evaluates_everything():
    memory = Memory(partial_ok=False)
    cache = filled(memory.cache(2), 1, SYSTEM + [1, 2])
    assert cache.take(0, SYSTEM + [3], cache.plan(0, SYSTEM + [3])) == 0
    assert cache.length(0) == 0 and memory.removed[-1] == (0, 0)
