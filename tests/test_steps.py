"""The sampling loop's step rules and hooks: Prompt-to-Prompt's windows count the steps sampled, a non-finite
latent stops the run naming the step, and the loop itself knows no method."""

import inspect

import pytest
import torch

from diffinv import BackboneConfig, DDPMInversion, NegativePromptInversion
from diffinv.editing import PromptToPrompt
from diffinv.errors import DiffinvError
from diffinv.steps import Controlled
from test_methods import item


@pytest.fixture(scope="module")
def bb(tiny_model_dir):
    return BackboneConfig(pretrained=str(tiny_model_dir))


def test_prompt_to_prompt_windows_count_the_steps_sampled_below_level_n(bb, monkeypatch):
    """DDPM inversion at skip 0.5 of 10 steps samples 5: cross-attention is replaced on int(0.8 (5 + 1)) = 4 of
    them and self-attention on floor(0.4 * 5) = 2, from the first step sampled (the authors' counting). Counting
    from level N replaced self-attention on none of them."""
    seen = []
    before = Controlled.before

    def spy(self, k):
        before(self, k)
        c = self.controller
        seen.append((k, c.step, bool(c.self_on[c.step]), bool(c.cross_alpha[c.step].any())))

    monkeypatch.setattr(Controlled, "before", spy)
    m = DDPMInversion(bb, 10, skip=0.5, editor=PromptToPrompt(cross_replace_steps=0.8, self_replace_steps=0.4))
    with torch.inference_mode():
        m.run_batch([item(0, targets=["a photo of a dog"])])
    assert [k for k, *_ in seen] == [5, 4, 3, 2, 1] and [s for _, s, *_ in seen] == [0, 1, 2, 3, 4]
    assert sum(self_on for *_, self_on, _ in seen) == 2 and [x[2] for x in seen][:2] == [True, True]
    assert sum(cross for *_, cross in seen) == 4


def test_a_non_finite_latent_stops_the_run_naming_the_step(bb, monkeypatch):
    m = NegativePromptInversion(bb, 6)
    with torch.inference_mode():
        inv = m.run_batch([item(0, targets=[])])[0].inversion
        eps = m.backbone.eps
        bad = int(m.backbone.schedule(6).timesteps[2])  # the step from level 3

        def broken(z, t, emb):
            out = eps(z, t, emb)
            return out * float("nan") if int(t) == bad else out

        monkeypatch.setattr(m.backbone, "eps", broken)
        with pytest.raises(DiffinvError, match=rf"NaN or infinite latents at the step from level 3 of 6 \(timestep "
                                               rf"{bad}\) in row\(s\) \[0, 1\]"):
            m.edit([inv], [["a photo of a dog"]])


def test_the_loop_knows_no_method():
    """sample() takes a step rule and hooks; none of the methods' own parameters."""
    from diffinv.editing.sampler import sample

    params = set(inspect.signature(sample).parameters)
    assert params == {"backbone", "schedule", "z_T", "cond", "uncond", "guidance", "step", "hooks", "uncond_is_cond",
                      "start_level"}


