"""The Gradio page of ``diffinv serve``: upload, caption, Invert; then edits by typing; downloads; saved records.

Every handler is a thin wrapper over :class:`diffinv.app.session.Studio`: it turns a problem into one line shown
in the page (the ``status`` box), never a traceback. All events share one queue of one worker, so a single request
runs on the device at a time; each browser tab has its own :class:`Session` (``gr.State``) and sub-folder.
Every client may be hostile (:mod:`diffinv.app.guard`): the handlers open only files uploaded through the page,
load only the server's models, escape what a client typed and show no server path.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DiffinvError
from .guard import (SESSIONS, UPLOADS, Uploads, clear_uploads, exposure_warning, own_folder, plain, read_auth,
                    scrub)

if TYPE_CHECKING:  # the session module imports torch and Lightning: only after prepare_environment
    from .session import Inverted, Session, Studio

log = logging.getLogger("diffinv.serve")
CSS = """
#source img, #reconstruction img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#gallery img { image-rendering: pixelated; }
"""
"""Small images (the embedded model's are 32 px) shown large and sharp."""
QUEUE = "device"
"""The one concurrency group of every event that runs a model: one request at a time."""


def prepare_environment(folder: Path) -> None:
    """Before Gradio is imported: no analytics or version calls, and its uploads (and matplotlib's font cache,
    which Gradio's import builds) kept inside ``folder`` (the upload folder is always ``folder/.uploads``: the
    handlers accept files from there alone)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(folder / UPLOADS)
    os.environ.setdefault("MPLCONFIGDIR", str(folder / ".cache" / "matplotlib"))
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def message(e: BaseException) -> str:
    """The one line the page shows for an error, with no absolute server path in it."""
    from ..errors import one_line

    text = one_line(e)
    if text is None:  # a bug, not the user's input: keep the traceback in the server's log
        log.error("%s", "".join(traceback.format_exception(e)))
        text = f"internal error ({type(e).__name__}); the server's log has the details"
    return scrub(text)


def status_line(ok: str | None = None, error: str | None = None, warnings: list[str] | None = None) -> str:
    """The status box's Markdown: ``ok`` is the page's own (already escaped), the error and warnings are shown
    literally."""
    lines = [f"**Error:** {plain(error)}" if error else f"{ok}"]
    lines += [f"*Warning:* {plain(scrub(w))}" for w in warnings or []]
    return "\n\n".join(lines)


def build(studio: Studio, uploads: Uploads, steps: int = 50, upload_ttl: int = 3600):
    """The page (a ``gr.Blocks``) over ``studio``: its models are offered, the first is the form's default;
    ``steps`` is the form's default step count. Handlers open only files in ``uploads``; Gradio deletes each
    upload (and its own copies of the results) ``upload_ttl`` seconds after it was made."""
    import gradio as gr

    from .session import EDITORS, METHODS, EditSettings, InvertSettings

    def own(session: Session | None) -> Session:
        """This tab's session: made on its first request, with a folder of its own."""
        return session if session is not None else studio.session(uuid.uuid4().hex)

    def gallery(session: Session):
        return [(str(p.path), p.caption) for p in session.gallery()]

    def files(session: Session):
        return [str(p) for p in session.files()] or None

    def shown(session: Session, done: Inverted, what: str):
        return (session, str(done.source.path), str(done.reconstruction.path),
                status_line(f"{what}: reconstruction PSNR **{done.psnr:.2f} dB** in {done.reconstruction.seconds:.1f} s "
                            f"({plain(session.settings.method)}, {session.record.num_steps} steps, model "
                            f"{plain(session.settings.model)})", warnings=done.warnings),
                gallery(session), files(session), gr.update(value=str(done.record), interactive=True))

    def failed(session, e):
        return (session, gr.skip(), gr.skip(), status_line(error=message(e)), gr.skip(), gr.skip(), gr.skip())

    def on_invert(session, image, caption, model_id, method, n, scale, quantile,
                  progress=gr.Progress()):
        session = own(session)
        try:
            image = uploads.accept(image, "image")
            done = studio.invert(session, image, caption, InvertSettings(model_id, method, n, scale, quantile),
                                 progress=lambda f, what: progress(f, desc=what))
        except Exception as e:  # noqa: BLE001 - shown in the page as one line
            return failed(session, e)
        return shown(session, done, "Inverted")

    def on_load(session, record, progress=gr.Progress()):
        session = own(session)
        if record is None:
            return (session, *[gr.skip()] * 6)
        try:
            record = uploads.accept(record, "record")
            done = studio.load_record(session, record, progress=lambda f, what: progress(f, desc=what))
        except Exception as e:  # noqa: BLE001
            return failed(session, e)
        return shown(session, done, f"Loaded {plain(Path(record).name)} ({plain(repr(session.record.source_prompt))})")

    def on_edit(session, target, editor, words, scale, blend, cross, self_steps, strength, show_mask,
                progress=gr.Progress()):
        session = own(session)
        try:
            done = studio.edit(session, EditSettings(target, editor, words, scale, blend, cross, self_steps, strength,
                                                     show_mask), progress=lambda f, what: progress(f, desc=what))
        except Exception as e:  # noqa: BLE001
            return session, gr.skip(), status_line(error=message(e)), gr.skip()
        return (session, gallery(session),
                status_line(f"Edited: *{plain(done.image.caption)}*", warnings=done.warnings), files(session))

    cleanup = (max(1, min(600, upload_ttl // 2)), max(1, upload_ttl))
    with gr.Blocks(title="diffinv: invert once, edit by typing", delete_cache=cleanup) as page:
        session = gr.State(None)
        gr.Markdown("## diffinv: invert a photo once, then edit it by typing\n"
                    "Upload an image and its caption, pick a model and a method, press **Invert**; then type target "
                    "prompts and press **Edit** as often as you like. Your images, records and edits are kept on "
                    "the server, in a folder of this tab's own.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.File(label="Image (PNG, JPEG, WebP, TIFF, ...)", file_types=["image"], elem_id="image")
                caption = gr.Textbox(label="Caption of the image (the source prompt)", elem_id="caption")
                with gr.Row():
                    model_id = gr.Dropdown(studio.models.names, value=studio.models.names[0], label="Model",
                                           allow_custom_value=False, elem_id="model")
                    method = gr.Dropdown(list(METHODS), value="NPI", label="Method", elem_id="method")
                with gr.Row():
                    n = gr.Number(steps, label="Steps", precision=0, minimum=1, maximum=1000, elem_id="steps")
                    scale = gr.Number(7.5, label="Guidance scale", minimum=0, maximum=100, elem_id="scale")
                    quantile = gr.Slider(0, 1, 0.7, step=0.05, label="ProxNPI quantile", elem_id="quantile")
                invert = gr.Button("Invert", variant="primary", elem_id="invert")
                record_in = gr.File(label="...or load a saved inversion record (.safetensors)",
                                    file_types=[".safetensors"], elem_id="record-in")
            with gr.Column(scale=1):
                with gr.Row():
                    source = gr.Image(label="Source", type="filepath", interactive=False, elem_id="source",
                                      format="png", height=280)
                    reconstruction = gr.Image(label="Reconstruction", type="filepath", interactive=False,
                                              elem_id="reconstruction", format="png", height=280)
                status = gr.Markdown("Upload an image to start.", elem_id="status")
                download = gr.DownloadButton("Download the inversion record", interactive=False,
                                             elem_id="download-record")
                outputs = gr.File(label="Files (record and images)", file_count="multiple", interactive=False,
                                  elem_id="files")
        gr.Markdown("### Edit")
        with gr.Row():
            target = gr.Textbox(label="Target prompt", scale=3, elem_id="target")
            editor = gr.Dropdown(list(EDITORS), value="none", label="Editor", scale=1, elem_id="editor")
            edit = gr.Button("Edit", variant="primary", scale=1, elem_id="edit")
        with gr.Accordion("Editor settings", open=False):
            with gr.Row():
                words = gr.Textbox(label="P2P reweight: words", elem_id="reweight-words")
                reweight = gr.Number(2.0, label="P2P reweight: scale", elem_id="reweight-scale")
                blend = gr.Textbox(label="P2P local blend: words (source and target)", elem_id="blend-words")
            with gr.Row():
                cross = gr.Slider(0, 1, 0.8, step=0.05, label="P2P cross-attention steps", elem_id="cross")
                self_steps = gr.Slider(0, 1, 0.4, step=0.05, label="P2P self-attention steps", elem_id="self")
                strength = gr.Slider(0.05, 1, 0.5, step=0.05, label="SDEdit strength", elem_id="strength")
                show_mask = gr.Checkbox(False, label="ProxNPI: show the edit mask", elem_id="show-mask")
        shelf = gr.Gallery(label="Source and edits", columns=6, fit_columns=False, height=300, object_fit="contain",
                           format="png",
                           elem_id="gallery")

        after = [session, source, reconstruction, status, shelf, outputs, download]
        invert.click(on_invert, [session, image, caption, model_id, method, n, scale, quantile], after,
                     concurrency_id=QUEUE)
        record_in.upload(on_load, [session, record_in], after, concurrency_id=QUEUE)
        edit_inputs = [session, target, editor, words, reweight, blend, cross, self_steps, strength, show_mask]
        edit.click(on_edit, edit_inputs, [session, shelf, status, outputs], concurrency_id=QUEUE)
        target.submit(on_edit, edit_inputs, [session, shelf, status, outputs], concurrency_id=QUEUE)
    page.queue(default_concurrency_limit=1)
    return page


def serve(folder: str | Path, host: str = "127.0.0.1", port: int = 7860, models: list[str] | tuple[str, ...] = ("shapes",),
          steps: int = 50, device: str = "auto", max_models: int = 1, block: bool = True,
          auth: list[tuple[str, str]] | None = None, max_file_size_mb: float = 64, upload_ttl: int = 3600,
          max_side: int = 2048):
    """Start the page on ``host:port`` (``port`` 0: a free one); returns the running ``gr.Blocks``.

    ``models`` are the only models it loads (the first is the form's default). Gradio serves the sessions' folder
    alone (never ``folder`` itself), takes uploads up to ``max_file_size_mb`` and deletes them ``upload_ttl``
    seconds after they were made (and any left by an earlier server at start); ``auth`` is Gradio's login."""
    from .guard import ModelMenu

    folder = Path(folder).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise DiffinvError(f"--output_dir {folder.name} is an existing file, not a folder")
    ModelMenu(models)  # a model the server cannot offer is refused before anything is written
    prepare_environment(folder)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise DiffinvError("diffinv serve needs Gradio: pip install 'diffinv[app]'") from None
    folder.mkdir(parents=True, exist_ok=True)
    uploads, sessions = own_folder(folder / UPLOADS), own_folder(folder / SESSIONS)
    if clear_uploads(uploads):
        log.info("removed the uploads an earlier server left in %s", uploads)
    from .session import Studio

    studio = Studio(folder, device=device, max_models=max_models, models=models, max_side=max_side)
    page = build(studio, Uploads(uploads, int(max_file_size_mb * 2**20)), steps=steps, upload_ttl=upload_ttl)
    page.launch(server_name=host, server_port=port or None, share=False, inbrowser=False, ssr_mode=False,
                allowed_paths=[str(sessions)], max_file_size=int(max_file_size_mb * 2**20), auth=auth,
                prevent_thread_lock=not block, show_error=False, quiet=False, footer_links=[], css=CSS)
    return page


def main(argv: list[str]) -> None:
    """``diffinv serve [--host H] [--port N] [--output_dir DIR] [--model M] [--allow_model M ...] [--auth FILE]
    [--steps N] [--device D] [--max_models N] [--max_file_size MB] [--upload_ttl S] [--max_side PX]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="diffinv serve", description="The browser editor: invert an image once, then edit it by typing. "
        "Every client may be hostile: it can open only what it uploaded, sees only what the page wrote for it, and "
        "runs only the models named here (README: 'Running it on a shared host').")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                        "only; 0.0.0.0 exposes the page to the network: use --auth)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free one)")
    parser.add_argument("--output_dir", default="diffinv-serve", help="the folder everything is written to: "
                        "uploads (.uploads/), one sub-folder per browser session (sessions/); only sessions/ is "
                        "served (default ./diffinv-serve)")
    parser.add_argument("--model", default="shapes", help="the form's default model: 'shapes' (embedded, offline), "
                        "a hub id in the local cache or a diffusers folder")
    parser.add_argument("--allow_model", action="append", default=[], metavar="MODEL",
                        help="another model the page may offer (repeat it for more); no other model is ever "
                        "loaded, whatever a client or a record names")
    parser.add_argument("--auth", default=None, metavar="FILE",
                        help="a file of user:password lines: the page asks for a login (else from "
                        "$DIFFINV_SERVE_AUTH; never the password itself on the command line)")
    parser.add_argument("--steps", type=int, default=50, help="the form's default step count (default 50)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: the GPU if any)")
    parser.add_argument("--max_models", type=int, default=1, help="models kept loaded at once (default 1)")
    parser.add_argument("--max_file_size", type=float, default=64, metavar="MB",
                        help="the largest upload, image or record, in MB (default 64)")
    parser.add_argument("--upload_ttl", type=int, default=3600, metavar="SECONDS",
                        help="uploads are deleted this long after they arrive (default 3600); results stay")
    parser.add_argument("--max_side", type=int, default=2048, metavar="PIXELS",
                        help="the longest image side the page inverts or a loaded record may hold (default 2048)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    for name in ("steps", "max_models", "upload_ttl", "max_side"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.max_file_size < float("inf"):
        parser.error(f"--max_file_size must be a positive number of MB, got {args.max_file_size}")
    if not args.output_dir.strip():
        parser.error("--output_dir is empty: name the folder to write to")
    auth = read_auth(args.auth)
    warning = exposure_warning(args.host, auth is not None)
    if warning:
        print(f"diffinv: warning: {warning}", file=sys.stderr)
    serve(args.output_dir, args.host, args.port, [args.model, *args.allow_model], args.steps, args.device,
          args.max_models, auth=auth, max_file_size_mb=args.max_file_size, upload_ttl=args.upload_ttl,
          max_side=args.max_side)
