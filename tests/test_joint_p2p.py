"""Prompt-to-Prompt on joint attention (SD 3 / 3.5, FLUX.1): the image-query x text-key block of the joint map is the
cross-attention map, the image x image block the self-attention map (diffinv.editing.joint_attention)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffinv import BackboneConfig, NegativePromptInversion
from diffinv.editing import PromptToPrompt
from diffinv.editing.alignment import layout_mapping, refine_mapping, replace_mapping
from diffinv.editing.joint_attention import ControlledFluxAttnProcessor, ControlledJointAttnProcessor
from diffinv.editing.prompt_to_prompt import attention_control
from test_cli import REPO
from test_cli import cli as run_cli
from test_methods import item

SOURCE, TARGET = "a photo of a cat", "a photo of a dog"
FAMILIES = ["sd3", "sd3_t5", "sd35", "flux", "flux_schnell"]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def backbone_of(request, family):
    return request.getfixturevalue(f"tiny_{family}")


def encode(bb, prompts):
    """The prompts' conditioning, each encoded alone: the session's backbones cache a prompt's encoding, and
    test_families compares a batch-of-one encoding with the pipelines' bit for bit."""
    return torch.cat([bb.encode_prompts([p]) for p in prompts])


def latents(bb, rows: int, seed=0):
    c = bb.vae.config.latent_channels
    return torch.randn(rows, c, 8, 8, generator=torch.Generator().manual_seed(seed))


def denoise(bb, z, cond, t=500.0):
    with torch.no_grad():
        return bb.family.denoise(bb, z, torch.tensor(t), bb.layout.unpack(cond))


def controller_for(bb, editor, sources, targets, source_index, steps=4, uncond=None):
    c = editor.controller(bb.layout, sources, targets, source_index, steps, (8, 8))
    c.set_unconditional_rows(torch.zeros(len(targets), dtype=torch.bool) if uncond is None else uncond)
    return c


# --- the processors ----------------------------------------------------------------------------------------------
def test_the_controlled_processors_replace_every_joint_layer_and_are_restored(tiny_sd35, tiny_flux):
    for bb, kind in ((tiny_sd35, ControlledJointAttnProcessor), (tiny_flux, ControlledFluxAttnProcessor)):
        before = dict(bb.unet.attn_processors)
        c = controller_for(bb, PromptToPrompt(), [SOURCE], [None], [0])
        with attention_control(bb.unet, c):
            inside = bb.unet.attn_processors
            assert inside.keys() == before.keys() and all(isinstance(p, kind) for p in inside.values())
        assert all(bb.unet.attn_processors[k] is p for k, p in before.items())
    # SD 3.5's image-only attn2 and FLUX's single-stream blocks are among them
    assert any("attn2" in k for k in tiny_sd35.unet.attn_processors)
    assert any("single_transformer_blocks" in k for k in tiny_flux.unet.attn_processors)


@pytest.mark.parametrize("joint", ["maps", "qk_swap"])
def test_a_controller_that_edits_nothing_equals_diffusers_processors(family, joint, request):
    """Uncontrolled: diffusers' own processor runs (bit for bit); controlled but with no target row (the explicit
    maps, or qk_swap's fused call, on every layer): equal to float noise."""
    bb = backbone_of(request, family)
    z, cond = latents(bb, 2), encode(bb, [SOURCE, TARGET])
    ref = denoise(bb, z, cond)
    idle = controller_for(bb, PromptToPrompt(cross_replace_steps=0.0, self_replace_steps=0.0, joint_attention=joint),
                          [SOURCE, TARGET], [None, None], [0, 1])
    with attention_control(bb.unet, idle):
        assert torch.equal(denoise(bb, z, cond), ref)
    # every block "controlled" (windows on, local blend on), no row a target: nothing may change
    busy = controller_for(bb, PromptToPrompt(cross_replace_steps=1.0, self_replace_steps=1.0, joint_attention=joint,
                                             local_blend_words=["cat"]), [SOURCE, TARGET], [None, None], [0, 1])
    calls = []
    edit = busy.edit
    busy.edit = lambda *a: calls.append(a[1]) or edit(*a)
    with attention_control(bb.unet, busy):
        out = denoise(bb, z, cond)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    assert busy.blend_maps  # the maps were read
    if joint == "maps":
        layers = len(bb.unet.attn_processors)
        text_layers = layers - sum("attn2" in k for k in bb.unet.attn_processors)
        assert calls.count(True) == text_layers and calls.count(False) == layers


