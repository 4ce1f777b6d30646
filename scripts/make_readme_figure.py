"""A picture of a diffinv run for the README: one row per item (source, reconstruction, edits), with prompts.

    diffinv predict -c configs/edit_p2p_replace.yaml --output_dir outputs/readme
    python scripts/make_readme_figure.py outputs/readme docs/editing.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

CELL, SCALE, TEXT_H = 128, 4, 14


def main(run_dir: str, out: str) -> None:
    run = Path(run_dir)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    items: dict[str, list[dict]] = {}
    for line in lines:
        items.setdefault(line["id"], []).append(line)
    cols = 1 + max(len(v) for v in items.values())
    sheet = Image.new("RGB", (cols * CELL, len(items) * (CELL + 2 * TEXT_H)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (item, rows) in enumerate(items.items()):
        y = r * (CELL + 2 * TEXT_H)
        cells = [("source", run / item / "source.png", rows[0]["source_prompt"])]
        cells += [(x["kind"] + (f" {x['psnr']:.1f} dB" if x["kind"] == "reconstruction" else ""),
                   run / x["image_path"], x["target_prompt"] or "") for x in rows]
        for c, (label, path, prompt) in enumerate(cells):
            img = Image.open(path).convert("RGB")
            sheet.paste(img.resize((img.width * SCALE, img.height * SCALE), Image.Resampling.NEAREST).resize((CELL, CELL)),
                        (c * CELL, y))
            draw.text((c * CELL + 2, y + CELL), label, fill="black")
            short = " ".join(w for w in prompt.split() if w not in ("a", "on", "background"))
            draw.text((c * CELL + 2, y + CELL + TEXT_H - 2), short, fill="gray")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
