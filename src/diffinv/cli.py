"""The ``diffinv`` command: its usage text and the route of each subcommand to the module that runs it.

    diffinv fit|predict ...   one run (:func:`diffinv.run.run_lightning`: Lightning's CLI over the methods)
    diffinv bench ...         several runs, then tables and plots (:func:`diffinv.bench.main`)
    diffinv serve ...         the browser editor (:func:`diffinv.app.ui.main`)

Each route is imported only when taken, so ``diffinv --help`` answers without importing torch or Lightning.
Every problem with the user's input ends in one line ``diffinv: error: ...`` and exit status 2; a run stopped by
SIGINT or SIGTERM exits with 128 + the signal's number (:mod:`diffinv.run`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from .errors import DiffinvError

# Written out, not built from diffinv.inversion.registry: that imports torch, which `diffinv --help` must not.
# tests/test_registry.py checks that it names every registered method under its subcommand.
USAGE = """usage: diffinv {fit,predict,bench,serve} ...

Real-image inversion and text-guided editing with latent diffusion models.

  diffinv predict -c configs/npi.yaml [--data.manifest captions.jsonl] [--output_dir DIR] [...]
                  invert and edit with an optimization-free method (DDIM, NPI, ProxNPI, CycleDiffusion,
                  DirectInversion, EDICT, DDPM inversion; on flow models also RF-Solver, FireFlow,
                  RF-Inversion: configs/flow/), or edit saved inversions (--data.records DIR)
  diffinv fit -c configs/null_text.yaml [...]
                  the optimizing methods (null-text inversion, latent-TOP)
  diffinv bench -c configs/bench_reconstruction.yaml [--output_dir DIR]
                  several runs over one dataset, then tables and plots
  diffinv serve [--host 127.0.0.1] [--port 7860] [--output_dir DIR]
                  the browser editor: invert an image once, then edit it by typing (pip install 'diffinv[app]')

'diffinv predict -c CONFIG --help' lists every option, the config's model options last.
"""


def _run(argv: list[str]) -> int:
    """``diffinv fit|predict ...``: one run through Lightning's CLI."""
    from .run import run_lightning

    return run_lightning(argv)


def _one_line(main: Callable[[list[str]], None], argv: list[str]) -> int:
    """Run a subcommand's ``main`` on its own arguments: 0, or 2 after its DiffinvError in one line."""
    try:
        main(argv[1:])
    except DiffinvError as e:
        print(f"diffinv: error: {e}", file=sys.stderr)
        return 2
    return 0


def _bench(argv: list[str]) -> int:
    """``diffinv bench -c configs/bench_*.yaml ...``."""
    from .bench import main

    return _one_line(main, argv)


def _serve(argv: list[str]) -> int:
    """``diffinv serve ...``."""
    from .app.ui import main

    return _one_line(main, argv)


ROUTES: dict[str, Callable[[list[str]], int]] = {"fit": _run, "predict": _run, "bench": _bench, "serve": _serve}
"""Each subcommand's runner: given the whole command line (subcommand first), it returns the exit status."""


def main(args: list[str] | None = None) -> None:
    """``diffinv fit|predict ...`` (LightningCLI), ``diffinv bench -c configs/bench_*.yaml`` or ``diffinv serve``:
    returns when the subcommand succeeded, else exits with its status."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return None if argv else sys.exit(2)
    # an option first (`diffinv --config x.yaml ...`) is Lightning's to parse and report
    route = ROUTES.get(argv[0], _run if argv[0].startswith("-") else None)
    if route is None:
        print(f"diffinv: error: unknown subcommand {argv[0]!r}: use fit, predict, bench or serve (diffinv --help)",
              file=sys.stderr)
        sys.exit(2)
    code = route(argv)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
