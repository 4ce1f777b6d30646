"""Token bookkeeping of Prompt-to-Prompt (Hertz et al. 2022): which tokens each word owns, and how the tokens of a
target prompt map onto the source prompt's, pure torch.

Every mapping is a matrix M (L, L) and a mask a (L,) over token positions (L = the tokenizer's padded length, or a
segment's ``length``): the edited cross-attention of a target row is ``A_src @ M + A_tgt * (1 - a)`` — replace
(word swap) has a = 1, refine keeps the target's own attention where a token has no counterpart in the source
(a = 0). A token sequence either opens with a start token (CLIP's <|startoftext|>, ``start_token``) or not (T5);
either way the end token follows the last word and padding follows it. :func:`layout_mapping` lays the mappings of
a model's text segments (SD 3: CLIP then T5) block-diagonally over its L token rows.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..errors import DiffinvError
from ..models import Segment, TextLayout


def word_token_spans(tokenizer, prompt: str, start_token: bool = True) -> list[tuple[str, list[int]]]:
    """(word, token positions) of each whitespace-separated word, positions counted after the start token, if any
    (:meth:`~diffinv.models.Segment.word_spans`)."""
    return Segment("clip", 0, tokenizer.model_max_length, tokenizer, start_token).word_spans(prompt)


def _length(tokenizer, prompt: str, L: int) -> int:
    """The prompt's token count with its special tokens, cut at L (the end token's position + 1)."""
    return min(len(tokenizer(prompt).input_ids), L)


def _tail_identity(m: Tensor, a: Tensor, src_len: int, tgt_len: int) -> None:
    """Map the end token and the padding of the target onto the source's, position by position from the end."""
    L = m.shape[0]
    for j in range(tgt_len - 1, L):
        i = min(L - 1, j - tgt_len + src_len)
        m[i, j], a[j] = 1.0, 1.0


def replace_mapping(tokenizer, source: str, target: str,
                    tail: Literal["same_position", "shifted"] = "same_position", length: int | None = None,
                    start_token: bool = True) -> tuple[Tensor, Tensor]:
    """Word swap: the i-th word of ``target`` takes the attention of the i-th word of ``source``. A swapped word
    of another token count gives each of its target tokens the sum of the source word's tokens divided by the
    target's token count (the attention mass is preserved: rows still sum to 1), as google/prompt-to-prompt's
    replacement mapper does. Needs equal word counts.

    ``tail``: the tokens after the last swapped word (words, end token, padding). 'same_position' maps target
    position j onto source position j, as the reference does; 'shifted' maps them word by word, then the end
    token and the padding from the end (the same thing unless a swapped word changed the token count).

    ``length``: the padded token count (default: the tokenizer's ``model_max_length``); ``start_token``: the
    sequence opens with one (CLIP), else the first word is at position 0 (T5).
    """
    src = word_token_spans(tokenizer, source, start_token)
    tgt = word_token_spans(tokenizer, target, start_token)
    if len(src) != len(tgt):
        raise DiffinvError(
            f"prompt-to-prompt replace needs prompts with equal word counts: source {source!r} has {len(src)} "
            f"words, target {target!r} has {len(tgt)} (use mode 'refine' for added or removed words)")
    L = tokenizer.model_max_length if length is None else length
    m, a = torch.zeros(L, L), torch.zeros(L)
    if start_token:
        m[0, 0], a[0] = 1.0, 1.0
    swapped = [k for k, ((ws, _), (wt, _)) in enumerate(zip(src, tgt)) if ws != wt]
    mapped = len(src) if tail == "shifted" or not swapped else swapped[-1] + 1
    end = int(start_token)
    for (_, s), (_, t) in zip(src[:mapped], tgt[:mapped]):
        s, t = [i for i in s if i < L - 1], [j for j in t if j < L - 1]
        if len(s) == len(t):
            for i, j in zip(s, t):
                m[i, j] = 1.0
        elif s and t:
            m[torch.tensor(s)[:, None], torch.tensor(t)[None, :]] = 1.0 / len(t)
        a[t] = 1.0
        if t:
            end = t[-1] + 1
    if tail == "shifted":
        _tail_identity(m, a, _length(tokenizer, source, L), _length(tokenizer, target, L))
    else:
        for j in range(end, L):
            m[j, j], a[j] = 1.0, 1.0
    return m, a