def record_edits(controller):
    """Wrap the controller's edit: a list of (is_cross, probabilities in, probabilities out) per call."""
    seen, edit = [], controller.edit

    def recording(probs, is_cross, heads):
        out = edit(probs, is_cross, heads)
        seen.append((is_cross, probs.view(-1, heads, *probs.shape[1:]).clone(),
                     out.view(-1, heads, *out.shape[1:]).clone()))
        return out

    controller.edit = recording
    return seen


@pytest.mark.parametrize("name", ["sd3_t5", "flux"])
def test_joint_maps_sum_to_one_before_editing_and_the_edit_is_the_papers(name, request):
    """Image-query rows: cross block + self block sum to 1 over the keys before editing; after it, the target row's
    image x text block is the source's mapped (replace: a = 1, eq = 1, no renormalisation) and its image x image
    block the source's (self window); the source row and the text-query rows are untouched."""
    bb = backbone_of(request, name)
    z, cond = latents(bb, 2), encode(bb, [SOURCE, TARGET])
    editor = PromptToPrompt(cross_replace_steps=1.0, self_replace_steps=1.0)
    c = controller_for(bb, editor, [SOURCE, SOURCE], [None, TARGET], [0, 0])
    seen = record_edits(c)
    with attention_control(bb.unet, c):
        denoise(bb, z, cond)
    L, M = bb.layout.tokens, c.mapping[1]
    pairs = [(seen[i + 1], seen[i]) for i in range(len(seen) - 1) if not seen[i][0] and seen[i + 1][0]]
    assert len(pairs) == sum("attn2" not in k for k in bb.unet.attn_processors)  # one per layer with text keys
    for (_, cross_in, cross_out), (_, self_in, self_out) in pairs:
        assert cross_in.shape[-1] == L and self_in.shape[-1] == self_in.shape[-2] == 16  # 8 x 8 latents in 2 x 2
        total = cross_in.sum(-1) + self_in.sum(-1)
        torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
        torch.testing.assert_close(cross_out[1], torch.einsum("hqk,kj->hqj", cross_in[0], M), atol=1e-6, rtol=0)
        assert torch.equal(cross_out[0], cross_in[0]) and torch.equal(self_out[0], self_in[0])
        assert torch.equal(self_out[1], self_in[0])
        after = cross_out[1].sum(-1) + self_out[1].sum(-1)  # the source's mass: not renormalised
        torch.testing.assert_close(after, torch.ones_like(after), atol=1e-5, rtol=0)


def test_reweight_changes_only_the_words_columns(tiny_sd3_t5):
    bb = tiny_sd3_t5
    z, cond = latents(bb, 2), encode(bb, [SOURCE, SOURCE])
    c = controller_for(bb, PromptToPrompt(cross_replace_steps=1.0, self_replace_steps=0.0, reweight_words=["cat"],
                                          reweight_scale=3.0), [SOURCE, SOURCE], [None, SOURCE], [0, 0])
    seen = record_edits(c)
    with attention_control(bb.unet, c):
        denoise(bb, z, cond)
    cols = bb.layout.word_positions(SOURCE, ["cat"])
    clip, t5 = bb.layout.segments
    assert any(p < clip.length for p in cols) and any(p >= t5.start for p in cols)  # the word in both segments
    others = [j for j in range(bb.layout.tokens) if j not in cols]
    for is_cross, probs_in, probs_out in seen:
        assert is_cross
        torch.testing.assert_close(probs_out[1][..., cols], 3 * probs_in[0][..., cols], atol=1e-7, rtol=1e-6)
        assert torch.equal(probs_out[1][..., others], probs_in[0][..., others])  # identical prompts: M = I


