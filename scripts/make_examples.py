"""Write the bundled example inputs (src/diffinv/examples): held-out shapes scenes, their captions and edits.

    python scripts/make_examples.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from PIL import Image  # noqa: E402

from diffinv.shapes.world import render, sample_scenes  # noqa: E402

# (scene index in the held-out draw, edits as attribute changes)
EDITS = [{"colour": "blue"}, {"shape": "square"}, {"background": "white"}]


def main() -> None:
    out = REPO / "src/diffinv/examples"
    out.mkdir(parents=True, exist_ok=True)
    scenes = sample_scenes(3, seed=7, split="held_out")
    lines = []
    for n, (scene, edit) in enumerate(zip(scenes, EDITS)):
        if any(scene.attributes[k] == v for k, v in edit.items()) or (
            edit.get("colour") == scene.background or edit.get("background") == scene.colour
        ):
            edit = {"colour": "yellow"} if scene.colour != "yellow" and scene.background != "yellow" else {"colour": "red"}
        name = f"shapes-{n}.png"
        Image.fromarray(render(scene)).save(out / name)
        lines.append({"id": f"shapes-{n}", "image": name, "source_prompt": scene.caption,
                      "target_prompts": [scene.edited(**edit).caption], "scene": scene.to_dict()})
    (out / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    print("\n".join(f"{line['source_prompt']} -> {line['target_prompts'][0]}" for line in lines))
    write_bench_set(out / "bench", count=24, seed=11)


def write_bench_set(out: Path, count: int, seed: int) -> None:
    """The benchmark configs' default data: held-out scenes, each with one edit (colour, shape, background in
    turn) whose ground truth is the same geometry with that attribute changed."""
    import numpy as np

    from diffinv.shapes.world import COLOURS, SHAPES

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for n, scene in enumerate(sample_scenes(count, seed=seed, split="held_out")):
        kind = ("colour", "shape", "background")[n % 3]
        free = [c for c in COLOURS if c not in (scene.colour, scene.background)]
        value = str(rng.choice([s for s in SHAPES if s != scene.shape] if kind == "shape" else free))
        target = scene.edited(**{kind: value})
        name = f"scene-{n:02d}.png"
        Image.fromarray(render(scene)).save(out / name)
        lines.append({"id": f"scene-{n:02d}", "image": name, "source_prompt": scene.caption,
                      "target_prompts": [target.caption], "edit": kind, "scene": scene.to_dict()})
    (out / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    print(f"{count} benchmark scenes in {out}")


if __name__ == "__main__":
    main()
