"""The engine's slots: one sequence of the shared context each, and what happens to the job it runs.

A slot starts a job (prefix-cache reuse from any slot, or waiting for a slot evaluating that prefix;
its sampler chain and grammar), samples and detokenizes each of its tokens, and ends it (freeing what
it held before telling the client). Clients hear of a step's tokens and ends together after it
(`send`). Engine thread only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llama_cpp import _internals as internals

from edge_server.engine.prefixcache import Plan, PrefixCache
from edge_server.engine.sampler import (ConstrainedSampler, forced_tokens, make_sampler, mask_buffer, take_forced,
                                        token_logprobs)
from edge_server.engine.speculation import SHARED_INDEX_ENTRIES, DraftState, NgramIndex, PromptLookup, SpecConfig
from edge_server.engine.types import KV_CACHE_FULL, Finish, FinishReason, Job, Token, TokenStream
from edge_server.engine.vocab import Vocabulary

POOL_FULL_MESSAGE = "the KV cache (--kv-unified pool) is full with other requests; retry later"

log = logging.getLogger("edge_server.engine")


@dataclass
class Slot:
    """One sequence of the shared context and the job it runs (its cells are the prefix cache's)."""

    seq: int
    job: Job | None = None
    stream: TokenStream | None = None
    sampler: internals.LlamaSampler | None = None
    grammar: Any = None  # the llguidance matcher of the job's grammar, following its tokens
    mask: Any = None  # a buffer for the grammar's mask: at the next sampled position when `mask_known`
    mask_known: bool = False  # fast-forward computed that mask already
    pending_prompt: list[int] = field(default_factory=list)  # prompt tokens not decoded yet
    next_token: int | None = None  # sampled, emitted, and to be decoded in the next step
    produced: int = 0
    logits_at: int = -1  # index of this slot's logits in the current batch, -1 if none
    awaits: tuple[Plan, TokenStream | None] | None = None  # waiting for another slot's prompt prefix (and its job)
    drafter: DraftState | None = None  # proposes tokens to verify with the next one (speculative decoding)
    draft: list[int] = field(default_factory=list)  # tokens proposed in the current step, after next_token
    # A recurrent memory's drafts: (tokens held, its state) before them, restored when some are rejected, and
    # the accepted tokens to decode again from there, before next_token in the next step.
    before_draft: tuple[int, Any] | None = None
    redo: list[int] = field(default_factory=list)


PickToken = Callable[[Slot], int]  # the token a slot samples from its logits in the current batch


def inject_faults(pick: PickToken, seed: int) -> PickToken:
    """Tests only (`EDGE_FAULT_SEED`): `pick`, except that a job with this seed fails on its third token.

    Installed at construction when the setting is on, so that the sampling path never checks for it.
    """

    def pick_or_fail(slot: Slot) -> int:
        if slot.job.sampling.seed == seed and slot.produced == 3:
            raise RuntimeError("injected fault (EDGE_FAULT_SEED)")
        return pick(slot)

    return pick_or_fail


class Slots:
    """The `parallel` slots of one context, with the prefix cache that records their cells."""

    def __init__(self, model: internals.LlamaModel, context: internals.LlamaContext, vocab: Vocabulary,
                 cache: PrefixCache, *, parallel: int, fault_seed: int | None = None,
                 speculation: SpecConfig | None = None, partial_memory: Any = None):
        self._model = model
        self._ctx = context
        self._vocab = vocab
        self._cache = cache
        self._n_vocab = model.n_vocab()
        self._constrained = ConstrainedSampler(context, self._n_vocab)
        self.all = [Slot(seq) for seq in range(parallel)]
        # Events for the clients, sent together after each step (`send`): readers woken one by one
        # while the step still samples would take the interpreter from it at every llama.cpp call.
        self._outbox: list[tuple[TokenStream, Token | Finish]] = []
        self._pick: PickToken = self._pick_token if fault_seed is None else inject_faults(self._pick_token, fault_seed)
        self._speculation = speculation
        # Recurrent memories cannot drop rejected drafts: their state before the drafts is kept and restored.
        self._recurrent = partial_memory if partial_memory is not None and partial_memory.kind == "recurrent" \
            else None
        # ngram-mod: one n-gram index for every request of this model, so earlier answers are proposed too
        self._shared_ngrams = NgramIndex(SHARED_INDEX_ENTRIES) \
            if speculation is not None and speculation.kind == "ngram-mod" else None

    @property
    def running(self) -> int:
        """Slots holding a job."""
        return sum(slot.job is not None for slot in self.all)

    def active(self) -> list[Slot]:
        """The slots holding a job."""
        return [slot for slot in self.all if slot.job is not None]

    def free(self) -> list[Slot]:
        """The slots holding no job."""
        return [slot for slot in self.all if slot.job is None]

    def send(self) -> None:
        """Hand the events of the last step to their streams, in order."""
        outbox, self._outbox = self._outbox, []
        for stream, event in outbox:
            stream._emit(event)

    def make_room(self, decoded: list[tuple[Slot, list[int]]]) -> None:
        """The shared pool (`--kv-unified`) had no room for a step, so nothing of it was decoded: put its
        prompt chunks back, then drop the cells idle slots keep for reuse or, when there are none, end
        the newest job: shortened (LENGTH) once it has answered, else with the `kv_cache_full` error."""
        for slot, tokens in decoded:
            if slot.next_token is None:  # a prompt chunk, not a generated token
                slot.pending_prompt = tokens + slot.pending_prompt
        idle = [slot.seq for slot in self.free() if self._cache.length(slot.seq)]
        for seq in idle:
            self._cache.forget(seq)
        if idle:
            return
        newest = max(self.active(), key=lambda slot: slot.stream.submitted_at)
        log.warning("the KV cache pool (--kv-unified) is full: ending the newest request")
        if newest.produced:
            self.end(newest, Finish(FinishReason.LENGTH))
        else:
            self.end(newest, Finish(FinishReason.ERROR, POOL_FULL_MESSAGE, KV_CACHE_FULL))
        self._cache.forget(newest.seq)

    def start(self, free: list[Slot], job: Job, stream: TokenStream) -> None:
        """Run `job` in the free slot whose cells share the longest prefix with its prompt.

        The prompt's prefix comes from whichever slot holds it (`PrefixCache.plan`); when a slot is
        evaluating it right now, this one waits for it (`resume`) instead of evaluating it too.
        """
        slot = self.all[self._cache.choose([slot.seq for slot in free], job.prompt)]
        try:
            slot.job, slot.stream, slot.produced, slot.next_token = job, stream, 0, None
            slot.sampler = make_sampler(job.sampling, self._model)
            slot.grammar = job.sampling.grammar.take() if job.sampling.grammar is not None else None
            slot.drafter = None
            # The draft model's context would need the images too: image jobs draft from prompt lookup only.
            if self._speculation and job.speculative and not (job.images and self._speculation.kind == "draft-simple"):
                slot.drafter = DraftState(self._speculation) if self._speculation.kind == "draft-simple" \
                    else PromptLookup(self._speculation, job.prompt, self._shared_ngrams)
            self._prepare(slot, self._cache.plan(slot.seq, job.prompt))
        except Exception as error:  # e.g. a sampler llama.cpp refuses: only this job fails
            log.exception("starting a job failed")
            self._cache.forget(slot.seq)
            self.end(slot, Finish(FinishReason.ERROR, f"generation failed: {error}"))

    def resume(self) -> None:
        """Let slots waiting for another slot's prompt prefix take it once that slot evaluated it (or
        stopped evaluating it: they then take whatever is held)."""
        for slot in self.all:
            if slot.awaits is None or slot.job is None:
                continue
            plan, source_stream = slot.awaits
            source = self.all[plan.source]
            if source.stream is source_stream and source.pending_prompt \
                    and self._cache.length(source.seq) < plan.tokens:
                continue
            self._prepare(slot, self._cache.plan(slot.seq, slot.job.prompt))

    def _prepare(self, slot: Slot, plan: Plan) -> None:
        if not plan.ready:
            slot.awaits = (plan, self.all[plan.source].stream)
            if self._cache.checkpoints is not None:  # the shared prefix is copied from a checkpoint there
                self._cache.checkpoints.want(plan.source, plan.tokens)
            return
        slot.awaits = None
        reuse = self._cache.take(slot.seq, slot.job.prompt, plan)
        slot.stream.reused_tokens = reuse
        slot.pending_prompt = slot.job.prompt[reuse:]
        self._cache.promise(slot.seq, slot.pending_prompt)

    def sample(self, slot: Slot) -> None:
        """Sample `slot`'s next token from its logits, send its piece, and end the job when it is done.

        With a draft in the batch, each drafted position is then sampled in turn, the same way, while the
        sampled token is the drafted one (its cells are already there); the first that differs becomes the
        next token and the cells of the rest are dropped. Every token is thus sampled from the model's own
        distribution at its position, as plain decoding would. A grammar's forced tokens with no log-probabilities
        wanted (`blind_draft`) had no logits computed: each is taken as the only token its position allows.
        """
        draft, slot.draft = slot.draft, []
        first, accepted, stream, drafter = slot.logits_at, 0, slot.stream, slot.drafter
        try:
            if blind_draft(slot, draft):
                for token in draft:
                    if not self._take_forced(slot, token):
                        return
                    accepted += 1
                self._emit(slot)
                return
            for offset in range(len(draft) + 1):
                slot.logits_at = first + offset
                if not self._emit(slot):
                    return
                if offset < len(draft) and slot.next_token == draft[offset]:
                    slot.next_token = None  # decoded already, as part of the draft
                    accepted += 1
                    continue
                break
        finally:
            if draft and drafter is not None:  # without a drafter, the grammar's forced tokens: always accepted
                stream.draft_tokens += len(draft)
                stream.draft_accepted += accepted
                drafter.record(len(draft), accepted)
            elif draft:
                stream.forced_tokens += accepted
            if draft:
                self._drop_rejected(slot, len(draft) - accepted)

    def _emit(self, slot: Slot) -> bool:
        """Sample one token at `slot.logits_at` and send it; False when that ended the job."""
        try:
            token = self._pick(slot)
        except Exception as error:  # a failing sampler ends its own job only
            log.exception("sampling failed")
            self.end(slot, Finish(FinishReason.ERROR, f"sampling failed: {error}"))
            return False
        slot.next_token = None
        if self._vocab.ends_generation(token):
            self.end(slot, Finish(FinishReason.STOP))
            return False
        return self._send(slot, self._token(slot, token))

    def _take_forced(self, slot: Slot, token: int) -> bool:
        """Take a forced draft token without sampling it (its position's mask allows nothing else) and send it;
        False when that ended the job."""
        try:
            take_forced(slot.sampler, slot.grammar, token)
        except Exception as error:
            log.exception("sampling failed")
            self.end(slot, Finish(FinishReason.ERROR, f"sampling failed: {error}"))
            return False
        slot.next_token = None  # decoded already, as part of the draft
        return self._send(slot, Token(token, self._vocab.piece(token)))

    def _send(self, slot: Slot, sent: Token) -> bool:
        """Send a generated token (it becomes the next to decode); False when that ended the job."""
        slot.produced += 1
        self._outbox.append((slot.stream, sent))
        if slot.drafter is not None:
            slot.drafter.extend([sent.id])
        if slot.produced >= slot.job.max_tokens:
            self.end(slot, Finish(FinishReason.LENGTH))
            return False
        slot.next_token = sent.id
        return True

    def forced_tokens(self, slot: Slot, room: int) -> list[int]:
        """Up to `room` tokens `slot`'s grammar leaves no choice about after its next token, none that ends
        generation. They are always accepted: a recurrent memory need not keep its state before them."""
        if slot.mask is None:
            slot.mask = mask_buffer(self._n_vocab)
        forced = forced_tokens(slot.grammar, slot.mask, room)
        complete = until_end(forced, self._vocab.ends_generation)
        # The mask left is the next sampled position's when all of them are fed and none is sampled on the way.
        slot.mask_known = len(forced) < room and complete == forced and (not forced or blind_draft(slot, forced))
        return complete

    def keep_state_before_drafts(self, decoded: list[tuple[Slot, list[int]]]) -> None:
        """Before a step verifies drafts on a recurrent memory: keep the state of each slot whose drafter proposed
        some (they may be rejected; a grammar's forced tokens never are), to go back to."""
        if self._recurrent is None:
            return
        for slot, _ in decoded:
            slot.before_draft = (self._cache.length(slot.seq), self._recurrent.save(slot.seq)) \
                if slot.draft and slot.drafter is not None else None

    def _drop_rejected(self, slot: Slot, rejected: int) -> None:
        """Drop the cells of drafted tokens the model rejected, when the job goes on (an ended job's cells
        stay: they hold what those tokens are, for the prefix cache). A recurrent memory goes back to its state
        before the drafts instead, and the accepted tokens are decoded again in the next step (`redo`)."""
        before, slot.before_draft = slot.before_draft, None
        if slot.job is None or not rejected:
            return
        length = self._cache.length(slot.seq)
        if before is not None:
            start, state = before
            accepted = self._cache.tokens(slot.seq)[start:length - rejected]
            if self._recurrent.load(slot.seq, state) and self._cache.truncate(slot.seq, start):
                slot.redo = accepted
                return
        elif self._cache.truncate(slot.seq, length - rejected):
            return
        self.fail(slot, "this model's memory could not drop rejected draft tokens: turn speculation off")

    def _token(self, slot: Slot, token: int) -> Token:
        wanted = slot.job.sampling.logprobs
        if wanted is None:
            return Token(token, self._vocab.piece(token))
        logprob, best = token_logprobs(self._ctx.ctx, slot.logits_at, token, self._n_vocab, wanted)
        return Token(token, self._vocab.piece(token), logprob, tuple((self._vocab.piece(i), lp) for i, lp in best))

    def _pick_token(self, slot: Slot) -> int:
        if slot.grammar is None:
            return slot.sampler.sample(self._ctx, slot.logits_at)
        known, slot.mask_known = slot.mask_known, False
        return self._constrained.sample(slot.sampler, slot.grammar, slot.logits_at,
                                        keep_logits=slot.job.sampling.logprobs is not None,
                                        computed=slot.mask if known else None)

    def end(self, slot: Slot, finish: Finish) -> None:
        """End `slot`'s job with `finish`, freeing the slot before the client hears of it (at `send`)."""
        stream, sampler = slot.stream, slot.sampler
        slot.job = slot.stream = slot.sampler = slot.grammar = slot.drafter = None
        slot.mask_known = False
        slot.next_token = slot.awaits = None
        slot.draft = []
        slot.redo = []
        slot.before_draft = None
        slot.pending_prompt = []
        self._cache.release(slot.seq, time.monotonic())
        if sampler is not None:
            sampler.close()
        # Free the slot before telling the client: whoever reads the answer then sees the engine idle.
        self._outbox.append((stream, finish))

    def fail(self, slot: Slot, error: str) -> None:
        """End `slot`'s job with `error` after a failed step, dropping its cells (their contents are unknown)."""
        self._cache.forget(slot.seq)
        self.end(slot, Finish(FinishReason.ERROR, error))


def blind_draft(slot: Slot, draft: list[int]) -> bool:
    """Whether `draft` is `slot`'s grammar's forced tokens with no log-probabilities wanted: only the position
    after them needs logits (sampling each would only find the one token its mask leaves)."""
    return bool(draft) and slot.drafter is None and slot.grammar is not None and slot.job.sampling.logprobs is None


def until_end(tokens: list[int], ends_generation: Callable[[int], bool]) -> list[int]:
    """`tokens` up to (not including) the first end-of-generation token or image placeholder."""
    for i, token in enumerate(tokens):
        if token < 0 or ends_generation(token):  # a negative id stands for an image token: never drafted
            return tokens[:i]
    return tokens
