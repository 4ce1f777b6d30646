"""What a client of ``diffinv serve`` may reach, and what the page shows it: every client may be hostile.

- A client names files only by uploading them: the handlers open a path only when it is a regular file inside the
  upload folder that Gradio writes (:class:`Uploads`), within the server's size limit.
- The server serves only what it wrote: Gradio's ``allowed_paths`` is the sessions folder alone, which holds only
  diffinv's files (:func:`own_folder` refuses a folder diffinv did not make), never ``--output_dir`` itself.
- The models a page may load are the server's choice (:class:`ModelMenu`); anything else gets one message that
  does not depend on what was named, so a client learns nothing about the server's folders.
- Text a client chose (prompts, file names) is escaped before it reaches Markdown (:func:`plain`), and no message
  shows an absolute server path (:func:`scrub`).

Nothing here imports Gradio or torch.
"""

from __future__ import annotations

import html
import ipaddress
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import DiffinvError

UPLOADS = ".uploads"
"""Gradio's upload folder inside ``--output_dir`` (``GRADIO_TEMP_DIR``)."""
SESSIONS = "sessions"
"""The browser sessions' folders inside ``--output_dir``: the only files the page serves."""
MARKER = ".diffinv-serve"
"""Written by diffinv into each folder it made, so that it never serves or empties a folder it did not make."""
EMBEDDED = ("shapes", "shapes-flow")
"""The embedded models' names (:data:`diffinv.backbone.EMBEDDED_MODELS`, which imports torch): never a folder of
that name in the working directory, as the CLI loads them."""
AUTH_ENV = "DIFFINV_SERVE_AUTH"
"""The environment variable holding ``user:password`` when ``--auth`` is not given."""


def own_folder(path: Path) -> Path:
    """``path``, made (with its marker) if missing; a non-empty folder diffinv did not make is refused, since its
    files would be served (sessions) or deleted (uploads)."""
    if path.exists() and not path.is_dir():
        raise DiffinvError(f"{path} is a file, not a folder: choose another --output_dir")
    if path.is_dir() and not (path / MARKER).is_file() and any(path.iterdir()):
        raise DiffinvError(f"{path} exists and was not made by diffinv serve (its files would be served or "
                           "deleted): choose another --output_dir")
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).touch()
    return path


def clear_uploads(path: Path) -> int:
    """Remove every upload of an earlier server from diffinv's own upload folder (made by :func:`own_folder`);
    the number of entries removed."""
    removed = 0
    for entry in path.iterdir():
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
    return removed


_ABSOLUTE = re.compile(r"(?<![\w:/.~-])(?:/|[A-Za-z]:\\)[^\s'\"`<>|]*")


def scrub(text: str) -> str:
    """``text`` with every absolute path shortened to its last part: no message shows where the server keeps
    its files (``cannot read image /srv/x/.uploads/ab12/cat.png`` -> ``cannot read image cat.png``)."""
    def last(m: re.Match) -> str:
        parts = [p for p in re.split(r"[/\\]", m.group(0)) if p]
        return parts[-1] if parts else m.group(0)

    return _ABSOLUTE.sub(last, text)


_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|~])")


def plain(text: str) -> str:
    """``text`` shown literally in Markdown: Markdown's marks backslash-escaped, then HTML's ``<``, ``>`` and ``&``
    as entities, on one line (a prompt with ``<img src=...>`` or ``![](...)`` shows as those characters and
    fetches nothing)."""
    one = " ".join(str(text).split())
    return html.escape(_MARKDOWN.sub(r"\\\1", one), quote=False)


@dataclass(frozen=True)
class Uploads:
    """The upload folder Gradio writes and the server's limits on what a client sends.

    Args:
        folder: Gradio's upload folder (``GRADIO_TEMP_DIR``).
        max_bytes: The largest file accepted.
    """

    folder: Path
    max_bytes: int = 64 << 20

    def accept(self, path: str | Path | None, what: str) -> Path | None:
        """The uploaded file ``path`` names (None for none), or a one-line DiffinvError, which names no path:
        the file must be a regular file inside the upload folder (after following any link), within the size
        limit."""
        if path is None or not str(path).strip():
            return None
        refused = DiffinvError(f"the {what} was not uploaded through this page: upload it with the {what} box")
        given = Path(str(path))
        try:
            real = given.resolve(strict=True)
            inside = real.relative_to(self.folder.resolve())
        except (OSError, ValueError, RuntimeError):
            raise refused from None
        if given.is_symlink() or not real.is_file() or any(p.startswith(".") for p in inside.parts):
            raise refused
        size = real.stat().st_size
        if size > self.max_bytes:
            raise DiffinvError(f"the {what} is {size / 2**20:.1f} MB, over this server's limit of "
                               f"{self.max_bytes / 2**20:.0f} MB (--max_file_size)")
        return real


