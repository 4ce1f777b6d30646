"""Perturbed inputs (pixel noise, a dropped or replaced caption word), to measure a method's robustness."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..errors import DiffinvError
from ..seeds import keyed_seed
from .items import Item


@dataclass
class Perturbation:
    """Perturbed inputs, to measure robustness (latent-TOP §3.1-3.2): noisy pixels, a changed caption. Every draw
    is seeded per (seed, item id), so an item is perturbed the same alone or in any batch."""

    pixel_noise: float = 0.0
    """Standard deviation (0-255 scale) of Gaussian noise added to each image at its own size, then rounded and
    clipped to 8 bits (the paper: 5, 10, 20). PSNR is then measured against the noisy image the method sees."""
    caption: Literal["none", "drop_word", "replace_word"] = "none"
    """'drop_word': one word of 3+ letters removed from the source prompt; 'replace_word': one word found in
    ``neighbours`` replaced by its neighbour (the paper: 'teddy bear' -> 'brown toy bear')."""
    neighbours: dict[str, str] = field(default_factory=dict)
    """Word -> synonym-like neighbour for 'replace_word' (e.g. {"big": "large"}); an item with none of these
    words keeps its caption (said in one line)."""
    seed: int = 0
    """Seed of the noise and of the word drawn."""

    def check(self) -> None:
        """Refuse settings that cannot apply (called by the data module, which reports it in one line)."""
        if self.pixel_noise < 0:
            raise DiffinvError(f"perturb.pixel_noise must be >= 0, got {self.pixel_noise}")
        if self.caption == "replace_word" and not self.neighbours:
            raise DiffinvError("perturb.caption 'replace_word' needs perturb.neighbours, e.g. '{\"big\": \"large\"}'")

    def apply(self, item: Item) -> Item:
        """The item with its image and source prompt perturbed; what changed goes into its metadata."""
        rng = np.random.default_rng(keyed_seed(self.seed, item.id, "perturb"))
        meta = dict(item.meta)
        image, prompt = item.image, item.source_prompt
        if self.pixel_noise > 0:
            noisy = image.astype(np.float64) + rng.normal(0.0, self.pixel_noise, image.shape)
            image = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
            meta["pixel_noise"] = self.pixel_noise
        words = prompt.split()
        if self.caption == "drop_word":
            candidates = [k for k, w in enumerate(words) if len(w.strip(".,;:!?")) >= 3]
            if candidates and len(words) > 1:
                k = candidates[rng.integers(len(candidates))]
                prompt = " ".join(words[:k] + words[k + 1:])
        elif self.caption == "replace_word":
            candidates = [k for k, w in enumerate(words) if w.lower() in self.neighbours]
            if candidates:
                k = candidates[rng.integers(len(candidates))]
                prompt = " ".join(words[:k] + [self.neighbours[words[k].lower()]] + words[k + 1:])
        if prompt != item.source_prompt:
            meta["caption_before_perturbation"] = item.source_prompt
        return Item(item.id, image, prompt, item.target_prompts, item.resolution, item.square, item.inversion, meta)

