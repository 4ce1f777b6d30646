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
    it), by the schedule's own timesteps (FLUX's fractional ones too). A phase runs the timesteps one way: inversion
    up, then each optimisation or sampling pass down from the top."""
    order = {float(t): i for i, t in enumerate(timesteps.tolist())}
    n = len(order)
    state = {"phase": 0, "last": None, "down": False}

    def hook(t):
        i = order.get(float(t.flatten()[0]) if isinstance(t, Tensor) else float(t))
        if i is None:
            return
        last = state["last"]
        if last is not None and not state["down"] and (i < last or i == last == n - 1):
            # inversion done (a pass down from the top begins; its first step is at the top, where inversion's
            # last was): optimising or sampling
            state["phase"], state["down"] = state["phase"] + 1, True
        elif last is not None and i > last and state["down"]:
            state["phase"] += 1  # a descent ended and a new one starts at the top (sampling after optimising)
        state["last"] = i
        p = min(state["phase"], len(phases) - 1)
        within = (n - i) / n if state["down"] else (i + 1) / n
        report(min(0.99, (p + within) / len(phases)), f"{phases[p]}: step {(n - i) if state['down'] else i + 1}/{n}")

    with backbone.watch(hook):
        yield


@contextmanager
def console_progress(enabled: bool = True) -> Iterator[Progress]:
    """A :data:`Progress` drawing a tqdm bar (nothing where ``enabled`` is false); closed on exit."""
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

