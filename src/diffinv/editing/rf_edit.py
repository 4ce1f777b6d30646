"""RF-Edit's feature sharing (Wang et al., ICML 2025, "Taming Rectified Flow for Inversion and Editing", Sec. 4.2;
FireFlow, Deng et al., ICML 2025, edits the same way): the source's self-attention values V replace the edit's in
the last attention layers of the MM-DiT, for the first steps of sampling, so the edit keeps the source's structure
while its queries and keys (and every other layer) follow the target prompt.

Which V. The paper takes V "from the inversion process" and shares it at each timestep of the denoising; the
authors' code keys it by the step's interval: the sampling step from level k reads what the inversion computed
when it left level k - 1 going up (its step from k - 1 to k). Here that V is re-derived from the record: one
evaluation of the source prompt at the inversion's own latent of the paired level (its trajectory) and guidance
(``feature_guidance``, which must be the inversion's: RF-Solver and FireFlow invert at 1, RF-Inversion at 0 on
FLUX.1-dev's embedding; a record does not store it). At scale 1 or with the guidance embedding that is the
conditional rows alone, as the inversions evaluate; at another CFG scale the call runs the null rows too and the
conditional rows' V is kept. For RF-Solver and Euler-type inversions it is the very evaluation the inversion made
(tested to 1e-5); FireFlow's inversion reuses its midpoint velocities, so there it is a fresh one at the same point.
Nothing is stored in records: a record re-edits with it as it was inverted. The cost: one evaluation per injected
step, and the features in memory (``features_on``: FLUX.1 at 1024 px, 18 layers x 3 steps, about 3 GB per item in
fp32).

Pairing (``pairing``): ``interval`` (default; the authors' code, and the only pairing in which every injected V is
one the inversion computed): the step from level k reads the inversion's V at level k - 1. ``level``: the step
from level k reads V at the same noise level k, the inversion's latent there (at the top level N the inversion
made no evaluation: a fresh one at its noise latent). In both, every evaluation of a step (RF-Solver's and
FireFlow's midpoint too) reads the step's V: the authors' code gives the midpoint evaluation the inversion's
midpoint V, which depends on the inversion's solver and cannot be re-derived by an editor (left out).

Which layers (``blocks``): the authors inject into FLUX.1's single-stream blocks 20..37, the last 18 of its 57
attention layers over the joint image + text sequence (19 double-stream, 38 single-stream), replacing the whole V
of the joined sequence (text and image rows). SD 3 / 3.5 has no single-stream blocks; its analogue here is the
same relative depth of its joint attention layers (the attention over the same joint sequence, whose text and
image values together are what a single-stream block's V is): the last round(18/57 L) of its L joint layers (SD 3
medium: 8 of 24; SD 3.5 large: 12 of 38; the 4-layer shapes-flow model: 1), at least one. SD 3.5's image-only
``attn2`` layers are not counted. Every row of an edit (its conditional and, under classifier-free guidance, its
unconditional branch) takes its item's features; reconstruction rows are left alone. An edit never reads another
item's features: it is the same alone or beside any other item (tested).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..ddim import flow_x
from ..errors import DiffinvError, check_at_least, check_finite
from .editor import EditContext, Editor, Row, SampleRows
from .joint_attention import _sdpa, flux_output, flux_qkv, joint_output, joint_qkv, joint_sequence_layers

FLUX_INJECTED, FLUX_LAYERS = 18, 57
"""The authors' FLUX.1 injection: single-stream blocks 20..37, the last 18 of its 57 joint-sequence layers."""


def default_blocks(layers: int) -> int:
    """The number of last joint-sequence layers injected by default: FLUX.1's share (18 of 57), at least one."""
    return max(1, round(FLUX_INJECTED * layers / FLUX_LAYERS))


