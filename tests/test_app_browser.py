"""End to end: ``diffinv serve`` on 127.0.0.1 driven by a real headless Chromium through upload -> invert -> two
edits -> download, bad input shown in the page, a second tab that sees nothing of the first and edits the
downloaded record, no request leaving the machine, and nothing written outside the chosen folder.

Needs Debian's chromium + chromium-driver (.ci/run installs them); without them the test is skipped, except
in CI (CI=true), where it fails.
"""

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffinv.app.session import EditSettings, InvertSettings, Studio
from diffinv.data import EXAMPLES
from diffinv.inversion.record import Inversion
from drive import browser_missing, chromium, fetch, free_port, server

STEPS = 10


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def browser_ready():
    why = browser_missing()
    if why and os.environ.get("CI"):
        pytest.fail(f"the browser test must run in CI: {why}")
    if why:
        pytest.skip(why)


def test_upload_invert_edit_twice_download(browser_ready, tmp_path):
    example = json.loads(EXAMPLES.read_text().splitlines()[0])
    image, caption, target = EXAMPLES.parent / example["image"], example["source_prompt"], example["target_prompts"][0]
    folder, home, tmp = tmp_path / "served", tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    port = free_port()
    env = {"HOME": str(home), "TMPDIR": str(tmp), "XDG_CACHE_HOME": str(home / ".cache"), "OMP_NUM_THREADS": "1"}
    with server(folder, port, "--steps", str(STEPS), "--device", "cpu", env=env) as url, chromium(url) as page:
        # bad input first: the page says what is wrong, in one line
        assert page.press("invert", "invert without an image").startswith("Error: no image")
        page.upload("image", image)
        assert "caption is empty" in page.press("invert", "invert without a caption")
        page.type("caption", caption)
        assert page.press("invert", "invert").startswith("Inverted: reconstruction PSNR")

        (source_url,), (recon_url,) = page.image_urls("source"), page.image_urls("reconstruction")
        served = folder / "sessions"
        (run,) = [p for p in served.glob("*/inversion-001")]
        assert np.array_equal(png(fetch(source_url)), png((run / "source.png").read_bytes()))
        assert np.array_equal(png(fetch(recon_url)), png((run / "reconstruction.png").read_bytes()))

        page.type("target", target)
        assert page.press("edit", "edit (prompt)").startswith(f"Edited: {target} (prompt")
        page.choose("editor", "P2P replace")
        assert page.press("edit", "edit (P2P replace)").startswith(f"Edited: {target} (P2P replace")
        page.type("target", "a small red square")
        assert page.press("edit", "P2P replace of other word counts").startswith("Error: ")  # shown, nothing lost

        gallery = page.image_urls("gallery")
        assert len(gallery) == 3  # the source, then the two edits
        shown = [png(fetch(u)) for u in gallery]
        assert np.array_equal(shown[1], png((run / "edit-001.png").read_bytes()))
        assert np.array_equal(shown[2], png((run / "edit-002.png").read_bytes()))
        assert not np.array_equal(shown[0], shown[1]) and not np.array_equal(shown[1], shown[2])

        downloaded = page.download("download-record", ".safetensors")
        record = Inversion.load(downloaded)
        assert record.source_prompt == caption and record.num_steps == STEPS and record.method == "npi"

        # a second tab: its own session, nothing of the first
        first = page.driver.current_window_handle
        page.driver.switch_to.new_window("tab")
        page.driver.get(url)
        page.wait(lambda: page.finds("#edit"), 60, "the second tab")
        page.type("target", target)
        assert "nothing to edit yet" in page.press("edit", "edit in a fresh tab")
        assert page.image_urls("gallery") == []
        # ...which loads the downloaded record and edits it as the first tab did, without inverting again
        page.find("#record-in input[type=file]").send_keys(str(downloaded))
        page.wait(lambda: page.status().startswith("Loaded"), 120, "the record to load")
        page.choose("editor", "P2P replace")
        assert page.press("edit", "edit of a loaded record").startswith(f"Edited: {target} (P2P replace")
        assert np.array_equal(png(fetch(page.image_urls("gallery")[1])), shown[2])
        assert len([p for p in served.iterdir() if p.is_dir()]) == 2  # two tabs, two session folders
        page.driver.close()
        page.driver.switch_to.window(first)
        # a record whose prompt is HTML and Markdown: shown as text, nothing rendered or fetched
        hostile = Inversion.load(downloaded)
        hostile.source_prompt = '<img id="injected" src="/gradio_api/file=/etc/hostname"> ![x](/y.png) **b**'
        hostile.save(tmp_path / "hostile.safetensors")
        page.find("#record-in input[type=file]").send_keys(str(tmp_path / "hostile.safetensors"))
        page.wait(lambda: "hostile.safetensors" in page.status(), 120, "the hostile record to load")
        assert hostile.source_prompt in page.status() and page.finds("#status img, #status a") == []
        assert [e.text for e in page.finds("#status strong")] == [page.status().split("PSNR ")[1].split(" in ")[0]]

        resources = page.resources()
        assert resources and all(r.startswith(url) or r.startswith("data:") or r.startswith("blob:")
                                 for r in resources), [r for r in resources if not r.startswith(url)]
        timings = dict(page.timings)

    # the browser's images are what the same settings give in-process
    studio = Studio(tmp_path / "check", device="cpu")
    session = studio.session("check")
    studio.invert(session, image, caption, InvertSettings(method="NPI", steps=STEPS))
    plain = studio.edit(session, EditSettings(target))
    p2p = studio.edit(session, EditSettings(target, "P2P replace"))
    assert np.array_equal(shown[1], png(plain.image.path.read_bytes()))
    assert np.array_equal(shown[2], png(p2p.image.path.read_bytes()))
    # nothing written outside the chosen folder (the server's home and temporary folders stay empty)
    assert list(home.iterdir()) == [] and list(tmp.iterdir()) == [], (list(home.rglob("*")), list(tmp.rglob("*")))
    print("seconds per action in the browser:", {k: round(v, 2) for k, v in timings.items()})
