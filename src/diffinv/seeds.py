"""Noise keyed by what it belongs to (run seed, item id, prompt), never by its place in a batch."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def keyed_seed(seed: int, *keys: str) -> int:
    """A 63-bit seed from the run seed and string keys (stable across runs and processes, unlike ``hash``)."""
    digest = hashlib.sha256("\0".join([str(seed), *keys]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def keyed_normal(shape: tuple[int, ...], seed: int, *keys: str) -> Tensor:
    """Standard normal draws of ``shape`` (on the CPU, float32) from :func:`keyed_seed`."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(keyed_seed(seed, *keys)))
