"""What the sampling loop asks of a step rule and of a post-step hook (it knows no more of any method).

The loop (:func:`diffinv.editing.sampler.sample`) walks the levels k = top .. 1 and, for each, calls the step
rule, then each hook in order. A step rule moves the latents from level k to k - 1 given ``guided``, the guided
noise prediction of the run (one denoiser call for every row's branches, combined by the guidance rule). A hook
sees the new latents and may replace them (DirectInversion's snap, Prompt-to-Prompt's local blend), read them
(progress, ProxNPI's masks) or stop the run (a non-finite latent).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import Tensor

from ..ddim import Schedule
from ..guidance import GuidanceRule

Guided = Callable[..., tuple[Tensor, "Tensor | None", "Tensor | None"]]
"""guided(z, k, need_x0=False, at=None) -> (eps, mask, x0): the guided noise prediction of latents z at level k's
timestep, the guidance rule's mask (ProxNPI's unedited region; None under classifier-free guidance) and the model's
own guided x0 where level k's alpha is 0 (a zero-terminal-SNR model's or a flow's top level: x0 cannot be read from
eps there) or where ``need_x0`` asks (None elsewhere). ``at`` = (timestep, alpha): evaluate z at that point instead
of level k's (a flow solver's midpoint between levels k - 1 and k), with step k's embeddings and guidance; x0 is then
always the model's own."""


class Step(Protocol):
    """One reverse step, level k -> k - 1, of every row of a run."""

    def start(self, z: Tensor, level: int) -> None:
        """Called once before the first step with the start latents and the start level."""

    def __call__(self, z: Tensor, k: int, guided: Guided, rule: GuidanceRule,
                 schedule: Schedule) -> tuple[Tensor, Tensor | None]:
        """The latents of level k - 1 and the guidance's mask of this step (None: no mask)."""

    def map_companions(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply ``fn`` to any latents the step carries beside z (EDICT's second sequence); none by default."""


class StepHook:
    """Base of the post-step hooks: each method does nothing until overridden."""

    def before(self, k: int) -> None:
        """Called before the step from level k (Prompt-to-Prompt: which step's windows apply)."""

    def after(self, z: Tensor, k: int, mask: Tensor | None, step: Step) -> Tensor:
        """The latents after the step that left level k (returned unchanged by default)."""
        return z
