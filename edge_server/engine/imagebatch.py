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
                     budget: int) -> tuple[Slot, list[int]] | None:
    """Put up to `budget` rows of the oldest waiting image into the embeddings `batch`; returns its slot and the
    placeholders those rows stand for (None: no slot's prompt continues with an image). The last row of a
    prompt gets logits (`slot.logits_at`)."""
    batch.n_tokens = 0
    if budget <= 0:
        return None
    for slot in sorted(active, key=lambda s: s.stream.submitted_at):
        found = next_image(slot) if slot.awaits is None else None
        if found is None:
            continue
        image, row = found
        rows = min(budget, image.n_tokens - row)
        block = image.embeddings[row:row + rows]
        address = ctypes.cast(batch.embd, ctypes.c_void_p).value
        ctypes.memmove(address, block.ctypes.data, rows * n_embd * 4)
        position = cache.length(slot.seq)
        for i in range(rows):
            batch.pos[i] = position + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot.seq
            batch.logits[i] = False
        placeholders, slot.pending_prompt = slot.pending_prompt[:rows], slot.pending_prompt[rows:]
        slot.logits_at = -1 if slot.pending_prompt else rows - 1
        batch.logits[rows - 1] = not slot.pending_prompt
        batch.n_tokens = rows
        return slot, placeholders
    return None
