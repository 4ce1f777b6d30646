"""The authors' recipes beside the papers': EDICT's leapfrog order and strength, CycleDiffusion's strength, DDPM
inversion's variance form, SDEdit under a record that starts below level N, and the reference configs. Exactness
is checked in float64 on the tiny model; the authors' loops are transcribed here from their code."""

import inspect
import json
from pathlib import Path

import pytest
import torch

from diffinv import BackboneConfig, CycleDiffusion, DDPMInversion, EDICT
from diffinv.ddim import (direction_sigma, ddim_sigma, ddim_step, from_x0, independent_chain, posterior_chain,
                          predict_x0, step_residuals, strength_level)
from diffinv.editing import SDEdit
from diffinv.editing.sampler import sample
from diffinv.errors import DiffinvError
from diffinv.inversion.edict import edict_invert
from diffinv.inversion.record import Inversion, Sampling
from diffinv.steps import CoupledStep, StochasticStep
from diffinv.steps.coupled import y_first
from test_compared_methods import guided_fn, latents64, paired
from test_methods import item

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
P = 0.93


@pytest.fixture(scope="module")
def bb(tiny_model_dir):
    return BackboneConfig(pretrained=str(tiny_model_dir))


@pytest.fixture(scope="module")
def prompts(bb64):
    cond = bb64.encode_prompts(["a photo of a cat", "a red car"]).double()
    null = bb64.encode_prompts(["", ""]).double()
    return cond, null


# --- EDICT: the authors' loops, transcribed -----------------------------------------------------------------------
def authors_edict_sample(eps, pair, schedule, top, p):
    """salesforce/EDICT coupled_stablediffusion (reverse=False, leapfrog_steps=True), i counted from the first
    sampled step: ``offset = i % 2; latent_i = (latent_i + offset) % 2``, then the mixing layer."""
    pair = list(pair)
    for i, k in enumerate(range(top, 0, -1)):
        t, a_t, a_prev = schedule.timesteps[k - 1], schedule.alphas[k], schedule.alphas[k - 1]
        for latent_i in range(2):
            latent_i = (latent_i + i % 2) % 2
            latent_j = (latent_i + 1) % 2
            pair[latent_i] = ddim_step(pair[latent_i], eps(pair[latent_j], t), a_t, a_prev)
        pair[0] = P * pair[0] + (1 - P) * pair[1]
        pair[1] = (1 - P) * pair[0] + P * pair[1]
    return pair


def salesforce_edict_invert(eps, z0, schedule, top, p):
    """salesforce/EDICT coupled_stablediffusion (reverse=True, leapfrog_steps=True): ``orig_i = len(timesteps) -
    (i + 1); offset = (orig_i + 1) % 2``, i counted from the lowest level."""
    pair = [z0, z0]
    for i, k in enumerate(range(1, top + 1)):
        t, a_lo, a_hi = schedule.timesteps[k - 1], schedule.alphas[k - 1], schedule.alphas[k]
        pair[1] = (pair[1] - (1 - p) * pair[0]) / p
        pair[0] = (pair[0] - (1 - p) * pair[1]) / p
        offset = (top - (i + 1) + 1) % 2
        for latent_i in range(2):
            latent_i = (latent_i + offset) % 2
            latent_j = (latent_i + 1) % 2
            pair[latent_i] = ddim_step(pair[latent_i], eps(pair[latent_j], t), a_lo, a_hi)
    return pair


def diffusers_edict_invert(eps, z0, schedule, top, p):
    """diffusers' community EDICTPipeline.prepare_latents (leapfrog_steps=True): k = j ^ 1, swapped where
    ``i % 2 == 0``, i counted from the lowest level (the base k is stepped with the prediction of j)."""
    pair = [z0, z0]
    for i, lvl in enumerate(range(1, top + 1)):
        t, a_lo, a_hi = schedule.timesteps[lvl - 1], schedule.alphas[lvl - 1], schedule.alphas[lvl]
        pair[1] = (pair[1] - (1 - p) * pair[0]) / p
        pair[0] = (pair[0] - (1 - p) * pair[1]) / p
        for j in range(2):
            k = j ^ 1
            if i % 2 == 0:
                k, j = j, k
            pair[k] = ddim_step(pair[k], eps(pair[j], t), a_lo, a_hi)
    return pair


