"""Prompt-to-Prompt and SDEdit on tiny components."""

import pytest
import torch

from diffinv import BackboneConfig, DiffinvError, NegativePromptInversion
from diffinv.editing import PromptToPrompt, SDEdit
from diffinv.editing.alignment import global_alignment, refine_mapping, replace_mapping
from diffinv.editing.prompt_to_prompt import AttentionController
from diffinv.models import Segment, TextLayout
from diffinv.shapes.tokenizer import load_tokenizer
from test_methods import item

STEPS = 5


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir / "tokenizer")


@pytest.fixture(scope="module")
def layout(tok):
    """A UNet model's layout: one CLIP segment."""
    return TextLayout((Segment("clip", 0, tok.model_max_length, tok),), width=32)


@pytest.fixture(scope="module")
def bb(tiny_model_dir):
    return BackboneConfig(pretrained=str(tiny_model_dir))


def test_replace_mapping_swaps_words_and_names_counts(tok):
    m, a = replace_mapping(tok, "a red car", "a blue car")
    assert torch.equal(m, torch.eye(tok.model_max_length)) and a.min() == 1
    with pytest.raises(DiffinvError, match="source 'a red car' has 3 words, target 'a big red car' has 4"):
        replace_mapping(tok, "a red car", "a big red car")


def test_replace_mapping_spreads_multi_token_words_preserving_attention_mass(tok):
    n = len(tok("xyz", add_special_tokens=False).input_ids)  # 'xyz' is several character tokens
    assert n > 1
    m, _ = replace_mapping(tok, "a cat", "a xyz")
    # google/prompt-to-prompt: each of the n pieces gets 'cat''s attention / n (not all of it: mass preserved)
    torch.testing.assert_close(m[2, 2 : 2 + n], torch.full((n,), 1.0 / n))
    row = torch.softmax(torch.randn(tok.model_max_length, generator=torch.Generator().manual_seed(0)), 0)
    edited = row @ m
    torch.testing.assert_close(edited[2 : 2 + n].sum(), row[2])
    # after the last swapped word, the reference maps position j onto j; 'shifted' follows the token shift
    assert all(m[j, j] == 1 for j in range(2 + n, tok.model_max_length))
    shifted, _ = replace_mapping(tok, "a cat", "a xyz", tail="shifted")
    assert shifted[3, 2 + n] == 1  # end token onto end token
    torch.testing.assert_close(shifted[2, 2 : 2 + n], torch.full((n,), 1.0 / n))


def test_replace_mapping_several_tokens_onto_one(tok):
    n = len(tok("xyz", add_special_tokens=False).input_ids)
    m, _ = replace_mapping(tok, "a xyz", "a cat")
    assert m[2 : 2 + n, 2].tolist() == [1.0] * n  # 'cat' gets the sum of the pieces' attention (1 target token)


def test_refine_alignment_and_new_words(tok):
    assert global_alignment([1, 2, 3], [1, 9, 2, 3]) == [0, -1, 1, 2]
    m, a = refine_mapping(tok, "a red car", "a big red car")
    assert a[2] == 0  # 'big' is new: keeps its own attention
    assert m[1, 1] == 1 and m[2, 3] == 1 and m[3, 4] == 1  # a, red, car aligned


def test_reweighting_scales_only_the_words_of_the_target(layout):
    c = PromptToPrompt(mode="refine", reweight_words=["red"], reweight_scale=3.0).controller(
        layout, sources=["a red car", "a red car"], targets=[None, "a big red car"], source_index=[0, 0],
        num_steps=5, latent_hw=(8, 8))
    assert c.equalizer[1, 3] == 3.0 and c.equalizer[1, [0, 1, 2, 4]].tolist() == [1.0] * 4
    assert c.equalizer[0].eq(1).all()  # the source row is never reweighted


def test_cross_replace_schedule_per_word(layout):
    p2p = PromptToPrompt(cross_replace_steps={"default": 1.0, "dog": 0.4})
    alpha = p2p._cross_alpha(layout, "a dog on the grass", 10)
    assert alpha[:, 2].sum() == 4 and alpha[:, 1].sum() == 10


def test_cross_replace_steps_count_as_the_reference_and_take_bounds(layout):
    # the reference: steps s < int(f (N + 1)); 0.25 of 10 steps is int(2.75) = 2 steps (ceil(2.5) = 3 would differ)
    assert PromptToPrompt(cross_replace_steps=0.25)._cross_alpha(layout, "a dog", 10)[:, 1].tolist() == [1] * 2 + [0] * 8
    window = PromptToPrompt(cross_replace_steps=(0.2, 0.6))._cross_alpha(layout, "a dog", 10)[:, 1]
    assert window.nonzero().flatten().tolist() == [2, 3, 4, 5]  # int(2.2) .. int(6.6) - 1
    per_word = PromptToPrompt(cross_replace_steps={"default": 0.8, "dog": [0.1, 0.5]})._cross_alpha(layout, "a dog", 10)
    assert per_word[:, 2].nonzero().flatten().tolist() == [1, 2, 3, 4] and per_word[:, 1].sum() == 8
    with pytest.raises(DiffinvError, match="cross_replace_steps"):
        PromptToPrompt(cross_replace_steps=(0.6, 0.2))
    with pytest.raises(DiffinvError, match="local_blend_words"):
        PromptToPrompt(substruct_words=["cat"])


