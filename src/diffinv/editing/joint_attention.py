"""Prompt-to-Prompt on joint attention (SD 3 / 3.5, FLUX.1): attention processors installed with
``set_attn_processor`` that expose the image-query rows of the joint map to the controller.

MM-DiT attends over one sequence of image and text tokens (SD 3: image then text; FLUX.1's double-stream blocks:
text then image; its single-stream blocks get that [text, image] sequence already concatenated, with no
``encoder_hidden_states``). With q = [q_i; q_t], k = [k_i; k_t] the map splits into four blocks (Shin et al.,
ICCV 2025): image queries x image keys (I2I, the self-attention analogue), image queries x text keys (the
cross-attention analogue: its columns are the layout's L token rows, CLIP's then T5's on SD 3, T5's on FLUX), and
the text-query rows. Per row of a softmaxed map, the image-query rows sum to 1 over *all* keys, image and text.

Two ways to control it (``PromptToPrompt.joint_attention``):

* ``maps`` (default; the Prompt-to-Prompt paper's semantics on the image-query x text-key block): the image-query
  rows are computed as explicit softmax maps P (fp32), and for a target row with source row s

  - image x text block, while the token's cross window lasts: P_it <- (P_it,s M + P_it (1 - a)) eq (the
    controller's replace / refine mapping over the layout, its keep mask and equaliser);
  - image x image block, inside the self window and for at most ``max_self_attention_tokens`` image tokens:
    P_ii <- P_ii,s (SD 3.5's image-only ``attn2`` is all image x image block);

  no renormalisation: a row's mass to the text keys is the mapping's (replace moves the source's text mass; a
  mass-changing equaliser changes the row's total, as in the reference's cross-attention). The text-query rows
  are left alone (their SDPA output, the target's own): the text stream of a target row evolves with its prompt.
  The unconditional branch of a target row takes its source's blocks in the same windows where the controller
  says so (``control_unconditional``). The maps of the local-blend words are read from the edited image x text
  block of every joint layer (double- and single-stream), summed over layers and steps, and mapped back to the
  latent grid through the patch (SD 3: p x p, FLUX: 2 x 2 packing), both in row-major order.
* ``qk_swap`` (Shin et al.): during the row's cross window, the image queries and keys of a target row are its
  source's (q_i, k_i <- q_i,s, k_i,s; the text queries, keys and every value stay the target's); attention then
  runs as one fused SDPA call. The image x image block is then the source's exactly and the image x text block is
  the source's image queries against the target's text keys, so no word mapping is needed (the target's own words
  are read); the equaliser is a log(eq) bias on the image-query x text-key logits (renormalised by the softmax,
  unlike the maps' product). Local blend still needs the word maps: where it is on, the image-query maps are
  computed beside the fused call (read-only).

Uncontrolled calls (steps and layers where the controller asks nothing) run diffusers' own processor, unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DiffinvError


def _sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """PyTorch's fused attention on (N, H, S, d) tensors, the default scale 1 / sqrt(d)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0, is_causal=False)


def joint_controlled(controller, image_tokens: int, has_text: bool) -> bool:
    """Whether the controller acts on a joint layer with ``image_tokens`` image queries at its current step."""
    if controller.joint_attention == "qk_swap":
        return controller.qk_sources() is not None or (has_text and controller.blend_tokens is not None)
    return (has_text and controller.wants_probs(True, image_tokens)) or controller.wants_probs(False, image_tokens)


