"""Editing benchmark on held-out shapes scenes, where every edit has a ground truth.

    python scripts/benchmark_editing.py                         # 24 scenes x 3 edit kinds, 20 steps
    python scripts/benchmark_editing.py --scenes 6 --inversions NPI ProxNPI --editors none p2p
    python scripts/benchmark_editing.py --world flow --model shapes-flow --steps 28 \
        --inversions DDIM NPI RF-Solver FireFlow RF-Inversion --editors none p2p "p2p (qk_swap)" flowedit rf_edit

For each scene three edits are made: colour -> another colour, shape -> another shape, background -> another
colour. For every inversion x editor it reports, per edit kind and overall:
  edit accuracy     the attribute classifier reads the intended attribute from the edited image;
  kept              the other three attributes read unchanged;
  PSNR kept region  PSNR against the source on the pixels that must not change (outside both the source's and
                    the target's shape for colour/shape edits, inside both for background edits);
  PSNR vs truth     PSNR against the ground-truth edited scene (same geometry, edited attribute);
  seconds           per edited image (inversion + sampling, batched as diffinv runs them);
  evaluations       the denoiser's calls per edit batch (inversion + sampling: metrics.jsonl's evaluations_*).
``--world flow``: the flow model's world (48-pixel scenes on striped backgrounds, ``shapes-flow``).
Prints a Markdown table and writes it with a CSV to --out.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from diffinv import BackboneConfig, ProximalGuidance  # noqa: E402
from diffinv.data import Item  # noqa: E402
from diffinv.editing import FlowEdit, PromptToPrompt, RFEdit, SDEdit  # noqa: E402
from diffinv.inversion import registry  # noqa: E402
from diffinv.shapes.classifier import classify  # noqa: E402
from diffinv.shapes import world  # noqa: E402
from diffinv.shapes.world import COLOURS, SHAPES, coverage  # noqa: E402

VARIANTS = {  # label -> (registered method, settings) beside every registered method with its own defaults
    "ProxNPI (authors' code)": ("proxnpi",  # configs/reference/proxnpi.yaml
                                {"proximal": ProximalGuidance(prox="authors_l0", scope="item", mask_from="shrunk")}),
    "NTI (source init)": ("null_text", {"init": "source"}),
    "EDICT (authors' code)": ("edict", {"leapfrog": True, "strength": 0.8}),  # configs/reference/edict.yaml
    "CycleDiffusion (authors' demo)": ("cycle_diffusion",  # configs/reference/cycle_diffusion.yaml at these steps
                                       {"eta": 0.1, "strength": 0.7, "guidance_scale": 5.0}),
}
INVERSIONS = {  # every registered method by its label (EDICT: its paper's CFG 3, DDPM inversion: 3.5 / 15 and
    # T_skip 36% unless --guidance-scale is given), each followed by its variants
    label: make
    for m in registry.METHODS
    for label, make in [(m.label, m.cls), *((v, lambda *a, cls=m.cls, kw=kw, **k: cls(*a, **(kw | k)))
                                             for v, (name, kw) in VARIANTS.items() if name == m.name)]
}
EDITORS = {
    "none": lambda: None,
    "p2p": lambda: PromptToPrompt(mode="replace", cross_replace_steps=0.8, self_replace_steps=0.4),
    "p2p (reference)": lambda: PromptToPrompt(mode="replace", cross_replace_steps=0.8, self_replace_steps=0.4,
                                              control_unconditional=False),  # the reference: conditional rows only
    "p2p+blend": lambda: PromptToPrompt(mode="replace", cross_replace_steps=0.8, self_replace_steps=0.4,
                                        local_blend_words=list(SHAPES)),  # the object's region
    "sdedit": lambda: SDEdit(strength=0.6, start_from="inversion"),  # NPI paper App. C.3: from the inverted latent
    # joint-attention models (SD 3, FLUX): Shin et al.'s query/key swap instead of the edited maps
    "p2p (qk_swap)": lambda: PromptToPrompt(mode="replace", cross_replace_steps=0.8, self_replace_steps=0.4,
                                            joint_attention="qk_swap"),
    "flowedit": lambda: FlowEdit(),  # flow models: the paper's SD 3 settings (n_max 0.66, CFG 3.5 / 13.5)
    # flow models: RF-Solver-Edit's / FireFlow's value injection (the source's V in the last joint layers)
    "rf_edit": lambda: RFEdit(inject_steps=3),
    "rf_edit (8 steps)": lambda: RFEdit(inject_steps=8),
}


def edits_for(scene, rng: np.random.Generator) -> dict[str, object]:
    colours = [c for c in COLOURS if c not in (scene.colour, scene.background)]
    return {
        "colour": scene.edited(colour=str(rng.choice(colours))),
        "shape": scene.edited(shape=str(rng.choice([s for s in SHAPES if s != scene.shape]))),
        "background": scene.edited(background=str(rng.choice(colours))),
    }


def kept_region(scene, target, kind: str, size: int = world.SIZE) -> np.ndarray:
    k = size / world.SIZE
    a = coverage(scene.shape, scene.cx * k, scene.cy * k, scene.r * k, size=size)
    b = coverage(target.shape, target.cx * k, target.cy * k, target.r * k, size=size)
    if kind == "background":
        return (a > 0.99) & (b > 0.99)
    return (a == 0) & (b == 0)


def psnr_np(x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None) -> float:
    d = (x.astype(np.float64) - y.astype(np.float64)) / 255
    if mask is not None:
        d = d[mask]
    mse = float(np.mean(d**2)) if d.size else float("nan")
    return float("inf") if mse == 0 else -10 * math.log10(mse) if mse == mse else float("nan")


def to_uint8(t: torch.Tensor) -> np.ndarray:
    return (t.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def mean(values):
    v = [x for x in values if x == x and math.isfinite(x)]
    return sum(v) / len(v) if v else float("nan")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes")
    p.add_argument("--scenes", type=int, default=24)
    p.add_argument("--seed", type=int, default=321)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="CFG scale of every method; default: each method's own (7.5; EDICT 3; DDPM inversion 15)")
    p.add_argument("--inversions", nargs="+",
                   default=["DDIM", "NPI", "ProxNPI", "ProxNPI (authors' code)", "NTI", "CycleDiffusion"])
    p.add_argument("--editors", nargs="+", default=list(EDITORS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--world", choices=list(world.WORLDS), default="unet",
                   help="the scenes: the U-Net model's 32-pixel world, or the flow model's striped 48-pixel one")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_editing")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    sample_scenes, render, side = world.WORLDS[args.world]
    scenes = sample_scenes(args.scenes, args.seed, "held_out")
    cases = [(s, kind, t) for s in scenes for kind, t in edits_for(s, rng).items()]
    items = [Item(f"{i}", render(s), s.caption, [t.caption], resolution=side) for i, (s, _, t) in enumerate(cases)]
    bb = BackboneConfig(pretrained=args.model)
    rows = []
    for inv_name in args.inversions:
        for ed_name in args.editors:
            w = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
            method = INVERSIONS[inv_name](bb, args.steps, editor=EDITORS[ed_name](), **w)
            optimizing = registry.by_class(type(method)).optimizes
            method.backbone.encode_prompts(sorted({i.source_prompt for i in items} | {i.target_prompts[0] for i in items} | {""}))
            start = time.perf_counter()
            with torch.enable_grad() if optimizing else torch.inference_mode():
                results = method.run_batch(items)
            seconds = (time.perf_counter() - start) / len(items)
            per_kind: dict[str, list[dict]] = {}
            for (scene, kind, target), r in zip(cases, results):
                edited = to_uint8(r.edits[0])
                read = classify(edited)
                others = [k for k in ("size", "colour", "shape", "background") if k != kind]
                per_kind.setdefault(kind, []).append({
                    "accuracy": float(read[kind] == target.attributes[kind]),
                    "kept": float(all(read[k] == target.attributes[k] for k in others)),
                    "psnr_kept": psnr_np(edited, render(scene), kept_region(scene, target, kind, side)),
                    "psnr_truth": psnr_np(edited, render(target)),
                })
            for kind, vals in [*per_kind.items(), ("all", [v for vs in per_kind.values() for v in vs])]:
                rows.append({"inversion": inv_name, "editor": ed_name, "edit": kind, "n": len(vals),
                             **{k: mean([v[k] for v in vals]) for k in vals[0]}, "seconds_per_edit": seconds,
                             "evaluations": results[0].extra["evaluations_inversion"]
                             + results[0].extra["evaluations_sampling"]})
                r = rows[-1]
                print(f"{inv_name:<10} {ed_name:<10} {kind:<10} acc {r['accuracy']:.2f}  kept {r['kept']:.2f}  "
                      f"PSNR kept {r['psnr_kept']:5.2f}  vs truth {r['psnr_truth']:5.2f}  {seconds:.3f} s  "
                      f"{r['evaluations']} evaluations", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "editing.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    table = ["| inversion | editor | edit | accuracy | others kept | PSNR kept region | PSNR vs truth | s / edit | "
             "evaluations |", "|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['inversion']} | {r['editor']} | {r['edit']} | {r['accuracy']:.2f} | {r['kept']:.2f} | "
              f"{r['psnr_kept']:.2f} | {r['psnr_truth']:.2f} | {r['seconds_per_edit']:.3f} | {r['evaluations']} |"
              for r in rows]
    (args.out / "editing.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return rows


if __name__ == "__main__":
    main()
