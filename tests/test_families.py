"""Model families behind one interface: detection, SDXL's conditioning and denoiser call checked against
diffusers' own SDXL pipeline, every method config through the CLI on SDXL, exact inversion steps per family."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import diffinv
from diffinv.backbone import Backbone, BackboneConfig
from diffinv.data import Item
from diffinv.ddim import ddim_step
from diffinv.editing.sampler import sample
from diffinv.errors import DiffinvError
from diffinv.models import StableDiffusion, StableDiffusion3, StableDiffusionXL
from diffinv.inversion.record import Inversion

from tiny_model import flow_sample

from test_cli import METHOD_CONFIGS, REPO
from test_cli import cli as run_cli


def test_families_are_told_apart(tiny_model_dir, tiny_sdxl_dir, tiny_backbone, tiny_sdxl, tiny_sd3, tmp_path):
    assert isinstance(tiny_backbone.family, StableDiffusion)
    assert isinstance(tiny_sd3.family, StableDiffusion3) and tiny_sd3.text_encoder_3 is None  # T5 off
    assert isinstance(tiny_sdxl.family, StableDiffusionXL) and tiny_sdxl.family.force_zeros_for_empty_prompt
    broken = tmp_path / "sdxl-without-second-encoder"
    shutil.copytree(tiny_sdxl_dir, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(DiffinvError, match="lacks text_encoder_2: expected a SDXL model"):
        Backbone.load(BackboneConfig(pretrained=str(broken)))


@pytest.fixture(scope="module")
def pipeline(tiny_sdxl):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    bb = tiny_sdxl
    return StableDiffusionXLPipeline(
        vae=bb.vae, text_encoder=bb.text_encoder, text_encoder_2=bb.text_encoder_2, tokenizer=bb.tokenizer,
        tokenizer_2=bb.tokenizer_2, unet=bb.unet,
        scheduler=DDIMScheduler.from_config(bb.scheduler.config, clip_sample=False),  # diffinv never clips x0
        force_zeros_for_empty_prompt=True)


def test_sdxl_conditioning_is_the_pipelines(tiny_sdxl, pipeline):
    """Token states, pooled embedding and the zero negative prompt: as diffusers' SDXL pipeline encodes them."""
    prompts = ["a photo of a cat", "a red car"]
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(prompts, device="cpu",
                                                                           do_classifier_free_guidance=True)
    cond = tiny_sdxl.encode_prompts(prompts)
    null = tiny_sdxl.encode_prompts(["", ""])
    L, P = embeds.shape[1], pooled.shape[1]
    assert cond.shape == (2, L + 1, embeds.shape[2])
    assert torch.allclose(cond[:, :L], embeds, atol=1e-6) and torch.allclose(cond[:, L, :P], pooled, atol=1e-6)
    assert not cond[:, L, P:].any()
    assert torch.equal(null[:, :L], negative) and torch.equal(null[:, L, :P], negative_pooled)


def test_sdxl_ddim_cfg_sampling_is_the_pipelines(tiny_sdxl, pipeline):
    """DDIM + CFG 7.5 from the same start latents, at a non-square size (the time ids follow the image's size)."""
    h, w = 16, 24
    z_T = torch.randn(1, 4, h // 2, w // 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = pipeline("a photo of a cat", height=h, width=w, num_inference_steps=6, guidance_scale=7.5,
                          latents=z_T.clone(), output_type="latent").images
        bb = tiny_sdxl
        ours = sample(bb, bb.schedule(6), z_T, bb.encode_prompts(["a photo of a cat"]), bb.encode_prompts([""]), 7.5)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-4), (ours - theirs).abs().max()  # float32 order


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_one_inversion_step_then_one_sampling_step_returns_the_input(family, tiny_backbone, tiny_sdxl, tiny_sd3):
    bb = {"sd": tiny_backbone, "sdxl": tiny_sdxl, "sd3": tiny_sd3}[family]
    s = bb.schedule(5)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cond = bb.encode_prompts(["a photo of a cat"])
    eps = bb.eps(z.float(), s.timesteps[2], cond).double()
    up = ddim_step(z, eps, s.alphas[2], s.alphas[3])  # inversion: level 2 -> 3 with the prediction at level 2
    down = ddim_step(up, eps, s.alphas[3], s.alphas[2])  # sampling back with the same prediction
    assert torch.allclose(down, z, atol=1e-12)


