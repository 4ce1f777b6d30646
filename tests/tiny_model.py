"""Tiny random Stable Diffusion components built in code, saved in diffusers layout (like diffusers' dummies)."""

from __future__ import annotations

from pathlib import Path

import torch

from diffinv.shapes.tokenizer import load_tokenizer, write_tokenizer_files

WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "green", "on", "the", "grass", "big", "small", "car")
MAX_TOKENS = 8


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tok_dir = write_tokenizer_files(folder / "tokenizer", WORDS, MAX_TOKENS)
    tokenizer = load_tokenizer(tok_dir)
    tokenizer.model_max_length = MAX_TOKENS
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    unet.save_pretrained(folder / "unet")
    scheduler.save_pretrained(folder / "scheduler")
    return folder


def build_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """SDXL's layout and conditioning at toy size: two text encoders (the second with a projection: the pooled
    embedding), a UNet with SDXL's added text/time conditioning, and model_index.json naming the pipeline."""
    import json

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = None
    for sub in ("tokenizer", "tokenizer_2"):
        tokenizer = load_tokenizer(write_tokenizer_files(folder / sub, WORDS, MAX_TOKENS))
    tokenizer.model_max_length = MAX_TOKENS

    def text_config(hidden: int, **kw) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **kw)

    CLIPTextModel(text_config(8)).save_pretrained(folder / "text_encoder")
    CLIPTextModelWithProjection(text_config(16, projection_dim=12)).save_pretrained(folder / "text_encoder_2")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=16,
                  scaling_factor=0.13025).save_pretrained(folder / "vae")
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                         block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8 + 16,
                         attention_head_dim=2, norm_num_groups=8, addition_embed_type="text_time",
                         addition_time_embed_dim=4,
                         projection_class_embeddings_input_dim=6 * 4 + 12).save_pretrained(folder / "unet")
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           steps_offset=1, timestep_spacing="leading").save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"]}, indent=1))
    return folder


def build_tiny_sd3(folder: Path, seed: int = 0) -> Path:
    """SD 3's layout at toy size: two CLIP encoders with projections, no T5 (diffusers' "T5 off"), a joint-attention
    transformer (patch 2), a VAE with a shift factor and the flow-matching scheduler with SD 3's shift 3."""
    import json

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = None
    for sub in ("tokenizer", "tokenizer_2"):
        tokenizer = load_tokenizer(write_tokenizer_files(folder / sub, WORDS, MAX_TOKENS))
    for sub in ("text_encoder", "text_encoder_2"):
        CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=8,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)).save_pretrained(folder / sub)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=1.5305,
                  shift_factor=0.0609).save_pretrained(folder / "vae")
    SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                          num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                          pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16
                          ).save_pretrained(folder / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "text_encoder_3": [None, None], "tokenizer_3": [None, None],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}, indent=1))
    return folder


def _clip_tokenizer(folder: Path):
    """The tiny CLIP tokenizer (WORDS), written to ``folder`` and loaded from it."""
    tokenizer = load_tokenizer(write_tokenizer_files(folder, WORDS, MAX_TOKENS))
    tokenizer.model_max_length = MAX_TOKENS
    return tokenizer


def _clip_config(tokenizer, hidden: int, **kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **kw)


def tiny_t5(d_model: int):
    """A T5 tokenizer built offline (a Unigram model over WORDS, '<pad>' 0, '</s>' 1, '<unk>' 2, as T5's) and a
    one-layer T5EncoderModel of width ``d_model``."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0), *((f"\u2581{w}", -1.0) for w in WORDS)]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)
    encoder = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                                      num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                      decoder_start_token_id=0))
    return tokenizer, encoder


def _save_sd3_with_t5(folder: Path, seed: int, projection: int = 8, **transformer_kw) -> Path:
    """A StableDiffusion3Pipeline of tiny components with a T5 (text_encoder_3), saved by the pipeline; each CLIP
    projects to ``projection`` (the pooled embedding is both side by side)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizers = [_clip_tokenizer(folder / sub) for sub in ("tokenizer", "tokenizer_2")]
    encoders = [CLIPTextModelWithProjection(_clip_config(tokenizers[0], 8, projection_dim=projection))
                for _ in range(2)]
    tokenizer_3, encoder_3 = tiny_t5(32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=1.5305,
                        shift_factor=0.0609)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                        pooled_projection_dim=2 * projection, out_channels=4,
                                        pos_embed_max_size=16, **transformer_kw)
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizers[0], text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
        text_encoder_3=encoder_3, tokenizer_3=tokenizer_3).save_pretrained(folder)
    return folder


