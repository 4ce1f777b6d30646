"""DDIM math, pure torch. Symbols follow the negative-prompt inversion paper (NPI, Miyake et al.).

``alpha`` is the cumulative product of the noise schedule (diffusers' ``alphas_cumprod``), written alpha_t in
the paper. A run of N steps visits N + 1 noise *levels*: level 0 is the clean latent (alpha = the scheduler's
"final" alpha: 1 with ``set_alpha_to_one``, else ``alphas_cumprod[0]``), level k >= 1 is the k-th smallest
sampling timestep t_k.

Alignment (the off-by-one that diffusers users hit, PR #3436/#5145): the step between levels k-1 and k uses the
UNet at timestep t_k in *both* directions. Sampling evaluates eps(z_k, t_k); inversion evaluates
eps(z*_{k-1}, t_k), the paper's approximation eps(z*_{t-1}, t-1) ~ eps(z*_t, t) taken on the target level's
timestep, exactly as the prompt-to-prompt reference does. Then an inversion step followed by a sampling step with
the same eps returns the input exactly (tested).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor


def predict_x0(z: Tensor, eps: Tensor, alpha: Tensor | float) -> Tensor:
    """x0 predicted from z at level alpha: (z - sqrt(1 - alpha) eps) / sqrt(alpha) (ProxNPI Alg. 1 line 8)."""
    alpha = torch.as_tensor(alpha, dtype=z.dtype, device=z.device)
    return (z - (1 - alpha).sqrt() * eps) / alpha.sqrt()


def from_x0(x0: Tensor, eps: Tensor, alpha: Tensor | float) -> Tensor:
    """The latent at level alpha with clean part x0 and noise eps (ProxNPI Alg. 1 line 12)."""
    alpha = torch.as_tensor(alpha, dtype=x0.dtype, device=x0.device)
    return alpha.sqrt() * x0 + (1 - alpha).sqrt() * eps


def ddim_step(z: Tensor, eps: Tensor, alpha_from: Tensor | float, alpha_to: Tensor | float) -> Tensor:
    """One deterministic DDIM move of z from level alpha_from to level alpha_to with noise prediction eps.

    Towards less noise it is the sampling step (NPI eq. 2); towards more noise it is the inversion step (NPI
    eq. 3). Both equal sqrt(a_to / a_from) z + sqrt(a_to) (sqrt(1/a_to - 1) - sqrt(1/a_from - 1)) eps.
    """
    return from_x0(predict_x0(z, eps, alpha_from), eps, alpha_to)


@dataclass(frozen=True)
class Schedule:
    """The timesteps of an N-step run and the alpha of each of its N + 1 levels."""

    timesteps: Tensor
    """(N,) UNet timesteps t_1 < ... < t_N (level k >= 1 is at t_k)."""
    alphas: Tensor
    """(N + 1,) alpha of level 0 (clean) .. level N (z_T), float64."""

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def to(self, device) -> "Schedule":
        """The same schedule with its tensors on ``device``."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device)
                                            for f in dataclasses.fields(self)})

    def move(self, z: Tensor, eps: Tensor, x0: Tensor | None, k_from: int, k_to: int) -> Tensor:
        """z at level ``k_from`` moved to level ``k_to`` with the prediction (eps, x0), possibly of another latent
        (EDICT's coupled step): the DDIM step :func:`ddim_step` (NPI eq. 2/3), which reads eps only; at a level of
        alpha 0 (a zero-terminal-SNR model's top), where x0 is not a function of eps, from the given x0."""
        a_from, a_to = self.alphas[k_from].to(z.dtype), self.alphas[k_to].to(z.dtype)
        if x0 is not None and float(a_from) == 0.0:
            return from_x0(x0, eps, a_to)
        return ddim_step(z, eps, a_from, a_to)

    def invertible_from(self, k: int) -> bool:
        """Whether :meth:`move` from level k is an invertible map of z (it maps everything onto eps at alpha 0)."""
        return float(self.alphas[k]) > 0.0

    is_flow = False
    """A rectified flow's schedule (:class:`FlowSchedule`): its levels have sigmas, the flow solvers step it."""


def flow_norm(s: Tensor) -> Tensor:
    """sqrt((1 - s)^2 + s^2): a rectified-flow latent x_s = (1 - s) x0 + s eps is z = x / flow_norm(s) in DDIM's
    coordinates, whose alpha is (1 - s)^2 / flow_norm(s)^2."""
    return ((1 - s) ** 2 + s**2).sqrt()