def test_local_blend_region_is_upsampled_nearest_and_united_with_the_source(layout):
    c = PromptToPrompt(local_blend_words=["cat", "dog"]).controller(
        layout, sources=["a cat", "a cat"], targets=[None, "a dog"], source_index=[0, 0], num_steps=5, latent_hw=(8, 8))
    maps = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.2, 0.2, 0.2]])  # 2x2 maps (8/4 per side)
    region = c._region({4: maps}, 0.5, pool=False)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:4, :4] = True  # a 4x4 block: nearest, not a bilinear ramp
    assert torch.equal(region[1, 0], expected) and torch.equal(region[0, 0], torch.zeros(8, 8, dtype=torch.bool))
    union = c._region({4: maps.flip(0)}, 0.5, pool=False)
    assert torch.equal(union[1, 0], expected)  # the target row's region includes its source's


def method(bb, editor=None):
    return NegativePromptInversion(bb, STEPS, editor=editor)


@torch.inference_mode()
def run(m, items):
    return m.run_batch(items)


def test_identical_prompts_return_the_reconstruction_exactly(bb):
    r = run(method(bb, PromptToPrompt(self_replace_steps=1.0, cross_replace_steps=1.0)),
            [item(0, targets=["a photo of a cat"])])[0]
    assert torch.equal(r.edits[0], r.reconstruction)


def test_processors_are_restored_after_an_edit_even_on_error(bb):
    m = method(bb, PromptToPrompt())
    before = {k: type(v) for k, v in m.backbone.unet.attn_processors.items()}
    run(m, [item(0)])
    assert {k: type(v) for k, v in m.backbone.unet.attn_processors.items()} == before
    m.editor.cross_replace_steps = {"default": 1.0}
    m.editor.mode = "replace"
    with pytest.raises(DiffinvError, match="equal word counts"):
        run(m, [item(0, targets=["a big photo of a dog"])])
    assert {k: type(v) for k, v in m.backbone.unet.attn_processors.items()} == before


def test_replaced_words_attend_like_the_source(bb, monkeypatch):
    """During cross-replace steps the swapped word's cross-attention map in the target row is the source's."""
    seen = []
    original = AttentionController.edit

    def spy(self, probs, is_cross, heads):
        out = original(self, probs, is_cross, heads)
        if is_cross and self.cross_alpha[self.step].any():
            p = out.view(-1, heads, *out.shape[1:])
            seen.append((p[0, :, :, 4].clone(), p[1, :, :, 4].clone()))  # 'cat' / 'dog' token (a photo of a X)
        return out

    monkeypatch.setattr(AttentionController, "edit", spy)
    m = method(bb, PromptToPrompt(cross_replace_steps=1.0, self_replace_steps=0.0))
    cross_layers = sum(1 for name in m.backbone.unet.attn_processors if "attn2" in name)
    r = run(m, [item(0)])[0]
    assert len(seen) == STEPS * cross_layers  # every cross-attention layer, every step
    for src, tgt in seen:
        torch.testing.assert_close(tgt, src)
    plain = run(method(bb), [item(0)])[0]
    assert (plain.edits[0] - r.edits[0]).abs().max() > 1e-4  # the control changes the edit


def test_self_attention_is_the_source_s_inside_its_window_only(bb, monkeypatch):
    record = []
    original = AttentionController.edit

    def spy(self, probs, is_cross, heads):
        out = original(self, probs, is_cross, heads)
        if not is_cross:
            p = out.view(-1, heads, *out.shape[1:])
            record.append((self.step, torch.equal(p[0], p[1])))
        return out

    monkeypatch.setattr(AttentionController, "edit", spy)
    run(method(bb, PromptToPrompt(self_replace_steps=(0.2, 0.6), cross_replace_steps=0.0)), [item(0)])
    steps = {step for step, _ in record}
    assert steps == {1, 2}  # 5 steps: indices floor(0.2*5)=1 .. floor(0.6*5)-1=2; other steps run SDPA
    assert all(same for _, same in record)


def test_local_blend_keeps_pixels_outside_the_region(bb):
    p2p = PromptToPrompt(local_blend_words=["cat", "dog"], local_blend_threshold=0.99, local_blend_start=0.0)
    r = run(method(bb, p2p), [item(0)])[0]
    # a threshold of 0.99 leaves only the peak of the word maps editable: the edit stays close to the source row
    plain = run(method(bb), [item(0)])[0]
    assert float((r.edits[0] - r.reconstruction).abs().mean()) < float((plain.edits[0] - plain.reconstruction).abs().mean())


