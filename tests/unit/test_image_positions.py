"""Image placeholders and the positions a record takes: M-RoPE images place all their tokens at one position and
move the next one on by their longer side; a cut never splits an image (`engine/placeholders.py`, the prefix cache)."""

from __future__ import annotations

import pytest

from edge_server.engine.placeholders import (advance, ends_inside_image, image_ends, placeholders, position_at,
                                             span, whole_images)
from tests.unit.test_checkpoints import RecurrentMemory, evaluate
from tests.unit.test_prefix_cache import Memory, filled

A, B = "a" * 64, "b" * 64


def test_placeholders_are_negative_distinct_per_image_and_equal_for_the_same_image():
    one = placeholders(A, 6)
    assert all(t < 0 for t in one) and len(set(one)) == 6
    assert placeholders(A, 6) == one
    assert not set(placeholders(B, 6)) & set(one)
    assert placeholders(A, 6, 3) != one  # the same pixels on an M-RoPE model: other positions, other ids


def test_one_position_per_token_or_all_after_the_last_on_mrope():
    assert [advance(t) for t in placeholders(A, 4)] == [1, 1, 1, 1]
    assert [advance(t) for t in placeholders(A, 6, 3)] == [0, 0, 0, 0, 0, 3]
    assert advance(17) == 1
    record = [5, 6, *placeholders(A, 6, 3), 7]
    assert span(record) == 2 + 3 + 1
    assert position_at(record, 2, span(record)) == 2  # the image starts at 2
    assert position_at(record, 5, span(record)) == 2  # and all its tokens stand there
    assert position_at(record, 8, span(record)) == 5  # the text after it, at 2 + 3
    assert position_at(record, 1, span(record)) == 1


@pytest.mark.parametrize("n_pos", [None, 3])
def test_a_cut_never_splits_an_image(n_pos):
    record = [5, 6, *placeholders(A, 6, n_pos), 7, 8]
    assert whole_images(record, 5) == 2
    assert whole_images(record, 2) == 2
    assert whole_images(record, 8) == 8 and whole_images(record, 9) == 9
    assert ends_inside_image(record[:5]) and not ends_inside_image(record[:8]) and not ends_inside_image(record)


def test_out_of_range_images_are_refused():
    with pytest.raises(ValueError):
        placeholders(A, 0)
    with pytest.raises(ValueError):
        placeholders(A, 4, 1 << 20)


def test_the_prefix_cache_removes_cells_by_position_and_keeps_whole_images():
    memory = Memory()
    image = placeholders(A, 6, 3)
    cache = filled(memory.cache(1), 0, [5, 6, *image, 7, 8])
    assert cache.length(0) == 10 and cache.position(0) == 7
    # The same image, other text after it: the image's cells stay; positions 5 on go.
    assert cache.reuse(0, [5, 6, *image, 9, 9]) == 8
    assert memory.removed[-1] == (0, 5) and cache.position(0) == 5
    # A record that stopped inside the image: a prompt going on with it keeps its rows (none removed) ...
    cache.extend(0, [9])
    cache.reuse(0, [5, 6, 1])
    cache.extend(0, image[:4])
    assert cache.position(0) == 2 and ends_inside_image(cache.tokens(0))
    removed = len(memory.removed)
    assert cache.reuse(0, [5, 6, *image, 7]) == 6
    assert len(memory.removed) == removed and cache.position(0) == 2
    # ... and one going on with another image goes back to the image's start.
    cache.extend(0, image[4:5])
    assert cache.reuse(0, [5, 6, *image[:4], 1, 1]) == 2
    assert memory.removed[-1] == (0, 2) and cache.position(0) == 2


def test_truncating_drafts_after_an_image_uses_positions():
    memory = Memory()
    cache = filled(memory.cache(1), 0, [5, *placeholders(B, 4, 2), 7, 8, 9])
    assert cache.position(0) == 1 + 2 + 3
    assert cache.truncate(0, 6)
    assert memory.removed[-1] == (0, 4) and cache.position(0) == 4 and cache.length(0) == 6


def test_the_next_question_about_the_same_image_resumes_after_it_on_a_recurrent_memory():
    image = placeholders(A, 6, 3)
    assert image_ends([1, *image, 2, *placeholders(B, 2), 3]) == [7, 10]
    memory = RecurrentMemory(1)
    cache = memory.cache(1)
    evaluate(cache, memory, 0, [1, 2, *image, 3, 4, 5, 6, 7, 8, 9, 9, 9], [9])
    assert evaluate(cache, memory, 0, [1, 2, *image, 7, 7, 7], [9]) == 8  # from the checkpoint after the image
    assert memory.loads[-1] == (0, 8)