def test_refine_over_clip_and_t5_aligns_words_in_both_segments(tiny_sd3_t5):
    layout = tiny_sd3_t5.layout
    src, tgt = "a photo of a cat", "a photo of a big cat"
    M, a = layout_mapping(layout, src, tgt, "refine")
    clip, t5 = layout.segments
    assert M.shape == (layout.tokens, layout.tokens)
    assert not M[: clip.length, clip.length:].any() and not M[clip.length:, : clip.length].any()  # block-diagonal
    for seg in (clip, t5):
        (s_cat,) = [p for p in layout.word_positions(src, ["cat"]) if seg.start <= p < seg.start + seg.length]
        (t_cat,) = [p for p in layout.word_positions(tgt, ["cat"]) if seg.start <= p < seg.start + seg.length]
        (t_big,) = [p for p in layout.word_positions(tgt, ["big"]) if seg.start <= p < seg.start + seg.length]
        assert t_cat == s_cat + 1 and M[s_cat, t_cat] == 1 and a[t_cat] == 1  # "cat" moved one token right
        assert a[t_big] == 0 and not M[:, t_big].any()  # the new word keeps its own attention
        for w in ("photo", "of"):  # the words before it stay in place
            (p,) = [q for q in layout.word_positions(tgt, [w]) if seg.start <= q < seg.start + seg.length]
            assert M[p, p] == 1 and a[p] == 1
        end = seg.start + len(seg.tokenizer(tgt).input_ids) - 1  # T5's </s> (no start token), CLIP's end token
        assert M[end - 1, end] == 1 and a[end] == 1
    # T5's segment: no start token; its first word is at its first row
    assert M[t5.start, t5.start] == 1 and a[t5.start] == 1
    # replace on T5 alone: the swapped word's rows
    m, _ = replace_mapping(t5.tokenizer, src, "a photo of a dog", length=t5.length, start_token=False)
    assert m[4, 4] == 1 and m.shape == (t5.length, t5.length) and torch.equal(m.sum(0), torch.ones(t5.length))
    # a single CLIP segment: the layout's mapping is the tokenizer's own (SD 1.x/2.x, SDXL unchanged)
    mc, ac = refine_mapping(clip.tokenizer, src, tgt)
    assert torch.equal(M[: clip.length, : clip.length], mc) and torch.equal(a[: clip.length], ac)


def test_a_segment_without_tokenizer_maps_onto_itself(tiny_sd3):
    layout = tiny_sd3.layout
    clip, t5 = layout.segments
    assert t5.tokenizer is None
    M, a = layout_mapping(layout, SOURCE, TARGET, "replace")
    rows = slice(t5.start, t5.start + t5.length)
    assert torch.equal(M[rows, rows], torch.eye(t5.length)) and bool(a[rows].all())


# --- whole runs ----------------------------------------------------------------------------------------------------
def run(bb_dir, editor, items, method=NegativePromptInversion):
    m = method(BackboneConfig(pretrained=str(bb_dir)), 4, editor=editor)
    if m.backbone.native_resolution > 64:  # FLUX's 1024-px default: 16 px on the tiny model
        items = [dataclasses.replace(i, resolution=16) for i in items]
    with torch.inference_mode():
        return m.run_batch(items)


@pytest.mark.parametrize("name", ["sd3_t5", "sd35", "flux"])
def test_replace_with_identical_prompts_equals_no_control(name, request):
    folder = request.getfixturevalue(f"tiny_{name}_dir")
    plain = run(folder, None, [item(0, targets=[SOURCE])])[0]
    for editor in (PromptToPrompt(self_replace_steps=1.0, cross_replace_steps=1.0),
                   PromptToPrompt(joint_attention="qk_swap", cross_replace_steps=1.0)):
        controlled = run(folder, editor, [item(0, targets=[SOURCE])])[0]
        torch.testing.assert_close(controlled.reconstruction, plain.reconstruction, atol=1e-5, rtol=0)
        torch.testing.assert_close(controlled.edits[0], plain.edits[0], atol=1e-5, rtol=0)
    changed = run(folder, PromptToPrompt(), [item(0, targets=[TARGET])])[0]
    assert (changed.edits[0] - changed.reconstruction).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("editor", ["qk_swap", "qk_swap_blend_reweight", "maps_blend"])
def test_joint_p2p_edit_does_not_depend_on_its_batch_neighbours(name, editor, request):
    folder = request.getfixturevalue(f"tiny_{name}_dir")
    ed = {"qk_swap": lambda: PromptToPrompt(joint_attention="qk_swap"),
          "qk_swap_blend_reweight": lambda: PromptToPrompt(joint_attention="qk_swap", reweight_words=["dog"],
                                                           local_blend_words=["cat", "dog"], local_blend_start=0.0),
          "maps_blend": lambda: PromptToPrompt(mode="refine", local_blend_words=["cat", "dog", "car"],
                                               local_blend_start=0.0)}[editor]
    alone = run(folder, ed(), [item(0, targets=[TARGET])])[0]
    after = run(folder, ed(), [item(1, targets=["a photo of a car", "a photo of the grass"]),
                               item(0, targets=["a photo of a car", TARGET])])[1]
    assert (alone.edits[0] - alone.reconstruction).abs().max() > 1e-3
    torch.testing.assert_close(after.reconstruction, alone.reconstruction, atol=2e-4, rtol=0)
    torch.testing.assert_close(after.edits[1], alone.edits[0], atol=2e-4, rtol=0)


P2P_CONFIGS = ["edit_p2p_replace.yaml", "edit_p2p_refine.yaml", "edit_p2p_reweight.yaml"]