def test_null_text_inversion_on_sdxl_optimises_the_pooled_embedding(tiny_sdxl_dir):
    m = diffinv.NullTextInversion(BackboneConfig(pretrained=str(tiny_sdxl_dir)), 4, num_inner_steps=3)
    image = (np.random.default_rng(0).random((16, 24, 3)) * 255).astype(np.uint8)
    r = m.run_batch([Item("x", image, "a photo of a cat")])[0]
    u = r.inversion.unconditional
    L = m.backbone.tokenizer.model_max_length
    assert u.shape == (4, L + 1, 24)
    assert u[:, L, :12].abs().sum() > 0  # the pooled row moved from the zero null embedding
    assert not u[:, L, 12:].any()  # the padding of the pooled row is never read, never changed


@pytest.mark.parametrize("family", ["sdxl", "sd3", "sd35", "flux"])
@pytest.mark.parametrize("config", METHOD_CONFIGS)
def test_every_method_config_runs_on_each_family(config, family, tiny_sdxl_dir, tiny_sd3_dir, tiny_sd35_dir,
                                                 tiny_flux_dir, tmp_path):
    from diffinv.bench import subcommand_for

    path = REPO / "configs" / config
    model = {"sdxl": tiny_sdxl_dir, "sd3": tiny_sd3_dir, "sd35": tiny_sd35_dir, "flux": tiny_flux_dir}[family]
    out = tmp_path / "out"
    extra = ["--model.num_inner_steps", "2"] if subcommand_for(path) == "fit" else []
    if "num_starts" in path.read_text():
        extra += ["--model.num_starts", "2"]
    if family == "flux":  # FLUX's native size is FluxPipeline's default 1024 px: the tiny model's images are 16
        extra += ["--data.resolution", "16"]
    Image.fromarray((np.random.default_rng(1).random((20, 28, 3)) * 255).astype(np.uint8)).save(tmp_path / "x.png")
    run_cli(subcommand_for(path), "-c", str(path), "--model.backbone.pretrained", str(model),
            "--model.num_inference_steps", "3", "--trainer.accelerator", "cpu", "--output_dir", str(out),
            "--data.image", str(tmp_path / "x.png"), "--data.source_prompt", "a photo of a cat",
            "--data.target_prompts", json.dumps(["a photo of a dog"]), *extra)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["target_prompt"] for x in lines] == [None, "a photo of a dog"]
    assert all(np.isfinite(x["psnr"]) for x in lines)
    rec = Inversion.load(out / "x" / "inversion.safetensors")
    # 20x28 -> native 16 x 22 (SD 3: sides multiples of the VAE's 2 x the patch 2: 16 x 20) -> latent / 2
    assert rec.num_steps == 3 and rec.z0.shape[-2:] == ((8, 11) if family == "sdxl" else (8, 10))


@pytest.mark.parametrize("family, config", [("sdxl", "edit_p2p_replace.yaml"), ("sd3", "proxnpi.yaml")])
def test_bf16_mixed_has_no_nan(family, config, tiny_sdxl_dir, tiny_sd3_dir, tmp_path):
    Image.fromarray((np.random.default_rng(2).random((16, 16, 3)) * 255).astype(np.uint8)).save(tmp_path / "x.png")
    out = tmp_path / "out"
    model = tiny_sdxl_dir if family == "sdxl" else tiny_sd3_dir
    run_cli("predict", "-c", str(REPO / "configs" / config), "--model.backbone.pretrained", str(model),
            "--model.num_inference_steps", "3", "--trainer.accelerator", "cpu",
            "--trainer.precision", "bf16-mixed", "--output_dir", str(out), "--data.image", str(tmp_path / "x.png"),
            "--data.source_prompt", "a photo of a cat", "--data.target_prompts", json.dumps(["a photo of a dog"]))
    for name in ("reconstruction.png", "edit-0.png"):
        pixels = np.asarray(Image.open(out / "x" / name))
        assert pixels.std() > 0  # not a flat (NaN-decoded) image
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x["psnr"]) for x in lines)