class ModelMenu:
    """The models a page may use, by the names it shows: the server's ``--model`` first, then each
    ``--allow_model``. A local folder is shown by its folder name, a hub id or an embedded model's name as it is.

    Args:
        models: ``--model.backbone.pretrained`` values (``shapes``, hub ids in the local cache, diffusers folders).
    """

    def __init__(self, models: list[str] | tuple[str, ...]):
        self._by_name: dict[str, str] = {}
        self._values: dict[str, str] = {}
        for value in models:
            value = str(value).strip()
            if not value or value in self._values:
                continue
            path = Path(value).expanduser()
            local = value not in EMBEDDED and (path.exists() or value.startswith((".", "/", "~")))
            if local and not path.is_dir():
                raise DiffinvError(f"model folder {value} does not exist")
            pretrained = str(path.resolve()) if local else value
            name = path.resolve().name if local else value
            base, k = name, 2
            while name in self._by_name:
                name, k = f"{base} ({k})", k + 1
            self._by_name[name] = pretrained
            self._values[value] = self._values[pretrained] = name
        if not self._by_name:
            raise DiffinvError("no model to serve: give --model")

    @property
    def names(self) -> list[str]:
        """The names the page offers, the default first."""
        return list(self._by_name)

    def name_of(self, model: str | None) -> str:
        """The shown name of ``model`` (a name or one of the server's own values), or one constant one-line
        DiffinvError that does not depend on what was asked."""
        model = (model or "").strip()
        if model in self._by_name:
            return model
        if model in self._values:
            return self._values[model]
        raise DiffinvError(f"that model is not offered by this server (it offers: {', '.join(self.names)})")

    def pretrained(self, name: str) -> str:
        """What :class:`~diffinv.backbone.BackboneConfig` loads for an offered name."""
        return self._by_name[self.name_of(name)]


def read_auth(path: str | None) -> list[tuple[str, str]] | None:
    """Gradio's login pairs from ``--auth FILE`` (``user:password`` lines; ``#`` comments) or else from the
    environment variable :data:`AUTH_ENV` (one ``user:password``); None when neither is given. A password is
    never taken from the command line, where other users of the machine can read it."""
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            if ":" in path:
                raise DiffinvError("--auth takes a file of user:password lines, not the password itself (the command "
                                   f"line is visible to other users): put it in a file, or in ${AUTH_ENV}")
            raise DiffinvError(f"--auth file {path} does not exist")
        lines = [x.strip() for x in file.read_text(encoding="utf-8").splitlines()]
        where = f"--auth file {path}"
        lines = [x for x in lines if x and not x.startswith("#")]
    elif os.environ.get(AUTH_ENV):
        lines, where = [os.environ[AUTH_ENV].strip()], f"${AUTH_ENV}"
    else:
        return None
    pairs = []
    for n, line in enumerate(lines, 1):
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise DiffinvError(f"{where}: entry {n} is not user:password")
        pairs.append((user.strip(), password))
    if not pairs:
        raise DiffinvError(f"{where} holds no user:password line")
    return pairs


def is_loopback(host: str) -> bool:
    """True when ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, auth: bool) -> str | None:
    """What to tell the person starting a server others can reach (None on a loopback address)."""
    if is_loopback(host):
        return None
    if not auth:
        return (f"--host {host} exposes the page to the network without a login: anyone who reaches this port can "
                f"upload images, run the served models and download the results; add --auth FILE (or set "
                f"${AUTH_ENV}), and see the README's 'Running it on a shared host'")
    return (f"--host {host} exposes the page to the network; logins travel as plain HTTP unless a TLS proxy is in "
            "front of it (README: 'Running it on a shared host')")
