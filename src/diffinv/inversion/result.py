"""What a run of one item produced (for the writer, the metrics and the tests)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from .record import Inversion


@dataclass
class ItemResult:
    """What one item produced: images (3, H, W) in [0, 1] on the CPU, the record, and timings."""

    id: str
    source: Tensor
    reconstruction: Tensor
    edits: list[Tensor]
    target_prompts: list[str]
    inversion: Inversion
    seconds_inversion: float
    seconds_sampling: float
    extra: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    """The item's dataset annotations (e.g. PIE-Bench's edit mask), for the writer."""


def optimization_summary(inv: Inversion) -> dict:
    """Per-item figures of an optimizing inversion for metrics.jsonl (empty for the optimization-free ones)."""
    if "inner_iterations" not in inv.extra:
        return {}
    return {"inner_iterations": int(inv.extra["inner_iterations"].sum()),
            "final_step_loss": float(inv.extra["step_loss"][-1])}