@dataclass(frozen=True)
class FlowSchedule(Schedule):
    """A rectified flow's schedule (SD 3, FLUX.1): the levels' sigmas s_k beside their DDIM alphas
    (1 - s)^2 / ((1 - s)^2 + s^2), latents in the coordinates z = x / sqrt((1 - s)^2 + s^2)."""

    sigmas: Tensor = None
    """(N + 1,) sigma of level 0 (0: clean) .. level N (1: pure noise), float64."""
    is_flow = True

    def move(self, z: Tensor, eps: Tensor, x0: Tensor | None, k_from: int, k_to: int) -> Tensor:
        """The flow's own Euler step x' = x + (s_to - s_from) v with v = eps - x0 (x = (1 - s) x0 + s eps), in z
        coordinates. With a prediction of z itself it is the DDIM step exactly; with another latent's (EDICT) it
        stays an invertible map of z at every level, s = 1 included, where DDIM's is not. Without x0: DDIM's."""
        if x0 is None:
            return super().move(z, eps, x0, k_from, k_to)
        s_from, s_to = self.sigmas[k_from], self.sigmas[k_to]
        x = z * flow_norm(s_from).to(z.dtype) + (s_to - s_from).to(z.dtype) * (eps - x0)
        return x / flow_norm(s_to).to(z.dtype)

    def invertible_from(self, k: int) -> bool:
        return True

    def level_timestep(self, j: int) -> Tensor:
        """The timestep of level j: t_j for j >= 1, 0 for level 0 (s = 0, the clean latent; a flow's timestep is
        s T). Where a solver evaluates the velocity on the latent of the level it leaves (RF-Solver, FireFlow,
        RF-Inversion invert from level 0 as their papers do)."""
        return self.timesteps[j - 1] if j >= 1 else torch.zeros((), dtype=self.timesteps.dtype,
                                                                  device=self.timesteps.device)

    def midpoint(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """(s, timestep, alpha) halfway between levels k - 1 and k: s = (s_{k-1} + s_k) / 2, its timestep
        (t_{k-1} + t_k) / 2 (exact: the scheduler's timesteps are s T, linear in s; t_0 = 0) and its DDIM alpha
        (:func:`flow_alpha`). The point RF-Solver and FireFlow evaluate their second velocity at."""
        s = (self.sigmas[k - 1] + self.sigmas[k]) / 2
        t = (self.level_timestep(k - 1) + self.level_timestep(k)) / 2
        return s, t, flow_alpha(s)


def flow_alpha(s: Tensor) -> Tensor:
    """The DDIM alpha (1 - s)^2 / ((1 - s)^2 + s^2) of a rectified-flow latent at sigma s (:class:`FlowSchedule`)."""
    return (1 - s) ** 2 / flow_norm(s) ** 2


def flow_x(z: Tensor, s: Tensor) -> Tensor:
    """The flow latent x = z sqrt((1 - s)^2 + s^2) of DDIM-coordinate latents z at sigma s."""
    return z * flow_norm(s).to(z.dtype)


def flow_z(x: Tensor, s: Tensor) -> Tensor:
    """The DDIM-coordinate latents z = x / sqrt((1 - s)^2 + s^2) of a flow latent x at sigma s."""
    return x / flow_norm(s).to(x.dtype)


def make_schedule(alphas_cumprod: Tensor, timesteps: Tensor, final_alpha_cumprod: float) -> Schedule:
    """Levels for the given sampling ``timesteps`` (any order; e.g. a diffusers scheduler's ``timesteps``)."""
    ts = torch.sort(torch.as_tensor(timesteps, dtype=torch.long)).values
    if len(ts) == 0 or len(torch.unique(ts)) != len(ts):
        raise ValueError(f"need distinct sampling timesteps, got {timesteps.tolist()}")
    alphas = torch.cat([torch.tensor([final_alpha_cumprod], dtype=torch.float64), alphas_cumprod.double()[ts]])
    return Schedule(timesteps=ts, alphas=alphas)


def strength_level(num_steps: int, strength: float) -> int:
    """The level L = int(N strength) an editing strength inverts to and samples from, at least 1 (salesforce/EDICT:
    ``t_limit = steps - int(steps * init_image_strength)``; diffusers' CycleDiffusionPipeline: ``init_timestep =
    int(num_inference_steps * strength)``; both sample the L lowest timesteps). ``int`` truncates as theirs do:
    int(100 * 0.29) = 28."""
    return max(1, int(num_steps * strength))


EpsFn = Callable[[Tensor, Tensor], Tensor]
"""eps_fn(z, t) -> noise prediction for latents z (B, C, H, W) at UNet timestep t (a 0-d long tensor)."""


LevelEpsFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""eps_fn(z, t, alpha) -> noise prediction for latents z at UNet timestep t, z sitting at the level of ``alpha``
(0-d float64): inversion evaluates the step's target timestep on the latent of the level below, and a flow family
converts its velocity where the latent really is (:meth:`diffinv.backbone.Backbone.eps`)."""


def invert(eps_fn: LevelEpsFn, z0: Tensor, schedule: Schedule) -> Tensor:
    """DDIM inversion (NPI eq. 3): the trajectory z*_0 .. z*_N as a (N + 1, B, C, H, W) tensor. The step to level
    k evaluates timestep t_k on z*_{k-1}, which sits at level k - 1 (told to ``eps_fn``)."""
    trajectory = [z0]
    z = z0
    for k in range(1, schedule.num_steps + 1):
        t = schedule.timesteps[k - 1]
        z = ddim_step(z, eps_fn(z, t, schedule.alphas[k - 1]), schedule.alphas[k - 1], schedule.alphas[k])
        trajectory.append(z)
    return torch.stack(trajectory)


# --- stochastic DDIM (eta > 0): CycleDiffusion's sampler and DPM-Encoder ---------------------------------------------
def ddim_sigma(alpha_from: Tensor | float, alpha_to: Tensor | float, eta: float) -> Tensor:
    """sigma of the DDIM step from level alpha_from to the less noisy alpha_to (DDIM paper eq. 16):
    eta sqrt((1 - a_to) / (1 - a_from)) sqrt(1 - a_from / a_to); eta = 1 is DDPM's posterior variance."""
    a_from, a_to = torch.as_tensor(alpha_from, dtype=torch.float64), torch.as_tensor(alpha_to, dtype=torch.float64)
    return eta * ((1 - a_to) / (1 - a_from)).sqrt() * (1 - a_from / a_to).sqrt()


Variance = Literal["ddim", "authors"]
"""How a stochastic step's direction coefficient sqrt(1 - a_to - s^2) (DDIM eq. 12) subtracts the variance:
'ddim': s^2 = sigma_eta^2 = eta^2 sigma_1^2 (DDIM eq. 12/16, the papers'); 'authors': s^2 = eta sigma_1^2, as the
edit-friendly DDPM inversion code writes it (``1 - alpha_prod_t_prev - eta * variance``, sigma_1^2 = DDPM's posterior
variance). The two agree at eta = 1 (and at eta = 0)."""


def direction_sigma(alpha_from: Tensor | float, alpha_to: Tensor | float, eta: float,
                    variance: Variance = "ddim") -> Tensor:
    """The s whose square the direction coefficient sqrt(1 - a_to - s^2) of the step from level alpha_from to
    alpha_to subtracts (:data:`Variance`): 'ddim': :func:`ddim_sigma` at eta (DDIM eq. 16); 'authors': sqrt(eta)
    sigma_1, so s^2 = eta sigma_1^2 (edit-friendly DDPM inversion's ``reverse_step``)."""
    if variance == "authors":
        return math.sqrt(eta) * ddim_sigma(alpha_from, alpha_to, 1.0)
    return ddim_sigma(alpha_from, alpha_to, eta)


def ddim_mean(x0: Tensor, eps: Tensor, alpha_to: Tensor | float, sigma: Tensor | float) -> Tensor:
    """Mean of the step's target (DDIM paper eq. 12): sqrt(a_to) x0 + sqrt(1 - a_to - sigma^2) eps."""
    a_to = torch.as_tensor(alpha_to, dtype=x0.dtype, device=x0.device)
    sigma = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device)
    # from alpha 0 at eta 1 the direction's 1 - a_to - sigma^2 is 0 up to rounding: never the root of a negative
    return a_to.sqrt() * x0 + (1 - a_to - sigma**2).clamp(min=0).sqrt() * eps