def test_y_first_counts_from_the_start_level():
    assert [y_first(6, k, True) for k in range(6, 0, -1)] == [False, True, False, True, False, True]
    assert [y_first(5, k, True) for k in range(5, 0, -1)] == [False, True, False, True, False]
    assert not any(y_first(6, k, False) for k in range(1, 7))


@pytest.mark.parametrize("top", [6, 5, 4])
def test_leapfrog_round_trip_is_exact_for_any_step_count(bb64, prompts, top):
    """Inverting to level ``top`` (N = 6) and sampling back from it, odd and even step counts."""
    schedule = bb64.schedule(STEPS)
    z0 = latents64()
    eps = guided_fn(bb64, *prompts, 3.0)
    xs, y = edict_invert(paired(eps), z0, schedule, P, top=top, leapfrog=True)
    assert xs.shape == (STEPS + 1, *z0.shape) and bool((xs[top + 1:] == xs[top]).all())
    start = None if top == STEPS else top
    z = sample(bb64, schedule, xs[top], *prompts, 3.0, step=CoupledStep(mix=P, y_start=y, leapfrog=True),
               start_level=start)
    torch.testing.assert_close(z, z0, atol=1e-10, rtol=0)
    plain_xs, plain_y = edict_invert(paired(eps), z0, schedule, P, top=top)
    assert (plain_xs[top] - xs[top]).abs().max() > 1e-6  # another order, other latents
    wrong = sample(bb64, schedule, xs[top], *prompts, 3.0, step=CoupledStep(mix=P, y_start=y), start_level=start)
    assert (wrong - z0).abs().max() > 1e-6  # the paper's order does not undo the leapfrog inversion