def test_a_hub_id_is_read_from_the_local_cache_offline(tiny_model_dir, tiny_sdxl_dir, tiny_sd3_dir, tiny_flux_dir,
                                                       tmp_path):
    """Hub ids of both families load from the hub cache with no network (HF_HUB_OFFLINE=1), family and all."""
    import os
    import subprocess
    import sys

    cache = tmp_path / "hub"
    for repo, folder in (("acme/tiny-sd", tiny_model_dir), ("acme/tiny-sdxl", tiny_sdxl_dir),
                         ("acme/tiny-sd3", tiny_sd3_dir), ("acme/tiny-flux", tiny_flux_dir)):
        root = cache / f"models--{repo.replace('/', '--')}"
        commit = "0123456789abcdef0123456789abcdef01234567"
        shutil.copytree(folder, root / "snapshots" / commit)
        (root / "refs").mkdir()
        (root / "refs" / "main").write_text(commit)
    code = ("from diffinv.backbone import Backbone, BackboneConfig\n"
            "for repo in ('acme/tiny-sd', 'acme/tiny-sdxl', 'acme/tiny-sd3', 'acme/tiny-flux'):\n"
            "    bb = Backbone.load(BackboneConfig(pretrained=repo))\n"
            "    print(repo, type(bb.family).__name__, tuple(bb.encode_prompts(['a photo of a cat']).shape))\n")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "acme/tiny-sd StableDiffusion (1, 8, 16)" in proc.stdout
    assert "acme/tiny-sdxl StableDiffusionXL (1, 9, 24)" in proc.stdout
    assert "acme/tiny-sd3 StableDiffusion3 (1, 265, 32)" in proc.stdout  # 8 CLIP + 256 T5 (off: zeros) + pooled
    assert "acme/tiny-flux Flux (1, 513, " in proc.stdout  # 512 T5 states + CLIP's pooled row


def test_the_ddim_step_in_normalised_coordinates_is_the_rectified_flow_euler_step():
    """z = x / sqrt((1 - s)^2 + s^2), alpha = (1 - s)^2 / ((1 - s)^2 + s^2), eps = x + (1 - s) v: DDIM between two
    levels is exactly Euler's x' = x + (s' - s) v (hand-made tensors, float64)."""
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, 3, generator=g,
                                                                                  dtype=torch.float64)
    for s, s2 in ((0.9, 0.6), (0.3, 0.0), (0.2, 0.7)):
        norm = lambda q: ((1 - q) ** 2 + q**2) ** 0.5  # noqa: E731
        alpha = lambda q: (1 - q) ** 2 / norm(q) ** 2  # noqa: E731
        eps = x + (1 - s) * v
        z2 = ddim_step(x / norm(s), eps, alpha(s), alpha(s2))
        assert torch.allclose(z2 * norm(s2), x + (s2 - s) * v, atol=1e-12)


