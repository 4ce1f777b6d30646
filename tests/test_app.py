"""The browser editor's functions (diffinv.app.session), without a browser: same results as the CLI, one-line
errors, sessions that share nothing, records that round-trip, ProxNPI masks, progress."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffinv.app.session import EDITORS, EditSettings, InvertSettings, Studio, build_editor, split_words
from diffinv.cli import main
from diffinv.editing.prompt_to_prompt import PromptToPrompt
from diffinv.editing.sdedit import SDEdit
from diffinv.errors import DiffinvError
from diffinv.inversion.record import Inversion

REPO = Path(__file__).resolve().parents[1]
SOURCE, TARGET, OTHER = "a photo of a cat", "a photo of a dog", "a photo of a red car"


def picture(path: Path, seed: int = 0, size=(40, 32)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture
def studio(tmp_path, tiny_model_dir):
    return Studio(tmp_path / "served", device="cpu", models=[str(tiny_model_dir), "shapes"])


@pytest.fixture
def settings(tiny_model_dir):
    return InvertSettings(model=str(tiny_model_dir), method="NPI", steps=4)


def test_edits_equal_the_clis(studio, settings, tiny_model_dir, tmp_path):
    """Invert once in the app, edit twice (plain and P2P replace): each image equals ``diffinv predict``'s."""
    image = picture(tmp_path / "cat.png")
    session = studio.session("a")
    done = studio.invert(session, image, SOURCE, settings)
    plain = studio.edit(session, EditSettings(TARGET))
    p2p = studio.edit(session, EditSettings(TARGET, "P2P replace"))
    assert done.psnr > 5 and done.record.is_file()
    for config, edited in (("npi.yaml", plain), ("edit_p2p_replace.yaml", p2p)):
        out = tmp_path / config
        try:
            main(["predict", "-c", str(REPO / "configs" / config), "--data.image", str(image), "--data.source_prompt",
                  SOURCE, "--data.target_prompts", json.dumps([TARGET]), "--model.backbone.pretrained",
                  str(tiny_model_dir), "--model.num_inference_steps", "4", "--trainer.accelerator", "cpu",
                  "--output_dir", str(out)])
        except SystemExit as e:
            assert e.code in (0, None)
        item = next(p for p in out.iterdir() if (p / "edit-0.png").is_file())
        assert np.array_equal(pixels(edited.image.path), pixels(item / "edit-0.png")), config
        assert np.array_equal(pixels(done.reconstruction.path), pixels(item / "reconstruction.png"))
        assert np.array_equal(pixels(done.source.path), pixels(item / "source.png"))
    assert plain.image.path != p2p.image.path and not np.array_equal(pixels(plain.image.path), pixels(p2p.image.path))


def test_an_edit_does_not_depend_on_the_edits_before_it(studio, settings, tmp_path):
    image = picture(tmp_path / "cat.png")
    first, second = studio.session("first"), studio.session("second")
    studio.invert(first, image, SOURCE, settings)
    studio.invert(second, image, SOURCE, settings)
    alone = studio.edit(first, EditSettings(TARGET, "P2P refine"))
    studio.edit(second, EditSettings(OTHER, "SDEdit", sdedit_strength=0.8))
    studio.edit(second, EditSettings("a photo of a red dog", "P2P reweight", reweight_words="red"))
    after = studio.edit(second, EditSettings(TARGET, "P2P refine"))
    assert np.array_equal(pixels(alone.image.path), pixels(after.image.path))
    assert len(second.gallery()) == 4 and len(first.gallery()) == 2  # the source, then each edit


