import pytest
import torch

from diffinv.backbone import Backbone, BackboneConfig
from diffinv.errors import DiffinvError


def test_loads_a_diffusers_folder_frozen(tiny_backbone):
    bb = tiny_backbone
    assert not any(p.requires_grad for p in bb.parameters())
    assert bb.vae_scale_factor == 2 and bb.native_resolution == 16
    x = torch.rand(2, 3, 16, 16)
    z = bb.encode_image(x)
    assert z.shape == (2, 4, 8, 8)
    assert bb.decode(z).shape == (2, 3, 16, 16)


def test_prompt_embeddings_are_cached_and_long_prompts_warn(tiny_backbone):
    bb = tiny_backbone
    a = bb.encode_prompts(["a cat", "a dog", "a cat"])
    assert torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])
    calls = []
    handle = bb.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        bb.encode_prompts(["a cat"])
        assert calls == []  # cached
        with pytest.warns(UserWarning, match="over the text encoder's limit of 8: it is truncated"):
            bb.encode_prompts(["a big red car on the grass of a dog"])
    finally:
        handle.remove()


def test_schedule_follows_the_scheduler_config(tiny_backbone):
    s = tiny_backbone.schedule(10)
    assert s.timesteps.tolist() == list(range(1, 1000, 100))  # 'leading' spacing, steps_offset 1
    with pytest.raises(DiffinvError, match="num_inference_steps"):
        tiny_backbone.schedule(0)


def test_v_prediction_is_converted_to_eps(tiny_backbone):
    bb = tiny_backbone
    z, t, emb = torch.randn(1, 4, 8, 8), torch.tensor(501), bb.encode_prompts(["a cat"])
    raw = bb.unet(z, t, encoder_hidden_states=emb).sample
    bb.scheduler.register_to_config(prediction_type="v_prediction")
    try:
        a = bb.alphas_cumprod[t].float()
        torch.testing.assert_close(bb.eps(z, t, emb), a.sqrt() * raw + (1 - a).sqrt() * z)
    finally:
        bb.scheduler.register_to_config(prediction_type="epsilon")


@pytest.mark.parametrize("name, message", [
    ("/nonexistent/sd", "model folder /nonexistent/sd does not exist"),
    ("someone/not-a-model", "could not load the Stable Diffusion hub model 'someone/not-a-model'.*hf download"),
])
def test_missing_models_fail_with_one_clear_message(name, message):
    with pytest.raises(DiffinvError, match=message):
        Backbone.load(BackboneConfig(pretrained=name))


def test_incomplete_folder_names_what_is_missing(tmp_path):
    (tmp_path / "vae").mkdir()
    with pytest.raises(DiffinvError, match="lacks text_encoder, tokenizer, unet, scheduler"):
        Backbone.load(BackboneConfig(pretrained=str(tmp_path)))


def test_schedule_stays_float64_under_half_precision_casts(tiny_model_dir):
    """Lightning's bf16-true / 16-true cast every floating tensor of the module: not the noise schedule."""
    bb = Backbone.load(BackboneConfig(pretrained=str(tiny_model_dir)))
    reference = bb.schedule(50).alphas.clone()
    for dtype in (torch.bfloat16, torch.float16):
        bb.to(dtype)
        assert next(bb.unet.parameters()).dtype == dtype and bb.alphas_cumprod.dtype == torch.float64
        alphas = bb.schedule(50).alphas
        assert torch.equal(alphas, reference) and bool((alphas.diff() < 0).all())


def test_predict_gives_eps_and_x0_for_each_prediction_type(tiny_backbone):
    """v-prediction: eps = sqrt(a) v + sqrt(1 - a) z and x0 = sqrt(a) z - sqrt(1 - a) v at the timestep's a (whatever
    alpha); sample prediction: x0 is the output itself."""
    bb = tiny_backbone
    z, t, emb = torch.randn(1, 4, 8, 8), torch.tensor(501), bb.encode_prompts(["a cat"])
    raw = bb.unet(z, t, encoder_hidden_states=emb).sample
    a = bb.alphas_cumprod[t].float()
    try:
        bb.scheduler.register_to_config(prediction_type="v_prediction")
        eps, x0 = bb.predict(z, t, emb, alpha=torch.tensor(0.3, dtype=torch.float64))
        torch.testing.assert_close(eps, a.sqrt() * raw + (1 - a).sqrt() * z)
        torch.testing.assert_close(x0, a.sqrt() * z - (1 - a).sqrt() * raw)
        torch.testing.assert_close(a.sqrt() * x0 + (1 - a).sqrt() * eps, z)
        bb.scheduler.register_to_config(prediction_type="sample")
        eps, x0 = bb.predict(z, t, emb)
        assert torch.equal(x0, raw) and torch.equal(bb.eps(z, t, emb), eps)
        torch.testing.assert_close(eps, (z - a.sqrt() * raw) / (1 - a).sqrt())
    finally:
        bb.scheduler.register_to_config(prediction_type="epsilon")


def test_v_prediction_x0_is_exact_at_zero_terminal_snr(tiny_backbone):
    """rescale_betas_zero_snr + trailing spacing: the top level has alpha 0, where v-prediction's x0 is -v (the
    ε-form (z - eps) / sqrt(a) would be 0/0)."""
    from diffusers import DDIMScheduler

    tb = tiny_backbone
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                              prediction_type="v_prediction")
    bb = Backbone(tb.vae, tb.text_encoder, tb.tokenizer, tb.unet, scheduler)
    s = bb.schedule(5)
    assert s.timesteps[-1] == 999 and s.alphas[-1] == 0
    z, emb = torch.randn(1, 4, 8, 8), bb.encode_prompts(["a cat"])
    v = bb.unet(z, s.timesteps[-1], encoder_hidden_states=emb).sample
    eps, x0 = bb.predict(z, s.timesteps[-1], emb, s.alphas[-1])
    assert torch.equal(eps, z) and torch.equal(x0, -v)


def test_schedule_takes_the_latent_size_where_it_matters(tiny_backbone, tiny_flux):
    """SD's schedule is the same at every size; FLUX.1-dev's shifts with the latents' token count."""
    assert torch.equal(tiny_backbone.schedule(10, latent_size=(4, 6)).timesteps, tiny_backbone.schedule(10).timesteps)
    assert tiny_flux.schedule(10, latent_size=(8, 12)).timesteps[0] < tiny_flux.schedule(10).timesteps[0]