def build_tiny_sd3_t5(folder: Path, seed: int = 0) -> Path:
    """SD 3 with T5 at toy size: :func:`build_tiny_sd3`'s parts plus a tiny T5 (width 32, the transformer's joint
    attention width), saved by StableDiffusion3Pipeline (model_index.json lists text_encoder_3)."""
    return _save_sd3_with_t5(folder, seed)


def build_tiny_sd35(folder: Path, seed: int = 0) -> Path:
    """SD 3.5 at toy size: SD 3 with T5 and SD 3.5's transformer (MMDiT-X dual attention in layer 0, RMS q/k
    norm)."""
    return _save_sd3_with_t5(folder, seed, dual_attention_layers=(0,), qk_norm="rms_norm")


def build_tiny_sd3_wide_pooled(folder: Path, seed: int = 0) -> Path:
    """SD 3 with T5 whose pooled embedding (2 x 24 = 48) is wider than its token states (32), as
    StableDiffusion3Pipeline runs it (SD 3's own: 2048 pooled, 4096 tokens; nothing in diffusers ties them)."""
    return _save_sd3_with_t5(folder, seed, projection=24)


def build_tiny_flux(folder: Path, guidance_embeds: bool = True, seed: int = 0) -> Path:
    """FLUX.1 at toy size, saved by FluxPipeline: CLIP (pooled, width 16), T5 (width 32), a 16-channel VAE with
    FLUX's shift and scale, a FluxTransformer2DModel on 2x2-packed latents (64 channels). ``guidance_embeds``:
    FLUX.1-dev (embedded guidance, resolution-dependent shift); else FLUX.1-schnell (no guidance embedding, a
    fixed shift 1)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = _clip_tokenizer(folder / "tokenizer")
    tokenizer_2, text_encoder_2 = tiny_t5(32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=16, norm_num_groups=4, sample_size=16, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 6, 6))
    scheduler = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                 max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
                 if guidance_embeds else FlowMatchEulerDiscreteScheduler(shift=1.0))
    FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=CLIPTextModel(_clip_config(tokenizer, 16)),
                 tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                 transformer=transformer).save_pretrained(folder)
    return folder


def flow_sample(backbone, schedule, z_T, cond, uncond=None, scale: float = 1.0):
    """Reference sampler for the flow families' tests: from z_T at the top level, each step k -> k-1 is
    from_x0(x0, eps, alpha_{k-1}) with (eps, x0) = backbone.predict(z, t_k, cond, alpha_k) (classifier-free at
    ``scale`` where ``uncond`` is given: both are affine in the velocity, so combining them combines v). In z
    coordinates this is the pipelines' Euler step x' = x + (s_{k-1} - s_k) v, exact at s = 1."""
    from diffinv.ddim import from_x0

    z = z_T
    for k in range(schedule.num_steps, 0, -1):
        t, a = schedule.timesteps[k - 1], schedule.alphas[k]
        eps, x0 = backbone.predict(z, t, cond, a)
        if uncond is not None:
            eps_u, x0_u = backbone.predict(z, t, uncond, a)
            eps, x0 = eps_u + scale * (eps - eps_u), x0_u + scale * (x0 - x0_u)
        z = from_x0(x0, eps, schedule.alphas[k - 1].to(z.dtype))
    return z
