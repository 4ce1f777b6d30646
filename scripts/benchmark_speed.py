"""Speed and memory of every method and editor at a real Stable Diffusion's size, beside its compute floor.

No download: the components are built in code with random weights (timing does not depend on the weights) at
SD 1.5's architecture (UNet 320-640-1280-1280, CLIP-L-size text encoder, SD's VAE) or SDXL's UNet (320-640-1280,
transformer depths 1/2/10, 2048-d context; without SDXL's added time/pooled conditioning, which the core does not
take yet), or the tests' tiny ones (`--arch tiny`, a smoke test).

For each method x editor and batch size it reports seconds per image (inversion and sampling apart), images per
second, peak memory (GPU: torch.cuda.max_memory_allocated; CPU: the process's peak RSS, each measurement in a fresh
process) and the **compute floor measured in the same run**: every UNet, VAE and text-encoder call the method made
is recorded (batch, shapes, with or without gradient), then the same bare calls are timed alone on random inputs
(a call with gradient: forward + backward); the floor is their sum. `x floor` = the method's time / its floor: what
the orchestration (Python, attention processors, guidance, optimisers, copies) costs on top of the network.

    python scripts/benchmark_speed.py --arch sd15 --resolution 512 --steps 50 --batches 1 4 8      # on a GPU
    python scripts/benchmark_speed.py --arch sd15 --resolution 256 --steps 10 --batches 1 4        # CPU-sized
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from diffinv import BackboneConfig  # noqa: E402
from diffinv.backbone import Backbone  # noqa: E402
from diffinv.data import Item  # noqa: E402
from diffinv.inversion import registry  # noqa: E402

METHODS = {  # label -> (registered method_name, editor factory or None, extra init args)
    "NPI": ("npi", None, {}),
    "ProxNPI": ("proxnpi", None, {}),
    "NPI+P2P replace": ("npi", "replace", {}),
    "NPI+P2P refine+blend": ("npi", "refine_blend", {}),
    "NPI+SDEdit": ("npi", "sdedit", {}),
    "DDIM+CFG": ("ddim", None, {}),
    "DirectInversion+P2P": ("direct_inversion", "replace", {}),
    "EDICT": ("edict", None, {}),
    "DDPM inversion": ("ddpm_inversion", None, {}),
    "CycleDiffusion": ("cycle_diffusion", None, {}),
    "NTI": ("null_text", None, {"num_inner_steps": "inner"}),
    "NTI (checkpointing)": ("null_text", None, {"num_inner_steps": "inner", "gradient_checkpointing": True}),
    "latent-TOP (20 starts)": ("latent_top", None, {"num_inner_steps": "inner", "num_starts": 20}),
}
SOURCE, TARGET = "a photo of a cat", "a photo of a dog"


def build_components(arch: str, seed: int = 0):
    """(vae, text_encoder, tokenizer, unet, scheduler) with random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffinv.shapes.tokenizer import load_tokenizer, write_tokenizer_files

    torch.manual_seed(seed)
    tiny = arch == "tiny"
    max_len = 8 if tiny else 77
    folder = Path(tempfile.mkdtemp()) / "tokenizer"
    tokenizer = load_tokenizer(write_tokenizer_files(folder, ("a", "photo", "of", "cat", "dog"), max_len))
    tokenizer.model_max_length = max_len
    context = {"tiny": 16, "sd15": 768, "sdxl": 2048}[arch]
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=context, intermediate_size=4 * context,
        num_hidden_layers=1 if tiny else 12, num_attention_heads=2 if tiny else 12, max_position_embeddings=max_len,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    if tiny:
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
        unet = UNet2DConditionModel(sample_size=8, layers_per_block=1, block_out_channels=(16, 32),
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                    attention_head_dim=2, norm_num_groups=8)
    else:
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            sample_size=512 if arch == "sd15" else 1024)
        if arch == "sd15":
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        else:
            unet = UNet2DConditionModel(
                sample_size=128, block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                use_linear_projection=True)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return vae, text_encoder, tokenizer, unet, scheduler