def test_sd3_conditioning_and_sampling_are_the_pipelines(tiny_sd3):
    """Conditioning as diffusers' StableDiffusion3Pipeline.encode_prompt (T5 off), and CFG sampling as the pipeline's
    flow-matching Euler sampler from the same start, pure noise (s = 1), through the sampler itself."""
    from diffusers import StableDiffusion3Pipeline

    bb = tiny_sd3
    pipe = StableDiffusion3Pipeline(transformer=bb.unet, scheduler=bb.scheduler, vae=bb.vae,
                                    text_encoder=bb.text_encoder, tokenizer=bb.tokenizer,
                                    text_encoder_2=bb.text_encoder_2, tokenizer_2=bb.tokenizer_2,
                                    text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            "a photo of a cat", None, None, device="cpu", do_classifier_free_guidance=True)
        cond, null = bb.encode_prompts(["a photo of a cat"]), bb.encode_prompts([""])
        assert torch.allclose(cond[:, :-1], embeds, atol=1e-6) and torch.allclose(cond[:, -1, :16], pooled, atol=1e-6)
        assert torch.allclose(null[:, :-1], negative, atol=1e-6)
        assert torch.allclose(null[:, -1, :16], negative_pooled, atol=1e-6)
        z_T = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(1))
        theirs = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                      negative_pooled_prompt_embeds=negative_pooled, height=16, width=24, num_inference_steps=6,
                      guidance_scale=7.5, latents=z_T.clone(), output_type="latent").images
        ours = sample(bb, bb.schedule(6), z_T, cond, null, 7.5)
    gap, scale = float((ours - theirs).abs().max()), float(theirs.abs().max())  # was 0.0044 of 4.22 from s = 0.999
    assert gap <= 1e-5 * scale, (gap, scale)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_prompt_to_prompt_runs_on_joint_attention(family, tiny_sd3_dir, tiny_flux_dir, tmp_path):
    """Issue 24: the refusal is gone; the edit differs from the reconstruction and from the plain prompt swap
    (the attention control acts). The method x config matrix is test_every_method_config_runs_on_each_family;
    the maps and options, tests/test_joint_p2p.py."""
    model = {"sd3": tiny_sd3_dir, "flux": tiny_flux_dir}[family]
    Image.fromarray((np.random.default_rng(2).random((16, 16, 3)) * 255).astype(np.uint8)).save(tmp_path / "x.png")
    pixels = {}
    for name, config in (("p2p", "edit_p2p_replace.yaml"), ("plain", "npi.yaml")):
        out = tmp_path / name
        run_cli("predict", "-c", str(REPO / "configs" / config), "--model.backbone.pretrained", str(model),
                "--model.num_inference_steps", "3", "--trainer.accelerator", "cpu", "--output_dir", str(out),
                "--data.image", str(tmp_path / "x.png"), "--data.source_prompt", "a photo of a cat",
                "--data.target_prompts", json.dumps(["a photo of a dog"]),
                *(["--data.resolution", "16"] if family == "flux" else []))
        pixels[name] = [np.asarray(Image.open(out / "x" / f), dtype=np.float64)
                        for f in ("reconstruction.png", "edit-0.png")]
    assert np.abs(pixels["p2p"][0] - pixels["plain"][0]).max() <= 1  # the source row: its own attention (float noise)
    assert np.abs(pixels["p2p"][1] - pixels["plain"][1]).max() > 0


# --- predict: (eps, x0) where the latent sits ---------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_diffusion_predict_keeps_eps_and_gives_x0_at_the_latents_level(family, tiny_backbone, tiny_sdxl):
    """eps is the denoiser's output bit for bit (epsilon prediction), whatever alpha; x0 is DDIM's
    (z - sqrt(1 - a) eps) / sqrt(a) at the given level a (default: the timestep's)."""
    from diffinv.ddim import predict_x0

    bb = {"sd": tiny_backbone, "sdxl": tiny_sdxl}[family]
    s = bb.schedule(5)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = bb.encode_prompts(["a photo of a cat"])
    with torch.no_grad():
        raw = bb.family.denoise(bb, z, s.timesteps[2], bb.layout.unpack(cond))
        eps, x0 = bb.predict(z, s.timesteps[2], cond)
        eps_at, x0_at = bb.predict(z, s.timesteps[2], cond, s.alphas[2])
    assert torch.equal(eps, raw) and torch.equal(eps_at, raw) and torch.equal(bb.eps(z, s.timesteps[2], cond), raw)
    assert torch.equal(x0, predict_x0(z, raw, s.alphas[3].float()))  # level 3 is the timestep's
    assert torch.equal(x0_at, predict_x0(z, raw, s.alphas[2]))


