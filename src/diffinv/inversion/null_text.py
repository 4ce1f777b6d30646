"""Null-text inversion (Mokady et al. 2023; NPI paper §3.3 and appendix B), run by ``diffinv fit``."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from ..backbone import BackboneConfig
from ..editing.prompt_to_prompt import Editor
from ..ddim import Schedule
from .optimizing import OptimizingInversion
from .tracking import TrackingSchedule, track_trajectory


class NullTextInversion(OptimizingInversion):
    """Optimises one unconditional embedding per timestep so CFG sampling tracks the DDIM (w = 1) trajectory.

    Learnable parameters: the per-step null embeddings of every image in the batch (per-sample Adam states and
    early stopping, so batching never changes a result). The conditional branch is computed once per step
    without grad; gradients flow to the embedding only.
    """

    method_name = "null_text"

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_inner_steps: int = 10,
        lr: float = 1e-2,
        lr_decay: float = 0.01,
        lr_floor: float = 0.5,
        early_stop_epsilon: float = 1e-5,
        early_stop_delta: float = 2e-5,
        schedule_steps: int | None = 50,
        init: Literal["null", "source"] = "null",
        gradient_checkpointing: bool = False,
        editor: Editor | None = None,
    ):
        """
        Args:
            backbone: The Stable Diffusion to use; default: the embedded shapes model.
            num_inference_steps: DDIM steps of inversion and sampling (the papers use 50).
            guidance_scale: CFG scale w the embeddings are optimised for (the papers use 7.5).
            num_inner_steps: Adam iterations per timestep at most (reference: 10).
            lr: Adam learning rate at t = T (reference: 1e-2).
            lr_decay: The i-th step (i = 0 at t = T) of N uses lr max(lr_floor, 1 - lr_decay i 50 / N): the
                reference's 1e-2 (1 - i / 100) at 50 steps, falling from lr to lr / 2 at any N; below 50 steps
                the lr is multiplied by 50 / N (see schedule_steps).
            lr_floor: Lowest lr, as a fraction of ``lr`` (binds only with schedule_steps none beyond 50 steps).
            early_stop_epsilon: An image stops iterating at step i once its loss < epsilon + delta i 50 / N
                (reference: 1e-5 + i 2e-5 at 50 steps). The check follows the update, as in the reference: every
                step takes at least one Adam step.
            early_stop_delta: See ``early_stop_epsilon``.
            schedule_steps: The step count the reference's lr and stop schedules are written for (its 50): at
                other step counts they follow N, so NTI converges at any N (scripts/benchmark_reconstruction.py,
                10 steps: 33.26 dB with it, 30.24 without; NPI 33.06); none: the reference's formulas verbatim
                (configs/reference/null_text.yaml).
            init: Start of the first step's embedding: 'null' (the null prompt, as the paper) or 'source' (the
                source prompt: negative-prompt inversion's solution, NPI eq. 6). 'source' reconstructs a little
                better at few steps (scripts/benchmark_reconstruction.py, 10 steps: 33.60 against 33.26 dB) but
                its embeddings stay near the source prompt and edit like NPI: on the shapes editing benchmark
                (72 edits, 20 steps) accuracy 0.85 and attributes kept 0.67, against 0.97 and 0.86 from 'null'.
            gradient_checkpointing: Recompute the UNet's activations in each backward pass instead of keeping
                them (diffusers' gradient checkpointing): less memory for the optimisation, about one more UNet
                forward per iteration; the results are the same (tested).
            editor: How target prompts edit: none (plain prompt swap), Prompt-to-Prompt or SDEdit.
        """
        super().__init__(backbone, num_inference_steps, guidance_scale, editor)
        self.gradient_checkpointing = gradient_checkpointing
        self.tracking = TrackingSchedule(num_inner_steps, lr, lr_decay, early_stop_epsilon, early_stop_delta, lr_floor,
                                         schedule_steps)
        self.init = init

    def optimize(self, trajectory: Tensor, source_emb: Tensor, schedule: Schedule) -> dict:
        null = self.backbone.encode_prompts([""]).expand_as(source_emb)
        start = source_emb if self.init == "source" else null
        out = track_trajectory(self.backbone.predict, schedule, trajectory, source_emb, start, self.guidance_scale,
                               self.tracking)
        return {
            "unconditional": out["unconditional"],
            "extra": {"step_loss": out["step_loss"], "inner_iterations": out["inner_iterations"]},
        }