def test_sessions_share_nothing_and_write_only_in_the_folder(studio, settings, tmp_path):
    a, b = studio.session("tab-a"), studio.session("tab-b")
    studio.invert(a, picture(tmp_path / "one.png", 1), SOURCE, settings)
    studio.invert(b, picture(tmp_path / "two.png", 2), "a photo of a dog", settings)
    studio.edit(a, EditSettings(TARGET))
    assert a.folder != b.folder and a.record is not b.record
    assert a.record.source_prompt == SOURCE and b.record.source_prompt == "a photo of a dog"
    assert [p.name for p in b.files()] == ["inversion.safetensors", "reconstruction.png", "source.png"]
    assert "edit-001.png" in [p.name for p in a.files()]
    assert all(studio.folder in p.parents for s in (a, b) for p in s.files())
    # a second inversion in a session never overwrites the first one's files
    first_run = a.run
    studio.invert(a, picture(tmp_path / "three.png", 3), SOURCE, settings)
    assert a.run != first_run and (first_run / "edit-001.png").is_file() and a.edits == []


def test_a_saved_record_edits_as_before(studio, settings, tmp_path):
    session = studio.session("saver")
    done = studio.invert(session, picture(tmp_path / "cat.png"), SOURCE, settings)
    edited = studio.edit(session, EditSettings(TARGET, "P2P replace"))
    later = studio.session("later")
    loaded = studio.load_record(later, done.record)
    again = studio.edit(later, EditSettings(TARGET, "P2P replace"))
    assert np.array_equal(pixels(again.image.path), pixels(edited.image.path))
    assert np.array_equal(pixels(loaded.reconstruction.path), pixels(done.reconstruction.path))
    assert loaded.psnr == pytest.approx(done.psnr) and later.settings.method == "NPI"


@pytest.mark.parametrize("method", ["NTI", "latent-TOP"])
def test_optimizing_methods_report_progress(studio, settings, tmp_path, method):
    seen = []
    session = studio.session("opt")
    settings = InvertSettings(settings.model, method, 3)
    done = studio.invert(session, picture(tmp_path / "cat.png"), SOURCE, settings,
                         progress=lambda f, what: seen.append((f, what)))
    assert Inversion.load(done.record).unconditional is not None
    whats = [w.split(":")[0] for _, w in seen]
    assert {"inverting", "optimising", "sampling"} <= set(whats)
    assert whats.index("inverting") < whats.index("optimising") < whats.index("sampling")
    assert seen[-1] == (1.0, "done") and all(0 <= f <= 1 for f, _ in seen)
    assert studio.edit(session, EditSettings(TARGET)).image.path.is_file()


def test_progress_follows_a_flux_models_fractional_timesteps(tmp_path, tiny_flux_dir):
    """FLUX's transformer sees t / 1000 and its timesteps are fractional: the steps are counted from the schedule's
    own timesteps, every one of them, in each phase."""
    studio = Studio(tmp_path / "served", device="cpu", models=[str(tiny_flux_dir)])
    seen = []
    studio.invert(studio.session("flux"), picture(tmp_path / "cat.png", size=(32, 32)), SOURCE,
                  InvertSettings(str(tiny_flux_dir), "NPI", 3), progress=lambda f, what: seen.append(what))
    for phase in ("inverting", "sampling"):
        assert [w.split(": ")[1] for w in seen if w.startswith(phase)][-3:] == ["step 1/3", "step 2/3", "step 3/3"]


def test_proxnpi_shows_its_edit_mask(studio, settings, tmp_path):
    session = studio.session("prox")
    studio.invert(session, picture(tmp_path / "cat.png"), SOURCE, InvertSettings(settings.model, "ProxNPI", 4,
                                                                                  quantile=0.7))
    edited = studio.edit(session, EditSettings(TARGET, show_mask=True))
    mask = pixels(edited.mask.path)
    assert mask.shape == pixels(edited.image.path).shape
    assert 0 < mask.mean() < 255  # some of the image edited, not all of it
    assert [p.caption for p in session.gallery()][-1].startswith("edit mask")
    assert studio.edit(session, EditSettings(TARGET)).mask is None  # only when asked
    npi = studio.session("npi")
    studio.invert(npi, picture(tmp_path / "cat.png"), SOURCE, settings)
    assert studio.edit(npi, EditSettings(TARGET, show_mask=True)).mask is None  # NPI has no mask


