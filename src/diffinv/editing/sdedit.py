"""SDEdit (Meng et al. 2022): noise the source latent part-way, then denoise it with the target prompt."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..ddim import Schedule, from_x0
from ..errors import DiffinvError
from ..seeds import keyed_normal
from .editor import EditContext, Editor, Row, SampleRows


class SDEdit(Editor):
    """Start the edits at the level ``strength`` of the way to pure noise, from the source latent noised there
    (SDEdit) or from the DDIM-inverted latent of that level (NPI paper appendix C.3); the reconstruction row
    is the inversion method's own. Where the records start sampling below level N (DDPM inversion's skip, EDICT's
    or CycleDiffusion's strength: ``EditContext.start_level``), the edits start at most there: the records hold no
    inverted latents, step noise or second EDICT sequence above it."""

    edit_name = "sdedit"

    def __init__(self, strength: float = 0.5, start_from: Literal["noise", "inversion"] = "noise", seed: int = 0):
        """
        Args:
            strength: Fraction t0 of the sampling steps the edit runs (0: no change, 1: from pure noise); clipped
                to the records' start level where they start lower.
            start_from: 'noise': sqrt(a) z0 + sqrt(1 - a) n with fresh Gaussian n (SDEdit); 'inversion': the DDIM
                inversion trajectory's latent at that level (deterministic).
            seed: Run seed of the noise of 'noise'. Each edit draws its own noise from (this seed, the item's id,
                the target prompt), so an edit is the same alone or beside any other items and prompts.
        """
        if not 0 < strength <= 1:
            raise DiffinvError(f"SDEdit strength must be in (0, 1], got {strength}")
        self.strength, self.start_from, self.seed = strength, start_from, seed

    def start_level(self, num_steps: int, records_level: int | None = None) -> int:
        """The level the edits start from: round(strength N), in 1..N, and at most ``records_level`` (the level
        the records' sampling starts from, None: N): above it the records computed nothing."""
        level = max(1, min(num_steps, round(self.strength * num_steps)))
        return level if records_level is None else min(level, records_level)

    def start_latents(self, z0: Tensor, trajectory: Tensor, schedule: Schedule, keys: list[tuple[str, str]],
                      level: int | None = None) -> Tensor:
        """(B, C, h, w) start latents of the edit rows at ``level`` (None: :meth:`start_level`). ``trajectory``:
        (N + 1, B, ...); ``keys``: (item id, target prompt) of each row, which (with ``seed``) seed that row's
        noise."""
        k = self.start_level(schedule.num_steps) if level is None else level
        if self.start_from == "inversion":
            return trajectory[k]
        noise = torch.stack([keyed_normal(tuple(z0.shape[1:]), self.seed, *key) for key in keys]).to(z0)
        return from_x0(z0, noise, schedule.alphas[k].to(z0.dtype))

    def sample(self, run: SampleRows, rows: list[Row], starts: Tensor, ctx: EditContext) -> Tensor:
        """The reconstructions as the method samples them; the edits from :meth:`start_latents`, part of the way."""
        recon = [r for r, row in enumerate(rows) if not row.is_edit]
        edits = [r for r, row in enumerate(rows) if row.is_edit]
        latents = torch.empty_like(starts)
        latents[recon] = run(recon, starts[recon])
        if edits:
            z0 = torch.stack([ctx.z0[rows[r].item] for r in edits]).to(starts.device)
            traj = torch.stack([ctx.trajectories[rows[r].item] for r in edits], dim=1).to(starts.device)
            keys = [(ctx.item_ids[rows[r].item], rows[r].target) for r in edits]
            level = self.start_level(ctx.schedule.num_steps, ctx.start_level)
            latents[edits] = run(edits, self.start_latents(z0, traj, ctx.schedule, keys, level).to(starts.dtype),
                                 start_level=level)
        return latents