@pytest.mark.parametrize("name", ["sd3_t5", "flux_schnell"])  # sd3, sd35, flux: test_families' config matrix
@pytest.mark.parametrize("config", P2P_CONFIGS)
def test_every_p2p_config_runs_through_the_cli(name, config, request, tmp_path):
    folder = request.getfixturevalue(f"tiny_{name}_dir")
    Image.fromarray((np.random.default_rng(1).random((20, 28, 3)) * 255).astype(np.uint8)).save(tmp_path / "x.png")
    out = tmp_path / "out"
    extra = ["--data.resolution", "16"] if name.startswith("flux") else []
    run_cli("predict", "-c", str(REPO / "configs" / config), "--model.backbone.pretrained", str(folder),
            "--model.num_inference_steps", "3", "--trainer.accelerator", "cpu", "--output_dir", str(out),
            "--data.image", str(tmp_path / "x.png"), "--data.source_prompt", SOURCE,
            "--data.target_prompts", json.dumps([TARGET, "a photo of a big dog"] if "refine" in config else [TARGET]),
            *extra)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["target_prompt"] is None and lines[1]["target_prompt"] == TARGET
    assert all(np.isfinite(x["psnr"]) for x in lines)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_local_blend_and_qk_swap_through_the_cli(name, request, tmp_path):
    folder = request.getfixturevalue(f"tiny_{name}_dir")
    Image.fromarray((np.random.default_rng(1).random((16, 16, 3)) * 255).astype(np.uint8)).save(tmp_path / "x.png")
    for joint in ("maps", "qk_swap"):
        out = tmp_path / joint
        extra = ["--data.resolution", "16"] if name == "flux" else []
        run_cli("predict", "-c", str(REPO / "configs" / "edit_p2p_replace.yaml"), "--model.backbone.pretrained",
                str(folder), "--model.num_inference_steps", "3", "--trainer.accelerator", "cpu",
                "--output_dir", str(out), "--data.image", str(tmp_path / "x.png"), "--data.source_prompt", SOURCE,
                "--data.target_prompts", json.dumps([TARGET]),
                "--model.editor.init_args.local_blend_words", '["cat", "dog"]',
                "--model.editor.init_args.joint_attention", joint, *extra)
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(lines) == 2 and all(np.isfinite(x["psnr"]) for x in lines)


@pytest.mark.parametrize("name", ["sd35", "flux"])
def test_qk_swap_acts_on_the_target_rows_only(name, request):
    """qk_swap: the source row's prediction is diffusers' (float noise), the target row's changes; the image x text
    maps it stores for local blend are softmax maps of the swapped queries (rows within [0, 1])."""
    bb = backbone_of(request, name)
    z, cond = latents(bb, 2), encode(bb, [SOURCE, TARGET])
    ref = denoise(bb, z, cond)
    c = controller_for(bb, PromptToPrompt(joint_attention="qk_swap", cross_replace_steps=1.0,
                                          local_blend_words=["cat", "dog"]), [SOURCE, SOURCE], [None, TARGET], [0, 0])
    with attention_control(bb.unet, c):
        out = denoise(bb, z, cond)
    torch.testing.assert_close(out[0], ref[0], atol=2e-6, rtol=1e-5)
    assert (out[1] - ref[1]).abs().max() > 1e-4
    (maps,) = c.blend_maps.values()
    assert maps.shape == (2, 16) and bool((maps >= 0).all())


@pytest.mark.parametrize("name", ["sd35", "flux"])
def test_bf16_mixed_joint_p2p_has_no_nan(name, request, tmp_path):
    folder = request.getfixturevalue(f"tiny_{name}_dir")
    Image.fromarray((np.random.default_rng(2).random((16, 16, 3)) * 255).astype(np.uint8)).save(tmp_path / "x.png")
    out = tmp_path / "out"
    run_cli("predict", "-c", str(REPO / "configs" / "edit_p2p_reweight.yaml"), "--model.backbone.pretrained",
            str(folder), "--model.num_inference_steps", "3", "--trainer.accelerator", "cpu",
            "--trainer.precision", "bf16-mixed", "--output_dir", str(out), "--data.image", str(tmp_path / "x.png"),
            "--data.source_prompt", SOURCE, "--data.target_prompts", json.dumps([TARGET]),
            "--model.editor.init_args.local_blend_words", '["cat", "dog"]',
            *(["--data.resolution", "16"] if name == "flux" else []))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(np.isfinite(x["psnr"]) for x in lines)
    for f in ("reconstruction.png", "edit-0.png"):
        pixels = np.asarray(Image.open(out / "x" / f))
        assert pixels.std() > 0  # NaN decodes to a flat image