def test_editor_settings():
    assert build_editor(EditSettings(TARGET)) is None
    p2p = build_editor(EditSettings(TARGET, "P2P reweight", reweight_words="red, big", reweight_scale=3,
                                    blend_words="cat dog"))
    assert isinstance(p2p, PromptToPrompt) and p2p.reweight_words == ["red", "big"] and p2p.reweight_scale == 3
    assert p2p.local_blend_words == ["cat", "dog"] and p2p.mode == "refine"
    assert build_editor(EditSettings(TARGET, "P2P replace")).mode == "replace"
    assert isinstance(build_editor(EditSettings(TARGET, "SDEdit", sdedit_strength=0.3)), SDEdit)
    assert split_words(" a,b  c ") == ["a", "b", "c"] and EDITORS[0] == "none"


@pytest.mark.parametrize("case, expected", [
    ("no image", "no image"),
    ("not an image", "not an image file or corrupt"),
    ("empty caption", "the caption is empty"),
    ("unknown method", "unknown method 'XYZ'"),
    ("zero steps", "steps must be a whole number in [1, 1000]"),
    ("steps not a number", "steps must be a number, got 'ten'"),
    ("model not offered", "that model is not offered by this server (it offers: "),
    ("panorama", "over --data.max_aspect"),
])
def test_bad_inversions_say_what_is_wrong(studio, settings, tmp_path, case, expected):
    image = picture(tmp_path / "cat.png")
    caption, s = SOURCE, settings
    if case == "no image":
        image = None
    elif case == "not an image":
        image = tmp_path / "notes.png"
        image.write_text("not a picture")
    elif case == "empty caption":
        caption = "  "
    elif case == "unknown method":
        s = InvertSettings(settings.model, "XYZ", 4)
    elif case == "zero steps":
        s = InvertSettings(settings.model, "NPI", 0)
    elif case == "steps not a number":
        s = InvertSettings(settings.model, "NPI", "ten")
    elif case == "model not offered":
        s = InvertSettings(str(tmp_path / "no-such-model"), "NPI", 4)
    elif case == "panorama":
        image = picture(tmp_path / "wide.png", size=(200, 20))
    session = studio.session("bad")
    with pytest.raises(DiffinvError, match=re.escape(expected)):
        studio.invert(session, image, caption, s)
    assert session.record is None and not session.folder.exists()  # nothing written


def test_bad_edits_say_what_is_wrong(studio, settings, tmp_path):
    session = studio.session("edits")
    with pytest.raises(DiffinvError, match="invert an image"):
        studio.edit(session, EditSettings(TARGET))
    studio.invert(session, picture(tmp_path / "cat.png"), SOURCE, settings)
    for edit, expected in [
        (EditSettings(""), "the target prompt is empty"),
        (EditSettings("a photo of a red dog", "P2P replace"), "word"),
        (EditSettings(TARGET, "P2P reweight"), "needs the words"),
        (EditSettings(TARGET, "SDEdit", sdedit_strength=0), "strength"),
        (EditSettings(TARGET, "cartoon"), "unknown editor"),
    ]:
        with pytest.raises(DiffinvError, match=expected):
            studio.edit(session, edit)
    assert not list(session.run.glob("edit-*"))  # nothing written by a refused edit


def test_bad_records_say_what_is_wrong(studio, tmp_path):
    session = studio.session("records")
    corrupt = tmp_path / "broken.safetensors"
    corrupt.write_bytes(b"\x00" * 100)
    with pytest.raises(DiffinvError, match="corrupt or not a safetensors file"):
        studio.load_record(session, corrupt)
    with pytest.raises(DiffinvError, match="no record"):
        studio.load_record(session, None)
    assert session.record is None


