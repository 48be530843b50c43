"""Context checkpoints and the prefix cache on a memory that cannot drop a suffix, with a recorded fake memory."""

from __future__ import annotations

from edge_server.engine.checkpoints import END_OFFSETS, Checkpoints
from edge_server.engine.placeholders import span
from edge_server.engine.prefixcache import Plan, PrefixCache


class Snapshot:
    """A saved state: what it has seen, and the size it stands for."""

    def __init__(self, state: list[int], size: int):
        self.state, self.size = list(state), size

    def __len__(self) -> int:
        return self.size


class RecurrentMemory:
    """A recurrent memory's behaviour: its state is that of everything decoded, so only a snapshot goes back."""

    def __init__(self, n_seq: int, snapshot_bytes: int = 100):
        self.state: list[list[int]] = [[] for _ in range(n_seq)]  # what each sequence's state has seen
        self.snapshot_bytes = snapshot_bytes
        self.loads: list[tuple[int, int]] = []

    def remove(self, seq: int, start: int) -> bool:
        if start == 0:
            self.state[seq] = []
            return True
        return start >= span(self.state[seq])  # nothing to drop (positions: images may take fewer): fine; else refused

    def copy(self, source: int, destination: int) -> None:
        self.state[destination] = list(self.state[source])

    def save(self, seq: int) -> Snapshot:
        return Snapshot(self.state[seq], self.snapshot_bytes)

    def load(self, seq: int, snapshot: Snapshot) -> bool:
        self.state[seq] = list(snapshot.state)
        self.loads.append((seq, len(self.state[seq])))
        return True

    def kept_in_place(self, seq: int, keep: int, held: int) -> bool:
        return keep >= held

    def cache(self, n_seq: int, **options) -> PrefixCache:
        store = Checkpoints(n_seq, self.save, self.load, **options)
        return PrefixCache(n_seq, self.remove, self.copy, checkpoints=store, kept_in_place=self.kept_in_place)


def evaluate(cache: PrefixCache, memory: RecurrentMemory, seq: int, prompt: list[int], answer: list[int]) -> int:
    """Run one job as the engine does: reuse, then prompt chunks cut at checkpoints, then the answer; returns
    the prompt tokens reused."""
    reused = cache.reuse(seq, prompt)
    pending = prompt[reused:]
    cache.promise(seq, pending)
    while pending:
        size = min(len(pending), cache.until_checkpoint(seq) or len(pending))
        chunk, pending = pending[:size], pending[size:]
        memory.state[seq] += chunk
        cache.extend(seq, chunk)
    for token in answer:
        memory.state[seq].append(token)
        cache.extend(seq, [token])
    return reused


def conversation_turn(history: list[int], answer: list[int]) -> list[int]:
    """The next prompt as a thinking template renders it: the previous generation prompt's last two tokens
    (`<think>\\n`) are not in the re-rendered answer, then a new user turn."""
    return history[:-2] + answer + [7, 7, 7, 7, 7, 7, 8, 8]


def test_the_next_turn_resumes_from_the_checkpoint_near_the_previous_prompts_end():
    memory = RecurrentMemory(1)
    cache = memory.cache(1)
    prompt = list(range(1000, 1600))
    assert evaluate(cache, memory, 0, prompt, [1, 2, 3]) == 0
    assert cache.checkpoints.held(0) == sorted(len(prompt) - offset for offset in END_OFFSETS)
    second = conversation_turn(prompt, [1, 2, 3])
    reused = evaluate(cache, memory, 0, second, [4, 5])
    assert reused == len(prompt) - 4
    assert memory.loads == [(0, len(prompt) - 4)]
    assert memory.state[0] == second + [4, 5]  # the state is exactly that of what the sequence holds
    assert cache.checkpoints.stats.restored == 1 and cache.checkpoints.stats.misses == 0


def test_a_continuation_of_everything_held_needs_no_checkpoint():
    memory = RecurrentMemory(1)
    cache = memory.cache(1)
    prompt = list(range(1000, 1100))
    evaluate(cache, memory, 0, prompt, [1, 2, 3])
    assert evaluate(cache, memory, 0, prompt + [1, 2, 3, 9, 9], []) == len(prompt) + 3
    assert memory.loads == []