def test_flow_predict_converts_at_the_latents_level_and_steps_as_euler(tiny_sd3):
    """With a constant-velocity fake transformer: (eps, x0) at the level alpha (s from alpha, not from t), and the
    DDIM step from_x0(x0, eps, a_to) in z-coordinates is exactly the Euler step x' = x + (s_to - s) v, also from
    and to s = 1 (alpha 0: no division)."""
    from diffinv.ddim import from_x0

    g = torch.Generator().manual_seed(0)
    x, v = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    family = replace(tiny_sd3.family, max_sigma=1.0)
    family.denoise = lambda backbone, z, t, cond: v  # noqa: E731 - the fake: the same velocity everywhere
    s = family.schedule(tiny_sd3, 6)
    sigmas = [0.0, *(float(q) for q in tiny_sd3.scheduler.sigmas[:6].flip(0))]  # level k's s, level 0 clean
    assert sigmas[-1] == 1.0 and s.alphas[-1] == 0
    norm = lambda q: ((1 - q) ** 2 + q**2) ** 0.5  # noqa: E731
    t = s.timesteps[0]  # any timestep: the conversion reads the latent's level, not t's
    for k_from, k_to in ((6, 5), (6, 0), (3, 2), (2, 6), (0, 6), (4, 4)):
        eps, x0 = family.predict(tiny_sd3, x / norm(sigmas[k_from]), t, None, s.alphas[k_from])
        assert torch.allclose(x0, x - sigmas[k_from] * v, atol=1e-12)
        z_to = from_x0(x0, eps, s.alphas[k_to])
        assert torch.allclose(z_to * norm(sigmas[k_to]), x + (sigmas[k_to] - sigmas[k_from]) * v, atol=1e-12)
    eps_t, _ = family.predict(tiny_sd3, x, s.timesteps[-1], None)  # alpha None: the timestep's own level, s = 1
    assert torch.equal(eps_t, x)


def test_flow_eps_is_bit_identical_at_the_timesteps_own_level(tiny_sd3):
    """predict(alpha=None) keeps today's eps = x + (1 - t/T) v, x = z sqrt((1 - s)^2 + s^2) op for op."""
    bb = tiny_sd3
    z, cond = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)), bb.encode_prompts(["a cat"])
    t = bb.schedule(5).timesteps[2]
    with torch.no_grad():
        sig = torch.as_tensor(t).double() / 1000
        x = z * ((1 - sig) ** 2 + sig**2).sqrt().float()
        expected = x + (1 - sig).float() * bb.family.denoise(bb, x, t, bb.layout.unpack(cond))
        assert torch.equal(bb.eps(z, t, cond), expected)


def test_flow_schedule_reaches_pure_noise_with_max_sigma_one(tiny_sd3):
    """max_sigma 1: the scheduler's own (distinct) sigmas, top level alpha exactly 0, any step count (shift 3 puts
    two levels above 0.999 from 334 steps: refused with the default clamp)."""
    family = replace(tiny_sd3.family, max_sigma=1.0)
    for n in (1, 6, 334, 1000):
        s = family.schedule(tiny_sd3, n)
        assert s.num_steps == n and s.alphas[-1] == 0 and s.alphas[0] == 1 and bool((s.alphas.diff() < 0).all())
        assert torch.equal(s.timesteps, tiny_sd3.scheduler.timesteps.flip(0))
        assert len(torch.unique(s.timesteps)) == n
    assert tiny_sd3.family.max_sigma == 1.0 and tiny_sd3.schedule(334).alphas[-1] == 0  # the default
    with pytest.raises(DiffinvError, match="repeated timesteps"):
        replace(tiny_sd3.family, max_sigma=0.999).schedule(tiny_sd3, 334)  # the clamp of before


# --- SD 3 with T5, SD 3.5, dynamic shifting ----------------------------------------------------------------
def sd3_pipeline(bb):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(transformer=bb.unet, scheduler=bb.scheduler, vae=bb.vae,
                                    text_encoder=bb.text_encoder, tokenizer=bb.tokenizer,
                                    text_encoder_2=bb.text_encoder_2, tokenizer_2=bb.tokenizer_2,
                                    text_encoder_3=bb.text_encoder_3, tokenizer_3=bb.tokenizer_3)


