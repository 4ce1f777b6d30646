"""The conditioning a family gives its denoiser, typed: token states and a pooled embedding, and the text-token
layout that says which encoder wrote which token row.

Methods, editors and the sampler carry a prompt's conditioning as one tensor (B, R, D): null-text inversion
optimises it whole, negative-prompt inversion swaps it whole, records store it. :class:`TextLayout` is what that
tensor *is*: its first L rows are the token states the denoiser's (cross- or joint-) attention reads, one
:class:`Segment` per text encoder in order (SD 1.x/2.x, SDXL: CLIP; SD 3: CLIP then T5; FLUX.1: T5), and its last
``pooled_rows`` rows hold the pooled embedding of width P, row after row (zero after its last entry), however
much wider than D it is. :meth:`TextLayout.pack` and :meth:`TextLayout.unpack` turn a :class:`Conditioning` into
that tensor and back; :meth:`TextLayout.word_positions` finds a word's token rows in every segment, so an editor
can address a word in CLIP + T5 sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import DiffinvError


class Conditioning(NamedTuple):
    """A batch of prompts' conditioning, typed."""

    tokens: Tensor
    """(B, L, D) the text token states the denoiser's attention reads."""
    pooled: Tensor | None
    """(B, P) the pooled text embedding (SDXL's, SD 3's, FLUX.1's), None where the family has none."""


@dataclass(frozen=True)
class Segment:
    """One text encoder's token states: rows ``start .. start + length`` of the token rows."""

    name: str
    """The encoder ('clip', 't5')."""
    start: int
    length: int
    tokenizer: object = field(compare=False, repr=False)
    """The tokenizer that made its tokens (None where the model has no such encoder: SD 3 without T5, whose rows
    are zeros)."""
    start_token: bool = True
    """Its first token is a start token (CLIP's <|startoftext|>; T5 has none)."""

    def word_spans(self, prompt: str) -> list[tuple[str, list[int]]]:
        """(word, token positions within the segment) of each whitespace-separated word of ``prompt``, counted
        after the start token (if any), the tokenizer's pieces of the word alone (no positions: no tokenizer)."""
        if self.tokenizer is None:
            return [(word, []) for word in prompt.split()]
        spans, pos = [], int(self.start_token)
        for word in prompt.split():
            n = len(self.tokenizer(word, add_special_tokens=False).input_ids)
            spans.append((word, list(range(pos, pos + n))))
            pos += n
        return spans


@dataclass(frozen=True)
class TextLayout:
    """Which rows of a conditioning tensor (B, R, D) hold what (see the module docstring)."""

    segments: tuple[Segment, ...]
    width: int
    """D: the width of a token state (and of a row)."""
    pooled: int = 0
    """P: the pooled embedding's width (0: none)."""
    reader: int = 0
    """The index of the segment whose encoder's truncation decides what the denoiser reads of a prompt (CLIP's
    77 on SD and SD 3, T5's ``max_sequence_length`` on FLUX.1): what the long-prompt warning counts."""

    @property
    def tokens(self) -> int:
        """L: the number of token rows."""
        return sum(s.length for s in self.segments)

    @property
    def pooled_rows(self) -> int:
        """The rows the pooled embedding takes: ceil(P / D)."""
        return math.ceil(self.pooled / self.width)

    @property
    def rows(self) -> int:
        """R = L + pooled_rows."""
        return self.tokens + self.pooled_rows

    def pack(self, tokens: Tensor, pooled: Tensor | None = None) -> Tensor:
        """(B, R, D): the token states (B, L, D), then the pooled embedding (B, P) laid row after row, zero-padded
        to a whole row."""
        if tuple(tokens.shape[1:]) != (self.tokens, self.width):
            raise DiffinvError(f"token states of shape {tuple(tokens.shape)} do not fit the layout (L {self.tokens}, "
                               f"D {self.width})")
        if not self.pooled:
            return tokens
        if pooled is None or pooled.shape[-1] != self.pooled:
            raise DiffinvError(f"the layout holds a pooled embedding of width {self.pooled}, got "
                               f"{None if pooled is None else tuple(pooled.shape)}")
        rows = torch.nn.functional.pad(pooled, (0, self.pooled_rows * self.width - self.pooled))
        return torch.cat([tokens, rows.view(-1, self.pooled_rows, self.width).to(tokens.dtype)], dim=1)

    def unpack(self, cond: Tensor) -> Conditioning:
        """The :class:`Conditioning` in a (B, R, D) tensor made by :meth:`pack` (views, no copy of the tokens)."""
        if tuple(cond.shape[1:]) != (self.rows, self.width):
            raise DiffinvError(f"conditioning of shape {tuple(cond.shape)} does not fit the layout ({self.rows} rows "
                               f"of {self.width})")
        tokens = cond[:, : self.tokens]
        if not self.pooled:
            return Conditioning(tokens, None)
        return Conditioning(tokens, cond[:, self.tokens:].reshape(cond.shape[0], -1)[:, : self.pooled])

    @property
    def prompt_reader(self) -> tuple[object, int]:
        """(tokenizer, token limit) of the encoder that reads the prompt (:attr:`reader`)."""
        segment = self.segments[self.reader]
        return segment.tokenizer, segment.length

    def word_positions(self, prompt: str, words: list[str]) -> list[int]:
        """The token rows (of the L) of every occurrence of any of ``words`` (case-insensitive, punctuation at a
        word's end ignored) in ``prompt``, in every segment; a word cut off by a segment's length has no rows
        there (its last row is the end token's when a prompt is truncated)."""
        wanted = {w.lower() for w in words}
        return [s.start + p for s in self.segments for word, ps in s.word_spans(prompt)
                if word.lower().strip(".,;:!?") in wanted for p in ps if p < s.length - 1]