@dataclass
class ValueStore:
    """Per-run state: the features of each injected step and layer, and which denoiser rows take them.

    ``mode``: 'record' (an evaluation whose first ``items`` rows' V are kept as step ``step``'s), 'inject' (the
    sampler's evaluations: during the first ``steps`` steps, row r's V becomes its item's features), 'off'."""

    steps: int
    items: int = 0
    keep_on: str | None = None
    """Where recorded features are kept (None: where they were computed)."""
    mode: Literal["off", "record", "inject"] = "off"
    step: int = 0
    features: dict[tuple[int, str], Tensor] = field(default_factory=dict)
    cond_items: Tensor | None = None
    """(B,) each conditional row's item, -1 for a row left alone (the reconstructions)."""
    row_items: Tensor | None = None
    """Each row of the denoiser's batch: its item, -1 for a row left alone."""

    def active(self) -> bool:
        return self.mode == "record" or (self.mode == "inject" and self.step < self.steps)

    def values(self, layer: str, v: Tensor) -> Tensor:
        """The V a layer attends with: its own (kept, while recording) or, for the injected rows, its item's."""
        if self.mode == "record":
            kept = v[: self.items].detach()
            self.features[(self.step, layer)] = kept.to(self.keep_on) if self.keep_on else kept.clone()
            return v
        rows = self.row_items.to(v.device)
        picked = rows >= 0
        if rows.shape[0] != v.shape[0]:
            raise DiffinvError(f"RF-Edit's injection expected {rows.shape[0]} rows at {layer}, the call has {v.shape[0]}")
        v = v.clone()
        v[picked] = self.features[(self.step, layer)][rows[picked]].to(v.dtype)
        return v

    # the sampler's controller protocol (diffinv.steps.hooks.Controlled): told the rows and each step
    def set_unconditional_rows(self, need_uncond: Tensor) -> None:
        """The sampler's batch: [conditional rows, unconditional rows of ``need_uncond``]."""
        cond = self.cond_items
        self.row_items = torch.cat([cond, cond[need_uncond.to(cond.device)]])

    def after_step(self, z: Tensor, index: int) -> Tensor:
        return z


