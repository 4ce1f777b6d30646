"""How much an edit depends on its batch neighbours, per method x editor, on the embedded model.

For held-out bench scenes, each (image, target) is edited alone, beside two more target prompts of its item
(listed second), and after another item in the batch; the script prints the largest per-pixel difference
(0-255 scale) of the edit between those runs and the run alone. Float noise is well under 1/255; anything above
is a result that depends on what shares its batch.

    python scripts/batch_independence.py [--scenes 8] [--steps 20] [--methods ddim npi proxnpi cycle_diffusion]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from diffinv import BackboneConfig  # noqa: E402
from diffinv.data import Item, build_items, read_manifest  # noqa: E402
from diffinv.editing import PromptToPrompt, SDEdit  # noqa: E402
from diffinv.inversion import registry  # noqa: E402

METHODS = {m.name: m.cls for m in registry.METHODS}  # every registered method, by its method_name
EDITORS = {
    "none": lambda: None,
    "p2p": lambda: PromptToPrompt(mode="refine"),
    "sdedit": lambda: SDEdit(strength=0.6),
}


def with_targets(item: Item, targets: list[str]) -> Item:
    return Item(item.id, item.image, item.source_prompt, targets, item.resolution, item.square)


def run(method, items: list[Item]):
    if registry.by_class(type(method)).optimizes:
        return method.run_batch(items)
    with torch.inference_mode():
        return method.run_batch(items)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--methods", nargs="+", default=["ddim", "npi", "proxnpi", "cycle_diffusion"], choices=list(METHODS))
    p.add_argument("--editors", nargs="+", default=list(EDITORS))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    items = build_items(read_manifest(REPO / "src/diffinv/examples/bench/captions.jsonl"), None, False)
    n = len(items)
    print("| method | editor | beside two more targets (/255) | after another item (/255) |")
    print("|---|---|---|---|")
    for name in args.methods:
        for editor in args.editors:
            m = METHODS[name](BackboneConfig(), args.steps, editor=EDITORS[editor]())
            beside_worst = after_worst = 0.0
            for k, it in enumerate(items[: args.scenes]):
                target = it.target_prompts[0]
                others = [items[(k + 1) % n].target_prompts[0], items[(k + 2) % n].target_prompts[0]]
                alone = run(m, [with_targets(it, [target])])[0].edits[0]
                beside = run(m, [with_targets(it, [others[0], target, others[1]])])[0].edits[1]
                after = run(m, [items[(k + 5) % n], with_targets(it, [target])])[1].edits[0]
                beside_worst = max(beside_worst, float((beside - alone).abs().max()) * 255)
                after_worst = max(after_worst, float((after - alone).abs().max()) * 255)
            print(f"| {name} | {editor} | {beside_worst:.2f} | {after_worst:.2f} |", flush=True)


if __name__ == "__main__":
    main()
