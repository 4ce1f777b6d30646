"""Token bookkeeping of Prompt-to-Prompt (Hertz et al. 2022): which tokens each word owns, and how the tokens of a
target prompt map onto the source prompt's, pure torch.

Every mapping is a matrix M (L, L) and a mask a (L,) over token positions (L = the tokenizer's padded length):
the edited cross-attention of a target row is ``A_src @ M + A_tgt * (1 - a)`` — replace (word swap) has a = 1,
refine keeps the target's own attention where a token has no counterpart in the source (a = 0).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..errors import DiffinvError
from ..models import Segment


def word_token_spans(tokenizer, prompt: str) -> list[tuple[str, list[int]]]:
    """(word, token positions) of each whitespace-separated word, positions counted after the start token (a CLIP
    tokenizer's :meth:`~diffinv.models.Segment.word_spans`)."""
    return Segment("clip", 0, tokenizer.model_max_length, tokenizer).word_spans(prompt)


def _length(tokenizer, prompt: str) -> int:
    return min(len(tokenizer(prompt).input_ids), tokenizer.model_max_length)


def _tail_identity(m: Tensor, a: Tensor, src_len: int, tgt_len: int) -> None:
    """Map the end token and the padding of the target onto the source's, position by position from the end."""
    L = m.shape[0]
    for j in range(tgt_len - 1, L):
        i = min(L - 1, j - tgt_len + src_len)
        m[i, j], a[j] = 1.0, 1.0


def replace_mapping(tokenizer, source: str, target: str,
                    tail: Literal["same_position", "shifted"] = "same_position") -> tuple[Tensor, Tensor]:
    """Word swap: the i-th word of ``target`` takes the attention of the i-th word of ``source``. A swapped word
    of another token count gives each of its target tokens the sum of the source word's tokens divided by the
    target's token count (the attention mass is preserved: rows still sum to 1), as google/prompt-to-prompt's
    replacement mapper does. Needs equal word counts.

    ``tail``: the tokens after the last swapped word (words, end token, padding). 'same_position' maps target
    position j onto source position j, as the reference does; 'shifted' maps them word by word, then the end
    token and the padding from the end (the same thing unless a swapped word changed the token count).
    """
    src, tgt = word_token_spans(tokenizer, source), word_token_spans(tokenizer, target)
    if len(src) != len(tgt):
        raise DiffinvError(
            f"prompt-to-prompt replace needs prompts with equal word counts: source {source!r} has {len(src)} "
            f"words, target {target!r} has {len(tgt)} (use mode 'refine' for added or removed words)")
    L = tokenizer.model_max_length
    m, a = torch.zeros(L, L), torch.zeros(L)
    m[0, 0], a[0] = 1.0, 1.0  # start token
    swapped = [k for k, ((ws, _), (wt, _)) in enumerate(zip(src, tgt)) if ws != wt]
    mapped = len(src) if tail == "shifted" or not swapped else swapped[-1] + 1
    end = 1
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
        _tail_identity(m, a, _length(tokenizer, source), _length(tokenizer, target))
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


def refine_mapping(tokenizer, source: str, target: str) -> tuple[Tensor, Tensor]:
    """Refinement: target tokens aligned to equal source tokens (global alignment) take the source's attention;
    new tokens (a = 0) keep their own."""
    L = tokenizer.model_max_length
    x = tokenizer(source, truncation=True, max_length=L).input_ids
    y = tokenizer(target, truncation=True, max_length=L).input_ids
    aligned = global_alignment(x[1:-1], y[1:-1])
    m, a = torch.zeros(L, L), torch.zeros(L)
    m[0, 0], a[0] = 1.0, 1.0
    for j, i in enumerate(aligned):
        if i >= 0:
            m[i + 1, j + 1], a[j + 1] = 1.0, 1.0
    _tail_identity(m, a, len(x), len(y))
    return m, a
