"""Reconstruction benchmark on held-out shapes scenes: PSNR and seconds per image of every inversion method at
several step counts, and our null-text inversion against a straightforward reference-style loop.

    python scripts/benchmark_reconstruction.py                      # 10 held-out scenes, 10/20/50 steps
    python scripts/benchmark_reconstruction.py --scenes 4 --steps 10 --model /path/to/sd   # any model
    python scripts/benchmark_reconstruction.py --world flow --model shapes-flow --steps 10 28 \
        --methods "DDIM (w = 1)" NPI RF-Solver FireFlow RF-Inversion      # the flow model: PSNR against evaluations

Prints a Markdown table and writes it with a CSV to --out. Timings use one torch thread (the machine is shared);
each method runs all scenes as one batch, as `diffinv` does, except the reference-style loop (batch 1, as the
reference notebook).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from diffinv import (  # noqa: E402
    BackboneConfig,
    DDIMInversion,
    FireFlowInversion,
    LatentTrajectoryOptimization,
    NegativePromptInversion,
    NullTextInversion,
    ProximalNegativePromptInversion,
    RFInversion,
    RFSolverInversion,
)
from diffinv.bench import mean_ci  # noqa: E402
from diffinv.data import Item, image_tensor  # noqa: E402
from diffinv.ddim import ddim_step, invert  # noqa: E402
from diffinv.guidance import cfg  # noqa: E402
from diffinv.inversion import registry  # noqa: E402
from diffinv.metrics import psnr  # noqa: E402
from diffinv.shapes import world  # noqa: E402

METHODS = {
    "DDIM+CFG": lambda bb, n: DDIMInversion(bb, n),
    "NPI": lambda bb, n: NegativePromptInversion(bb, n),
    "ProxNPI": lambda bb, n: ProximalNegativePromptInversion(bb, n),
    "NTI": lambda bb, n: NullTextInversion(bb, n),  # schedules follow the step count (the reference at 50)
    "NTI (source init)": lambda bb, n: NullTextInversion(bb, n, init="source"),
    "NTI (reference formulas)": lambda bb, n: NullTextInversion(bb, n, schedule_steps=None),
    "latent-TOP": lambda bb, n: LatentTrajectoryOptimization(bb, n),
    # flow models (--world flow): Euler-style inversion at w = 1, and the flow solvers (their papers' w = 1)
    "DDIM (w = 1)": lambda bb, n: DDIMInversion(bb, n, guidance_scale=1.0),
    "RF-Solver": lambda bb, n: RFSolverInversion(bb, n),
    "FireFlow": lambda bb, n: FireFlowInversion(bb, n),
    "RF-Inversion": lambda bb, n: RFInversion(bb, n),
    "RF-Inversion (eta 0)": lambda bb, n: RFInversion(bb, n, eta=0.0),
}


def held_out_items(n: int, seed: int, flow: bool = False) -> list[Item]:
    sample, draw, side = world.WORLDS["flow" if flow else "unet"]  # flow: 48-pixel scenes on striped backgrounds
    scenes = sample(n, seed, "held_out")
    return [Item(f"scene-{i}", draw(s), s.caption, [], resolution=side) for i, s in enumerate(scenes)]


def run_method(method, items: list[Item]) -> tuple[list[float], float, float, int, list[float]]:
    """PSNRs, seconds per image, inner iterations per image (optimizing methods), the denoiser's calls (inversion +
    sampling, each on the whole batch), and PSNRs against the VAE's own reconstruction (the inversion's own error,
    without the VAE's)."""
    optimizing = registry.by_class(type(method)).optimizes
    method.backbone.encode_prompts([i.source_prompt for i in items] + [""])  # text encoding outside the timing
    start = time.perf_counter()
    with torch.enable_grad() if optimizing else torch.inference_mode():
        results = method.run_batch(items)
    seconds = (time.perf_counter() - start) / len(items)
    iters = sum(r.extra.get("inner_iterations", 0) for r in results) / len(items)
    calls = results[0].extra["evaluations_inversion"] + results[0].extra["evaluations_sampling"]
    with torch.no_grad():
        vae = method.backbone.decode(torch.stack([r.inversion.z0 for r in results])).cpu()
    return ([psnr(r.reconstruction, r.source) for r in results], seconds, iters, calls,
            [psnr(r.reconstruction, v) for r, v in zip(results, vae)])


