"""The embedded shapes model: loads like any checkpoint, reconstructs, follows prompts, and shows the papers'
claims on held-out scenes (DDIM+CFG reconstruction clearly worse than NPI; NTI raises PSNR over DDIM+CFG)."""

import numpy as np
import pytest
import torch

from diffinv import BackboneConfig, DDIMInversion, NegativePromptInversion, NullTextInversion
from diffinv.backbone import Backbone, embedded_model_path
from diffinv.data import Item, image_tensor
from diffinv.metrics import psnr
from diffinv.shapes.classifier import attribute_accuracy, classify
from diffinv.shapes.world import render, sample_scenes

SHAPES = BackboneConfig()  # the default: the embedded model


@pytest.fixture(scope="module")
def scenes():
    return sample_scenes(8, seed=2024, split="held_out")


def items(scenes):
    return [Item(f"s{i}", render(s), s.caption, []) for i, s in enumerate(scenes)]


def mean_psnr(results):
    return float(np.mean([psnr(r.reconstruction, r.source) for r in results]))


def test_loads_with_plain_diffusers_and_generates():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(embedded_model_path(), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a big red circle on a white background", height=32, width=32, num_inference_steps=10,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_loads_through_the_same_code_as_a_real_checkpoint():
    bb = Backbone.load(SHAPES)
    assert bb.native_resolution == 32 and bb.vae_scale_factor == 4
    assert bb.tokenizer.model_max_length == 16 and bb.scheduler.config.prediction_type == "epsilon"


@torch.inference_mode()
def test_vae_reconstructs_held_out_scenes():
    bb = Backbone.load(SHAPES)
    scenes = sample_scenes(64, seed=7, split="held_out")
    x = torch.stack([image_tensor(render(s)) for s in scenes])
    rec = bb.decode(bb.encode_image(x))
    assert float(np.mean([psnr(a, b) for a, b in zip(rec, x)])) > 31  # measured 33.5 dB here, 33.7 on 512 (README)
    read = [classify((r.permute(1, 2, 0).numpy() * 255).round()) for r in rec]
    acc = attribute_accuracy(read, [s.attributes for s in scenes])
    assert acc["colour"] == 1 and acc["background"] == 1 and acc["all"] > 0.9, acc  # measured all: 0.98


@torch.inference_mode()
def test_samples_follow_their_prompts_and_guidance_matters():
    from diffinv.editing.sampler import sample

    bb = Backbone.load(SHAPES)
    scenes = sample_scenes(32, seed=99, split="held_out")
    schedule = bb.schedule(20)
    z = torch.randn(32, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    acc = {}
    for w in (7.5, 1.0):
        latents = sample(bb, schedule, z, bb.encode_prompts([s.caption for s in scenes]),
                         bb.encode_prompts([""] * 32), guidance=w)
        images = (bb.decode(latents).permute(0, 2, 3, 1).numpy() * 255).round()
        acc[w] = attribute_accuracy([classify(i) for i in images], [s.attributes for s in scenes])
    assert acc[7.5]["colour"] > 0.9 and acc[7.5]["background"] > 0.9 and acc[7.5]["all"] > 0.9, acc
    assert acc[7.5]["all"] > acc[1.0]["all"], acc  # measured 1.0 against 0.84: CFG matters (README: 99.8 / 94.9%)


def test_npi_reconstructs_far_better_than_ddim_with_cfg(scenes):
    with torch.inference_mode():
        ddim = mean_psnr(DDIMInversion(SHAPES, 10).run_batch(items(scenes)))
        npi = mean_psnr(NegativePromptInversion(SHAPES, 10).run_batch(items(scenes)))
    assert npi > ddim + 5, (npi, ddim)


def test_null_text_inversion_raises_psnr_over_ddim_with_cfg(scenes):
    with torch.inference_mode():
        ddim = mean_psnr(DDIMInversion(SHAPES, 10).run_batch(items(scenes[:4])))
    nti = NullTextInversion(SHAPES, 10).run_batch(items(scenes[:4]))
    assert mean_psnr(nti) > ddim + 5
    losses = torch.stack([r.inversion.extra["step_loss"] for r in nti])
    none = torch.stack([r.inversion.extra["step_loss"]
                        for r in NullTextInversion(SHAPES, 10, num_inner_steps=0).run_batch(items(scenes[:4]))])
    assert float(losses.mean()) < float(none.mean())  # the optimisation lowers the per-step loss


def test_plain_diffusers_loads_and_samples_the_shipped_model_without_a_dtype():
    """The README says the embedded model is an ordinary diffusers folder: no dtype argument may be needed."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(embedded_model_path()))
    assert pipe.text_encoder.dtype == pipe.unet.dtype == pipe.vae.dtype
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a big red circle on a white background", num_inference_steps=3, height=32, width=32,
               output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()