def global_alignment(x: list[int], y: list[int], match: int = 1, mismatch: int = -1, gap: int = 0) -> list[int]:
    """Needleman-Wunsch alignment of sequence y onto x: for each y[j], the aligned index in x or -1.

    Scores as the Prompt-to-Prompt reference: gap 0, match 1, mismatch -1; ties prefer a diagonal move.
    """
    n, k = len(x), len(y)
    score = [[0] * (k + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        score[i][0] = i * gap
    for j in range(1, k + 1):
        score[0][j] = j * gap
    for i in range(1, n + 1):
        for j in range(1, k + 1):
            diag = score[i - 1][j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            score[i][j] = max(diag, score[i - 1][j] + gap, score[i][j - 1] + gap)
    out, i, j = [-1] * k, n, k
    while i > 0 and j > 0:
        if score[i][j] == score[i - 1][j - 1] + (match if x[i - 1] == y[j - 1] else mismatch) and x[i - 1] == y[j - 1]:
            out[j - 1] = i - 1
            i, j = i - 1, j - 1
        elif score[i][j] == score[i - 1][j] + gap:
            i -= 1
        elif score[i][j] == score[i][j - 1] + gap:
            j -= 1
        else:
            i, j = i - 1, j - 1
    return out


def refine_mapping(tokenizer, source: str, target: str, length: int | None = None,
                   start_token: bool = True) -> tuple[Tensor, Tensor]:
    """Refinement: target tokens aligned to equal source tokens (global alignment) take the source's attention;
    new tokens (a = 0) keep their own. ``length``, ``start_token``: as :func:`replace_mapping`'s."""
    L = tokenizer.model_max_length if length is None else length
    o = int(start_token)  # the first word's position
    x = tokenizer(source, truncation=True, max_length=L).input_ids
    y = tokenizer(target, truncation=True, max_length=L).input_ids
    aligned = global_alignment(x[o:-1], y[o:-1])
    m, a = torch.zeros(L, L), torch.zeros(L)
    if start_token:
        m[0, 0], a[0] = 1.0, 1.0
    for j, i in enumerate(aligned):
        if i >= 0:
            m[i + o, j + o], a[j + o] = 1.0, 1.0
    _tail_identity(m, a, len(x), len(y))
    return m, a


def segment_mapping(segment: Segment, source: str, target: str, mode: Literal["replace", "refine"],
                    tail: Literal["same_position", "shifted"] = "same_position") -> tuple[Tensor, Tensor]:
    """(M, a) over one segment's rows, built with its tokenizer, length and start token; a segment without a
    tokenizer (SD 3 without T5: zero rows) maps each row onto itself (M = I, a = 1)."""
    L = segment.length
    if segment.tokenizer is None:
        return torch.eye(L), torch.ones(L)
    if mode == "replace":
        return replace_mapping(segment.tokenizer, source, target, tail=tail, length=L, start_token=segment.start_token)
    return refine_mapping(segment.tokenizer, source, target, length=L, start_token=segment.start_token)


def layout_mapping(layout: TextLayout, source: str, target: str, mode: Literal["replace", "refine"],
                   tail: Literal["same_position", "shifted"] = "same_position") -> tuple[Tensor, Tensor]:
    """(M, a) over the layout's L token rows: each segment's :func:`segment_mapping` on the diagonal (a word's
    CLIP tokens map onto the source's CLIP tokens, its T5 tokens onto the source's T5 tokens; no mass crosses
    segments)."""
    L = layout.tokens
    m, a = torch.zeros(L, L), torch.zeros(L)
    for segment in layout.segments:
        rows = slice(segment.start, segment.start + segment.length)
        m[rows, rows], a[rows] = segment_mapping(segment, source, target, mode, tail)
    return m, a
