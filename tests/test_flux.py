"""FLUX.1 as a family, checked against diffusers' own FluxPipeline on tiny random components (tests/tiny_model.py):
detection, conditioning, the packed transformer call, the resolution-dependent schedule, sampling (FLUX.1-dev with
its guidance embedding, schedule-free schnell without), exact inversion steps and the VAE's shift and scale."""

import json
import shutil
from dataclasses import replace

import pytest
import torch

from diffinv.backbone import Backbone, BackboneConfig
from diffinv.ddim import from_x0
from diffinv.models import Flux, StableDiffusion3, calculate_shift

from tiny_model import flow_sample

PROMPT = "a photo of a cat"


def pipeline_of(bb):
    from diffusers import FluxPipeline

    return FluxPipeline(scheduler=bb.scheduler, vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer,
                        text_encoder_2=bb.text_encoder_2, tokenizer_2=bb.tokenizer_2, transformer=bb.unet)


@pytest.fixture(params=["dev", "schnell"])
def flux(request, tiny_flux, tiny_flux_schnell):
    return {"dev": tiny_flux, "schnell": tiny_flux_schnell}[request.param]


def test_a_flux_folder_loads_as_flux(tiny_flux_dir, tiny_flux, tiny_flux_schnell, tmp_path):
    """FluxPipeline's saved folder (once taken for SD 3: a state_dict error), and one without model_index.json
    (told by its transformer's config class)."""
    assert json.loads((tiny_flux_dir / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    for bb in (tiny_flux, tiny_flux_schnell):
        assert isinstance(bb.family, Flux) and not isinstance(bb.family, StableDiffusion3)
        assert bb.size_multiple == 4 and bb.native_resolution == 256  # VAE 2 x packing 2; 128 latents
    assert tiny_flux.unet.config.guidance_embeds and not tiny_flux_schnell.unet.config.guidance_embeds
    bare = tmp_path / "flux-without-index"
    shutil.copytree(tiny_flux_dir, bare)
    (bare / "model_index.json").unlink()
    assert isinstance(Backbone.load(BackboneConfig(pretrained=str(bare))).family, Flux)


def test_flux_conditioning_is_the_pipelines(tiny_flux):
    """T5 token states then a row holding CLIP's pooled output: FluxPipeline.encode_prompt's two tensors."""
    prompts = [PROMPT, "a red car", ""]
    with torch.no_grad():
        embeds, pooled, text_ids = pipeline_of(tiny_flux).encode_prompt(prompts, None, device="cpu")
    cond = tiny_flux.encode_prompts(prompts)
    L, P = embeds.shape[1], pooled.shape[1]
    assert (L, P) == (512, 16) and cond.shape == (3, L + 1, embeds.shape[2]) and not text_ids.any()
    assert torch.equal(cond[:, :L], embeds) and torch.equal(cond[:, L, :P], pooled)
    assert not cond[:, L, P:].any()


def test_flux_denoiser_is_the_pipelines_transformer_call_on_packed_latents(flux):
    from diffusers import FluxPipeline

    z = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    t = flux.schedule(4, latent_size=(8, 12)).timesteps[2]
    cond = flux.encode_prompts([PROMPT, "a red car"])
    guidance = torch.full([1], 3.5).expand(2) if flux.unet.config.guidance_embeds else None
    with torch.no_grad():
        theirs = flux.unet(hidden_states=FluxPipeline._pack_latents(z, 2, 16, 8, 12), timestep=t.expand(2) / 1000,
                           guidance=guidance, pooled_projections=cond[:, -1, :16], encoder_hidden_states=cond[:, :-1],
                           txt_ids=torch.zeros(512, 3),
                           img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32)).sample
        ours = flux.family.denoise(flux, z, t, flux.layout.unpack(cond))
    assert ours.shape == z.shape
    assert torch.equal(FluxPipeline._pack_latents(ours, 2, 16, 8, 12), theirs)


def test_flux_schedule_is_the_pipelines(flux):
    """FluxPipeline's sigmas linspace(1, 1/N, N), shifted by mu = calculate_shift(the packed token count) where the
    scheduler shifts dynamically (dev), by its fixed shift otherwise (schnell); max_sigma 1: top alpha 0."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_shift

    assert calculate_shift(24, 256, 4096, 0.5, 1.15) == diffusers_shift(24)
    family = replace(flux.family, max_sigma=1.0)
    s = family.schedule(flux, 6, latent_size=(8, 12))
    dynamic = flux.scheduler.config.use_dynamic_shifting
    flux.scheduler.set_timesteps(6, sigmas=[1 - k / 6 for k in range(6)], mu=diffusers_shift(4 * 6))
    assert torch.equal(s.timesteps, flux.scheduler.timesteps.flip(0))
    assert s.alphas[-1] == 0 and bool((s.alphas.diff() < 0).all())
    native = family.schedule(flux, 6)
    assert torch.equal(native.timesteps, s.timesteps) != dynamic  # the size matters where the shift is dynamic


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_flux_sampling_is_the_pipelines(flux, scale):
    """Same start latents, same steps: ``backbone.predict`` + DDIM steps in z-coordinates (max_sigma 1, so the start
    is pure noise as the pipeline's) equal FluxPipeline(output_type='latent')'s Euler steps; with true CFG too."""
    from diffusers import FluxPipeline

    pipe = pipeline_of(flux)
    h, w = 8, 12
    z_T = torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(1))
    cond, null = flux.encode_prompts([PROMPT]), flux.encode_prompts([""])
    kw = {} if scale == 1.0 else dict(negative_prompt_embeds=null[:, :-1], true_cfg_scale=scale,
                                      negative_pooled_prompt_embeds=null[:, -1, :16])
    with torch.no_grad():
        theirs = pipe(prompt_embeds=cond[:, :-1], pooled_prompt_embeds=cond[:, -1, :16], height=2 * h, width=2 * w,
                      num_inference_steps=5, guidance_scale=3.5, latents=FluxPipeline._pack_latents(z_T, 1, 16, h, w),
                      output_type="latent", **kw).images
        theirs = FluxPipeline._unpack_latents(theirs, 2 * h, 2 * w, pipe.vae_scale_factor)
        schedule = replace(flux.family, max_sigma=1.0).schedule(flux, 5, latent_size=(h, w))
        ours = flow_sample(flux, schedule, z_T, cond, None if scale == 1.0 else null, scale)
    gap = float((ours - theirs).abs().max())
    assert gap <= 1e-5 * float(theirs.abs().max()), gap  # float32 rounding of the two step forms


def test_one_flux_inversion_step_then_one_sampling_step_returns_the_input(tiny_flux):
    bb = tiny_flux
    s = replace(bb.family, max_sigma=1.0).schedule(bb, 5, latent_size=(8, 8))
    z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cond = bb.encode_prompts([PROMPT])
    for k in (3, 5):  # a middle step, and the top one (alpha 0: s = 1)
        eps, x0 = bb.predict(z, s.timesteps[k - 1], cond, s.alphas[k - 1])  # float64 around the float32 model
        up = from_x0(x0, eps, s.alphas[k])  # inversion: level k-1 -> k with the prediction at level k-1
        down = from_x0(x0, eps, s.alphas[k - 1])  # sampling back with the same velocity
        assert torch.isfinite(up).all() and torch.allclose(down, z, atol=1e-12)


def test_flux_vae_applies_its_shift_and_scale(tiny_flux):
    bb = tiny_flux
    images = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = bb.encode_image(images)
        raw = bb.vae.encode(images * 2 - 1).latent_dist.mean
        assert z.shape == (1, 16, 8, 12)
        torch.testing.assert_close(z, (raw - 0.1159) * 0.3611)
        decoded = bb.vae.decode(z / 0.3611 + 0.1159).sample  # FluxPipeline's decode
        torch.testing.assert_close(bb.decode(z), ((decoded + 1) / 2).clamp(0, 1))


def test_flux_warns_about_long_prompts_at_t5s_limit(tiny_flux):
    """FLUX reads a prompt through T5 (CLIP gives only the pooled embedding): the warning counts T5's tokens
    against max_sequence_length, not CLIP's limit."""
    import warnings

    assert tiny_flux.max_prompt_tokens == 512 < len(tiny_flux.tokenizer(" ".join(["cat"] * 600)).input_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_flux.encode_prompts([" ".join(["cat"] * 20)])  # over the tiny CLIP's 8 tokens: no warning
    with pytest.warns(UserWarning, match=r"over the text encoder's limit of 512: it is truncated to its first 511 "):
        tiny_flux.encode_prompts([" ".join(["cat"] * 600)])


def test_embedded_guidance_is_a_backbone_option_pinned_in_records(tiny_flux_dir, tiny_flux_schnell_dir, tmp_path):
    """FLUX.1-dev's distilled guidance goes through the family's channel (--model.backbone.embedded_guidance): it
    reaches the transformer, records pin it, and a record re-edited under another value is refused in one line."""
    import numpy as np

    from diffinv import DiffinvError, NegativePromptInversion
    from diffinv.data import Item
    from diffinv.inversion import Inversion, check_record

    default = Backbone.load(BackboneConfig(pretrained=str(tiny_flux_dir)))
    strong = Backbone.load(BackboneConfig(pretrained=str(tiny_flux_dir), embedded_guidance=7.0))
    assert default.family.embedded_guidance(default) == 3.5 and strong.family.embedded_guidance(strong) == 7.0
    z, t = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0)), strong.schedule(3).timesteps[1]
    cond = default.encode_prompts([PROMPT])
    with torch.no_grad():
        assert not torch.equal(default.eps(z, t, cond), strong.eps(z, t, cond))  # it reaches the transformer
    with pytest.raises(DiffinvError, match="schnell\\) has no guidance embedding"):
        Backbone.load(BackboneConfig(pretrained=str(tiny_flux_schnell_dir), embedded_guidance=2.0))

    image = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    method = NegativePromptInversion(BackboneConfig(pretrained=str(tiny_flux_dir), embedded_guidance=7.0), 3)
    record = Inversion.load(method.run_batch([Item("x", image, PROMPT)])[0].inversion.save(tmp_path / "x.safetensors"))
    assert record.plan.embedded_guidance == 7.0
    check_record(record, strong)
    with pytest.raises(DiffinvError, match="embedded guidance 7.*gives it 3.5: load the model with embedded_guidance 7"):
        check_record(record, default)
