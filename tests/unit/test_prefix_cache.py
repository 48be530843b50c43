"""The prefix cache's choices and records, with the memory operation recorded instead of performed."""

from __future__ import annotations

from edge_server.engine.prefixcache import PrefixCache, common_prefix


class Memory:
    """Records cell removals; can refuse partial ones like a recurrent model's memory."""

    def __init__(self, partial_ok: bool = True):
        self.partial_ok = partial_ok
        self.removed: list[tuple[int, int]] = []

    def remove(self, seq: int, start: int) -> bool:
        self.removed.append((seq, start))
        return self.partial_ok or start == 0


def filled(cache: PrefixCache, seq: int, tokens: list[int]) -> PrefixCache:
    cache.reuse(seq, tokens + [0])
    cache.extend(seq, tokens)
    return cache


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2]) == 2


def test_longest_prefix_wins_and_ties_go_to_the_least_recently_used():
    cache = PrefixCache(3, Memory().remove)
    filled(cache, 0, [1, 2, 3])
    filled(cache, 1, [1, 2, 9, 9])
    assert cache.choose([0, 1, 2], [1, 2, 3, 4]) == 0
    assert cache.choose([1, 2], [1, 2, 3, 4]) == 1
    cache.release(2, now=5.0)
    cache.release(1, now=1.0)
    assert cache.choose([1, 2], [7, 7]) == 1  # no prefix anywhere: the one idle longest


def test_reuse_keeps_the_shared_cells_and_drops_the_rest():
    memory = Memory()
    cache = filled(PrefixCache(1, memory.remove), 0, [1, 2, 3, 4])
    assert cache.reuse(0, [1, 2, 3, 9, 9]) == 3
    assert memory.removed[-1] == (0, 3) and cache.length(0) == 3
    assert cache.reused_tokens == 3


def test_one_prompt_token_is_always_left_to_evaluate():
    cache = filled(PrefixCache(1, Memory().remove), 0, [1, 2, 3])
    assert cache.reuse(0, [1, 2, 3]) == 2  # the same prompt again: its last token is decoded anew
    assert cache.length(0) == 2


def test_a_memory_that_cannot_trim_loses_the_whole_sequence():
    memory = Memory(partial_ok=False)
    cache = filled(PrefixCache(1, memory.remove), 0, [1, 2, 3, 4])
    assert cache.reuse(0, [1, 2, 3, 9]) == 0
    assert memory.removed[-2:] == [(0, 3), (0, 0)] and cache.length(0) == 0


def test_forget_drops_every_cell():
    memory = Memory()
    cache = filled(PrefixCache(2, memory.remove), 1, [5, 6])
    cache.forget(1)
    assert memory.removed[-1] == (1, 0) and cache.length(1) == 0
