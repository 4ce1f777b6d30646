"""Prompt-to-Prompt attention control (Hertz et al. 2022) through diffusers' public attention-processor API.

:class:`PromptToPrompt` is the editor's configuration; :meth:`PromptToPrompt.controller` builds the per-run
:class:`AttentionController` for the rows of one sampling batch; :func:`attention_control` installs a controlled
processor on every attention layer with ``set_attn_processor`` and restores the previous processors afterwards,
whatever happens: :class:`ControlledAttnProcessor` on a UNet's attention, the processors of
:mod:`diffinv.editing.joint_attention` on joint attention (SD 3 / 3.5, FLUX.1: their image-query x text-key block
is the cross-attention map, their image x image block the self-attention map). Layers and steps that need no
control run PyTorch's SDPA (UNet) or diffusers' own processor (joint attention).

Rows: the sampler's conditional branch holds, per item, a source row (its reconstruction) and target rows (its
edits). The conditional branch is controlled as in the reference, and by default the unconditional branch of a
target row takes its source's attention too (``control_unconditional``). For a target row with source row s:

* cross-attention, while the word's ``cross_replace_steps`` last:  A ← (A_s M + A (1 − a)) · eq
  (M, a: replace or refine mapping over the layout's token rows, block-diagonal over its text encoders' segments,
  :func:`diffinv.editing.alignment.layout_mapping`; eq: reweighting);
* self-attention, inside ``self_replace_steps`` and on maps of at most ``max_self_attention_tokens`` queries:
  A ← A_s;
* local blend, from ``local_blend_start`` of the steps on: z ← z_s + m (z − z_s), m = the union of the source's
  and the target's thresholded cross-attention maps of ``local_blend_words`` (3x3 max-pool, nearest upsampling,
  normalised by the max, > ``local_blend_threshold``), summed over steps so far, at the layer resolution nearest
  latent / 4, read after the replacement (the target rows' edited maps) as the reference's attention store does;
  minus the region of ``substruct_words`` (no pool, > ``substruct_threshold``), as the reference's LocalBlend.

Step counts follow google/prompt-to-prompt: a cross-replace bound f covers steps s < int(f (N + 1)), a
self-replace bound s < int(f N).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DiffinvError, check_at_least, check_finite, check_fraction
from ..models import TextLayout
from .alignment import layout_mapping
from .editor import EditContext, Editor, Row, SampleRows
from .joint_attention import is_joint_attention, joint_processor


class PromptToPrompt(Editor):
    """Prompt-to-Prompt attention control: word swap (replace), refinement, reweighting, local blend."""

    edit_name = "prompt_to_prompt"

    def __init__(
        self,
        mode: Literal["replace", "refine"] = "replace",
        cross_replace_steps: float | tuple[float, float] | dict[str, float | tuple[float, float]] = 0.8,
        self_replace_steps: float | tuple[float, float] = 0.4,
        reweight_words: list[str] | None = None,
        reweight_scale: float = 2.0,
        local_blend_words: list[str] | None = None,
        local_blend_threshold: float = 0.3,
        local_blend_start: float = 0.2,
        substruct_words: list[str] | None = None,
        substruct_threshold: float = 0.3,
        max_self_attention_tokens: int = 1024,
        replace_tail: Literal["same_position", "shifted"] = "same_position",
        control_unconditional: bool | None = None,
        joint_attention: Literal["maps", "qk_swap"] = "maps",
    ):
        """
        Args:
            mode: 'replace' (word swap: equal word counts) or 'refine' (added/removed words, aligned globally).
            cross_replace_steps: Steps during which target rows take the source's cross-attention: a fraction f
                (steps s < int(f (N + 1)), as the reference counts), a (start, end) fraction pair, or per word,
                e.g. {"default": 0.8, "dog": [0.0, 0.4]}.
            self_replace_steps: Fraction of the steps (from the first), or a (start, end) fraction, during which
                target rows take the source's self-attention.
            reweight_words: Words whose cross-attention is multiplied by ``reweight_scale`` in the target rows
                (composable with both modes; words not in a prompt are ignored).
            reweight_scale: The equalizer value (the reference uses 2-5; < 1 weakens a word).
            local_blend_words: Words whose attention region is the only part allowed to change (source and
                target words, e.g. ["cat", "dog"]); none: no local blend.
            local_blend_threshold: Threshold of the normalised attention mask (reference: 0.3).
            local_blend_start: Fraction of the steps after which latents are blended (reference: 0.2).
            substruct_words: Words whose attention region is taken out of the local-blend region (the
                reference's LocalBlend ``substruct_words``); needs ``local_blend_words``.
            substruct_threshold: Threshold of the normalised attention mask of ``substruct_words`` (reference: 0.3).
            max_self_attention_tokens: Self-attention maps with more queries are never replaced (reference: 32^2).
            replace_tail: Word swap, tokens after the last swapped word: 'same_position' maps target position j
                onto source position j (the reference's mapper); 'shifted' follows the token shift of a swapped
                word of another token count. The same unless a swapped word changes the token count.
            control_unconditional: Also give a target row's unconditional branch its source's attention. We
                differ from the reference (which controls the conditional branch only) on purpose where that
                branch is the source prompt (the default, none: on for negative-prompt inversion and ProxNPI, off
                for the others): on the shapes editing benchmark (scripts/benchmark_editing.py, 72 edits, NPI)
                it raised edit accuracy from 0.79 to 0.88, attributes kept from 0.61 to 0.75 and kept-region
                PSNR from 16.7 to 18.4 dB. False reproduces the reference.
            joint_attention: How a joint-attention model (SD 3 / 3.5, FLUX.1) is controlled. 'maps': the
                Prompt-to-Prompt paper's edits, exact, on the explicit softmax maps of the image queries: the image
                x text-token block is edited as the cross-attention map above (replace / refine mapping over CLIP +
                T5, reweighting), the image x image block replaced as self-attention; it computes those maps
                (n_image x (n_image + L) per head and row: no fused attention kernel while an edit is on).
                'qk_swap' (Shin et al., ICCV 2025): during a row's cross window the target's image queries and
                keys are its source's and attention runs fused (the target reads its own words, so no word
                mapping; reweighting is a log(eq) bias before the softmax; local blend still computes maps).
                'maps' is the default: the paper's semantics, exact on every edit mode, and it measures better
                on the trained flow model (scripts/benchmark_editing.py --world flow, 48 edits, every inversion:
                kept region +0.3 to +1.3 dB, PSNR against the true edit +0.4 to +1.0 dB, other attributes kept
                more often; accuracy within one edit, four higher with DDIM; README). 'qk_swap' is cheaper.
                Ignored on a UNet (its cross-attention maps are edited).
        """
        if isinstance(self_replace_steps, (int, float)):
            self_replace_steps = (0.0, float(self_replace_steps))
        if not (0 <= self_replace_steps[0] <= self_replace_steps[1] <= 1):
            raise DiffinvError(f"self_replace_steps must be a fraction or 0 <= start <= end <= 1, got {self_replace_steps}")
        specs = cross_replace_steps.values() if isinstance(cross_replace_steps, dict) else [cross_replace_steps]
        for spec in specs:
            start, end = step_bounds(spec)
            if not 0 <= start <= end <= 1:
                raise DiffinvError(f"cross_replace_steps must be fractions in [0, 1] or (start, end) with "
                                   f"0 <= start <= end <= 1, got {cross_replace_steps}")
        if substruct_words and not local_blend_words:
            raise DiffinvError("substruct_words takes a region out of the local blend: set local_blend_words too")
        check_finite(locals(), prefix="editor.")
        check_fraction("editor.local_blend_threshold", local_blend_threshold,
                       "of the normalised attention mask: over 1 nothing may change, the edit is a no-op; "
                       "reference 0.3")
        check_fraction("editor.local_blend_start", local_blend_start, "a fraction of the steps; reference 0.2")
        check_at_least("editor.max_self_attention_tokens", max_self_attention_tokens, 0, hint="reference: 1024")
        if joint_attention not in ("maps", "qk_swap"):
            raise DiffinvError(f"editor.joint_attention must be 'maps' or 'qk_swap', got {joint_attention!r}")
        self.mode = mode
        self.cross_replace_steps = cross_replace_steps
        self.self_replace_steps = tuple(self_replace_steps)
        self.reweight_words, self.reweight_scale = list(reweight_words or []), reweight_scale
        self.local_blend_words = list(local_blend_words or [])
        self.local_blend_threshold, self.local_blend_start = local_blend_threshold, local_blend_start
        self.substruct_words, self.substruct_threshold = list(substruct_words or []), substruct_threshold
        self.max_self_attention_tokens = max_self_attention_tokens
        self.replace_tail = replace_tail
        self.control_unconditional = control_unconditional
        self.joint_attention = joint_attention

    def _cross_alpha(self, layout: TextLayout, target: str, num_steps: int) -> Tensor:
        """(N, L) 1 while the target token's cross-attention is replaced at step index s (0 = first step): the
        reference's ``get_time_words_attention_alpha``, bounds int(f (N + 1))."""
        L = layout.tokens
        spec = self.cross_replace_steps
        words = dict(spec) if isinstance(spec, dict) else {"default": spec}
        default = words.pop("default", words.pop("default_", (0.0, 1.0)))
        alpha = cross_steps_on(default, num_steps)[:, None].repeat(1, L)
        for word, bounds in words.items():
            positions = layout.word_positions(target, [word])
            if positions:
                alpha[:, positions] = cross_steps_on(bounds, num_steps)[:, None]
        return alpha

    def controller(self, layout: TextLayout, sources: list[str], targets: list[str | None], source_index: list[int],
                   num_steps: int, latent_hw: tuple[int, int], negative_is_source: bool = False) -> "AttentionController":
        """The controller of one sampling run over the token rows of ``layout`` (the model's
        :class:`~diffinv.models.TextLayout`). Row r of the conditional branch has prompt ``targets[r]`` (None
        for a source row) and source row ``source_index[r]`` with prompt ``sources[r]``; ``negative_is_source``:
        the unconditional branch is the source prompt (decides ``control_unconditional`` when it is none)."""
        B, L = len(targets), layout.tokens
        M = torch.eye(L).repeat(B, 1, 1)
        a = torch.ones(B, L)
        eq = torch.ones(B, L)
        alpha = torch.zeros(num_steps, B, L)
        blend, substruct = torch.zeros(B, L), torch.zeros(B, L)
        for r, (src, tgt) in enumerate(zip(sources, targets)):
            prompt = src if tgt is None else tgt
            if self.local_blend_words:
                blend[r, layout.word_positions(prompt, self.local_blend_words)] = 1.0
            if self.substruct_words:
                substruct[r, layout.word_positions(prompt, self.substruct_words)] = 1.0
            if tgt is None:
                continue
            M[r], a[r] = layout_mapping(layout, src, tgt, self.mode, tail=self.replace_tail)
            if self.reweight_words:
                eq[r, layout.word_positions(tgt, self.reweight_words)] = self.reweight_scale
            alpha[:, r] = self._cross_alpha(layout, tgt, num_steps)
        s0, s1 = self.self_replace_steps
        idx = torch.arange(num_steps)
        self_on = (idx >= math.floor(s0 * num_steps)) & (idx < math.floor(s1 * num_steps))
        return AttentionController(
            source_index=torch.tensor(source_index), is_target=torch.tensor([t is not None for t in targets]),
            mapping=M, keep=1 - a, equalizer=eq, cross_alpha=alpha, self_on=self_on,
            max_self_tokens=self.max_self_attention_tokens, blend_tokens=blend if self.local_blend_words else None,
            blend_threshold=self.local_blend_threshold, blend_from=math.floor(self.local_blend_start * num_steps),
            substruct_tokens=substruct if self.substruct_words else None, substruct_threshold=self.substruct_threshold,
            latent_hw=latent_hw,
            control_unconditional=negative_is_source if self.control_unconditional is None else self.control_unconditional,
            joint_attention=self.joint_attention)

    def check_model(self, denoiser) -> None:
        require_attention_maps(denoiser)

    def check(self, layout: TextLayout, source: str, targets: list[str]) -> None:
        """Word swap needs as many words in each target as in the source (one line naming both counts)."""
        if self.mode == "replace":
            check_word_counts(source, targets)

    def sample(self, run: SampleRows, rows: list[Row], starts: Tensor, ctx: EditContext) -> Tensor:
        """Every row at once, under attention control: each edit row reads its item's reconstruction row."""
        first = ctx.first_row(rows)
        controller = self.controller(
            ctx.layout, sources=[ctx.sources[row.item] for row in rows], targets=[row.target for row in rows],
            # the windows count the steps sampled, from the first one (the authors' code; a record may start below
            # level N: DDPM inversion's skip, a strength)
            source_index=[first[row.item] for row in rows], num_steps=ctx.start_level,
            latent_hw=tuple(starts.shape[-2:]), negative_is_source=ctx.negative_is_source).to(ctx.device)
        with attention_control(ctx.unet, controller):
            return run(list(range(len(rows))), starts, controller=controller)


@dataclass
class AttentionController:
    """Per-run state of Prompt-to-Prompt; tensors are over the B rows of the conditional branch."""

    source_index: Tensor
    is_target: Tensor
    mapping: Tensor
    keep: Tensor
    equalizer: Tensor
    cross_alpha: Tensor
    self_on: Tensor
    max_self_tokens: int
    blend_tokens: Tensor | None
    blend_threshold: float
    blend_from: int
    latent_hw: tuple[int, int]
    substruct_tokens: Tensor | None = None
    substruct_threshold: float = 0.3
    control_unconditional: bool = False
    joint_attention: Literal["maps", "qk_swap"] = "maps"
    step: int = 0

    def __post_init__(self):
        self.blend_maps: dict[int, Tensor] = {}
        self.substruct_maps: dict[int, Tensor] = {}
        self.uncond_rows: Tensor | None = None
        self.uncond_source: Tensor | None = None

    def set_unconditional_rows(self, need_uncond: Tensor) -> None:
        """The sampler's batch is [conditional rows (B), unconditional rows of the rows in ``need_uncond``]. The
        unconditional row of target row r takes the attention of its source s's unconditional row, or of s's
        conditional row where s's two branches coincide and only one was computed (NPI's reconstruction row)."""
        need = need_uncond.to(self.source_index.device)
        self.uncond_rows = need.nonzero().flatten()
        position = torch.cumsum(need.long(), 0) - 1
        src = self.source_index[self.uncond_rows]
        self.uncond_source = torch.where(need[src], self.rows + position[src], src)

    def to(self, device) -> "AttentionController":
        for name in ("source_index", "is_target", "mapping", "keep", "equalizer", "cross_alpha", "self_on", "blend_tokens",
                     "substruct_tokens"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    @property
    def rows(self) -> int:
        return len(self.is_target)

    @property
    def text_tokens(self) -> int:
        """L: the token rows the mappings are over (a joint sequence's text tokens)."""
        return self.mapping.shape[-1]

    def _swapped(self) -> tuple[Tensor, Tensor | None]:
        """(B,) conditional target rows inside a cross window at this step, and the same of the unconditional rows
        (None where they are not controlled)."""
        on = self.is_target & self.cross_alpha[self.step].bool().any(-1)
        if not (self.control_unconditional and self.uncond_rows is not None and len(self.uncond_rows)):
            return on, None
        return on, on[self.uncond_rows]

    def qk_sources(self) -> Tensor | None:
        """'qk_swap': for each row of the batch [conditional rows, unconditional rows], the row whose image queries
        and keys it reads at this step (itself where none is swapped); None where no row is swapped."""
        cond, uncond = self._swapped()
        if not bool(cond.any()) and (uncond is None or not bool(uncond.any())):
            return None
        n = 0 if self.uncond_rows is None else len(self.uncond_rows)
        rows = torch.arange(self.rows + n, device=cond.device)
        rows[: self.rows] = torch.where(cond, self.source_index, rows[: self.rows])
        if uncond is not None:
            rows[self.rows:] = torch.where(uncond, self.uncond_source, rows[self.rows:])
        return rows

    def qk_text_bias(self, total: int) -> Tensor | None:
        """'qk_swap' reweighting: (total, L) log(eq) of the conditional target rows' tokens inside their cross
        window (0 elsewhere), the bias of their image-query x text-key logits; None where it is 0 everywhere."""
        alpha = self.cross_alpha[self.step] * self.is_target[:, None]
        bias = torch.log(self.equalizer.clamp_min(1e-12)) * alpha
        if not bool(bias.any()):
            return None
        return torch.cat([bias, bias.new_zeros(total - self.rows, bias.shape[1])])

    def observe(self, probs: Tensor, heads: int) -> None:
        """Store the local-blend maps of (rows_total * heads, Lq, L) cross-attention probabilities, unedited."""
        self._store_blend_maps(probs.view(-1, heads, *probs.shape[1:])[: self.rows])

    def wants_probs(self, is_cross: bool, queries: int) -> bool:
        if is_cross:
            return bool(self.cross_alpha[self.step].any()) or self.blend_tokens is not None
        return bool(self.self_on[self.step]) and queries <= self.max_self_tokens

    def edit(self, probs: Tensor, is_cross: bool, heads: int) -> Tensor:
        """probs: (rows_total * heads, Lq, Lk) attention probabilities; edits the first ``rows`` rows."""
        B = self.rows
        p = probs.view(-1, heads, *probs.shape[1:])
        cond = p[:B]
        src = cond[self.source_index]
        t = self.is_target.view(-1, 1, 1, 1)
        if is_cross:
            alpha = self.cross_alpha[self.step].view(B, 1, 1, -1).to(p.dtype)
            if not bool(alpha.any()):
                self._store_blend_maps(cond)
                return probs  # nothing replaced at this step, in either branch
            new = torch.einsum("bhqk,bkj->bhqj", src, self.mapping.to(p.dtype))
            new = (new + cond * self.keep.view(B, 1, 1, -1).to(p.dtype)) * self.equalizer.view(B, 1, 1, -1).to(p.dtype)
            edited = new * alpha + cond * (1 - alpha)
        else:
            edited = src
        cond = torch.where(t, edited, cond)
        if is_cross:
            self._store_blend_maps(cond)  # after the replacement, as the reference's attention store holds them
        rest = p[B:]
        if self.control_unconditional and self.uncond_rows is not None and len(self.uncond_rows):
            targets = self.is_target[self.uncond_rows]
            if is_cross:  # while any of the row's tokens is being replaced
                targets = targets & self.cross_alpha[self.step][self.uncond_rows].bool().any(-1)
            rest = torch.where(targets.view(-1, 1, 1, 1), p[self.uncond_source], rest)
        return torch.cat([cond, rest]).view_as(probs)

    def _store_blend_maps(self, cond: Tensor) -> None:
        """Accumulate, per row, the mean over heads of the attention to the blend (and substruct) words: (B, Lq)."""
        for store, tokens in ((self.blend_maps, self.blend_tokens), (self.substruct_maps, self.substruct_tokens)):
            if tokens is None:
                continue
            m = (cond.mean(1) * tokens[:, None, :].to(cond.dtype)).sum(-1).float()
            q = m.shape[1]
            store[q] = store.get(q, 0) + m.detach()

    def _region(self, store: dict[int, Tensor], threshold: float, pool: bool) -> Tensor:
        """(B, 1, H, W) bool: a row's words' region (the reference's LocalBlend.get_mask), united with its source's."""
        H, W = self.latent_hw
        q = min(store, key=lambda n: abs(math.log(n / max(1.0, (H / 4) * (W / 4)))))
        f = round(math.sqrt(H * W / q))
        maps = store[q].view(-1, 1, H // f, W // f)
        if pool:
            maps = F.max_pool2d(maps, kernel_size=3, stride=1, padding=1)
        maps = F.interpolate(maps, size=(H, W), mode="nearest")
        maps = maps / maps.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
        mask = maps > threshold
        return mask | mask[self.source_index]

    def after_step(self, z: Tensor, step: int) -> Tensor:
        """Local blend of the conditional rows' latents once the step index reaches ``blend_from``."""
        if self.blend_tokens is None or step < self.blend_from or not self.blend_maps:
            return z
        mask = self._region(self.blend_maps, self.blend_threshold, pool=True)
        if self.substruct_tokens is not None and self.substruct_maps:
            mask = mask & ~self._region(self.substruct_maps, self.substruct_threshold, pool=False)
        mask = mask.to(z.dtype)
        src = z[self.source_index]
        blended = src + mask * (z - src)
        return torch.where(self.is_target.view(-1, 1, 1, 1), blended, z)


class ControlledAttnProcessor:
    """An attention processor that exposes the attention probabilities to a controller where it asks for them,
    and runs SDPA elsewhere. Same computation as diffusers' default processors otherwise."""

    def __init__(self, controller: AttentionController):
        self.controller = controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, queries, _ = hidden_states.shape
        is_cross = encoder_hidden_states is not None
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = encoder_hidden_states if is_cross else hidden_states
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        if self.controller.wants_probs(is_cross, queries):
            q, k, v = (attn.head_to_batch_dim(x) for x in (query, key, value))
            probs = attn.get_attention_scores(q, k, attention_mask)
            probs = self.controller.edit(probs, is_cross, attn.heads)
            out = attn.batch_to_head_dim(torch.bmm(probs, v))
        else:
            d = key.shape[-1] // attn.heads
            q, k, v = (x.view(batch, -1, attn.heads, d).transpose(1, 2) for x in (query, key, value))
            if attention_mask is not None:
                attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
            out = out.transpose(1, 2).reshape(batch, -1, attn.heads * d).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def require_attention_maps(denoiser) -> None:
    """A denoiser Prompt-to-Prompt can control: joint attention (SD 3 / 3.5, FLUX.1) or a UNet's cross-attention
    (refused in one line otherwise, :func:`require_cross_attention`)."""
    if not is_joint_attention(denoiser):
        require_cross_attention(denoiser)


def require_cross_attention(denoiser) -> None:
    """A denoiser without separate cross-attention layers (SD 3's joint attention, where text and image tokens
    attend together in one map) is refused in one line: the reference's controller edits cross-attention maps."""
    if not any(name.endswith("attn2.processor") for name in denoiser.attn_processors):
        raise DiffinvError("Prompt-to-Prompt edits cross-attention maps (or a joint attention's image x text "
                           "block), and this model has neither: use no editor or SDEdit on it")


@contextmanager
def attention_control(unet, controller: AttentionController):
    """Install the controller on every attention layer of ``unet`` (a UNet or a joint-attention transformer, by its
    processors' types); restore the previous processors on exit."""
    previous = dict(unet.attn_processors)
    if is_joint_attention(unet):
        unet.set_attn_processor({name: joint_processor(p, controller) for name, p in previous.items()})
    else:
        require_cross_attention(unet)
        unet.set_attn_processor(ControlledAttnProcessor(controller))
    try:
        yield controller
    finally:
        unet.set_attn_processor(previous)


def check_word_counts(source: str, targets: list[str]) -> None:
    """Fail early, naming both counts, when replace mode gets prompts of different word counts."""
    n = len(source.split())
    for t in targets:
        m = len(t.split())
        if m != n:
            raise DiffinvError(
                f"prompt-to-prompt replace needs prompts with equal word counts: source {source!r} has {n} words, "
                f"target {t!r} has {m} (use mode 'refine' for added or removed words)")


def step_bounds(spec: float | tuple[float, float] | list[float]) -> tuple[float, float]:
    """(start, end) fractions of a step spec: f means (0, f)."""
    if isinstance(spec, (int, float)):
        return 0.0, float(spec)
    start, end = spec
    return float(start), float(end)


def cross_steps_on(spec: float | tuple[float, float], num_steps: int) -> Tensor:
    """(N,) 1 at the steps s with int(start (N + 1)) <= s < int(end (N + 1)), the reference's
    ``update_alpha_time_word`` on its N + 1 rows."""
    start, end = step_bounds(spec)
    s = torch.arange(num_steps)
    return ((s >= int(start * (num_steps + 1))) & (s < int(end * (num_steps + 1)))).float()
