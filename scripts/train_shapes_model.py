"""Train the embedded "shapes" Stable Diffusion from scratch: VAE, then text encoder + UNet jointly.

    python scripts/train_shapes_model.py                       # writes src/diffinv/shapes/model
    python scripts/train_shapes_model.py --output /tmp/shapes --vae-steps 200 --unet-steps 200   # smoke run

Everything is seeded; the folder it writes is a diffusers `StableDiffusionPipeline` layout and is exactly
what ships in the package. It prints and writes (``quality.json`` beside the weights) the figures the README
quotes, measured on the *saved* weights reloaded with plain ``StableDiffusionPipeline.from_pretrained``:
VAE PSNR and the attribute classifier's accuracy on VAE reconstructions (the ceiling for samples), and
attribute accuracy of samples for held-out (never trained on) captions at CFG 7.5 and at w = 1.

Speed-ups over a straightforward loop (all measured on 2 CPU cores): latents are encoded once; the ~161
distinct captions are embedded once per step and indexed, instead of per sample; Min-SNR-gamma loss weights
(Hang et al. 2023) for faster convergence; one torch thread by default (the machine is shared). The VAE
trains at batch 8: on a CPU a step's cost grows with the batch, and for this small autoencoder more, smaller
steps win at equal time (held-out PSNR after ~6 minutes: about 26 dB at batch 64, 28.7 at 32, 29.0 at 16; after
~19 minutes: 32.5 dB at batch 16, 33.9 at batch 8).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from diffinv.shapes.classifier import attribute_accuracy, classify  # noqa: E402
from diffinv.shapes.tokenizer import MODEL_MAX_LENGTH, load_tokenizer, write_tokenizer_files  # noqa: E402
from diffinv.shapes.world import render, sample_scenes  # noqa: E402


def small_vae(channels: tuple[int, ...], latent_channels: int, groups: int, size: int):
    """An SD-layout AutoencoderKL with three levels (a factor-4 latent), one layer each."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=channels, layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=groups, sample_size=size)


def build_components(tokenizer):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = small_vae((32, 64, 64), latent_channels=4, groups=32, size=32)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MODEL_MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=32,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return vae, text_encoder, unet, scheduler


def images_to_tensor(scenes) -> torch.Tensor:
    arr = np.stack([render(s) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [0, 1]."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return -10 * torch.log10(mse)


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, lr: float, kl_weight: float, gen: torch.Generator):
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, 200))
    vae.train()
    bar = tqdm(range(steps), desc="vae", mininterval=5)
    for _ in bar:
        idx = torch.randint(len(images), (batch,), generator=gen)
        x = images[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.5f}", refresh=False)
    vae.eval()


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat([vae.encode(images[i : i + batch]).latent_dist.mean for i in range(0, len(images), batch)])


