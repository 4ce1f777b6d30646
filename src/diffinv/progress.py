"""Progress of a run, read from the model's predictions: no method knows of it (the browser editor's bar, the
Python API's)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import Tensor

Progress = Callable[[float, str], None]
"""progress(fraction in [0, 1], what is being done)."""


@contextmanager
def model_progress(backbone, timesteps: Tensor, phases: list[str], report: Progress) -> Iterator[None]:
    """Report progress from the model's predictions (:meth:`~diffinv.backbone.Backbone.watch`: no method knows of
    it), by the schedule's own timesteps (FLUX's fractional ones too). A phase runs the levels one way: inversion
    up, then each optimisation or sampling pass down from the top. Level k >= 1 is timestep t_k; level 0 (timestep
    0) is evaluated only by the flow solvers, whose inversion steps evaluate the level they leave (0 .. N - 1) where
    DDIM's evaluate the level they reach (1 .. N)."""
    level = {float(t): k + 1 for k, t in enumerate(timesteps.tolist())}
    level[0.0] = 0
    n = len(timesteps)
    state = {"phase": 0, "last": None, "down": False, "from_zero": None}

    def hook(t):
        k = level.get(float(t.flatten()[0]) if isinstance(t, Tensor) else float(t))
        if k is None:
            return
        last = state["last"]
        if state["from_zero"] is None:
            state["from_zero"] = k == 0  # a flow solver's inversion: its step j evaluates level j - 1
        if last is not None and not state["down"] and (k < last or k == n and (last == n or state["from_zero"])):
            # inversion done: a pass down from the top begins (its first step at level N, which DDIM's inversion
            # evaluated last and a flow solver's never): optimising or sampling
            state["phase"], state["down"] = state["phase"] + 1, True
        elif last is not None and k > last and state["down"]:
            state["phase"] += 1  # a descent ended and a new one starts at the top (sampling after optimising)
        state["last"] = k
        p = min(state["phase"], len(phases) - 1)
        step = n - k + 1 if state["down"] else k + state["from_zero"]
        report(min(0.99, (p + step / n) / len(phases)), f"{phases[p]}: step {step}/{n}")

    with backbone.watch(hook):
        yield


@contextmanager
def console_progress(enabled: "bool | Progress" = True) -> Iterator[Progress]:
    """A :data:`Progress` drawing a tqdm bar (nothing where ``enabled`` is false; ``enabled`` itself where it is a
    :data:`Progress`, e.g. the browser page's); a bar is closed on exit."""
    if callable(enabled):
        yield enabled
        return
    if not enabled:
        yield lambda fraction, what: None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=1000, bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}", leave=False)

    def report(fraction: float, what: str) -> None:
        bar.set_description_str(what, refresh=False)
        bar.update(max(0, round(fraction * 1000) - bar.n))

    try:
        yield report
    finally:
        bar.close()