class CallLog:
    """Records every call of the UNet, the VAE's encoder/decoder and the text encoder: (name, input shapes,
    timestep, with gradient)."""

    def __init__(self, backbone: Backbone):
        self.calls: list[tuple] = []
        self.handles = []
        for name, module in (("unet", backbone.unet), ("vae_encoder", backbone.vae.encoder),
                             ("vae_decoder", backbone.vae.decoder), ("text_encoder", backbone.text_encoder)):
            self.handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))

    def _hook(self, name):
        def hook(module, args, kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            ctx = kwargs.get("encoder_hidden_states")
            grad = torch.is_grad_enabled() and (any(t.requires_grad for t in tensors)
                                                or (ctx is not None and ctx.requires_grad))
            self.calls.append((name, tuple(tuple(t.shape) for t in tensors),
                               None if ctx is None else tuple(ctx.shape), grad))
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def bare_call_seconds(backbone: Backbone, call: tuple, reps: int, sync) -> float:
    """Median seconds of one bare call like ``call`` on random inputs (with gradient: forward + backward)."""
    name, shapes, ctx_shape, grad = call
    dev, dtype = backbone.device, next(backbone.unet.parameters()).dtype
    module = {"unet": backbone.unet, "vae_encoder": backbone.vae.encoder, "vae_decoder": backbone.vae.decoder,
              "text_encoder": backbone.text_encoder}[name]

    def once():
        if name == "text_encoder":
            ids = torch.zeros(shapes[0], dtype=torch.long, device=dev)
            with torch.no_grad():
                module(ids)
            return
        x = torch.randn(shapes[0], device=dev, dtype=dtype)
        if name == "unet":
            ctx = torch.randn(ctx_shape, device=dev, dtype=dtype, requires_grad=grad)
            t = torch.tensor(500, device=dev)
            if grad:
                out = module(x, t, encoder_hidden_states=ctx).sample
                torch.autograd.grad(out.float().square().mean(), [ctx])
            else:
                with torch.no_grad():
                    module(x, t, encoder_hidden_states=ctx)
            return
        with torch.no_grad():
            module(x)

    once()  # warm-up
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        once()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def measure(args, label: str, batch: int) -> dict:
    from diffinv.editing import PromptToPrompt, SDEdit

    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    backbone = Backbone(*build_components(args.arch), name=f"random {args.arch}").to(device)
    if dtype != torch.float32:  # the VAE stays in float32 (diffinv decodes in float32 anyway)
        backbone.unet.to(dtype)
        backbone.text_encoder.to(dtype)
    cls_name, editor_kind, extra = METHODS[label]  # cls_name: the method_name
    editor = {None: None, "replace": lambda: PromptToPrompt(mode="replace"),
              "refine_blend": lambda: PromptToPrompt(mode="refine", local_blend_words=["cat", "dog"]),
              "sdedit": lambda: SDEdit(strength=0.6)}[editor_kind]
    kw = {k: (args.inner if v == "inner" else v) for k, v in extra.items()}
    method = registry.by_name(cls_name).cls(BackboneConfig(), args.steps, editor=editor() if editor else None, **kw)
    method._backbone = backbone  # the random components instead of a download
    rng = np.random.default_rng(0)
    items = [Item(f"img{i}", rng.integers(0, 256, (args.resolution, args.resolution, 3), dtype=np.uint8), SOURCE,
                  [TARGET], resolution=args.resolution) for i in range(batch)]
    optimizing = registry.by_class(type(method)).optimizes
    run = (lambda: method.run_batch(items)) if optimizing else (lambda: _inference(method, items))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        backbone.encode_prompts([SOURCE, TARGET, ""])  # the prompt cache, as in a real run after its first batch
    for _ in range(args.warmup):
        run()
    log = CallLog(backbone)
    sync()
    t0 = time.perf_counter()
    results = run()
    sync()
    seconds = time.perf_counter() - t0
    log.close()
    peak = peak_memory_mb(device)
    distinct = {}
    for call in log.calls:
        distinct[call] = distinct.get(call, 0) + 1
    floor = sum(n * bare_call_seconds(backbone, call, args.reps, sync) for call, n in distinct.items())
    unet_rows = sum(c[1][0][0] for c in log.calls if c[0] == "unet")
    inv = sum(r.seconds_inversion for r in results)
    samp = sum(r.seconds_sampling for r in results)
    return {"method": label, "batch": batch, "seconds_per_image": seconds / batch,
            "inversion_s_per_image": inv / batch, "sampling_s_per_image": samp / batch,
            "images_per_s": batch / seconds, "floor_s_per_image": floor / batch, "x_floor": seconds / floor,
            "unet_calls": sum(1 for c in log.calls if c[0] == "unet"), "unet_rows": unet_rows,
            "peak_memory_mb": peak, "finite": all(bool(torch.isfinite(r.reconstruction).all()) for r in results)}


def _inference(method, items):
    with torch.inference_mode():
        return method.run_batch(items)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["sd15", "sdxl", "tiny"], default="sd15")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--inner", type=int, default=10, help="NTI's inner iterations per step")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each bare call of the floor (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each method before the timed one")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--in-process", action="store_true",
                   help="measure everything in this process (fast smoke test; the CPU peak memory is then cumulative)")
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "BATCH"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON lines here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print("RESULT " + json.dumps(measure(args, args.worker[0], int(args.worker[1]))), flush=True)
        return []
    rows = []
    print(f"{args.arch} components, random weights, {args.resolution}x{args.resolution}, {args.steps} steps, one "
          f"target prompt per image, {args.device} {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| method | batch | s / image | inversion | sampling | images / s | floor s / image | x floor | "
          "UNet calls (rows) | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label in args.methods:
        for batch in args.batches:
            if args.in_process:
                row = measure(args, label, batch)
            else:
                cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--worker", label,
                       str(batch)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONWARNINGS": "ignore"})
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    print(f"| {label} | {batch} | failed: {tail[:150]} |", flush=True)
                    continue
                row = json.loads(line[len("RESULT "):])
            rows.append(row)
            print(f"| {label} | {batch} | {row['seconds_per_image']:.3f} | {row['inversion_s_per_image']:.3f} | "
                  f"{row['sampling_s_per_image']:.3f} | {row['images_per_s']:.2f} | {row['floor_s_per_image']:.3f} | "
                  f"{row['x_floor']:.2f} | {row['unet_calls']} ({row['unet_rows']}) | {row['peak_memory_mb']:.0f} |"
                  + ("" if row["finite"] else " NaN!"), flush=True)
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


if __name__ == "__main__":
    main()
