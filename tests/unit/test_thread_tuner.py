"""The thread tuner on scripted step times: it follows the faster thread count, and costs little."""

from __future__ import annotations

from edge_server.engine.threadtuner import ThreadTuner


def run(tuner: ThreadTuner, seconds_by_threads: dict[int, float], steps: int, batch: int = 1) -> list[int]:
    used = []
    for _ in range(steps):
        threads = tuner.next_step_threads()
        used.append(threads)
        tuner.record(batch, seconds_by_threads[threads])
    return used


def test_more_threads_stay_while_they_are_faster():
    tuner = ThreadTuner(2)
    used = run(tuner, {2: 0.009, 1: 0.015}, 5000)
    assert tuner.threads == 2
    assert used.count(1) / len(used) < 0.02  # probing costs under 2% of the steps


def test_a_busy_core_moves_to_fewer_threads_and_back_when_it_frees():
    tuner = ThreadTuner(2)
    run(tuner, {2: 0.009, 1: 0.015}, 1000)
    busy = run(tuner, {2: 0.032, 1: 0.014}, 200)
    assert tuner.threads == 1 and busy[-100:].count(1) > 90
    run(tuner, {2: 0.009, 1: 0.0145}, 3000)
    assert tuner.threads == 2


def test_several_cores_settle_on_the_fastest_count():
    tuner = ThreadTuner(8)
    times = {8: 0.040, 7: 0.030, 6: 0.020, 5: 0.024, 4: 0.028, 3: 0.033, 2: 0.045, 1: 0.08}
    used = run(tuner, times, 4000)
    assert tuner.threads == 6 and used[-1000:].count(6) > 950


def test_fixed_threads_never_change():
    tuner = ThreadTuner(2, adaptive=False)
    assert set(run(tuner, {2: 0.032, 1: 0.014}, 500)) == {2}
