"""Outputs bit-for-bit across a refactor: record every method x editor on the embedded model, compare two records.

    python scripts/bit_identity.py record before.pt     # on the old commit
    python scripts/bit_identity.py record after.pt      # on the new one
    python scripts/bit_identity.py compare before.pt after.pt
    python scripts/bit_identity.py record --tiny sdxl sdxl.pt   # tiny random-weight SDXL / SD 3 / FLUX (tests/)

Run the new script on the old code with PYTHONPATH=<old checkout>/src for a family the old script lacks.

Every registered method (and ProxNPI with its authors' code, latent-TOP with two starts) x three editors (none,
Prompt-to-Prompt refine with local blend, SDEdit) x four bench scenes, 10 steps, one thread; every decoded
reconstruction and edit is compared with torch.equal. A method the model refuses (the flow solvers on a diffusion
model) is left out; outputs new since the first record (a method added) are counted apart, not as differences.
``--tiny`` takes a tiny random-weight model built by tests/tiny_model.py with its fixed seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


TINY = ("sdxl", "sd3", "sd3_t5", "flux")


def tiny_model(name: str) -> str:
    """A tiny random-weight model of the family ``name`` (tests/tiny_model.py, fixed seed) in a temporary folder."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tiny_model as tiny

    build = {"sdxl": tiny.build_tiny_sdxl, "sd3": tiny.build_tiny_sd3, "sd3_t5": tiny.build_tiny_sd3_t5,
             "flux": tiny.build_tiny_flux}[name]
    return str(build(Path(tempfile.mkdtemp()) / name))


def record(path: Path, scenes: int = 4, steps: int = 10, model: str | None = None) -> int:
    import diffinv
    from diffinv import BackboneConfig, DiffinvError, ProximalGuidance
    from diffinv.data import build_items, read_manifest
    from diffinv.editing import PromptToPrompt, SDEdit
    from diffinv.inversion import registry

    torch.set_num_threads(1)
    manifest = Path(diffinv.__file__).parent / "examples" / "bench" / "captions.jsonl"
    items = build_items(read_manifest(manifest), None, False)[:scenes]
    bb = BackboneConfig() if model is None else BackboneConfig(pretrained=model)
    authors = ProximalGuidance(prox="authors_l1", scope="item", mask_from="shrunk")
    # the keys older records use for the methods not keyed by their method_name
    keys = {"cycle_diffusion": "cycle", "null_text": "nti", "direct_inversion": "direct", "ddpm_inversion": "ddpm"}
    settings = {"null_text": {"num_inner_steps": 3}, "latent_top": {"num_inner_steps": 2, "num_starts": 2},
                "proxnpi_authors": {"proximal": authors}}
    methods = {  # every registered method, and ProxNPI with its authors' code
        keys.get(name, name): (m.cls, settings.get(name, {}), m.optimizes)
        for m in registry.METHODS
        for name in ([m.name, "proxnpi_authors"] if m.name == "proxnpi" else [m.name])
    }
    editors = {
        "none": lambda: None,
        "p2p": lambda: PromptToPrompt(mode="refine", local_blend_words=["circle", "square", "triangle"],
                                      local_blend_start=0.0),
        "sdedit": lambda: SDEdit(strength=0.6),
    }
    out = {}
    for m, (cls, kw, grad) in methods.items():  # grad: the optimizing methods need gradients
        for e, editor in editors.items():
            method = cls(bb, steps, editor=editor(), **kw)
            try:
                method.check_items(items)
            except DiffinvError:
                continue  # refused on this family (a flow solver on a diffusion model, ...)
            with torch.enable_grad() if grad else torch.inference_mode():
                results = method.run_batch(items)
            for r in results:
                out[f"{m}/{e}/{r.id}"] = torch.stack([r.reconstruction, *r.edits]).detach().clone()
    torch.save(out, path)
    return len(out)


def compare(a: Path, b: Path) -> tuple[list[str], list[str]]:
    """(outputs of ``a`` missing from ``b`` or different there, outputs new in ``b``: methods added since)."""
    x, y = torch.load(a), torch.load(b)
    return [k for k in x if k not in y or not torch.equal(x[k], y[k])], sorted(set(y) - set(x))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record")
    r.add_argument("out", type=Path)
    r.add_argument("--tiny", choices=TINY, help="a tiny random-weight model of this family instead of the embedded one")
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    if args.command == "record":
        print(f"{record(args.out, model=tiny_model(args.tiny) if args.tiny else None)} outputs written to {args.out}")
        return 0
    differ, new = compare(args.a, args.b)
    total = len(torch.load(args.a))
    print(f"{total - len(differ)} of {total} identical" + (f"; different or missing: {', '.join(differ)}" if differ
                                                          else "") + (f"; {len(new)} new outputs" if new else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