def test_a_record_of_a_model_the_server_does_not_offer(studio, settings, tmp_path):
    """A record names its model; the server loads it only if it is one of its own, and says the same whatever
    the record names (a folder that exists, one that does not, a hub id): nothing about the server leaks."""
    session = studio.session("gone")
    done = studio.invert(session, picture(tmp_path / "cat.png"), SOURCE, settings)
    seen = set()
    for model in (str(tmp_path / "deleted-model"), str(tmp_path), "someone/huge-model", "../served"):
        record = Inversion.load(done.record)
        record.model = model
        record.save(tmp_path / "moved.safetensors")
        with pytest.raises(DiffinvError, match="not offered by this server") as e:
            studio.load_record(studio.session("other"), tmp_path / "moved.safetensors")
        seen.add(str(e.value))
    assert len(seen) == 1 and str(tmp_path) not in seen.pop()
    assert list(studio._models) == [str(Path(settings.model).resolve())]  # nothing else was loaded


def test_models_are_loaded_once_and_dropped_beyond_the_limit(studio, settings, tiny_model_dir):
    first = studio.backbone(settings.model)
    assert studio.backbone(tiny_model_dir.name) is first  # by the name the page shows, or by value
    studio.backbone("shapes")  # max_models 1: the tiny model is dropped
    assert list(studio._models) == ["shapes"]
    assert isinstance(first.unet, torch.nn.Module)


def test_serve_without_gradio_says_what_to_install(monkeypatch, tmp_path, capsys):
    import os
    import sys

    monkeypatch.setattr(os, "environ", os.environ.copy())  # serve() sets Gradio's and matplotlib's folders
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if the app extra were not installed
    with pytest.raises(SystemExit) as e:
        main(["serve", "--output_dir", str(tmp_path / "served"), "--port", "0"])
    assert e.value.code == 2
    assert "diffinv serve needs Gradio: pip install 'diffinv[app]'" in capsys.readouterr().err
    assert not (tmp_path / "served").exists()  # nothing written


@pytest.mark.parametrize("args, expected", [(["--port", "70000"], "--port must be in [0, 65535]"),
                                            (["--steps", "0"], "--steps must be >= 1"),
                                            (["--host"], "expected one argument")])
def test_serve_options_are_checked(args, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--output_dir", str(tmp_path / "served"), *args])
    assert e.value.code == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "served").exists()


def test_the_page_shows_errors_in_one_line():
    from diffinv.app.ui import message, status_line

    assert message(DiffinvError("image x.png does not exist")) == "image x.png does not exist"
    assert message(KeyError("/srv/secret/oops")) == "internal error (KeyError); the server's log has the details"
    assert status_line(error="bad") == "**Error:** bad"
    assert status_line("done", warnings=["long prompt"]) == "done\n\n*Warning:* long prompt"


def test_every_button_waits_in_one_queue_of_one(studio, tmp_path):
    """One request at a time on the device: every event that runs a model shares one concurrency group of 1."""
    from diffinv.app.guard import Uploads
    from diffinv.app.ui import QUEUE, build

    page = build(studio, Uploads(tmp_path / "uploads"))
    events = list(page.fns.values())
    assert {f.name for f in events} == {"on_invert", "on_load", "on_edit"}
    assert {f.concurrency_id for f in events} == {QUEUE}
    assert {f.concurrency_limit for f in events} == {"default"} and page._queue.default_concurrency_limit == 1


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_the_page_works_on_every_family(family, tiny_sdxl_dir, tiny_sd3_dir, tiny_flux_dir, tmp_path):
    model = str({"sdxl": tiny_sdxl_dir, "sd3": tiny_sd3_dir, "flux": tiny_flux_dir}[family])
    studio = Studio(tmp_path / "served", device="cpu", models=[model])
    session = studio.session(family)
    done = studio.invert(session, picture(tmp_path / "cat.png", size=(32, 32)), SOURCE,
                         InvertSettings(model, "NPI", 4))
    assert done.psnr > 5
    assert studio.edit(session, EditSettings(TARGET, "SDEdit")).image.path.is_file()
    p2p = studio.edit(session, EditSettings(TARGET, "P2P replace"))  # joint attention on SD 3 and FLUX too
    assert p2p.image.path.is_file()