def test_local_blend_reads_the_target_maps_after_replacement(bb, monkeypatch):
    """With the whole prompt's cross-attention replaced, the target's stored 'dog' map is the source's 'cat' map."""
    stored = []
    original = AttentionController._store_blend_maps

    def spy(self, cond):
        before = {q: v.clone() for q, v in self.blend_maps.items()}
        original(self, cond)
        stored.append({q: v - before.get(q, 0) for q, v in self.blend_maps.items()})

    monkeypatch.setattr(AttentionController, "_store_blend_maps", spy)
    run(method(bb, PromptToPrompt(cross_replace_steps=1.0, self_replace_steps=0.0, local_blend_words=["cat", "dog"])),
        [item(0)])
    assert stored
    for maps in stored:
        for m in maps.values():
            torch.testing.assert_close(m[1], m[0])


def test_substruct_words_take_their_region_out_of_the_blend(bb):
    everything = PromptToPrompt(local_blend_words=["cat", "dog"], local_blend_start=0.0, substruct_words=["photo"],
                                substruct_threshold=-1.0)  # the substruct region covers the image: nothing may change
    r = run(method(bb, everything), [item(0)])[0]
    torch.testing.assert_close(r.edits[0], r.reconstruction, atol=1e-6, rtol=0)
    free = run(method(bb, PromptToPrompt(local_blend_words=["cat", "dog"], local_blend_start=0.0)), [item(0)])[0]
    assert (free.edits[0] - free.reconstruction).abs().max() > 1e-3


def test_batched_items_with_p2p_equal_single_runs(bb):
    m = method(bb, PromptToPrompt(mode="refine"))
    items = [item(0), item(1, targets=["a photo of a big dog", "a red car"]), item(2, targets=[])]
    together = run(m, items)
    for it, r in zip(items, together):
        alone = run(m, [it])[0]
        for x, y in zip([r.reconstruction, *r.edits], [alone.reconstruction, *alone.edits]):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=0)


def test_sdedit_full_strength_from_inversion_is_the_reconstruction(bb):
    r = run(method(bb, SDEdit(strength=1.0, start_from="inversion")), [item(0, targets=["a photo of a cat"])])[0]
    torch.testing.assert_close(r.edits[0], r.reconstruction, atol=1e-5, rtol=0)


def test_sdedit_strength_sets_how_far_the_edit_goes(bb):
    weak = run(method(bb, SDEdit(strength=0.2)), [item(0)])[0]
    strong = run(method(bb, SDEdit(strength=1.0)), [item(0)])[0]
    again = run(method(bb, SDEdit(strength=0.2)), [item(0)])[0]
    assert torch.equal(weak.edits[0], again.edits[0])  # seeded
    err = lambda r: float(((r.edits[0] - r.source) ** 2).mean())  # noqa: E731
    assert err(weak) < err(strong)
    with pytest.raises(DiffinvError, match="strength"):
        SDEdit(strength=0.0)


@pytest.mark.parametrize("control", [True, False, None])
def test_unconditional_branch_of_targets_takes_the_source_s_attention_only_when_asked(bb, monkeypatch, control):
    """DDIM inversion computes the source row's unconditional branch too: a target's unconditional self-attention
    is its source's unconditional one inside the window (when control_unconditional), its own otherwise."""
    from diffinv import DDIMInversion

    seen = []
    original = AttentionController.edit

    def spy(self, probs, is_cross, heads):
        out = original(self, probs, is_cross, heads)
        if not is_cross:
            p = out.view(-1, heads, *out.shape[1:])
            seen.append((self.step, torch.equal(p[2], p[3]), torch.equal(p[0], p[1])))  # cond src, cond tgt, uncond..
        return out

    monkeypatch.setattr(AttentionController, "edit", spy)
    m = DDIMInversion(bb, STEPS, editor=PromptToPrompt(self_replace_steps=1.0, cross_replace_steps=0.0,
                                                        control_unconditional=control))
    run(m, [item(0)])
    assert seen and all(cond_same for _, _, cond_same in seen)
    later = [uncond_same for step, uncond_same, _ in seen if step > 0]  # at step 0 both rows share z_T anyway
    assert all(later) if control else not all(later)  # None: DDIM's negative is the null prompt, as the reference


def test_npi_controls_the_unconditional_branch_by_default(bb):
    m = method(bb, PromptToPrompt())
    captured = {}
    original = PromptToPrompt.controller

    def capture(self, *a, **k):
        c = original(self, *a, **k)
        captured["c"] = c
        return c

    PromptToPrompt.controller = capture
    try:
        run(m, [item(0)])
    finally:
        PromptToPrompt.controller = original
    assert captured["c"].control_unconditional is True