@pytest.mark.parametrize("top", [6, 5])
def test_leapfrog_sampler_and_inversion_match_the_authors_loops(bb64, prompts, top):
    schedule = bb64.schedule(STEPS)
    z0 = latents64(1)
    eps = guided_fn(bb64, *prompts, 3.0)
    xs, y = edict_invert(paired(eps), z0, schedule, P, top=top, leapfrog=True)
    theirs = salesforce_edict_invert(eps, z0, schedule, top, P)
    torch.testing.assert_close(xs[top], theirs[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(y, theirs[1], atol=1e-12, rtol=0)
    start = None if top == STEPS else top
    step = CoupledStep(mix=P, y_start=y, leapfrog=True)
    ours = sample(bb64, schedule, xs[top], *prompts, 3.0, step=step, start_level=start)
    x_theirs, y_theirs = authors_edict_sample(eps, [xs[top], y], schedule, top, P)
    torch.testing.assert_close(ours, x_theirs, atol=1e-12, rtol=0)
    torch.testing.assert_close(step.y, y_theirs, atol=1e-12, rtol=0)
    # diffusers' inversion counts from the lowest level: the same order where the step count is even only
    dx, dy = diffusers_edict_invert(eps, z0, schedule, top, P)
    if top % 2 == 0:
        torch.testing.assert_close(dx, xs[top], atol=1e-12, rtol=0)
        torch.testing.assert_close(dy, y, atol=1e-12, rtol=0)
    else:
        assert (dx - xs[top]).abs().max() > 1e-6
        back, _ = authors_edict_sample(eps, [dx, dy], schedule, top, P)
        assert (back - z0).abs().max() > 1e-6  # and their sampler does not undo it


# --- EDICT strength ----------------------------------------------------------------------------------------------
def test_edict_strength_records_its_start_level_and_reconstructs_from_it(bb):
    m = EDICT(bb, STEPS, strength=0.5)
    with torch.inference_mode():
        inv = m.predict_step([item(0)])[0].inversion
    level = strength_level(STEPS, 0.5)
    assert level == 3 and inv.start_level == 3
    assert inv.sampling == Sampling(step="coupled", mix=0.93, start_level=3, guidance_scale=3.0)
    assert bool((inv.trajectory[4:] == inv.trajectory[3]).all())  # above L: never computed, never read
    with torch.inference_mode():
        (alone, _), = EDICT(bb, STEPS).edit([inv], [[]])  # the record's start level and y, whatever the config
        (rec, edits), = m.edit([inv], [["a photo of a dog"]])
        full = EDICT(bb, STEPS).predict_step([item(0)])[0].inversion
        (_, full_edits), = EDICT(bb, STEPS).edit([full], [["a photo of a dog"]])
    assert torch.equal(alone.float(), inv.z0)  # the same UNet calls as the inversion: exact
    torch.testing.assert_close(rec.float(), inv.z0, atol=1e-2, rtol=0)
    assert (edits[0] - rec).abs().max() > 1e-2
    assert (edits[0] - full_edits[0]).abs().max() > 1e-3  # three steps from level 3 are not six from level 6
    assert full.start_level == STEPS and full.sampling.start_level is None


def test_edict_strength_is_exact_in_float64(bb64, prompts):
    schedule = bb64.schedule(STEPS)
    z0 = latents64(2)
    eps = guided_fn(bb64, *prompts, 3.0)
    xs, y = edict_invert(paired(eps), z0, schedule, P, top=3)
    z = sample(bb64, schedule, xs[3], *prompts, 3.0, step=CoupledStep(mix=P, y_start=y), start_level=3)
    torch.testing.assert_close(z, z0, atol=1e-10, rtol=0)
    full, _ = edict_invert(paired(eps), z0, schedule, P)
    torch.testing.assert_close(full[:4], xs[:4], atol=0, rtol=0)  # the same levels up to L


def test_edict_leapfrog_record_is_pinned_and_reconstructed_by_any_config(bb, tmp_path):
    m = EDICT(bb, 5, leapfrog=True, strength=0.8)  # 4 steps from level 4 of 5
    with torch.inference_mode():
        inv = m.predict_step([item(0)])[0].inversion
    assert inv.sampling.leapfrog and inv.start_level == 4
    loaded = Inversion.load(inv.save(tmp_path / "inv.safetensors"))
    assert loaded.sampling == inv.sampling
    with torch.inference_mode():
        (rec, _), = EDICT(bb, 5).edit([loaded], [[]])  # a paper-order config samples the record's order
    assert torch.equal(rec.float(), inv.z0)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_strength_outside_zero_one_is_refused(bb, bad):
    with pytest.raises(DiffinvError, match="strength must be in"):
        EDICT(bb, STEPS, strength=bad)
    with pytest.raises(DiffinvError, match="strength must be in"):
        CycleDiffusion(bb, STEPS, strength=bad)


def test_strength_level_truncates_as_the_authors_code():
    assert strength_level(50, 0.8) == 40 and strength_level(100, 0.7) == 70 and strength_level(100, 0.29) == 28
    assert strength_level(3, 0.1) == 1 and strength_level(50, 1.0) == 50


# --- CycleDiffusion strength ---------------------------------------------------------------------------------------
def test_dpm_encoder_from_a_lower_level_is_exact_in_float64(bb64, prompts):
    schedule = bb64.schedule(STEPS)
    z0 = latents64(3)
    noise = torch.randn(STEPS, *z0.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eps = guided_fn(bb64, *prompts, 1.0)
    for top, eta in ((4, 0.1), (3, 1.0)):
        chain = posterior_chain(z0, schedule, eta, noise, top=top)
        torch.testing.assert_close(chain[top], from_x0(z0, noise[top - 1], schedule.alphas[top]), atol=0, rtol=0)
        assert torch.equal(chain[0], z0) and bool((chain[top + 1:] == chain[top]).all())
        residuals = step_residuals(eps, chain, schedule, eta, top=top)
        assert bool((residuals[top:] == 0).all()) and bool((residuals[:top] != 0).any())
        z = sample(bb64, schedule, chain[top], *prompts, 1.0, step=StochasticStep(eta=eta, noise=residuals),
                   start_level=top)
        torch.testing.assert_close(z, z0, atol=1e-10, rtol=0)


def test_cycle_diffusion_strength_records_its_start_level_and_reconstructs(bb):
    m = CycleDiffusion(bb, STEPS, eta=0.1, strength=0.7)  # int(4.2) = 4
    with torch.inference_mode():
        inv = m.predict_step([item(0)])[0].inversion
        (rec, edits), = m.edit([inv], [["a photo of a dog"]])
        full = CycleDiffusion(bb, STEPS, eta=0.1)
        (_, full_edits), = full.edit([full.predict_step([item(0)])[0].inversion], [["a photo of a dog"]])
    assert inv.sampling == Sampling(step="stochastic", eta=0.1, start_level=4, guidance_scale=1.0)
    assert bool((inv.extra["step_noise"][4:] == 0).all())
    torch.testing.assert_close(rec, inv.z0, atol=1e-4, rtol=0)
    assert (edits[0] - rec).abs().max() > 1e-3 and (edits[0] - full_edits[0]).abs().max() > 1e-3


def test_ddpm_inversion_keeps_its_skip_and_takes_no_strength(bb):
    assert "strength" not in inspect.signature(DDPMInversion.__init__).parameters
    m = DDPMInversion(bb, 10, skip=0.3)
    assert m.strength == 1.0 and m.start_level(10) == 7 and m.variance == "ddim"


# --- DDPM inversion: the authors' variance form ---------------------------------------------------------------------
def authors_reverse_step(eps, k, z, schedule, eta, sigma_z):
    """inbarhub/DDPM_inversion reverse_step with the noise sigma z already scaled (our stored maps)."""
    a_t, a_prev = schedule.alphas[k], schedule.alphas[k - 1]
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)  # get_variance
    x0 = (z - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    return a_prev ** 0.5 * x0 + (1 - a_prev - eta * variance) ** 0.5 * eps + sigma_z


def test_authors_variance_equals_ddim_at_eta_one_and_differs_below(bb64):
    schedule = bb64.schedule(STEPS)
    a_t, a_prev = schedule.alphas[3], schedule.alphas[2]
    assert torch.equal(direction_sigma(a_t, a_prev, 1.0, "authors"), direction_sigma(a_t, a_prev, 1.0, "ddim"))
    torch.testing.assert_close(direction_sigma(a_t, a_prev, 0.5, "authors") ** 2, 0.5 * ddim_sigma(a_t, a_prev, 1) ** 2)
    torch.testing.assert_close(direction_sigma(a_t, a_prev, 0.5, "ddim"), ddim_sigma(a_t, a_prev, 0.5), atol=0, rtol=0)
    z, eps, r = latents64(5), latents64(6), latents64(7)
    noise = torch.zeros(STEPS, *z.shape, dtype=torch.float64)
    noise[2] = r
    x0 = predict_x0(z, eps, a_t)
    lands = {v: {eta: StochasticStep(eta=eta, noise=noise, variance=v).land(x0, eps, 3, schedule)
                 for eta in (1.0, 0.5)} for v in ("ddim", "authors")}
    assert torch.equal(lands["ddim"][1.0], lands["authors"][1.0])
    assert (lands["ddim"][0.5] - lands["authors"][0.5]).abs().max() > 1e-3
    for eta in (1.0, 0.5):
        torch.testing.assert_close(lands["authors"][eta], authors_reverse_step(eps, 3, z, schedule, eta, r),
                                   atol=1e-12, rtol=0)


@pytest.mark.parametrize("variance", ["ddim", "authors"])
def test_ddpm_maps_absorb_either_variance_form(bb64, prompts, variance):
    schedule = bb64.schedule(STEPS)
    z0 = latents64(8)
    noise = torch.randn(STEPS, *z0.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    chain = independent_chain(z0, schedule, noise)
    eps = guided_fn(bb64, *prompts, 3.5)
    maps = step_residuals(eps, chain, schedule, 0.5, top=4, variance=variance)
    z = sample(bb64, schedule, chain[4], *prompts, 3.5, step=StochasticStep(eta=0.5, noise=maps, variance=variance),
               start_level=4)
    torch.testing.assert_close(z, z0, atol=1e-10, rtol=0)
    other = "ddim" if variance == "authors" else "authors"
    assert (maps - step_residuals(eps, chain, schedule, 0.5, top=4, variance=other)).abs().max() > 1e-4
    wrong = sample(bb64, schedule, chain[4], *prompts, 3.5, step=StochasticStep(eta=0.5, noise=maps, variance=other),
                   start_level=4)
    assert (wrong - z0).abs().max() > 1e-4  # the sampler must use the record's form


def test_variance_is_pinned_validated_and_read_as_ddim_from_older_records():
    assert Sampling(step="stochastic", variance="authors").problem(4) is None
    assert "variance 'dpm'" in Sampling(step="stochastic", variance="dpm").problem(4)
    old = json.loads(Sampling(step="stochastic", eta=0.5).to_json())
    del old["variance"]  # a version-2 record written before the field
    assert Sampling.from_json(json.dumps(old)).variance == "ddim"
    assert Sampling.from_json(Sampling(variance="authors").to_json()).variance == "authors"


def test_ddpm_inversion_refuses_an_unknown_variance(bb):
    with pytest.raises(DiffinvError, match="variance must be 'ddim' or 'authors'"):
        DDPMInversion(bb, 10, variance="dpm")


def test_ddpm_record_with_the_authors_variance_reconstructs_under_any_config(bb, tmp_path):
    m = DDPMInversion(bb, 10, eta=0.5, variance="authors", skip=0.3)
    with torch.inference_mode():
        inv = m.predict_step([item(0)])[0].inversion
    assert inv.sampling.variance == "authors"
    loaded = Inversion.load(inv.save(tmp_path / "inv.safetensors"))
    assert loaded.sampling == inv.sampling
    with torch.inference_mode():
        (rec, _), = DDPMInversion(bb, 10, eta=0.5, skip=0.3).edit([loaded], [[]])
    torch.testing.assert_close(rec, inv.z0, atol=1e-4, rtol=0)


# --- SDEdit under a record that starts below N ----------------------------------------------------------------------
def test_sdedit_level_is_clipped_to_the_records_start_level():
    e = SDEdit(strength=1.0)
    assert e.start_level(10) == 10 and e.start_level(10, 6) == 6 and SDEdit(strength=0.3).start_level(10, 6) == 3


@pytest.mark.parametrize("start_from", ["noise", "inversion"])
@pytest.mark.parametrize("method", ["ddpm", "edict"])
def test_sdedit_above_the_records_start_level_starts_at_it(bb, method, start_from):
    """A strength above the records' start level edits as the strength at it: nothing above is computed."""
    make = {"ddpm": lambda e: DDPMInversion(bb, 10, skip=0.4, editor=e),  # start level 6
            "edict": lambda e: EDICT(bb, 10, strength=0.6, editor=e)}[method]
    with torch.inference_mode():
        inv = make(None).predict_step([item(0)])[0].inversion
        assert inv.start_level == 6
        (rec_hi, hi), = make(SDEdit(strength=1.0, start_from=start_from)).edit([inv], [["a photo of a dog"]])
        (rec_at, at), = make(SDEdit(strength=0.6, start_from=start_from)).edit([inv], [["a photo of a dog"]])
        (_, low), = make(SDEdit(strength=0.3, start_from=start_from)).edit([inv], [["a photo of a dog"]])
    assert torch.equal(hi[0], at[0]) and torch.equal(rec_hi, rec_at)
    assert (low[0] - at[0]).abs().max() > 1e-4


# --- reference configs ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, expected", [
    ("edict.yaml", ["--model.leapfrog true", "--model.strength 0.8", "--model.guidance_scale 3.0",
                    "--model.num_inference_steps 50", "--model.mix 0.93"]),
    ("cycle_diffusion.yaml", ["--model.eta 0.1", "--model.strength 0.7", "--model.num_inference_steps 100",
                              "--model.guidance_scale 5.0", "--model.source_guidance_scale 1.0"]),
    ("ddpm_inversion.yaml", ["--model.variance authors", "--model.skip 0.36", "--model.eta 1.0",
                             "--model.guidance_scale 15.0", "--model.source_guidance_scale 3.5"]),
])
def test_reference_configs_load_through_the_cli(config, expected, capsys):
    from diffinv.cli import main

    with pytest.raises(SystemExit) as e:
        main(["predict", "-c", str(REPO / "configs" / "reference" / config), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in expected:
        assert option in out, option
