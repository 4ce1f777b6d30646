"""Sampling from inverted latents: reconstruction and prompt edits."""

from .sampler import sample

__all__ = ["sample"]