def train_unet(
    unet, text_encoder, tokenizer, scheduler, latents, captions, steps, batch, lr, dropout, snr_gamma, ema_decay, gen
):
    unique = sorted(set(captions)) + [""]
    caption_index = torch.tensor([unique.index(c) for c in captions])
    ids = tokenizer(unique, padding="max_length", max_length=MODEL_MAX_LENGTH, return_tensors="pt").input_ids
    empty = len(unique) - 1
    alphas_cumprod = scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, 500))
    unet.train()
    text_encoder.train()
    bar = tqdm(range(steps), desc="unet+text", mininterval=5)
    for step in bar:
        idx = torch.randint(len(latents), (batch,), generator=gen)
        z0 = latents[idx]
        cap = caption_index[idx]
        cap = torch.where(torch.rand(batch, generator=gen) < dropout, torch.full_like(cap, empty), cap)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
        emb = text_encoder(ids)[0][cap]
        pred = unet(zt, t, encoder_hidden_states=emb).sample
        weight = torch.clamp(snr[t], max=snr_gamma) / snr[t]  # Min-SNR-gamma for epsilon prediction
        loss = (weight * ((pred - noise) ** 2).flatten(1).mean(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        update(opt, sched, params, ema, ema_decay, step)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()


def update(opt, sched, params: list, ema: list, ema_decay: float, step: int) -> None:
    """One optimiser step after the backward pass: gradients clipped at norm 1, the schedule advanced, and the EMA
    weights moved toward the new ones (decay warmed up as (1 + step) / (10 + step), at most ``ema_decay``)."""
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)


def held_out_reload(pipeline_class, folder: Path, scenes: list, images):
    """(pipeline reloaded from ``folder`` the way a user loads it, the held-out ``scenes``, their attributes, their
    images in [-1, 1] by ``images``, the images' VAE round trip in [0, 1]): what both evaluations start from."""
    pipe = pipeline_class.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    x = images(scenes)
    return pipe, scenes, [s.attributes for s in scenes], x, vae_round_trip(pipe, x)


def vae_round_trip(pipe, x: torch.Tensor) -> torch.Tensor:
    """Images x in [-1, 1] through the pipeline's VAE (posterior mean), back in [0, 1]."""
    latents = pipe.vae.encode(x).latent_dist.mean
    return (pipe.vae.decode(latents).sample.clamp(-1, 1) + 1) / 2


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (t.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def evaluate(folder: Path, n_eval: int, seed: int, steps: int) -> dict:
    """Quality figures of the saved model, reloaded the way a user loads it."""
    from diffusers import StableDiffusionPipeline

    pipe, scenes, truth, x, rec = held_out_reload(StableDiffusionPipeline, folder,
                                                  sample_scenes(n_eval, seed=seed, split="held_out"), images_to_tensor)
    src = (x + 1) / 2
    vae_psnr = psnr(rec, src)
    vae_acc = attribute_accuracy([classify(i) for i in to_uint8(rec)], truth)
    out = {
        "held_out_scenes": n_eval,
        "vae_psnr_db": float(vae_psnr.mean()),
        "vae_reconstruction_accuracy": vae_acc,
        "latent_scaling_factor": pipe.vae.config.scaling_factor,
    }
    for w in (7.5, 1.0):
        gen = torch.Generator().manual_seed(seed)
        images = []
        prompts = [s.caption for s in scenes]
        for i in range(0, n_eval, 128):
            r = pipe(prompts[i : i + 128], height=32, width=32, num_inference_steps=steps, guidance_scale=w,
                     generator=gen, output_type="np")
            images.append(r.images)
        images = (np.concatenate(images) * 255).round().astype(np.uint8)
        out[f"samples_accuracy_w{w:g}"] = attribute_accuracy([classify(i) for i in images], truth)
        if w == 7.5:
            out["samples_example"] = images[:16]
    return out


def load_text_encoder_in_float32(folder: Path, sub: str = "text_encoder") -> None:
    """The weights are stored in fp16 to keep the package small, but plain diffusers must load the model as one
    dtype: transformers loads a text encoder in its config's dtype, diffusers the UNet and VAE in float32. Saying
    float32 in the text encoder's config makes ``StableDiffusionPipeline.from_pretrained(folder)`` sample as is."""
    path = folder / sub / "config.json"
    config = json.loads(path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "float32"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --- the flow-matching model ("shapes-flow"): SD 3's layout on the striped world -------------------------------
FLOW_VAE_STEPS = 3000
FLOW_TRAIN_STEPS = 3000
FLOW_BATCH = 64
FLOW_WIDTH = 128
FLOW_LAYERS = 4
FLOW_SHIFT = 3.0
FLOW_T5_TOKENS = 256
"""T5 rows of SD 3's conditioning (``max_sequence_length``): zeros in a model without T5, as diffusers' "T5 off"."""


class PaddedJointAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0``, op for op, where the last text token stands for ``copies`` identical ones.

    A model without T5 sees 256 zero rows after its CLIP tokens. Through the context embedder and every block they
    stay identical (each token's path depends only on itself and on attention over the same keys), so in attention
    they are one key whose softmax weight is multiplied by 256: a log(256) bias on its logit. Training and
    evaluating with one such row instead of 256 is the same function (to rounding), ~5x cheaper on this model."""

    def __init__(self, copies: int = FLOW_T5_TOKENS):
        self.log_copies = math.log(copies)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        from diffinv.editing.joint_attention import joint_qkv

        b, n = hidden_states.shape[:2]
        q, k, v = joint_qkv(attn, hidden_states, encoder_hidden_states)  # as JointAttnProcessor2_0
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = self.log_copies
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(q.shape[2], -1))
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * out.shape[-1]).to(q.dtype)
        hidden_states, encoder_hidden_states = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, encoder_hidden_states


def build_flow_components(tokenizer, args):
    """SD 3's parts at toy size: two CLIPs with projections (no T5), a joint-attention transformer (patch 2), a
    VAE (48 -> 12x12x8, shift and scale set from data) and the flow-matching Euler scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from diffinv.shapes.world import FLOW_SIZE

    vae = small_vae((16, 32, 64), latent_channels=args.latent_channels, groups=8, size=FLOW_SIZE)
    clip = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=MODEL_MAX_LENGTH, projection_dim=32,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    text_encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**clip)) for _ in range(2)]
    heads = args.width // 32
    transformer = SD3Transformer2DModel(
        sample_size=FLOW_SIZE // 4,
        patch_size=2,
        in_channels=args.latent_channels,
        out_channels=args.latent_channels,
        num_layers=args.layers,
        attention_head_dim=32,
        num_attention_heads=heads,
        joint_attention_dim=2 * clip["hidden_size"],
        caption_projection_dim=32 * heads,
        pooled_projection_dim=2 * clip["projection_dim"],
        pos_embed_max_size=FLOW_SIZE // 4,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=args.shift)
    return vae, text_encoders, transformer, scheduler


def silent_t5(width: int):
    """SD 3's "T5 off" as a component: a one-layer T5 encoder (and a T5 tokenizer over the world's words) whose
    final RMS norm has weight 0, so its output is exactly zero for every prompt: what StableDiffusion3Pipeline feeds
    the transformer when it has no text_encoder_3. It is there because diffusers' ``from_pretrained`` does not
    load an SD 3 folder whose model_index.json lists text_encoder_3 as null without ``text_encoder_3=None``."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    from diffinv.shapes.world import VOCABULARY

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0), *((f"\u2581{w}", -1.0) for w in VOCABULARY)]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)
    encoder = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=width, d_kv=8, d_ff=16, num_layers=1, num_heads=1,
                                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                      decoder_start_token_id=0))
    with torch.no_grad():
        encoder.encoder.final_layer_norm.weight.zero_()
    return tokenizer, encoder


def striped_images(scenes) -> torch.Tensor:
    from diffinv.shapes.world import render_striped

    arr = np.stack([render_striped(s) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def sd3_text(text_encoders, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SD 3's conditioning of token ids, T5 off, its 256 zero rows as one (:class:`PaddedJointAttnProcessor`):
    tokens (B, 16 + 1, 128) = both CLIPs' penultimate states side by side, then one zero row; pooled (B, 64)."""
    states, pooled = [], []
    for encoder in text_encoders:
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out[0])
    tokens = torch.cat(states, -1)
    return torch.cat([tokens, tokens.new_zeros(tokens.shape[0], 1, tokens.shape[2])], 1), torch.cat(pooled, -1)


def train_flow(transformer, text_encoders, tokenizer, latents, captions, args, gen):
    """Rectified flow: x_s = (1 - s) x0 + s eps, the transformer at timestep 1000 s predicts v = eps - x0; s
    logit-normal (SD 3's m = 0, s = 1); 10% empty captions; EMA; the text encoders train jointly."""
    unique = sorted(set(captions)) + [""]
    caption_index = torch.tensor([unique.index(c) for c in captions])
    ids = tokenizer(unique, padding="max_length", max_length=MODEL_MAX_LENGTH, return_tensors="pt").input_ids
    empty = len(unique) - 1
    transformer.set_attn_processor(PaddedJointAttnProcessor())
    params = list(transformer.parameters()) + [p for e in text_encoders for p in e.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.flow_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.flow_steps, 300))
    transformer.train()
    for e in text_encoders:
        e.train()
    batch = args.flow_batch
    bar = tqdm(range(args.flow_steps), desc="transformer+text", mininterval=10)
    for step in bar:
        idx = torch.randint(len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        cap = caption_index[idx]
        cap = torch.where(torch.rand(batch, generator=gen) < args.caption_dropout, torch.full_like(cap, empty), cap)
        s = torch.sigmoid(torch.randn(batch, generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        xs = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        tokens, pooled = sd3_text(text_encoders, ids)
        pred = transformer(hidden_states=xs, encoder_hidden_states=tokens[cap], pooled_projections=pooled[cap],
                           timestep=s * 1000).sample
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        update(opt, sched, params, ema, args.ema_decay, step)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer.set_attn_processor(JointAttnProcessor2_0())
    transformer.eval()
    for e in text_encoders:
        e.eval()


FLOW_GUIDANCE = 7.0
"""StableDiffusion3Pipeline's default guidance scale: the family's usual CFG."""
FLOW_STEPS = 28
"""StableDiffusion3Pipeline's default step count: the family's usual."""


@torch.no_grad()
def evaluate_flow(folder: Path, n_eval: int, seed: int, steps: int) -> dict:
    """Quality of the saved flow model, reloaded with plain ``StableDiffusion3Pipeline.from_pretrained``; samples
    run the pipeline with ``max_sequence_length=1`` under :class:`PaddedJointAttnProcessor` (the same function as
    the plain pipeline's 256 zero rows, checked here on a few samples)."""
    from diffusers import StableDiffusion3Pipeline

    from diffinv.shapes.world import FLOW_SIZE, sample_striped_scenes

    pipe, scenes, truth, x, rec = held_out_reload(StableDiffusion3Pipeline, folder,
                                                  sample_striped_scenes(n_eval, seed=seed, split="held_out"),
                                                  striped_images)
    out = {
        "held_out_scenes": n_eval,
        "resolution": FLOW_SIZE,
        "steps": steps,
        "vae_psnr_db": float(psnr(rec, (x + 1) / 2).mean()),
        "vae_reconstruction_accuracy": attribute_accuracy([classify(i) for i in to_uint8(rec)], truth),
        "latent_scaling_factor": pipe.vae.config.scaling_factor,
        "latent_shift_factor": pipe.vae.config.shift_factor,
        "scheduler_shift": pipe.scheduler.config.shift,
    }
    prompts = [s.caption for s in scenes]
    kw = dict(height=FLOW_SIZE, width=FLOW_SIZE, num_inference_steps=steps, output_type="np")
    plain = pipe(prompts[:2], guidance_scale=FLOW_GUIDANCE, generator=torch.Generator().manual_seed(seed), **kw).images
    pipe.transformer.set_attn_processor(PaddedJointAttnProcessor())
    fast = pipe(prompts[:2], guidance_scale=FLOW_GUIDANCE, generator=torch.Generator().manual_seed(seed),
                max_sequence_length=1, **kw).images
    out["padded_attention_max_abs_diff"] = float(np.abs(plain - fast).max())
    if out["padded_attention_max_abs_diff"] > 1e-3:
        raise RuntimeError(f"the one-row T5 padding is not the plain pipeline's function: {out}")
    for w in (FLOW_GUIDANCE, 1.0):
        gen = torch.Generator().manual_seed(seed)
        images = [pipe(prompts[i : i + 64], guidance_scale=w, generator=gen, max_sequence_length=1, **kw).images
                  for i in range(0, n_eval, 64)]
        images = (np.concatenate(images) * 255).round().astype(np.uint8)
        out[f"samples_accuracy_w{w:g}"] = attribute_accuracy([classify(i) for i in images], truth)
        if w == FLOW_GUIDANCE:
            out["samples_example"] = images[:16]
    return out


def train_flow_model(args) -> dict:
    """VAE on striped 48x48 scenes, then the transformer and both text encoders; saves SD 3's layout."""
    from diffinv.shapes.world import FLOW_SIZE, sample_striped_scenes

    if args.resume:
        return continue_flow_model(args)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    args.output.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(write_tokenizer_files(args.output / "tokenizer"))
    vae, text_encoders, transformer, scheduler = build_flow_components(tokenizer, args)
    scenes = sample_striped_scenes(args.train_scenes, seed=args.seed + 1000, split="train")
    images = striped_images(scenes)
    captions = [s.caption for s in scenes]
    print(f"{len(scenes)} training scenes ({FLOW_SIZE}x{FLOW_SIZE}, striped), {len(set(captions))} distinct captions",
          flush=True)
    t0 = time.perf_counter()
    train_vae(vae, images, args.vae_steps, args.vae_batch, args.vae_lr, args.kl_weight, gen)
    vae_minutes = (time.perf_counter() - t0) / 60
    with torch.no_grad():
        held_out = striped_images(sample_striped_scenes(256, seed=args.seed + 2000, split="held_out"))
        rec = vae.decode(vae.encode(held_out).latent_dist.mean).sample.clamp(-1, 1)
        print(f"VAE: {vae_minutes:.1f} min, held-out PSNR {psnr((rec + 1) / 2, (held_out + 1) / 2).mean():.2f} dB",
              flush=True)
    latents = encode_latents(vae, images)
    del images
    shift, scaling = float(latents.mean()), float(1.0 / latents.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scaling)
    latents = (latents - shift) * scaling
    t0 = time.perf_counter()
    train_flow(transformer, text_encoders, tokenizer, latents, captions, args, gen)
    unet_minutes = (time.perf_counter() - t0) / 60
    save_flow_model(args, vae, text_encoders, transformer, scheduler, tokenizer)
    return {"vae_minutes": vae_minutes, "transformer_minutes": unet_minutes}


def save_flow_model(args, vae, text_encoders, transformer, scheduler, tokenizer) -> None:
    from diffusers import StableDiffusion3Pipeline

    tokenizer_3, text_encoder_3 = silent_t5(transformer.config.joint_attention_dim)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=text_encoders[0], tokenizer=tokenizer,
                                    text_encoder_2=text_encoders[1], tokenizer_2=tokenizer,
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    if args.fp16:
        pipe.to(torch.float16)
    pipe.save_pretrained(args.output, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        write_tokenizer_files(args.output / sub)
    for sub in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        load_text_encoder_in_float32(args.output, sub)


def continue_flow_model(args) -> dict:
    """``--flow --resume``: train the saved model's transformer and text encoders ``--flow-steps`` more steps (a
    warm restart of the cosine schedule, noise from seed + the number of earlier phases, so no phase repeats
    another's batches), the VAE kept; the training record adds up."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from diffinv.shapes.world import sample_striped_scenes

    previous = json.loads((args.output / "quality.json").read_text())
    offset = len(previous.get("phases") or [previous])  # 1 after the first phase, as before
    torch.manual_seed(args.seed + offset)
    gen = torch.Generator().manual_seed(args.seed + offset)
    f32 = dict(torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(args.output, subfolder="vae", **f32)
    transformer = SD3Transformer2DModel.from_pretrained(args.output, subfolder="transformer", **f32)
    text_encoders = [CLIPTextModelWithProjection.from_pretrained(args.output, subfolder=sub, dtype=torch.float32)
                     for sub in ("text_encoder", "text_encoder_2")]
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(args.output, subfolder="scheduler")
    tokenizer = load_tokenizer(args.output / "tokenizer")
    scenes = sample_striped_scenes(args.train_scenes, seed=args.seed + 1000, split="train")
    with torch.no_grad():
        latents = torch.cat([encode_latents(vae, striped_images(scenes[i : i + 2000]))
                             for i in range(0, len(scenes), 2000)])
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    t0 = time.perf_counter()
    train_flow(transformer, text_encoders, tokenizer, latents, [s.caption for s in scenes], args, gen)
    minutes = (time.perf_counter() - t0) / 60
    save_flow_model(args, vae, text_encoders, transformer, scheduler, tokenizer)
    phases = previous.get("phases") or [{"transformer_minutes": previous["transformer_minutes"],
                                         "args": previous["args"]}]
    record = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "output"}
    return {"vae_minutes": previous["vae_minutes"], "transformer_minutes": previous["transformer_minutes"] + minutes,
            "earlier_minutes": previous["total_minutes"] - previous["eval_minutes"],
            "phases": [*phases, {"transformer_minutes": minutes, "args": record}]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flow", action="store_true",
                   help="the flow-matching model (SD 3 layout, striped 48x48 scenes): writes src/diffinv/shapes/flow_model")
    p.add_argument("--output", type=Path, default=None, help="default: src/diffinv/shapes/model (--flow: flow_model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-scenes", type=int, default=None, help="default 40000 (--flow: 30000)")
    p.add_argument("--vae-steps", type=int, default=None, help="default 14000 (--flow: FLOW_VAE_STEPS)")
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--unet-steps", type=int, default=9000)
    p.add_argument("--unet-batch", type=int, default=128)
    p.add_argument("--unet-lr", type=float, default=2e-3)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--snr-gamma", type=float, default=5.0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--latent-channels", type=int, default=8, help="--flow: the VAE's latent channels")
    p.add_argument("--width", type=int, default=FLOW_WIDTH, help="--flow: the transformer's width (heads of 32)")
    p.add_argument("--layers", type=int, default=FLOW_LAYERS, help="--flow: the transformer's joint blocks")
    p.add_argument("--shift", type=float, default=FLOW_SHIFT, help="--flow: the scheduler's shift")
    p.add_argument("--flow-steps", type=int, default=FLOW_TRAIN_STEPS)
    p.add_argument("--flow-batch", type=int, default=FLOW_BATCH)
    p.add_argument("--flow-lr", type=float, default=1e-3)
    p.add_argument("--eval-scenes", type=int, default=None, help="default 512 (--flow: 256)")
    p.add_argument("--eval-steps", type=int, default=None, help="default 50 (--flow: 28, the SD 3 pipeline's)")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True, help="store weights in fp16")
    p.add_argument("--eval-only", action="store_true", help="only measure the model already in --output")
    p.add_argument("--resume", action="store_true",
                   help="--flow: train the model in --output --flow-steps more steps (transformer and text encoders)")
    args = p.parse_args(argv)
    flow = args.flow
    defaults = dict(output=REPO / "src/diffinv/shapes" / ("flow_model" if flow else "model"),
                    train_scenes=30000 if flow else 40000, vae_steps=FLOW_VAE_STEPS if flow else 14000,
                    eval_scenes=256 if flow else 512, eval_steps=FLOW_STEPS if flow else 50)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(args.threads)
    if args.eval_only:
        return write_quality(args, {}, time.perf_counter())
    if flow:
        t_start = time.perf_counter()
        return write_quality(args, train_flow_model(args), t_start)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t_start = time.perf_counter()

    args.output.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(write_tokenizer_files(args.output / "tokenizer"))
    vae, text_encoder, unet, scheduler = build_components(tokenizer)

    scenes = sample_scenes(args.train_scenes, seed=args.seed + 1000, split="train")
    images = images_to_tensor(scenes)
    captions = [s.caption for s in scenes]
    print(f"{len(scenes)} training scenes, {len(set(captions))} distinct captions", flush=True)

    t0 = time.perf_counter()
    train_vae(vae, images, args.vae_steps, args.vae_batch, args.vae_lr, args.kl_weight, gen)
    vae_minutes = (time.perf_counter() - t0) / 60
    with torch.no_grad():  # an early look at the figure quality.json reports on the saved weights
        held_out = images_to_tensor(sample_scenes(256, seed=args.seed + 2000, split="held_out"))
        rec = vae.decode(vae.encode(held_out).latent_dist.mean).sample.clamp(-1, 1)
        print(f"VAE: {vae_minutes:.1f} min, held-out PSNR {psnr((rec + 1) / 2, (held_out + 1) / 2).mean():.2f} dB", flush=True)
    latents = encode_latents(vae, images)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling

    t0 = time.perf_counter()
    train_unet(unet, text_encoder, tokenizer, scheduler, latents, captions, args.unet_steps, args.unet_batch,
               args.unet_lr, args.caption_dropout, args.snr_gamma, args.ema_decay, gen)
    unet_minutes = (time.perf_counter() - t0) / 60

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    if args.fp16:
        pipe.to(torch.float16)
    pipe.save_pretrained(args.output, safe_serialization=True)
    write_tokenizer_files(args.output / "tokenizer")  # keep our own tokenizer files canonical
    load_text_encoder_in_float32(args.output)

    timing = {"vae_minutes": vae_minutes, "unet_minutes": unet_minutes}
    return write_quality(args, timing, t_start)


def write_quality(args, timing: dict, t_start: float) -> dict:
    """Measure the saved model and write ``quality.json`` (keeping the training record of an earlier run)."""
    t0 = time.perf_counter()
    measure = evaluate_flow if args.flow else evaluate
    quality = measure(args.output, args.eval_scenes, seed=args.seed + 2000, steps=args.eval_steps)
    example = quality.pop("samples_example")
    from PIL import Image

    # held-out prompts at the family's usual CFG, for the README
    samples = REPO / "docs" / ("shapes_flow_samples.png" if args.flow else "shapes_samples.png")
    samples.parent.mkdir(exist_ok=True)
    side = example.shape[1]
    Image.fromarray(np.concatenate(list(example), axis=1)).resize((16 * side * 4, side * 4), Image.Resampling.NEAREST).save(samples)
    path = args.output / "quality.json"
    previous = json.loads(path.read_text()) if args.eval_only and path.exists() else {}
    training = {k: previous[k] for k in ("vae_minutes", "unet_minutes", "transformer_minutes", "phases", "threads",
                                         "args") if k in previous}
    quality |= training or {**timing, "threads": args.threads,
                            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "output"}}
    quality |= {"eval_minutes": (time.perf_counter() - t0) / 60,
                "total_minutes": timing.get("earlier_minutes", 0.0) + (time.perf_counter() - t_start) / 60}
    path.write_text(json.dumps(quality, indent=1) + "\n")
    print(json.dumps(quality, indent=1))
    return quality


if __name__ == "__main__":
    main()