def posterior_sample(z: Tensor, x0: Tensor, alpha_from: Tensor | float, alpha_to: Tensor | float,
                     sigma: Tensor | float, noise: Tensor) -> Tensor:
    """A draw of q_sigma(z_to | z_from = z, x0) (DDIM paper eq. 7): the mean of eq. 12 with the noise that z
    really holds, (z - sqrt(a_from) x0) / sqrt(1 - a_from), plus sigma noise."""
    a_from = torch.as_tensor(alpha_from, dtype=z.dtype, device=z.device)
    true_eps = (z - a_from.sqrt() * x0) / (1 - a_from).sqrt()
    return ddim_mean(x0, true_eps, alpha_to, sigma) + torch.as_tensor(sigma, dtype=z.dtype, device=z.device) * noise


def posterior_chain(z0: Tensor, schedule: Schedule, eta: float, noise: Tensor, top: int | None = None) -> Tensor:
    """CycleDiffusion's DPM-Encoder chain (N + 1, B, ...): z_N ~ q(z_N | z0), then z_{k-1} ~ q_sigma(z_{k-1} | z_k,
    z0) down to z_0 = z0. ``noise``: (N, B, ...) standard normal, [N - 1] for z_N and [k - 2] for z_{k-1}.
    ``top``: the chain starts at that level instead (a strength below 1: z_top ~ q(z_top | z0) from
    ``noise[top - 1]``); the levels above it hold z_top, never read."""
    n = schedule.num_steps if top is None else top
    z = from_x0(z0, noise[n - 1], schedule.alphas[n].to(z0.dtype))
    chain = [z]
    for k in range(n, 1, -1):
        sigma = ddim_sigma(schedule.alphas[k], schedule.alphas[k - 1], eta)
        z = posterior_sample(z, z0, schedule.alphas[k].to(z.dtype), schedule.alphas[k - 1].to(z.dtype), sigma,
                             noise[k - 2])
        chain.append(z)
    chain.append(z0)
    return torch.stack([*chain[::-1], *[chain[0]] * (schedule.num_steps - n)])