def image_query_maps(q: Tensor, k: Tensor) -> Tensor:
    """(N, H, n_image, S) fp32 softmax maps of the image queries ``q`` over every key ``k`` (scale 1 / sqrt(d))."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    return scores.softmax(-1)


def controlled_attention(controller, q: Tensor, k: Tensor, v: Tensor, image: slice, text: slice | None) -> Tensor:
    """Joint attention (N, H, S, d) -> (N, H, S, d) under the controller (module docstring); ``image`` and ``text``:
    where the image and text tokens lie along S (``text`` None: an image-only attention, SD 3.5's ``attn2``)."""
    if controller.joint_attention == "qk_swap":
        return _qk_swap(controller, q, k, v, image, text)
    N, H, _, _ = q.shape
    P = image_query_maps(q[:, :, image], k)  # (N, H, n, S): each row sums to 1 over image and text keys
    n = P.shape[2]
    vf = v.float()
    self_block = P[..., image]
    if controller.wants_probs(False, n):
        self_block = controller.edit(self_block.reshape(N * H, n, n), False, H).view(N, H, n, n)
    out_image = torch.matmul(self_block, vf[:, :, image])
    if text is None:
        return out_image.to(q.dtype)
    cross = P[..., text]
    if controller.wants_probs(True, n):
        L = cross.shape[-1]
        cross = controller.edit(cross.reshape(N * H, n, L), True, H).view(N, H, n, L)
    out_image = (out_image + torch.matmul(cross, vf[:, :, text])).to(q.dtype)
    out_text = _sdpa(q[:, :, text], k, v)  # the text-query rows: left alone
    parts = [out_image, out_text] if (image.start or 0) == 0 else [out_text, out_image]
    return torch.cat(parts, dim=2)


def _qk_swap(controller, q: Tensor, k: Tensor, v: Tensor, image: slice, text: slice | None) -> Tensor:
    """Shin et al.'s edit: target rows read their source's image queries and keys; one fused attention call."""
    rows = controller.qk_sources()
    if rows is not None:
        rows = rows.to(q.device)
        q, k = q.clone(), k.clone()
        q[:, :, image], k[:, :, image] = q[rows][:, :, image], k[rows][:, :, image]
    bias = None
    if text is not None:
        if controller.blend_tokens is not None:
            P = image_query_maps(q[:, :, image], k)
            N, H, n, _ = P.shape
            controller.observe(P[..., text].reshape(N * H, n, -1), H)
        log_eq = controller.qk_text_bias(q.shape[0])
        if log_eq is not None:
            S = q.shape[2]
            bias = torch.zeros(q.shape[0], 1, S, S, dtype=q.dtype, device=q.device)
            bias[:, :, image, text] = log_eq.to(q.dtype).view(q.shape[0], 1, 1, -1)
    return _sdpa(q, k, v, bias)


def joint_qkv(attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(q, k, v) (B, heads, tokens, d) of SD 3's joint attention as ``JointAttnProcessor2_0`` makes them: the image
    tokens' projections and q/k norms, then (where there is a text stream) the text tokens' (``add_*_proj``,
    ``norm_added_*``) after them."""
    batch = hidden_states.shape[0]
    d = attn.to_k.out_features // attn.heads

    def heads(x: Tensor) -> Tensor:
        return x.view(batch, -1, attn.heads, d).transpose(1, 2)

    q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if encoder_hidden_states is None:
        return q, k, v
    cq = heads(attn.add_q_proj(encoder_hidden_states))
    ck = heads(attn.add_k_proj(encoder_hidden_states))
    cv = heads(attn.add_v_proj(encoder_hidden_states))
    if attn.norm_added_q is not None:
        cq = attn.norm_added_q(cq)
    if attn.norm_added_k is not None:
        ck = attn.norm_added_k(ck)
    return torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)


def joint_output(attn, out: Tensor, n: int, encoder_hidden_states: Tensor | None):
    """The tail of SD 3's joint attention as ``JointAttnProcessor2_0`` ends it: the attention output (B, S, H d)
    split into the image tokens (the first ``n``) and the text tokens, each through its output projection."""
    context = None
    if encoder_hidden_states is not None:
        out, context = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
    out = attn.to_out[1](attn.to_out[0](out))
    return out if context is None else (out, context)


def flux_qkv(attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None,
             image_rotary_emb) -> tuple[Tensor, Tensor, Tensor]:
    """(q, k, v) (B, S, H, d) of FLUX.1's attention as ``FluxAttnProcessor`` makes them: projections, q/k norms,
    the joined [text, image] sequence (double-stream blocks; a single-stream block's is joined already) and the
    rotary embedding on q and k."""
    from diffusers.models.embeddings import apply_rotary_emb

    q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in
               (attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if encoder_hidden_states is not None:
        cq, ck, cv = (x.unflatten(-1, (-1, attn.head_dim)) for x in
                      (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                       attn.add_v_proj(encoder_hidden_states)))
        cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
    if image_rotary_emb is not None:
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
    return q, k, v


def flux_output(attn, out: Tensor, encoder_hidden_states: Tensor | None):
    """The tail of FLUX.1's attention as ``FluxAttnProcessor`` ends it: a single-stream block's output (B, S, H d)
    as it is; a double-stream block's split into text (first) and image, each through its output projection."""
    if encoder_hidden_states is None:
        return out
    L = encoder_hidden_states.shape[1]
    context, out = out[:, :L], out[:, L:]
    out = attn.to_out[1](attn.to_out[0](out.contiguous()))
    return out, attn.to_add_out(context.contiguous())


class ControlledJointAttnProcessor:
    """SD 3 / 3.5's joint attention (diffusers' ``JointAttnProcessor2_0``, the ``attn`` of a JointTransformerBlock
    and SD 3.5's image-only ``attn2``) under a Prompt-to-Prompt controller; ``default``, the processor it
    replaces, runs every call the controller does not act on."""

    def __init__(self, controller, default):
        self.controller, self.default = controller, default

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        n = hidden_states.shape[1]  # image tokens first, then the text tokens
        if not joint_controlled(self.controller, n, encoder_hidden_states is not None):
            return self.default(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        batch = hidden_states.shape[0]
        # 1. projections and q/k norms, as JointAttnProcessor2_0
        q, k, v = joint_qkv(attn, hidden_states, encoder_hidden_states)
        text = None if encoder_hidden_states is None else slice(n, None)
        # 2. the controlled attention
        out = controlled_attention(self.controller, q, k, v, image=slice(0, n), text=text)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * q.shape[-1]).to(q.dtype)
        return joint_output(attn, out, n, encoder_hidden_states)  # 3. as JointAttnProcessor2_0


class ControlledFluxAttnProcessor:
    """FLUX.1's attention (diffusers' ``FluxAttnProcessor``) under a Prompt-to-Prompt controller: double-stream
    blocks (image ``hidden_states``, text ``encoder_hidden_states``, joined [text, image]) and single-stream blocks
    ([text, image] already joined in ``hidden_states``: the text is its first L = the layout's token rows); the
    rotary embedding of the joined sequence applied as diffusers applies it. ``default`` runs every call the
    controller does not act on."""

    def __init__(self, controller, default):
        self.controller, self.default = controller, default

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        L = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.controller.text_tokens
        S = hidden_states.shape[1] + (L if encoder_hidden_states is not None else 0)
        if not joint_controlled(self.controller, S - L, True):
            return self.default(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:  # diffinv's FLUX call passes none (FluxPipeline neither)
            raise DiffinvError("Prompt-to-Prompt on FLUX.1 controls attention without a mask, and this call has one")
        q, k, v = flux_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)  # 1. as FluxAttnProcessor
        # 2. the controlled attention, on (N, H, S, d)
        out = controlled_attention(self.controller, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                   image=slice(L, None), text=slice(0, L))
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        return flux_output(attn, out, encoder_hidden_states)  # 3. as FluxAttnProcessor


def _joint_processor_types() -> list[tuple[type, type]]:
    """(diffusers processor class, its controlled counterpart): the joint-attention processors P2P can drive."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    return [(JointAttnProcessor2_0, ControlledJointAttnProcessor), (FluxAttnProcessor, ControlledFluxAttnProcessor)]


def joint_processor(default, controller) -> object | None:
    """The controlled counterpart of a joint-attention processor ``default`` (None: not one P2P can drive)."""
    for kind, controlled in _joint_processor_types():
        if isinstance(default, kind):
            return controlled(controller, default)
    return None


def is_joint_attention(denoiser) -> bool:
    """Every attention layer of ``denoiser`` is a joint-attention processor P2P can drive (SD 3 / 3.5, FLUX.1)."""
    kinds = tuple(kind for kind, _ in _joint_processor_types())
    processors = list(denoiser.attn_processors.values())
    return bool(processors) and all(isinstance(p, kinds) for p in processors)


def joint_sequence_layers(denoiser) -> list[tuple[str, bool]]:
    """The attention layers of an MM-DiT that attend over its joint image + text sequence, in depth order, as
    (processor name, single-stream): SD 3's joint attention and FLUX.1's double-stream blocks (separate text
    projections), FLUX.1's single-stream blocks (the sequence joined before it, ``FluxAttnProcessor`` with no text
    projections). SD 3.5's image-only ``attn2`` is not among them; a UNet has none."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    out = []
    for name, module in denoiser.named_modules():
        proc = getattr(module, "processor", None)
        if proc is None or not isinstance(proc, tuple(kind for kind, _ in _joint_processor_types())):
            continue
        has_text = getattr(module, "add_q_proj", None) is not None
        joined = isinstance(proc, FluxAttnProcessor) and not has_text
        if has_text or joined:
            out.append((f"{name}.processor", joined))
    return out
