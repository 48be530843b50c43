"""One decode step's batch: a token of every generating sequence (with the tokens it drafted, when speculating),
then prompt chunks, oldest job first."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edge_server.engine.imagebatch import text_ahead
from edge_server.engine.prefixcache import PrefixCache
from edge_server.engine.slots import Slot, blind_draft, until_end

BATCH_TOKENS = 512  # most tokens one decode step takes (llama.cpp's n_batch)
PROMPT_CHUNK = 256  # prompt tokens in a step that also decodes running streams: bounds how long they stall


Propose = Callable[[list[tuple[Slot, int]]], None]  # sets `slot.draft` of each slot, in at most its room of tokens


def fill_batch(batch: Any, active: list[Slot], cache: PrefixCache, propose: Propose | None = None,
               ends_generation: Callable[[int], bool] = lambda token: False,
               forced: Callable[[Slot, int], list[int]] | None = None
               ) -> tuple[list[tuple[Slot, list[int]]], bool]:
    """Fill `batch` for `active` slots; returns (each slot with the tokens it put in, whether a prompt did).

    At most `PROMPT_CHUNK` prompt tokens go in while any sequence generates, up to the whole batch while
    none does (batched, chunked prefill). Drafted tokens get what real tokens leave, shared evenly; every
    position of a slot's draft gets logits (`slot.logits_at` is its next token's, the draft's follow), except
    forced tokens that need none (`blind_draft`: only the last position's, `slot.logits_at`).
    A draft never runs past what its job can use: its `max_tokens`, or an end-of-generation token (the
    position before one already predicts it). A slot with a grammar and no drafter drafts what `forced` says
    its grammar leaves no choice about (fast-forward: always accepted; `forced` stops before an end of
    generation). A prompt chunk ends where its slot takes a context checkpoint.
    """
    batch.n_tokens = 0
    decoded: list[tuple[Slot, list[int]]] = []
    generating = [slot for slot in active if slot.next_token is not None]
    pending = sum(len(slot.pending_prompt) for slot in active)
    spare = BATCH_TOKENS - sum(1 + len(slot.redo) for slot in generating) \
        - min(pending, PROMPT_CHUNK if generating else BATCH_TOKENS)
    for slot in active:
        slot.draft = []
        slot.mask_known = False  # known again only once `forced` computes it for this step (a step may not run)
    rooms = [(slot, min(spare // len(generating), slot.job.max_tokens - slot.produced - 1))
             for slot in generating] if spare >= len(generating) else []
    drafting = [(slot, room) for slot, room in rooms if room > 0 and slot.drafter is not None]
    if propose is not None and drafting:
        propose(drafting)
        for slot, _ in drafting:
            slot.draft = until_end(slot.draft, ends_generation)
    if forced is not None:
        for slot, room in rooms:
            if room > 0 and slot.drafter is None and slot.grammar is not None and slot.job.speculative:
                slot.draft = forced(slot, room)
    for slot in active:
        slot.logits_at = -1
        if slot.next_token is not None:
            # A recurrent memory that went back before rejected drafts decodes the accepted ones again first.
            tokens = [*slot.redo, slot.next_token, *slot.draft]
            blind = blind_draft(slot, slot.draft)
            last = add_to_batch(batch, tokens, cache.position(slot.seq), slot.seq, logits=True,
                                every_logit=bool(slot.draft) and not blind)
            slot.logits_at = last if blind else last - len(slot.draft)
            decoded.append((slot, tokens))
    budget = min(PROMPT_CHUNK if batch.n_tokens else BATCH_TOKENS, BATCH_TOKENS - batch.n_tokens)
    prefilling = False
    for slot in sorted(active, key=lambda s: s.stream.submitted_at):
        text = text_ahead(slot) if slot.job.images else len(slot.pending_prompt)  # images go in their own batch
        if text and budget > 0:
            size = min(budget, text, cache.until_checkpoint(slot.seq) or budget)  # a checkpoint is taken where it ends
            chunk, slot.pending_prompt = slot.pending_prompt[:size], slot.pending_prompt[size:]
            last = add_to_batch(batch, chunk, cache.position(slot.seq), slot.seq, logits=not slot.pending_prompt)
            slot.logits_at = -1 if slot.pending_prompt else last
            decoded.append((slot, chunk))
            budget -= len(chunk)
            prefilling = True
    return decoded, prefilling


def add_to_batch(batch: Any, tokens: list[int], position: int, seq: int, *, logits: bool,
                 every_logit: bool = False) -> int:
    """Append `tokens` of sequence `seq` from `position` on to a llama.cpp batch; return the last one's index.
    Logits are computed for the last token (when `logits`) or for every one (`every_logit`)."""
    start = batch.n_tokens
    for i, token in enumerate(tokens):
        j = start + i
        batch.token[j] = token
        batch.pos[j] = position + i
        batch.n_seq_id[j] = 1
        batch.seq_id[j][0] = seq
        batch.logits[j] = every_logit
    last = start + len(tokens) - 1
    batch.logits[last] = logits
    batch.n_tokens = last + 1
    return last
