"""The methods users compare against: DirectInversion, EDICT and edit-friendly DDPM inversion. Each one's
exactness property on tiny components, its record, and re-editing a saved record."""

import pytest
import torch

from diffinv import BackboneConfig, DDIMInversion, DDPMInversion, DirectInversion, EDICT
from diffinv.ddim import independent_chain, step_residuals
from diffinv.editing import PromptToPrompt
from diffinv.editing.sampler import sample
from diffinv.steps import CoupledStep, StochasticStep
from diffinv.guidance import cfg
from diffinv.inversion.edict import edict_invert
from diffinv.inversion.record import Inversion
from test_methods import item

STEPS = 6


@pytest.fixture(scope="module")
def bb(tiny_model_dir):
    return BackboneConfig(pretrained=str(tiny_model_dir))


def guided_fn(bb, cond, null, w):
    def guided(z, t):
        both = bb.eps(torch.cat([z, z]), t, torch.cat([cond, null]))
        return cfg(both[len(z):], both[: len(z)], w)
    return guided


def paired(eps_fn):
    """An eps-only prediction as the (eps, x0) pair edict_invert takes (the DDIM step reads eps only)."""
    return lambda z, t: (eps_fn(z, t), None)


def latents64(seed=0, batch=2):
    return torch.randn(batch, 4, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- DirectInversion --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("w", [1.0, 7.5, 15.0])
def test_direct_inversion_source_row_lands_on_z0_exactly_at_any_w(bb, w):
    m = DirectInversion(bb, STEPS, guidance_scale=w, editor=PromptToPrompt(self_replace_steps=0.6))
    with torch.inference_mode():
        r = m.predict_step([item(0, targets=["a photo of a dog"])])[0]
        (rec, edits), = m.edit([r.inversion], [["a photo of a dog"]], ["img0"])
    assert torch.equal(rec, r.inversion.trajectory[0])  # z*_0, bit for bit
    assert (edits[0] - rec).abs().max() > 1e-3
    ddim = DDIMInversion(bb, STEPS, guidance_scale=w, editor=PromptToPrompt(self_replace_steps=0.6))
    with torch.inference_mode():
        own = ddim.predict_step([item(0)])[0].inversion  # the same trajectory, sampled without the snap
        (d_rec, d_edits), = ddim.edit([own], [["a photo of a dog"]], ["img0"])
        (pinned, _), = ddim.edit([r.inversion], [["a photo of a dog"]], ["img0"])
    assert torch.equal(own.trajectory, r.inversion.trajectory)
    assert torch.equal(pinned, rec)  # DirectInversion's record pins its snap: any method reconstructs it so
    if w > 1:
        assert (d_rec - rec).abs().max() > 1e-3  # plain DDIM + CFG drifts; DirectInversion does not
        assert (d_edits[0] - edits[0]).abs().max() > 1e-4  # the edits read their attention from the exact source


def test_direct_inversion_without_an_editor_edits_like_ddim_cfg(bb):
    """The target branch runs free: with no attention control its edit is DDIM + CFG's."""
    m, ddim = DirectInversion(bb, STEPS), DDIMInversion(bb, STEPS)
    with torch.inference_mode():
        r = m.predict_step([item(0)])[0]
        (_, e1), = m.edit([r.inversion], [["a photo of a dog"]])
        (_, e2), = ddim.edit([r.inversion], [["a photo of a dog"]])
    torch.testing.assert_close(e1[0], e2[0], atol=1e-5, rtol=0)


# --- EDICT ------------------------------------------------------------------------------------------------------
def test_edict_inversion_then_sampling_returns_z0_in_float64(bb64):
    schedule = bb64.schedule(STEPS)
    z0 = latents64()
    cond = bb64.encode_prompts(["a photo of a cat", "a red car"]).double()
    null = bb64.encode_prompts(["", ""]).double()
    for w, p in ((3.0, 0.93), (7.5, 0.8)):
        xs, y_T = edict_invert(paired(guided_fn(bb64, cond, null, w)), z0, schedule, p)
        assert xs.shape == (STEPS + 1, *z0.shape) and torch.equal(xs[0], z0)
        assert (xs[-1] - z0).abs().max() > 0.1 and (y_T - xs[-1]).abs().max() > 1e-6  # the pair is really coupled
        z = sample(bb64, schedule, xs[-1], cond, null, w, step=CoupledStep(mix=p, y_start=y_T))
        torch.testing.assert_close(z, z0, atol=1e-10, rtol=0)


def test_edict_method_reconstructs_and_its_record_is_re_edited_coupled(bb, tmp_path):
    m = EDICT(bb, STEPS, editor=PromptToPrompt())
    with torch.inference_mode():
        r = m.predict_step([item(0)])[0]
    inv = r.inversion
    assert inv.trajectory.dtype == torch.float64 and inv.extra["edict_y_T"].shape == inv.z0.shape
    plain = EDICT(bb, STEPS)
    with torch.inference_mode():
        (alone, _), = plain.edit([inv], [[]])
        (rec, edits), = m.edit([inv], [["a photo of a dog"]])
    assert torch.equal(alone.float(), inv.z0)  # the same UNet calls as the inversion: exact
    # beside an edit row, or through Prompt-to-Prompt's attention processors, the float32 UNet rounds differently
    # (batch 2 vs 1: 6e-5 in DDIM's latents on this random model) and the coupled chain carries that further
    torch.testing.assert_close(rec.float(), inv.z0, atol=1e-2, rtol=0)
    assert (edits[0] - rec).abs().max() > 1e-1
    loaded = Inversion.load(inv.save(tmp_path / "inv.safetensors"))
    other = DDIMInversion(bb, STEPS, guidance_scale=3.0)  # another method samples an EDICT record coupled
    with torch.inference_mode():
        (again, _), = other.edit([loaded], [[]])
    assert torch.equal(again.float(), inv.z0)


def test_edict_in_float32_drifts_more_than_in_float64(bb):
    """Why the latents default to float64: each inverse mixing divides by p."""
    errs = {}
    for dtype in ("float32", "float64"):
        m = EDICT(bb, 20, latent_dtype=dtype)
        with torch.inference_mode():
            inv = m.predict_step([item(0)])[0].inversion
            (rec, _), = m.edit([inv], [[]])
        errs[dtype] = float((rec.float() - inv.z0).abs().max())
    assert errs["float64"] <= errs["float32"]


# --- edit-friendly DDPM inversion -------------------------------------------------------------------------------
def test_ddpm_noise_maps_return_z0_in_float64_from_any_start_level(bb64):
    schedule = bb64.schedule(STEPS)
    z0 = latents64(1)
    cond = bb64.encode_prompts(["a photo of a cat", "a red car"]).double()
    null = bb64.encode_prompts(["", ""]).double()
    noise = torch.randn(STEPS, *z0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    chain = independent_chain(z0, schedule, noise)
    for k in range(1, STEPS + 1):  # each level on its own: eq. 6
        a = schedule.alphas[k]
        torch.testing.assert_close(chain[k], a.sqrt() * z0 + (1 - a).sqrt() * noise[k - 1])
    for top in (STEPS, 4):
        maps = step_residuals(guided_fn(bb64, cond, null, 3.5), chain, schedule, 1.0, top=top)
        assert maps.shape == (STEPS, *z0.shape) and bool((maps[top:] == 0).all())
        z = sample(bb64, schedule, chain[top], cond, null, 3.5, step=StochasticStep(eta=1.0, noise=maps),
                   start_level=None if top == STEPS else top)
        torch.testing.assert_close(z, z0, atol=1e-10, rtol=0)


def test_ddpm_inversion_method_skips_steps_reconstructs_and_edits(bb):
    m = DDPMInversion(bb, 10, skip=0.3)
    with torch.inference_mode():
        r = m.predict_step([item(0)])[0]
    inv = r.inversion
    assert inv.start_level == 7 and inv.extra["step_noise"].shape == (10, *inv.z0.shape)
    assert bool((inv.extra["step_noise"][7:] == 0).all())  # above T - T_skip: never used, never computed
    with torch.inference_mode():
        (rec, edits), = m.edit([inv], [["a photo of a dog"]])
    torch.testing.assert_close(rec, inv.z0, atol=1e-4, rtol=0)
    assert (edits[0] - rec).abs().max() > 1e-3
    with torch.inference_mode():
        other = DDPMInversion(bb, 10, skip=0.3, seed=1).predict_step([item(0)])[0].inversion
    assert (other.trajectory[5] - inv.trajectory[5]).abs().max() > 0.1  # the seed draws other noisy latents


@pytest.mark.parametrize("bad, message", [
    (dict(skip=1.0), "skip must be in"), (dict(eta=0.0), "eta must be in"),
])
def test_ddpm_inversion_refuses_settings_it_cannot_invert(bb, bad, message):
    from diffinv.errors import DiffinvError

    with pytest.raises(DiffinvError, match=message):
        DDPMInversion(bb, 10, **bad)


def test_edict_refuses_a_mixing_weight_that_decouples(bb):
    from diffinv.errors import DiffinvError

    with pytest.raises(DiffinvError, match="mix must be in"):
        EDICT(bb, 10, mix=1.0)


@pytest.mark.parametrize("config", ["direct_inversion.yaml", "edict.yaml", "ddpm_inversion.yaml",
                                    "reference/edict.yaml", "reference/cycle_diffusion.yaml",
                                    "reference/ddpm_inversion.yaml"])
def test_saved_records_are_re_edited_through_the_cli(config, tiny_model_dir, tmp_path):
    """Invert once, then edit the saved records again with --data.records: the reconstruction comes back the
    same, the new target prompt is applied."""
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from diffinv.cli import main

    repo = Path(__file__).resolve().parents[1]
    common = ["-c", str(repo / "configs" / config), "--model.backbone.pretrained", str(tiny_model_dir),
              "--model.num_inference_steps", "4", "--trainer.accelerator", "cpu"]
    for args in (["--output_dir", str(tmp_path / "first")],
                 ["--data.records", str(tmp_path / "first"), "--data.target_prompts", '["a photo of a dog"]',
                  "--output_dir", str(tmp_path / "again")]):
        try:
            main(["predict", *common, *args])
        except SystemExit as e:
            assert e.code in (0, None)
    lines = [json.loads(x) for x in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    assert {x["target_prompt"] for x in lines} == {None, "a photo of a dog"}
    for x in lines:
        if x["kind"] == "reconstruction":
            a = np.asarray(Image.open(tmp_path / "first" / x["image_path"])).astype(int)
            b = np.asarray(Image.open(tmp_path / "again" / x["image_path"])).astype(int)
            assert np.abs(a - b).max() <= 1, x["image_path"]  # float noise of another batch layout at most