def independent_chain(z0: Tensor, schedule: Schedule, noise: Tensor) -> Tensor:
    """Edit-friendly DDPM inversion's chain (N + 1, B, ...) (Huberman-Spiegelglas et al. eq. 6): each level noised
    from z0 on its own, x_k = sqrt(a_k) z0 + sqrt(1 - a_k) n_k with independent n_k = ``noise[k - 1]``; x_0 = z0."""
    levels = [from_x0(z0, noise[k - 1], schedule.alphas[k].to(z0.dtype)) for k in range(1, schedule.num_steps + 1)]
    return torch.stack([z0, *levels])


def step_residuals(eps_fn: EpsFn, chain: Tensor, schedule: Schedule, eta: float, top: int | None = None,
                   variance: Variance = "ddim", x0_fn: EpsFn | None = None) -> Tensor:
    """(N, B, ...) the noise r_k = z_{k-1} - mean_theta(z_k) (DDIM eq. 12) that makes the stochastic sampler's step
    from each level k of ``chain`` land on level k - 1, stored at [k - 1]: CycleDiffusion's code and DDPM
    inversion's noise maps (their eq. 5: r_k = sigma_k z_k; stored as r_k, so sigma_k = 0 needs no division).
    Sampling from chain[N] with them returns chain[0] exactly in exact arithmetic, whatever the chain. ``top``:
    sampling starts at that level (DDPM inversion's skip, a strength), the residuals above it are zeros, never
    computed. ``variance``: the direction coefficient of the mean (:data:`Variance`); the residuals absorb either
    form, so the sampler must use the same. ``x0_fn(z, t)``: the model's own (guided) x0, used at a level of alpha 0
    (a zero-terminal-SNR model's top), where x0 is not a function of eps (eps = z there), as the sampler does."""
    top = schedule.num_steps if top is None else top
    residuals = []
    for k in range(1, schedule.num_steps + 1):
        if k > top:
            residuals.append(torch.zeros_like(chain[k]))
            continue
        z, a_t, a_prev = chain[k], schedule.alphas[k].to(chain.dtype), schedule.alphas[k - 1].to(chain.dtype)
        t = schedule.timesteps[k - 1]
        eps = eps_fn(z, t)
        sigma = direction_sigma(schedule.alphas[k], schedule.alphas[k - 1], eta, variance)
        pure_noise = float(schedule.alphas[k]) == 0.0 and x0_fn is not None
        x0 = x0_fn(z, t) if pure_noise else predict_x0(z, eps, a_t)
        residuals.append(chain[k - 1] - ddim_mean(x0, eps, a_prev, sigma))
    return torch.stack(residuals)