class InjectedJointAttnProcessor:
    """SD 3's joint attention (``JointAttnProcessor2_0``) with its V taken from a :class:`ValueStore`; ``default``
    runs every call the store does not act on."""

    def __init__(self, store: ValueStore, layer: str, default):
        self.store, self.layer, self.default = store, layer, default

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if not self.store.active():
            return self.default(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        q, k, v = joint_qkv(attn, hidden_states, encoder_hidden_states)
        out = _sdpa(q, k, self.store.values(self.layer, v))
        out = out.transpose(1, 2).reshape(hidden_states.shape[0], -1, attn.heads * q.shape[-1]).to(q.dtype)
        return joint_output(attn, out, hidden_states.shape[1], encoder_hidden_states)


class InjectedFluxAttnProcessor:
    """FLUX.1's attention (``FluxAttnProcessor``) with its V taken from a :class:`ValueStore`."""

    def __init__(self, store: ValueStore, layer: str, default):
        self.store, self.layer, self.default = store, layer, default

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if not self.store.active():
            return self.default(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:  # diffinv's FLUX call passes none (FluxPipeline neither)
            raise DiffinvError("RF-Edit's injection on FLUX.1 runs attention without a mask, and this call has one")
        q, k, v = (x.transpose(1, 2) for x in flux_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb))
        out = _sdpa(q, k, self.store.values(self.layer, v)).transpose(1, 2).flatten(2, 3).to(q.dtype)
        return flux_output(attn, out, encoder_hidden_states)


@contextmanager
def value_injection(denoiser, store: ValueStore, layers: list[tuple[str, bool]]):
    """Install the store on the joint-sequence ``layers`` of ``denoiser`` (the others unchanged); restore after."""
    previous = dict(denoiser.attn_processors)
    chosen = {name for name, _ in layers}
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    def wrap(name: str, proc):
        if name not in chosen:
            return proc
        kind = InjectedFluxAttnProcessor if isinstance(proc, FluxAttnProcessor) else InjectedJointAttnProcessor
        return kind(store, name, proc)

    denoiser.set_attn_processor({name: wrap(name, p) for name, p in previous.items()})
    try:
        yield store
    finally:
        denoiser.set_attn_processor(previous)


class RFEdit(Editor):
    """RF-Edit's feature sharing (RF-Solver-Edit, FireFlow's editor): the source's attention values in the last
    joint-attention layers for the first sampling steps. Flow models only (SD 3 / 3.5, FLUX.1)."""

    edit_name = "rf_edit"
    needs_flow = True
    flow_need = "injects a flow model's attention values (its inversion's)"

    def __init__(self, inject_steps: int = 3, blocks: int | None = None,
                 pairing: Literal["interval", "level"] = "interval", feature_guidance: float = 1.0,
                 embedded_guidance: bool | None = None, features_on: Literal["device", "cpu"] = "device"):
        """
        Args:
            inject_steps: Sampling steps, from the first, whose V is the source's (the authors' ``--inject``: their
                README suggests 2 to 8, tuned per image; their example script uses 3). Level 0 is the image: with
                'interval' the step from level 1 reads the inversion's evaluation there.
            blocks: The last joint-sequence attention layers injected; None: FLUX.1's share, 18 of 57 (its
                single-stream blocks 20..37, as the authors), round(18/57 L) of a model's L such layers.
            pairing: 'interval' (the authors' code: the step from level k reads the inversion's V at level k - 1,
                where it started the same interval) or 'level' (at level k itself; module docstring).
            feature_guidance: The guidance the features are evaluated at: the inversion's (RF-Solver and FireFlow
                invert at 1, RF-Inversion at 0 on FLUX.1-dev's embedding).
            embedded_guidance: Give ``feature_guidance`` to a guidance-distilled model's embedding (FLUX.1-dev, as
                the authors' inversion does) rather than as classifier-free guidance; None: wherever the model has
                one.
            features_on: Keep the features on the model's device, or on the CPU between their evaluation and their
                use (the authors' code; FLUX.1 at 1024 px holds about 57 MB per layer, step and item in fp32).
        """
        check_at_least("inject_steps", inject_steps, 0)
        if blocks is not None:
            check_at_least("blocks", blocks, 1)
        if pairing not in ("interval", "level"):
            raise DiffinvError(f"RF-Edit's pairing must be 'interval' or 'level', got {pairing!r}")
        if features_on not in ("device", "cpu"):
            raise DiffinvError(f"RF-Edit's features_on must be 'device' or 'cpu', got {features_on!r}")
        check_finite({"feature_guidance": feature_guidance})
        self.inject_steps, self.blocks, self.pairing = inject_steps, blocks, pairing
        self.feature_guidance, self.embedded_guidance = feature_guidance, embedded_guidance
        self.features_on = features_on

    def check_backbone(self, backbone) -> None:
        """With ``embedded_guidance``, the model must be guidance-distilled (FLUX.1-dev): refused in one line."""
        if self.embedded_guidance:
            backbone.family.with_embedded_guidance(backbone, self.feature_guidance)

    def check_steps(self, num_steps: int) -> None:
        """At most as many injected steps as the edit samples (checked again against a record's start level)."""
        self.feature_levels(num_steps)

    def check_model(self, denoiser) -> None:
        """The model must have joint-sequence attention layers (an MM-DiT), and ``blocks`` of them at most."""
        self.layers(denoiser)

    def layers(self, denoiser) -> list[tuple[str, bool]]:
        """The injected layers: the last ``blocks`` joint-sequence attention layers of ``denoiser``."""
        layers = joint_sequence_layers(denoiser)
        if not layers:
            raise DiffinvError("RF-Edit injects values into an MM-DiT's joint attention (SD 3 / 3.5, FLUX.1); this "
                               "model has none")
        count = default_blocks(len(layers)) if self.blocks is None else self.blocks
        if count > len(layers):
            raise DiffinvError(f"RF-Edit's blocks is {count}, and this model has {len(layers)} joint attention layers")
        return layers[-count:]

    def feature_levels(self, top: int) -> list[int]:
        """The inversion level whose features each injected step reads (step s samples from level top - s)."""
        if self.inject_steps > top:
            raise DiffinvError(f"RF-Edit injects {self.inject_steps} steps, and this edit samples {top}")
        offset = 1 if self.pairing == "interval" else 0
        return [top - s - offset for s in range(self.inject_steps)]  # interval: down to level 0, the image

    def sample(self, run: SampleRows, rows: list[Row], starts: Tensor, ctx: EditContext) -> Tensor:
        if ctx.velocity is None:
            raise DiffinvError("RF-Edit's injection runs on flow models (SD 3 / 3.5, FLUX.1)")
        levels = self.feature_levels(ctx.start_level)
        if not levels or not any(row.is_edit for row in rows):
            return run(list(range(len(rows))), starts)
        store = ValueStore(steps=len(levels), items=len(ctx.sources),
                           keep_on="cpu" if self.features_on == "cpu" else None)
        embedded = ctx.guidance_embedding if self.embedded_guidance is None else self.embedded_guidance
        sigmas = ctx.schedule.sigmas
        with value_injection(ctx.unet, store, self.layers(ctx.unet)), torch.no_grad():
            store.mode = "record"
            for s, k in enumerate(levels):  # the inversion's V at its own latents of level k (one evaluation each)
                store.step = s
                x = flow_x(torch.stack([t[k] for t in ctx.trajectories]).to(ctx.device), sigmas[k].to(ctx.device))
                ctx.velocity(x, k, ctx.sources, self.feature_guidance, embedded)
            store.mode, store.step = "inject", 0
            store.cond_items = torch.tensor([row.item if row.is_edit else -1 for row in rows])
            return run(list(range(len(rows))), starts, controller=store)
