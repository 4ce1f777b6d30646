"""The README's picture of the browser editor, and the seconds each action takes there.

Starts ``diffinv serve`` on 127.0.0.1 (embedded model, CPU, one thread), drives headless Chromium through upload ->
invert -> two edits (a plain prompt edit, then Prompt-to-Prompt replace), saves a screenshot and prints the
seconds per action as the browser saw them (click to result shown):

    python scripts/screenshot_app.py docs/app.png [--method NPI] [--steps 50] [--example 0]

Needs chromium + chromium-driver (apt-get) and Selenium (pip install -e ".[test]").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from diffinv.data import EXAMPLES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the Selenium driver lives with the tests
from drive import browser_missing, chromium, free_port, server  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--method", default="NPI", help="DDIM, NPI, ProxNPI, NTI or latent-TOP")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--example", type=int, default=0, help="which bundled example (captions.jsonl line)")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    args = parser.parse_args(argv)
    why = browser_missing()
    if why:
        sys.exit(f"screenshot_app: {why}")
    example = json.loads(EXAMPLES.read_text().splitlines()[args.example])
    target = example["target_prompts"][0]
    with tempfile.TemporaryDirectory(prefix="diffinv-serve-") as tmp:
        env = {"OMP_NUM_THREADS": str(args.threads)}
        with server(Path(tmp), free_port(), "--steps", str(args.steps), "--device", "cpu", env=env) as url, \
                chromium(url, height=1400) as page:
            page.upload("image", EXAMPLES.parent / example["image"])
            page.type("caption", example["source_prompt"])
            if args.method != "NPI":
                page.choose("method", args.method)
            shown = [page.press("invert", f"invert ({args.method}, {args.steps} steps)")]
            page.type("target", target)
            shown.append(page.press("edit", "edit (prompt)"))
            page.choose("editor", "P2P replace")
            shown.append(page.press("edit", "edit (P2P replace)"))
            failed = [s for s in shown if s.startswith("Error")]
            if failed:
                sys.exit(f"screenshot_app: the page said {failed[0]!r}")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(args.out)
            timings = dict(page.timings)
    print(f"wrote {args.out}")
    print("| action | seconds (click to result shown) |\n|---|---|")
    for name, seconds in timings.items():
        print(f"| {name} | {seconds:.2f} |")
    return timings


if __name__ == "__main__":
    main()
