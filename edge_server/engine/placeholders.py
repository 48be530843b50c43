"""Image placeholder ids in a token record, and the positions a record takes (pure).

An image's tokens are held in prompts and in the prefix cache's records as negative ids (never a vocabulary id),
one per image token, derived from the image's digest (so that the same image matches again and a different one
never does) and carrying what positions need: how far the image advances the position and whether a cut before
a token would split its image. Most projectors take one position per image token; M-RoPE models (Qwen2-VL to
Qwen3.5) place the whole image at its start position (rows and columns in the other sections) and move the next
token on by max(width, height) in tokens, so a record's position is not its length.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice

_ADVANCE_BITS = 13
_ROW_BITS = 17
MAX_ADVANCE = (1 << _ADVANCE_BITS) - 1  # positions one image may take (an M-RoPE image's longer side)
MAX_ROWS = 1 << _ROW_BITS  # tokens one image may take
_LAST = 1 << (_ADVANCE_BITS + _ROW_BITS)
_DIGEST_SHIFT = _ADVANCE_BITS + _ROW_BITS + 1


def placeholders(digest: str, n_tokens: int, n_pos: int | None = None) -> list[int]:
    """The ids standing for an image of `n_tokens` tokens: one position each (`n_pos` None), or, on an M-RoPE
    model, all of them at the image's start position and `n_pos` positions taken after its last token."""
    if not 0 < n_tokens <= MAX_ROWS or (n_pos is not None and not 0 < n_pos <= MAX_ADVANCE):
        raise ValueError(f"an image of {n_tokens} tokens over {n_pos} positions")
    base = int(digest[:15], 16) << _DIGEST_SHIFT
    if n_pos is None:
        ids = [-1 - (base | row << _ADVANCE_BITS | 1) for row in range(n_tokens)]
    else:
        ids = [-1 - (base | row << _ADVANCE_BITS) for row in range(n_tokens)]
        ids[-1] = -1 - (base | (n_tokens - 1) << _ADVANCE_BITS | n_pos)
    ids[-1] -= _LAST
    return ids


def advance(token: int) -> int:
    """Positions `token` moves the next one on by (1 for a text token)."""
    return 1 if token >= 0 else (-1 - token) & MAX_ADVANCE


def span(tokens: Sequence[int]) -> int:
    """Positions `tokens` take."""
    return len(tokens) + sum(advance(t) - 1 for t in tokens if t < 0)


def position_at(tokens: Sequence[int], length: int, position: int) -> int:
    """The position after the first `length` of `tokens`, which take `position` positions in all."""
    if length >= len(tokens) // 2:
        return position - span(tokens[length:])
    return length + sum(advance(t) - 1 for t in islice(tokens, length) if t < 0)


def _inner(token: int) -> bool:
    return token < 0 and ((-1 - token) >> _ADVANCE_BITS) & (MAX_ROWS - 1) > 0


def whole_images(tokens: Sequence[int], keep: int) -> int:
    """The most of `tokens`' first `keep` that can be kept without splitting an image they go on with (a cut
    inside one would drop all its cells on an M-RoPE model, and keep rows that attended to the dropped ones on a
    model that sees images whole)."""
    while 0 < keep < len(tokens) and _inner(tokens[keep]):
        keep -= 1
    return keep


def ends_inside_image(tokens: Sequence[int]) -> bool:
    """Whether `tokens` stop in the middle of an image (no checkpoint is worth taking there)."""
    return bool(tokens) and tokens[-1] < 0 and not (-1 - tokens[-1]) & _LAST


def image_ends(tokens: Sequence[int]) -> list[int]:
    """Where each image in `tokens` ends (the index after its last token): where the next question about the same
    image parts from the last one."""
    return [i + 1 for i, t in enumerate(tokens) if t < 0 and (-1 - t) & _LAST]