def reference_style_nti(method: NullTextInversion, items: list[Item]) -> tuple[list[float], float, float, int]:
    """The NTI reference notebook's loop on the same model: one image at a time, a fresh torch Adam per step,
    the conditional branch once per step, `.item()` on the loss every iteration, break after the update once the
    loss is below epsilon + i * delta, then one more forward to advance."""
    bb, n, w = method.backbone, method.num_inference_steps, method.guidance_scale
    s = method.tracking
    schedule = bb.schedule(n)
    scores, total_iters = [], 0
    start = time.perf_counter()
    for item in items:
        image = image_tensor(item.image)[None]
        cond = bb.encode_prompts([item.source_prompt])
        null = bb.encode_prompts([""])
        with torch.no_grad():
            z0 = bb.encode_image(image)
            traj = invert(lambda z, t, alpha: bb.eps(z, t, cond, alpha), z0, schedule)
        uncond = null.clone()
        embs = []
        z = traj[-1]
        for i, k in enumerate(range(n, 0, -1)):
            t = schedule.timesteps[k - 1]
            a_t, a_prev = schedule.alphas[k].float(), schedule.alphas[k - 1].float()
            uncond = uncond.clone().detach().requires_grad_(True)
            opt = torch.optim.Adam([uncond], lr=s.lr_at(i, n))  # the reference's 1e-2 (1 - i/100) at 50 steps
            with torch.no_grad():
                eps_c = bb.eps(z, t, cond)
            for _ in range(s.num_inner_steps):
                z_prev = ddim_step(z, cfg(bb.eps(z, t, uncond), eps_c, w), a_t, a_prev)
                loss = torch.nn.functional.mse_loss(z_prev, traj[k - 1])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total_iters += 1
                if loss.item() < s.threshold_at(i, n):
                    break
            with torch.no_grad():
                z = ddim_step(z, cfg(bb.eps(z, t, uncond), eps_c, w), a_t, a_prev)
            embs.append(uncond.detach())
        with torch.no_grad():
            rec_latent = z  # the tracked trajectory's end is the reconstruction under these embeddings
            rec = bb.decode(rec_latent)[0]
        scores.append(psnr(rec, image[0]))
    seconds = (time.perf_counter() - start) / len(items)
    return scores, seconds, total_iters / len(items), 0, []


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes", help="'shapes', a hub id or a diffusers folder")
    p.add_argument("--scenes", type=int, default=10)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--methods", nargs="+", default=list(METHODS) + ["NTI reference-style loop"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--world", choices=["unet", "flow"], default="unet",
                   help="the scenes: the U-Net model's 32-pixel world, or the flow model's striped 48-pixel one")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_reconstruction")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bb = BackboneConfig(pretrained=args.model)
    items = held_out_items(args.scenes, args.seed, flow=args.world == "flow")
    rows = []
    for n in args.steps:
        for name in args.methods:
            if name == "NTI reference-style loop":
                scores, seconds, iters, calls, own = reference_style_nti(
                    NullTextInversion(bb, n, schedule_steps=None), items)
            else:
                scores, seconds, iters, calls, own = run_method(METHODS[name](bb, n), items)
            m, ci, _, _ = mean_ci(scores)
            vae_m = mean_ci(own)[0] if own else float("nan")
            rows.append({"steps": n, "method": name, "psnr": m, "psnr_ci95": ci, "psnr_vs_vae": vae_m,
                         "seconds_per_image": seconds, "inner_iterations_per_image": iters, "evaluations": calls,
                         "images": len(items)})
            print(f"{n:>3} steps  {name:<26} PSNR {m:6.2f} ± {ci:4.2f} dB   {seconds:7.3f} s/image   {calls} "
                  "evaluations" + (f"   {iters:6.1f} inner iterations/image" if iters else ""), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "reconstruction.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = ["| steps | method | PSNR (dB, mean ± 95% CI) | PSNR vs the VAE's reconstruction | evaluations | s / image | "
             "inner iterations / image |", "|---|---|---|---|---|---|---|"]
    table += [f"| {r['steps']} | {r['method']} | {r['psnr']:.2f} ± {r['psnr_ci95']:.2f} | {r['psnr_vs_vae']:.2f} | "
              f"{r['evaluations'] or '-'} | {r['seconds_per_image']:.3f} | {r['inner_iterations_per_image']:.0f} |"
              for r in rows]
    (args.out / "reconstruction.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return rows


if __name__ == "__main__":
    main()