def assert_sd3_matches_the_pipeline(bb, h: int = 8, w: int = 12):
    """Conditioning as StableDiffusion3Pipeline.encode_prompt, and CFG 7.5 sampling from the same pure-noise start
    (max_sigma 1, predict + DDIM steps in z-coordinates) as the pipeline's Euler sampler, to float32 rounding."""
    pipe = sd3_pipeline(bb)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            "a photo of a cat", None, None, device="cpu", do_classifier_free_guidance=True)
        cond, null = bb.encode_prompts(["a photo of a cat"]), bb.encode_prompts([""])
        (tokens, pooled_ours), (null_tokens, null_pooled) = bb.layout.unpack(cond), bb.layout.unpack(null)
        assert torch.equal(tokens, embeds) and torch.equal(pooled_ours, pooled)
        assert torch.equal(null_tokens, negative) and torch.equal(null_pooled, negative_pooled)
        z_T = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(1))
        theirs = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                      negative_pooled_prompt_embeds=negative_pooled, height=2 * h, width=2 * w,
                      num_inference_steps=6, guidance_scale=7.5, latents=z_T.clone(), output_type="latent").images
        schedule = replace(bb.family, max_sigma=1.0).schedule(bb, 6, latent_size=(h, w))
        ours = flow_sample(bb, schedule, z_T, cond, null, 7.5)
    gap = float((ours - theirs).abs().max())
    assert gap <= 1e-5 * float(theirs.abs().max()), gap


@pytest.mark.parametrize("model", ["sd3_t5", "sd35", "sd3_wide_pooled"])
def test_sd3_with_t5_and_sd35_are_the_pipelines(model, tiny_sd3_t5, tiny_sd35, tiny_sd3_wide):
    """SD 3 with T5, SD 3.5, and an SD 3 whose pooled embedding (48) is wider than its token states (32): its
    conditioning takes two rows for the pooled embedding (refused before the typed layout)."""
    bb = {"sd3_t5": tiny_sd3_t5, "sd35": tiny_sd35, "sd3_wide_pooled": tiny_sd3_wide}[model]
    assert isinstance(bb.family, StableDiffusion3) and bb.family.t5 and bb.text_encoder_3 is not None
    assert_sd3_matches_the_pipeline(bb)


def test_sd3_without_t5_samples_as_the_pipeline_from_pure_noise(tiny_sd3):
    assert_sd3_matches_the_pipeline(tiny_sd3)


def test_a_t5_that_does_not_load_stops_the_load(tiny_sd3_t5_dir, tmp_path):
    """model_index.json lists text_encoder_3: T5 must load, else one line naming the folder and the error (no
    silent 'T5 off')."""
    broken = tmp_path / "sd3-broken-t5"
    shutil.copytree(tiny_sd3_t5_dir, broken)
    for f in (broken / "text_encoder_3").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(DiffinvError) as e:
        Backbone.load(BackboneConfig(pretrained=str(broken)))
    message = str(e.value)
    assert "\n" not in message and str(broken) in message and "T5 text encoder (text_encoder_3)" in message


def test_sd3_with_dynamic_shifting_loads_and_shifts_by_the_latents_size(tiny_sd3_dir, tmp_path):
    """A scheduler with use_dynamic_shifting (once refused): mu from the latents' token count as the SD 3 pipeline
    computes it, and sampling at a non-native size as the pipeline's."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    folder = tmp_path / "sd3-dynamic"
    shutil.copytree(tiny_sd3_dir, folder)
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64,
                                    base_shift=0.5, max_shift=1.16).save_pretrained(folder / "scheduler")
    bb = Backbone.load(BackboneConfig(pretrained=str(folder)))
    for size in ((8, 12), (4, 4), None):
        tokens = 16 if size is None else size[0] * size[1] // 4  # native 8 x 8 latents, 2 x 2 patches
        bb.scheduler.set_timesteps(6, mu=calculate_shift(tokens, 4, 64, 0.5, 1.16))
        expected = bb.scheduler.timesteps.flip(0)  # from s = 1, timestep 1000, as the pipeline
        assert torch.equal(bb.schedule(6, latent_size=size).timesteps, expected)
    assert not torch.equal(bb.schedule(6, (4, 4)).timesteps, bb.schedule(6, (8, 12)).timesteps)
    assert_sd3_matches_the_pipeline(bb, 8, 12)