@pytest.fixture(scope="module")
def zero_snr_dir(tiny_model_dir, tmp_path_factory):
    """The tiny SD turned into a zero-terminal-SNR v-prediction model with trailing spacing (SD 2.x-style
    fine-tunes): its top level has alpha exactly 0."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("zero_snr") / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {
        "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}))
    return folder


def test_zero_terminal_snr_samples_as_the_pipeline(zero_snr_dir):
    """At alpha 0 eps = z and x0 = (z - z) / 0 was NaN (black images, exit 0): x0 is now the model's own,
    sqrt(a) z - sqrt(1 - a) v, as diffusers' DDIMScheduler computes it; sampling matches the SD pipeline."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from diffinv.backbone import Backbone
    from diffinv.editing.sampler import sample

    bb = Backbone.load(BackboneConfig(pretrained=str(zero_snr_dir)))
    # 5 steps: diffusers' DDIM steps from t to t - T // N, not to the next timestep of its own list; with
    # trailing spacing the two differ by one where T / N is not an integer (999 -> 833, listed 832, at N = 6)
    schedule = bb.schedule(5)
    assert float(schedule.alphas[-1]) == 0.0
    pipe = StableDiffusionPipeline(vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer, unet=bb.unet,
                                   scheduler=DDIMScheduler.from_config(bb.scheduler.config, clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    z_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = pipe("a photo of a cat", height=16, width=16, num_inference_steps=5, guidance_scale=7.5,
                      latents=z_T.clone(), output_type="latent").images
        ours = sample(bb, schedule, z_T, bb.encode_prompts(["a photo of a cat"]), bb.encode_prompts([""]), 7.5)
    assert bool(torch.isfinite(ours).all())
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("method", [NegativePromptInversion, DDPMInversion])
def test_zero_terminal_snr_reconstructs_and_edits(zero_snr_dir, method):
    m = method(BackboneConfig(pretrained=str(zero_snr_dir)), 6,
               editor=PromptToPrompt(cross_replace_steps=0.8, self_replace_steps=0.4))
    with torch.inference_mode():
        r = m.run_batch([item(0, targets=["a photo of a dog"])])[0]
    for image in (r.reconstruction, *r.edits):
        assert bool(torch.isfinite(image).all()) and image.max() > 0.05  # not black


def test_zero_terminal_snr_cycle_diffusion_is_exact_and_edict_is_refused_in_one_line(zero_snr_dir):
    from diffinv import EDICT, CycleDiffusion

    bb = BackboneConfig(pretrained=str(zero_snr_dir))
    m = CycleDiffusion(bb, 6)
    with torch.inference_mode():
        r = m.run_batch([item(0, targets=["a photo of a dog"])])[0]
        (rec, _), = m.edit([r.inversion], [[]])
    torch.testing.assert_close(rec, r.inversion.z0, atol=1e-4, rtol=0)  # the code reaches z0 from alpha 0
    with pytest.raises(DiffinvError, match=r"EDICT cannot invert to level 6 .* alpha is 0 .* --model.strength"):
        EDICT(bb, 6).check_items([item(0)])
    with torch.inference_mode():
        r = EDICT(bb, 6, strength=0.8).run_batch([item(0, targets=["a photo of a dog"])])[0]
    assert all(bool(torch.isfinite(x).all()) for x in (r.reconstruction, *r.edits))


def test_flow_inversion_round_trip_is_exact_on_a_straight_flow(tiny_sd3, monkeypatch):
    """A constant velocity: Euler is exact, so inverting then sampling at w = 1 returns z0 up to float noise.
    Converting at the timestep's level instead of the latent's (the inversion before) erred 0.84 at 10 steps."""
    from dataclasses import replace

    from diffinv.ddim import invert
    from diffinv.editing.sampler import sample

    v = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(tiny_sd3, "family", replace(tiny_sd3.family))
    monkeypatch.setattr(type(tiny_sd3.family), "denoise", lambda self, bb, z, t, cond: v.expand_as(z))
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cond = tiny_sd3.encode_prompts(["a photo of a cat"])
    for n in (10, 50):
        schedule = tiny_sd3.schedule(n)
        traj = invert(lambda z, t, alpha: tiny_sd3.eps(z, t, cond, alpha), z0, schedule)
        back = sample(tiny_sd3, schedule, traj[-1], cond, cond, 1.0)
        torch.testing.assert_close(back, z0, atol=1e-4, rtol=0)
        stale = invert(lambda z, t, alpha: tiny_sd3.eps(z, t, cond), z0, schedule)  # at the timestep's level
        assert (sample(tiny_sd3, schedule, stale[-1], cond, cond, 1.0) - z0).abs().max() > 1e-2


def test_edict_on_a_flow_starts_at_pure_noise_and_reconstructs(tiny_sd3_dir):
    """A flow's schedule reaches s = 1 (alpha 0): EDICT's coupled step there is the flow's Euler step, which stays
    invertible (DDIM's maps both sequences onto eps), so the reconstruction is exact up to float32 noise."""
    from diffinv import EDICT

    m = EDICT(BackboneConfig(pretrained=str(tiny_sd3_dir)), 6)
    assert float(m.backbone.schedule(6).alphas[-1]) == 0.0
    with torch.inference_mode():
        r = m.run_batch([item(0, targets=["a photo of a dog"])])[0]
        (rec, _), = m.edit([r.inversion], [[]])
    torch.testing.assert_close(rec.float(), r.inversion.z0.float(), atol=1e-3, rtol=0)
    assert (r.edits[0] - r.reconstruction).abs().max() > 1e-3


def test_every_record_step_kind_has_its_step_rule_and_batch_settings():
    """The pipeline samples a record through diffinv.inversion.step_kinds alone: every kind a record may name is
    there, the flow solvers' marked as flow steps, and records that differ in a kind's settings form different
    batches."""
    from typing import get_args

    from diffinv.inversion.record import Sampling, StepKind
    from diffinv.inversion.step_kinds import STEP_KINDS, batch_key

    assert set(STEP_KINDS) == set(get_args(StepKind))
    assert {k for k, spec in STEP_KINDS.items() if spec.flow} == {"rf_solver", "fireflow", "rf_inversion"}
    assert batch_key(Sampling(step="stochastic", eta=1.0)) != batch_key(Sampling(step="stochastic", eta=0.5))
    assert batch_key(Sampling(step="coupled", mix=0.93)) != batch_key(Sampling(step="coupled", mix=0.9))
    assert batch_key(Sampling(step="rf_inversion", eta=0.9, eta_stop=0.25)) != batch_key(
        Sampling(step="rf_inversion", eta=0.9, eta_stop=0.5))
    assert batch_key(Sampling(step="ddim", eta=0.3)) == batch_key(Sampling(step="ddim"))  # eta means nothing there
