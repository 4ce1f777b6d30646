"""The browser editor against a hostile client: it opens only what was uploaded through the page, serves only what
it wrote, loads only the server's models, shows what a client typed literally and no server path, keeps uploads
within limits and for a while only, and asks for a login when told to.

The page's handlers are called as Gradio calls them (their functions, with a path a client could name); the
served folders, the upload limit, the clean-up and the login are checked against a real ``diffinv serve``.
"""

import html
import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffinv.app.guard import (AUTH_ENV, EMBEDDED, MARKER, ModelMenu, Uploads, exposure_warning, plain, read_auth,
                               scrub)
from diffinv.app.session import Studio
from diffinv.backbone import EMBEDDED_MODELS
from diffinv.cli import main
from diffinv.errors import DiffinvError
from diffinv.inversion.record import Inversion

SOURCE, TARGET = "a photo of a cat", "a photo of a dog"
HOSTILE = '<img src="http://127.0.0.2:9/x.png"> ![x](http://127.0.0.2:9/y.png) *bold* [link](http://a)'


def picture(path: Path, size=(40, 32), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def quiet(*args, **kwargs):
    return None


def shown(markdown: str) -> str:
    """What the status box displays of a line of escaped Markdown (its text, marks and entities undone)."""
    return html.unescape(re.sub(r"\\(.)", r"\1", markdown.replace("**", "")))


@pytest.fixture
def page(tmp_path, tiny_model_dir):
    """The page's handlers over a studio serving the tiny model; ``page.invert(...)`` / ``page.load(...)`` call
    them as Gradio does and return (session, status)."""
    from diffinv.app.ui import build

    studio = Studio(tmp_path / "served", device="cpu", models=[str(tiny_model_dir)])
    uploads = Uploads(tmp_path / "served" / ".uploads", max_bytes=1 << 20)
    uploads.folder.mkdir(parents=True)
    blocks = build(studio, uploads, steps=2)
    fns = {f.name: f.fn for f in blocks.fns.values()}

    class Page:
        def invert(self, image, caption=SOURCE, model=tiny_model_dir.name):
            out = fns["on_invert"](None, None if image is None else str(image), caption, model, "NPI", 2, 7.5, 0.7,
                                   progress=quiet)
            return out[0], out[3]

        def load(self, record):
            out = fns["on_load"](None, str(record), progress=quiet)
            return out[0], out[3]

        def edit(self, session, target):
            out = fns["on_edit"](session, target, "none", "", 2.0, "", 0.8, 0.4, 0.5, False, progress=quiet)
            return out[2]

    p = Page()
    p.studio, p.uploads, p.root = studio, uploads, tmp_path
    return p


def sessions_written(page) -> list[Path]:
    root = page.studio.folder / "sessions"
    return [f for f in root.rglob("*") if f.is_file()] if root.exists() else []


def test_handlers_open_only_files_uploaded_through_the_page(page, tmp_path):
    """A client can name any server path as the image or the record; only a regular file inside the upload folder
    is opened, and the refusal names no path (it says the same for a file that exists and one that does not)."""
    private = picture(tmp_path / "srv" / "private.png")
    inside = picture(page.uploads.folder / "abc" / "cat.png")
    (page.uploads.folder / "abc" / "link.png").symlink_to(private)
    picture(page.uploads.folder / ".hidden" / "x.png")
    secret_dir = tmp_path / "srv" / "record.safetensors"
    for path in (private, tmp_path / "srv" / "missing.png", page.uploads.folder / "abc" / "link.png",
                 page.uploads.folder / ".hidden" / "x.png", page.uploads.folder / "abc" / ".." / ".." / "srv" /
                 "private.png", page.uploads.folder):
        session, status = page.invert(path)
        assert shown(status) == "Error: the image was not uploaded through this page: upload it with the image box"
        assert session.record is None
    session, status = page.load(secret_dir)
    assert "record was not uploaded through this page" in shown(status) and session.record is None
    assert sessions_written(page) == []
    session, status = page.invert(inside)
    assert status.startswith("Inverted: reconstruction PSNR") and session.record is not None


def test_a_record_from_outside_the_upload_folder_is_refused_even_when_valid(page, tmp_path):
    session, status = page.invert(picture(page.uploads.folder / "a" / "cat.png"))
    record = session.record_path
    assert record.is_file()
    _, status = page.load(record)  # the server's own record, named by path: not an upload
    assert "record was not uploaded through this page" in shown(status)
    copy = page.uploads.folder / "b" / "cat.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(record.read_bytes())
    loaded, status = page.load(copy)
    assert shown(status).startswith("Loaded cat.safetensors") and loaded.record is not None


def test_uploads_over_the_size_limit_are_refused(page):
    big = page.uploads.folder / "big" / "huge.safetensors"
    big.parent.mkdir()
    big.write_bytes(b"\0" * ((1 << 20) + 1))
    _, status = page.load(big)
    assert "the record is 1.0 MB, over this server's limit of 1 MB (--max_file_size)" in shown(status)


def test_images_and_records_over_max_side_are_refused_before_any_work(page, tmp_path, tiny_model_dir):
    page.studio.max_side = 64
    session, status = page.invert(picture(page.uploads.folder / "w" / "wide.png", size=(80, 40)))
    assert "the image is 80x40 pixels; this server takes at most 64 pixels a side (--max_side)" in shown(status)
    assert session.record is None and page.studio._models == {}  # not even the model was loaded
    page.studio.max_side = 2048
    session, _ = page.invert(picture(page.uploads.folder / "w" / "cat.png"))
    record = Inversion.load(session.record_path)
    record.source_image = torch.zeros(3, 40, 200, dtype=torch.uint8)
    record.save(page.uploads.folder / "w" / "big.safetensors")
    page.studio.max_side = 64
    _, status = page.load(page.uploads.folder / "w" / "big.safetensors")
    assert "record's source image is 200x40 pixels" in shown(status)


def test_a_record_whose_latents_do_not_fit_its_image_is_refused_before_sampling(page, monkeypatch):
    """The issue's 3.7 MB record with oversized latents held the queue for 40 s: now it is refused before any
    sampling (the sampler is never reached)."""
    session, _ = page.invert(picture(page.uploads.folder / "r" / "cat.png"))
    record = Inversion.load(session.record_path)
    c, h, w = record.z0.shape
    record.z0 = torch.zeros(c, 8 * h, 8 * w)
    record.trajectory = torch.zeros(record.trajectory.shape[0], c, 8 * h, 8 * w)
    record.save(page.uploads.folder / "r" / "big-latents.safetensors")
    sampled = []
    monkeypatch.setattr("diffinv.inversion.base.InversionMethod.edit", lambda *a, **k: sampled.append(1))
    loaded, status = page.load(page.uploads.folder / "r" / "big-latents.safetensors")
    assert f"holds {8 * h}x{8 * w} latents for a" in shown(status) and sampled == [] and loaded.record is None


def test_only_the_servers_models_are_loaded_and_the_refusal_reveals_nothing(page, tmp_path, tiny_sdxl_dir):
    """The model box offers the server's models; a client naming another (a folder that exists, one that does
    not, a hub id) gets one message that does not depend on what it named, and nothing is loaded or fetched."""
    image = picture(page.uploads.folder / "m" / "cat.png")
    answers = set()
    for model in (str(tiny_sdxl_dir), str(tmp_path / "nothing-here"), "someone/a-100-GB-model", "../served", ""):
        session, status = page.invert(image, model=model or "  ")
        if model:
            answers.add(status)
            assert session.record is None
    assert len(answers) == 1 and str(tmp_path) not in answers.pop()
    assert list(page.studio._models) == [str(Path(page.studio.models.pretrained(page.studio.models.names[0])))]


def test_model_menu_names_and_values(tiny_model_dir, tmp_path, monkeypatch):
    menu = ModelMenu(["shapes", str(tiny_model_dir), "org/model", str(tiny_model_dir), f"{tmp_path}/../{tmp_path.name}"])
    assert menu.names == ["shapes", tiny_model_dir.name, "org/model", tmp_path.name]
    assert menu.pretrained(tiny_model_dir.name) == str(tiny_model_dir.resolve())
    assert menu.name_of(str(tiny_model_dir)) == tiny_model_dir.name and menu.pretrained("shapes") == "shapes"
    with pytest.raises(DiffinvError, match="does not exist"):
        ModelMenu([str(tmp_path / "nope")])  # the operator's own typo is named
    assert set(EMBEDDED) == set(EMBEDDED_MODELS)
    # an embedded model's name is the embedded model, as on the CLI, even beside a folder of that name
    (tmp_path / "shapes-flow").mkdir()
    monkeypatch.chdir(tmp_path)
    assert ModelMenu(["shapes-flow"]).pretrained("shapes-flow") == "shapes-flow"


def test_what_a_client_typed_is_shown_literally(page, tmp_path):
    """A prompt (here a record's) with HTML and Markdown shows as those characters: no element, no link."""
    session, _ = page.invert(picture(page.uploads.folder / "p" / "cat.png"))
    record = Inversion.load(session.record_path)
    record.source_prompt = HOSTILE
    record.save(page.uploads.folder / "p" / "[x](y) <i>evil.safetensors")
    _, status = page.load(page.uploads.folder / "p" / "[x](y) <i>evil.safetensors")
    assert "<" not in status and "](" not in status and "![" not in status  # no element, no link, no image
    assert shown(status).startswith(f"Loaded [x](y) <i>evil.safetensors ({HOSTILE!r}): reconstruction PSNR")
    assert shown(plain(HOSTILE)) == HOSTILE and plain("a\nb") == "a b"
    edited = page.edit(session, "a photo of a dog <script>x</script>")
    assert "<script>" not in edited and "a photo of a dog <script>x</script>" in shown(edited)


def test_no_message_shows_a_server_path(page, tmp_path):
    notes = page.uploads.folder / "n" / "notes.png"
    notes.parent.mkdir()
    notes.write_text("not a picture")
    _, status = page.invert(notes)
    assert shown(status).startswith("Error: cannot read image notes.png") and str(tmp_path) not in status
    assert scrub("model folder /srv/models/sd15 does not exist") == "model folder sd15 does not exist"
    assert scrub("at C:\\Users\\me\\x.png and http://host/a/b") == "at x.png and http://host/a/b"


def test_auth_comes_from_a_file_or_the_environment_never_the_command_line(tmp_path, monkeypatch):
    monkeypatch.delenv(AUTH_ENV, raising=False)
    assert read_auth(None) is None
    (tmp_path / "users").write_text("# who may log in\nann:s3cr:et\n\nbob:pw\n")
    assert read_auth(str(tmp_path / "users")) == [("ann", "s3cr:et"), ("bob", "pw")]
    monkeypatch.setenv(AUTH_ENV, "cid:pw")
    assert read_auth(None) == [("cid", "pw")]
    with pytest.raises(DiffinvError, match="not the password itself"):
        read_auth("ann:secret")
    (tmp_path / "bad").write_text("no-colon\n")
    with pytest.raises(DiffinvError, match="entry 1 is not user:password"):
        read_auth(str(tmp_path / "bad"))


def test_a_server_others_can_reach_warns(monkeypatch, tmp_path, capsys):
    assert exposure_warning("127.0.0.1", False) is None and exposure_warning("localhost", False) is None
    assert exposure_warning("::1", False) is None
    assert "without a login" in exposure_warning("0.0.0.0", False)
    assert "plain HTTP" in exposure_warning("192.168.1.5", True)
    started = {}
    monkeypatch.setattr("diffinv.app.ui.serve", lambda *a, **k: started.update(args=a, kw=k))
    monkeypatch.delenv(AUTH_ENV, raising=False)
    main(["serve", "--host", "0.0.0.0", "--output_dir", str(tmp_path / "s"), "--allow_model", "org/m"])
    err = capsys.readouterr().err
    assert err.startswith("diffinv: warning: --host 0.0.0.0 exposes the page to the network without a login")
    assert started["args"][3] == ["shapes", "org/m"] and started["kw"]["auth"] is None
    (tmp_path / "users").write_text("ann:pw\n")
    main(["serve", "--host", "127.0.0.1", "--auth", str(tmp_path / "users"), "--output_dir", str(tmp_path / "s")])
    assert capsys.readouterr().err == "" and started["kw"]["auth"] == [("ann", "pw")]


@pytest.mark.parametrize("args, expected", [
    (["--auth", "ann:secret"], "not the password itself"),
    (["--model", "/no/such/model"], "model folder /no/such/model does not exist"),
    (["--max_file_size", "0"], "--max_file_size must be a positive number"),
    (["--upload_ttl", "0"], "--upload_ttl must be >= 1"),
    (["--output_dir", ""], "--output_dir is empty"),
])
def test_serve_refuses_bad_settings_in_one_line(args, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "environ", os.environ.copy())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["serve", "--output_dir", str(tmp_path / "s"), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and expected in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_serve_refuses_a_folder_it_would_serve_or_empty_but_did_not_make(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "environ", os.environ.copy())
    (tmp_path / "sessions").mkdir()
    (tmp_path / "sessions" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["serve", "--output_dir", str(tmp_path), "--port", "0"])
    assert e.value.code == 2 and "sessions exists and was not made by diffinv serve" in capsys.readouterr().err
    assert (tmp_path / "sessions" / "notes.txt").read_text() == "mine"


def http(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def multipart(name: str, content: bytes) -> tuple[bytes, dict]:
    boundary = "diffinvtestboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_the_server_serves_only_what_it_wrote_and_keeps_uploads_small_and_short_lived(tmp_path):
    """A real ``diffinv serve`` over a folder holding the user's dotfiles: they are not served; an upload over
    --max_file_size is refused; an upload is deleted --upload_ttl seconds after it came; uploads an earlier server
    left are removed at start; results in the sessions folder stay."""
    from drive import free_port, server

    folder = tmp_path / "home"
    (folder / ".ssh").mkdir(parents=True)
    (folder / ".ssh" / "id_rsa").write_text("PRIVATE KEY")
    (folder / ".env").write_text("TOKEN=1")
    (folder / "photo.png").write_bytes(picture(tmp_path / "p.png").read_bytes())
    (folder / ".uploads").mkdir()
    (folder / ".uploads" / MARKER).touch()
    (folder / ".uploads" / "old").mkdir()
    (folder / ".uploads" / "old" / "left.png").write_bytes(b"x")
    (folder / "sessions").mkdir()
    (folder / "sessions" / MARKER).touch()
    (folder / "sessions" / "earlier").mkdir()
    (folder / "sessions" / "earlier" / "edit-001.png").write_bytes(picture(tmp_path / "e.png").read_bytes())
    env = {"HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    with server(folder, free_port(), "--max_file_size", "0.5", "--upload_ttl", "2", "--device", "cpu",
                env=env) as url:
        for path in (folder / ".env", folder / ".ssh" / "id_rsa", folder / "photo.png",
                     folder / "sessions" / ".." / ".env"):
            assert http(f"{url}gradio_api/file={path}")[0] == 403, path
        assert http(f"{url}gradio_api/file={folder / 'sessions' / 'earlier' / 'edit-001.png'}")[0] == 200
        assert not (folder / ".uploads" / "old").exists()  # an earlier server's uploads are gone
        status, body = http(f"{url}gradio_api/upload", *multipart("big.bin", b"\0" * (600 << 10)))
        assert status == 413, body
        status, body = http(f"{url}gradio_api/upload", *multipart("cat.png", b"\x89PNG small"))
        assert status == 200, body
        (uploaded,) = [Path(p) for p in json.loads(body)]
        assert uploaded.is_file() and folder / ".uploads" in uploaded.parents
        deadline = time.monotonic() + 30
        while uploaded.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not uploaded.exists()  # deleted after --upload_ttl
    assert (folder / ".env").read_text() == "TOKEN=1" and (folder / "sessions" / "earlier" / "edit-001.png").exists()


def test_with_auth_nothing_answers_before_a_login(tmp_path):
    from drive import free_port, server

    (tmp_path / "users").write_text("ann:correct horse\n")
    folder = tmp_path / "served"
    with server(folder, free_port(), "--auth", str(tmp_path / "users"), "--device", "cpu",
                env={"HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}) as url:
        marker = folder / "sessions" / MARKER
        assert http(f"{url}config")[0] == 401
        assert http(f"{url}gradio_api/file={marker}")[0] == 401
        assert http(f"{url}gradio_api/upload", *multipart("x.png", b"x"))[0] == 401
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        assert http(f"{url}login", b"username=ann&password=wrong", form)[0] == 400
        request = urllib.request.Request(f"{url}login", data=b"username=ann&password=correct+horse", headers=form)
        with urllib.request.urlopen(request, timeout=30) as r:
            cookie = "; ".join(c.split(";")[0] for c in r.headers.get_all("set-cookie"))
        assert http(f"{url}config", headers={"Cookie": cookie})[0] == 200
