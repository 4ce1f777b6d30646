"""Latent trajectory optimisation, latent-TOP ("On the robustness of diffusion inversion in image
manipulation", §2), run by ``diffinv fit``.

Choices where the paper is silent (documented, tested):
* The text bias z_∅ is **per timestep**: the paper optimises "m = 10 iterations for each timestamp" along the
  trajectory, which only a per-step variable allows without undoing earlier steps. u_k = ∅ + z_∅,k.
* The noise bias z_T (x̃_T = x_T + z_T, §2.1) only influences the trajectory through the first step, so it is
  optimised there, jointly with z_∅,N.
* Multi-start (§2.2): K random starts (z_∅, z_T) ~ (σ_text·std(∅)·N(0, I), σ_noise·N(0, I)), the zero start among
  them, each moved by a few "hops" (Adam steps on the first step's loss); the start with the lowest loss then
  is optimised. The DDIM (w = 1) trajectory is the prior: z̄_N = z*_N + z_T and every step is matched to z*.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backbone import BackboneConfig
from ..editing.prompt_to_prompt import Editor
from ..ddim import Schedule, ddim_step
from ..guidance import cfg
from ..optim import AdamState, masked_adam_step
from .base import OptimizingInversion
from .tracking import TrackingSchedule, per_sample_mse, track_trajectory


def choose_start(eps_fn, schedule: Schedule, trajectory: Tensor, cond: Tensor, null: Tensor, guidance_scale: float,
                 num_starts: int, hops: int, lr: float, text_std: float, noise_std: float,
                 generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Latent-TOP's multiple starts: (text bias (B, L, D), noise bias (B, C, h, w), losses (B, K) of all starts)."""
    n, B = schedule.num_steps, cond.shape[0]
    K = max(1, num_starts)
    dev = cond.device
    # Each image draws its starts from the same seed, so a batch gives every image what a run alone would.
    state = generator.get_state()
    text, noise = [], []
    for _ in range(B):
        generator.set_state(state)
        text.append(torch.randn((K, *null.shape[1:]), generator=generator))
        noise.append(torch.randn((K, *trajectory[n].shape[1:]), generator=generator))
    text = torch.stack(text, 1).to(dev) * text_std * null.std()
    noise = torch.stack(noise, 1).to(dev) * noise_std
    text[0], noise[0] = 0, 0  # the prior itself is always a candidate
    text, noise = text.flatten(0, 1), noise.flatten(0, 1)  # (K*B, ...) rows: candidate-major
    rep = lambda x: x.repeat(K, *([1] * (x.dim() - 1)))  # noqa: E731
    c, base, target = rep(cond), rep(null), rep(trajectory[n - 1])
    z_n = rep(trajectory[n])
    t = schedule.timesteps[n - 1]
    a_t, a_prev = schedule.alphas[n].to(z_n.dtype), schedule.alphas[n - 1].to(z_n.dtype)

    def first_step_loss(tb: Tensor, nb: Tensor) -> Tensor:
        z = z_n + nb
        return per_sample_mse(ddim_step(z, cfg(eps_fn(z, t, base + tb), eps_fn(z, t, c), guidance_scale), a_t, a_prev),
                              target)

    params = [text.requires_grad_(True), noise.requires_grad_(True)]
    states = [AdamState.zeros_like(p) for p in params]
    everyone = torch.ones(K * B, dtype=torch.bool, device=dev)
    for _ in range(hops):
        grads = torch.autograd.grad(first_step_loss(*params).sum(), params)
        for p, g, s in zip(params, grads, states):
            masked_adam_step(p, g, s, lr, everyone)
    with torch.no_grad():
        losses = first_step_loss(text, noise).view(K, B)
        best = losses.argmin(dim=0)
        pick = lambda x: x.detach().view(K, B, *x.shape[1:])[best, torch.arange(B, device=dev)]  # noqa: E731
        return pick(text), pick(noise), losses.T


class LatentTrajectoryOptimization(OptimizingInversion):
    """latent-TOP: learnable text bias on the null embedding (per step) and noise bias on x_T, trajectory matching
    under CFG with the DDIM trajectory as prior, multiple starts."""

    method_name = "latent_top"

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
        num_starts: int = 20,
        hops: int = 3,
        text_init_std: float = 0.1,
        noise_init_std: float = 0.1,
        seed: int = 0,
        editor: Editor | None = None,
    ):
        """
        Args:
            backbone: The Stable Diffusion to use; default: the embedded shapes model.
            num_inference_steps: DDIM steps T (the paper: 50).
            guidance_scale: CFG scale G of the reconstruction (the paper: 7.5).
            num_inner_steps: Iterations m per timestep (the paper: 10).
            lr: Adam learning rate at t = T (paper silent; NTI's 1e-2).
            lr_decay: The i-th step of N uses lr max(lr_floor, 1 - lr_decay i 50 / N) (NTI's numbers).
            lr_floor: Lowest lr, as a fraction of ``lr``.
            early_stop_epsilon: Stop an image's step-i iterations once its loss < epsilon + delta i 50 / N (paper
                silent; NTI's numbers; 0 and 0 disable early stopping).
            early_stop_delta: See ``early_stop_epsilon``.
            schedule_steps: The step count lr_decay and early_stop_delta are written for (NTI's 50); none: use
                them per step at any step count.
            num_starts: Random starts K of the multi-start strategy (the paper: 20; 1 = only the prior).
            hops: Adam steps each start takes before the starts are compared.
            text_init_std: Spread of the random text-bias starts, in units of the null embedding's std.
            noise_init_std: Spread of the random noise-bias starts (latents have unit variance).
            seed: Seed of the random starts.
            editor: How target prompts edit: none (plain prompt swap), Prompt-to-Prompt or SDEdit.
        """
        super().__init__(backbone, num_inference_steps, guidance_scale, editor)
        self.tracking = TrackingSchedule(num_inner_steps, lr, lr_decay, early_stop_epsilon, early_stop_delta, lr_floor,
                                         schedule_steps)
        self.num_starts, self.hops = num_starts, hops
        self.text_init_std, self.noise_init_std, self.seed = text_init_std, noise_init_std, seed

    def optimize(self, trajectory: Tensor, source_emb: Tensor, schedule: Schedule) -> dict:
        null = self.backbone.encode_prompts([""]).expand_as(source_emb).contiguous()
        gen = torch.Generator().manual_seed(self.seed)
        text0, noise0, start_losses = choose_start(
            self.backbone.eps, schedule, trajectory, source_emb, null, self.guidance_scale, self.num_starts,
            self.hops, self.tracking.lr, self.text_init_std, self.noise_init_std, gen)
        out = track_trajectory(self.backbone.eps, schedule, trajectory, source_emb, null + text0,
                               self.guidance_scale, self.tracking, noise_bias=noise0)
        return {
            "unconditional": out["unconditional"],
            "z_T": out["z_T"],
            "extra": {
                "text_bias": out["unconditional"] - null[:, None],
                "noise_bias": out["z_T"] - trajectory[-1],
                "start_losses": start_losses,
                "step_loss": out["step_loss"],
                "inner_iterations": out["inner_iterations"],
            },
        }
