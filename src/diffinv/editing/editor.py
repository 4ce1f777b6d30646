"""What an editor is to the pipeline: a small protocol over typed rows.

The pipeline (:meth:`diffinv.inversion.base.InversionMethod.edit`) lays out the rows of a batch, one per image to
produce, and hands them to its editor with a ``run`` function that samples any subset of them from given start
latents. The editor decides what to run and how: none (every row from its inverted latent), Prompt-to-Prompt
(every row at once under attention control), SDEdit (the edits from a noised latent, part of the way). The
pipeline knows no editor; an editor knows no inversion method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

from torch import Tensor

from ..ddim import Schedule
from ..models import TextLayout


@dataclass(frozen=True)
class Row:
    """One image a sampling run produces: an item's reconstruction or one of its edits."""

    item: int
    """Index of its item (its inversion) in the batch."""
    prompt: str
    """Its condition: the source prompt (reconstruction) or the target prompt (edit)."""
    target: str | None
    """The target prompt of an edit; None for the reconstruction."""

    @property
    def is_edit(self) -> bool:
        return self.target is not None


class SampleRows(Protocol):
    def __call__(self, picked: list[int], z_start: Tensor, **options) -> Tensor:
        """Latents z_0 of the rows ``picked`` (indices into the run's rows) from ``z_start`` (one per picked row);
        ``options``: ``start_level`` (start there instead of the records' own level, ``z_start`` being latents of
        that level) and ``controller`` (an attention controller the editor installed on the denoiser: Prompt-to-
        Prompt's, RF-Edit's value store; told the run's rows and each step)."""


FlowVelocity = Callable[[Tensor, int, list[str], float, bool], Tensor]
"""velocity(x, k, prompts, scale, embedded) -> v: a flow model's velocity dx/ds (v = eps - x0) of flow latents x
(one row per prompt) at level k's sigma and timestep (timestep 0 at level 0), under classifier-free guidance at
``scale`` with the null prompt (one call of the conditional rows, then the null ones; the conditional rows alone at
scale 1), or (``embedded``) with ``scale`` given to a guidance-distilled denoiser's embedding (FLUX.1-dev)."""


@dataclass
class EditContext:
    """What an editor may read about the batch it edits."""

    layout: TextLayout
    """The model's text-token layout (which conditioning rows hold which encoder's tokens)."""
    schedule: Schedule
    item_ids: list[str]
    """Each item's id (seeds SDEdit's noise)."""
    sources: list[str]
    """Each item's source prompt."""
    z0: list[Tensor]
    """Each item's source latent (C, h, w)."""
    trajectories: list[Tensor]
    """Each item's inversion trajectory (N + 1, C, h, w)."""
    negative_is_source: bool
    """Every item's unconditional branch is its source prompt (NPI-like): Prompt-to-Prompt controls it too."""
    unet: object
    device: object
    start_level: int
    """The level the records' sampling starts from (N, or lower: DDPM inversion's skip, a strength): a run from
    it samples that many steps."""
    annotations: list[dict] | None = None
    """Each item's dataset annotations (:attr:`diffinv.data.Item.meta`: PIE-Bench's blended_word, ...), where the
    pipeline has them (None: an edit of records alone)."""
    velocity: FlowVelocity | None = None
    """The model's velocity for any latents, prompts and guidance, on flow models (None on the others): what an
    inversion-free editor (FlowEdit) drives its own ODE with."""
    guidance_embedding: bool = False
    """The denoiser is guidance-distilled (FLUX.1-dev's guidance embedding)."""

    def first_row(self, rows: list[Row]) -> dict[int, int]:
        """Each item's first row (its reconstruction: the source of its edits' attention)."""
        first: dict[int, int] = {}
        for r, row in enumerate(rows):
            first.setdefault(row.item, r)
        return first


class Editor:
    """Base of the editing recipes a method's ``editor`` field takes; itself the plain prompt swap: every row
    sampled from its inverted latent with its own condition."""

    edit_name: ClassVar[str] = "prompt"
    """What metrics.jsonl's ``edit_with`` field says of an edit made by this editor."""
    needs_flow: ClassVar[bool] = False
    """The editor drives a rectified flow's ODE (FlowEdit) or needs a flow model's joint attention (RF-Edit): refused
    on the other models in one line, before any work."""
    flow_need: ClassVar[str] = "solves a rectified flow's ODE"
    """What that refusal says the editor does."""

    def check(self, layout: TextLayout, source: str, targets: list[str]) -> None:
        """Refuse, before any work and in one line, prompts this editor cannot take (nothing to refuse here)."""

    def check_model(self, denoiser) -> None:
        """Refuse, before any work and in one line, a denoiser this editor cannot act on (none here)."""

    def check_steps(self, num_steps: int) -> None:
        """Refuse, before any work and in one line, a step count this editor cannot use (none here)."""

    def check_backbone(self, backbone) -> None:
        """Refuse, before any work and in one line, a model whose family cannot give what this editor asks of it
        (FlowEdit's scales for a guidance embedding the model lacks); nothing here."""

    def sample(self, run: SampleRows, rows: list[Row], starts: Tensor, ctx: EditContext) -> Tensor:
        """The latents of every row (aligned with ``rows``); ``starts``: each row's inverted start latent."""
        return run(list(range(len(rows))), starts)
