"""Image embeddings in a step: the rows of one slot's next image, decoded in their own batch after the token
batch (llama.cpp takes tokens or embeddings per batch, never both), bounded like a prompt chunk."""

from __future__ import annotations

import ctypes
from typing import Any

from edge_server.engine.prefixcache import PrefixCache
from edge_server.engine.slots import Slot
from edge_server.engine.types import ImageChunk


def text_ahead(slot: Slot) -> int:
    """How many of `slot`'s pending prompt tokens come before its next image (all of them when none does)."""
    index = len(slot.job.prompt) - len(slot.pending_prompt)
    for image in slot.job.images:
        if image.at + image.n_tokens > index:
            return max(0, image.at - index)
    return len(slot.pending_prompt)


def next_image(slot: Slot) -> tuple[ImageChunk, int] | None:
    """The image `slot`'s pending prompt starts in and the row it starts at (None: it starts with text)."""
    if not slot.pending_prompt or slot.pending_prompt[0] >= 0:
        return None
    index = len(slot.job.prompt) - len(slot.pending_prompt)
    for image in slot.job.images:
        if image.at <= index < image.at + image.n_tokens:
            return image, index - image.at
    raise RuntimeError(f"prompt position {index} holds an image placeholder but no image")


def fill_image_batch(batch: Any, n_embd: int, active: list[Slot], cache: PrefixCache,
                     budget: int) -> tuple[Slot, list[int], bool] | None:
    """Put up to `budget` rows of the oldest waiting image into the embeddings `batch` (all of an image the model
    sees whole); returns its slot, the placeholders those rows stand for and whether the model attends to them
    non-causally (None: no slot's prompt continues with an image). The last row of a prompt gets logits
    (`slot.logits_at`)."""
    batch.n_tokens = 0
    if budget <= 0:
        return None
    for slot in sorted(active, key=lambda s: s.stream.submitted_at):
        found = next_image(slot) if slot.awaits is None else None
        if found is None:
            continue
        image, row = found
        rows = image.n_tokens - row if image.whole else min(budget, image.n_tokens - row)
        block = image.embeddings[row:row + rows]
        address = ctypes.cast(batch.embd, ctypes.c_void_p).value
        ctypes.memmove(address, block.ctypes.data, rows * n_embd * 4)
        place_rows(batch.pos, image, row, rows, cache.position(slot.seq))
        for i in range(rows):
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot.seq
            batch.logits[i] = False
        placeholders, slot.pending_prompt = slot.pending_prompt[:rows], slot.pending_prompt[rows:]
        slot.logits_at = -1 if slot.pending_prompt else rows - 1
        batch.logits[rows - 1] = not slot.pending_prompt
        batch.n_tokens = rows
        return slot, placeholders, image.whole
    return None


def place_rows(pos: Any, image: ImageChunk, row: int, rows: int, position: int) -> None:
    """Positions of `image`'s rows `row`.. `row + rows` decoded from `position` on: one each in a row, or on an
    M-RoPE model the image's start position with each token's row and column, in llama.cpp's section-major
    layout (all first sections, then all second ones...)."""
    if not image.mrope_width:
        for i in range(rows):
            pos[i] = position + i
        return
    width = image.mrope_width
    for i in range(rows):
        token = row + i
        pos[i] = position
        pos[i + rows] = position + token // width
        pos[i + 2 * rows] = position + token % width
        pos[i + 3 * rows] = 0