def test_without_a_checkpoint_at_or_before_the_divergence_everything_is_evaluated_and_counted(caplog):
    memory = RecurrentMemory(1)
    cache = memory.cache(1)
    prompt = list(range(1000, 1600))
    evaluate(cache, memory, 0, prompt, [1])
    edited = prompt[:50] + [5] + prompt[51:]  # diverges before the first checkpoint
    assert evaluate(cache, memory, 0, edited, []) == 0
    assert memory.state[0] == edited
    assert cache.checkpoints.stats.misses == 0  # 50 shared tokens: not worth a warning or a miss
    second = list(range(1000, 1800)) + [1]  # checkpoints at 285 and 797
    evaluate(cache, memory, 0, second, [])
    diverging = second[:100] + [6]
    with caplog.at_level("WARNING"):
        assert evaluate(cache, memory, 0, diverging, []) == 0
    assert "no context checkpoint" in caplog.text
    assert cache.checkpoints.stats.misses == 1 and cache.checkpoints.stats.missed_tokens == 100


def test_checkpoints_along_a_long_prompt():
    memory = RecurrentMemory(1)
    cache = memory.cache(1, step=256)
    prompt = list(range(5000, 6000))
    evaluate(cache, memory, 0, prompt, [])
    assert cache.checkpoints.held(0) == [256, 484, 512, 768, 996]
    assert evaluate(cache, memory, 0, prompt[:600] + [1, 2], []) == 512


def test_bounded_in_count_per_sequence_and_in_bytes_overall():
    memory = RecurrentMemory(2, snapshot_bytes=1000)
    cache = memory.cache(2, step=64, per_sequence=3)
    evaluate(cache, memory, 0, list(range(1000)), [])
    assert len(cache.checkpoints.held(0)) == 3
    assert cache.checkpoints.held(0)[-1] == 996  # the newest survive
    small = memory.cache(2, step=64, per_sequence=8, max_bytes=3 * 1000)
    evaluate(small, memory, 0, list(range(1000)), [])
    evaluate(small, memory, 1, list(range(3000, 4000)), [])
    assert small.checkpoints.count == 3 and small.checkpoints.bytes == 3000
    assert small.checkpoints.held(0) == [] and small.checkpoints.held(1)[-1] == 996  # the oldest went first


def test_zero_checkpoints_turns_them_off():
    memory = RecurrentMemory(1)
    cache = memory.cache(1, per_sequence=0)
    prompt = list(range(1000, 1300))
    evaluate(cache, memory, 0, prompt, [1])
    assert cache.checkpoints.held(0) == [] and cache.until_checkpoint(0) is None
    assert evaluate(cache, memory, 0, conversation_turn(prompt, [1]), []) == 0


def test_a_shared_prefix_being_evaluated_is_checkpointed_for_the_sequence_waiting_for_it():
    memory = RecurrentMemory(2)
    cache = memory.cache(2)
    system = list(range(2000, 2300))
    first, second = system + [1, 2, 3], system + [4, 5]
    cache.reuse(0, first)
    cache.promise(0, first)
    cache.extend(0, first[:100])
    memory.state[0] += first[:100]
    plan = cache.plan(1, second)
    assert plan == Plan(0, len(system), False)
    cache.checkpoints.want(0, plan.tokens)  # as Slots does when it waits
    pending = first[100:]
    while pending:
        size = min(len(pending), cache.until_checkpoint(0) or len(pending))
        chunk, pending = pending[:size], pending[size:]
        memory.state[0] += chunk
        cache.extend(0, chunk)
    assert len(system) in cache.checkpoints.held(0)
    plan = cache.plan(1, second)
    assert plan == Plan(0, len(system), True)
    assert cache.take(1, second, plan) == len(system)
    assert memory.state[1] == system
    assert cache.checkpoints.held(1) == [len(first) - 4, len(system)]  # copied along, none past what it holds


def test_another_sequence_is_only_worth_copying_as_far_as_its_checkpoints_reach():
    memory = RecurrentMemory(2)
    cache = memory.cache(2)
    prompt = list(range(3000, 3400))
    evaluate(cache, memory, 1, prompt, [1, 2])
    # sequence 1 holds 402 tokens and checkpoints at 396 only: a prompt sharing 300 of them gains nothing
    assert cache.plan(0, prompt[:300] + [9]) == Plan(0, 0, True)
    assert cache.plan(0, prompt + [9]) == Plan(1, 396, True)
