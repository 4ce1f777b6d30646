"""Time and memory per model family on the tests' tiny components (SD 1.x, SDXL, SD 3, SD 3.5, FLUX.1-dev).

Each (family, method) runs in a fresh process: three 16-px images, N steps, one thread; it prints seconds per item
(inversion + sampling) and the process's peak RSS. The tiny models show what the families' orchestration costs
(conditioning, packing, the flow conversion); a real model's speed is its denoiser's (scripts/benchmark_speed.py).

    python scripts/benchmark_families.py --steps 20
    python scripts/benchmark_families.py --round-trip   # flow inversion: converting at the latent's level or not
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAMILIES = {"sd": "build_tiny_model", "sdxl": "build_tiny_sdxl", "sd3": "build_tiny_sd3", "sd35": "build_tiny_sd35",
            "flux": "build_tiny_flux"}
METHODS = ("npi", "sdedit", "null_text")


def measure(folder: str, method: str, steps: int) -> dict:
    """One measurement, in this process: seconds per item and peak RSS (MB)."""
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from test_methods import item

    from diffinv import BackboneConfig, NegativePromptInversion, NullTextInversion
    from diffinv.editing import SDEdit

    torch.set_num_threads(1)
    bb = BackboneConfig(pretrained=folder)
    make = {"npi": lambda: NegativePromptInversion(bb, steps),
            "sdedit": lambda: NegativePromptInversion(bb, steps, editor=SDEdit(strength=0.6)),
            "null_text": lambda: NullTextInversion(bb, steps, num_inner_steps=3)}[method]
    m = make()
    items = [dataclasses.replace(item(i, targets=["a photo of a dog"]), resolution=16) for i in range(3)]
    with torch.inference_mode(method != "null_text"):  # null-text inversion optimises: it needs autograd
        m.run_batch(items[:1])  # load and warm up
        start = time.perf_counter()
        m.run_batch(items)
        seconds = (time.perf_counter() - start) / len(items)
    return {"seconds_per_item": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def round_trip(folder: str) -> None:
    """DDIM inversion then sampling at w = 1 on a flow model: mean |z0 - back| when the inversion converts the
    velocity at the latent's own level (diffinv now) and at the timestep's (diffinv before)."""
    import torch

    from diffinv.backbone import Backbone, BackboneConfig
    from diffinv.ddim import invert
    from diffinv.editing.sampler import sample

    torch.set_num_threads(1)
    bb = Backbone.load(BackboneConfig(pretrained=folder))
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = bb.encode_prompts(["a photo of a cat"])
    print("| steps | latent's level | timestep's level |\n|---|---|---|")
    with torch.no_grad():
        for n in (10, 20, 50):
            s = bb.schedule(n)
            errors = []
            for eps in (lambda z, t, a: bb.eps(z, t, cond, a), lambda z, t, a: bb.eps(z, t, cond)):
                back = sample(bb, s, invert(eps, z0, s)[-1], cond, cond, 1.0)
                errors.append(float((back - z0).abs().mean()))
            print(f"| {n} | {errors[0]:.4f} | {errors[1]:.4f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--round-trip", action="store_true",
                        help="instead: the inversion round trip on the tiny SD 3 (mean |z0 - back| at w = 1)")
    args = parser.parse_args(argv)
    if args.round_trip:
        sys.path.insert(0, str(REPO / "tests"))
        import tiny_model

        with tempfile.TemporaryDirectory() as tmp:
            round_trip(str(tiny_model.build_tiny_sd3(Path(tmp) / "sd3")))
        return 0
    if args.measure:
        print(json.dumps(measure(*args.measure, args.steps)))
        return 0
    sys.path.insert(0, str(REPO / "tests"))
    import tiny_model

    print(f"| family | {' | '.join(f'{m} s/item' for m in METHODS)} | peak RSS (MB) |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for family, builder in FAMILIES.items():
            folder = getattr(tiny_model, builder)(Path(tmp) / family)
            cells, rss = [], []
            for method in METHODS:
                out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--measure", str(folder),
                                      method], capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                cells.append(f"{result['seconds_per_item']:.3f}")
                rss.append(result["peak_rss_mb"])
            print(f"| {family} | {' | '.join(cells)} | {min(rss):.0f}–{max(rss):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
