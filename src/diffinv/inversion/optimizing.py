"""The base of the methods that optimise per image (null-text inversion, latent-TOP), run by ``diffinv fit``."""

from __future__ import annotations

import torch

from ..backbone import BackboneConfig
from ..data import Item
from ..editing.editor import Editor
from ..errors import DiffinvError
from .base import InversionMethod
from .result import ItemResult


class OptimizingInversion(InversionMethod):
    """Base of the methods that optimise per image (null-text inversion, latent-TOP): run by ``diffinv fit``.

    Manual optimisation: one training step is one batch of images, optimised together with per-sample
    parameters, Adam states and early stopping (:mod:`diffinv.optim`). The per-image parameters live only
    during their batch; results go to the writer, the frozen backbone never into a checkpoint.
    """

    def __init__(self, backbone: BackboneConfig | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, editor: Editor | None = None):
        super().__init__(backbone, num_inference_steps, guidance_scale, editor)
        self.automatic_optimization = False
        self.last_results: list[ItemResult] = []
        # The per-image parameters live only during their batch. DDP refuses a module without a trainable
        # parameter, so there is this one; it is never used: gradients come from torch.autograd.grad on the
        # per-image tensors, so DDP never all-reduces anything (each process optimises its own images).
        self.ddp_anchor = torch.nn.Parameter(torch.zeros(()))

    gradient_checkpointing: bool = False
    """Recompute the UNet's activations in the backward pass instead of keeping them (set by the subclasses)."""

    def configure_model(self) -> None:
        super().configure_model()
        unet = self._backbone.unet
        if self.gradient_checkpointing and not unet.is_gradient_checkpointing:
            unet.enable_gradient_checkpointing()  # acts only where gradients are taken: sampling is unchanged


    def training_step(self, batch: list[Item], batch_idx: int):
        self.last_results = self.run_batch(batch)
        if self.last_results:
            self.log_results(self.last_results)
        return None

    def refuse_fresh_items(self, items: list[Item]) -> None:
        """Under ``diffinv predict`` this method only edits saved inversions: images to invert are refused."""
        fresh = [i.id for i in items if i.inversion is None]
        if fresh:
            raise DiffinvError(
                f"{self.method_name} optimises per image: run it with `diffinv fit` (items {', '.join(fresh[:3])}); "
                "`diffinv predict` only edits inversions it saved (--data.records DIR)")

    def check_subcommand(self, subcommand: str, items: list[Item]) -> None:
        """``fit`` optimises images (saved inversions are refused: there is nothing to optimise); ``predict`` only
        edits saved inversions (images to invert are refused)."""
        if subcommand == "predict":
            self.refuse_fresh_items(items)
            return
        saved = [i.id for i in items if i.inversion is not None]
        if saved:
            raise DiffinvError(
                f"{self.method_name}: `diffinv fit` optimises images, and items {', '.join(saved[:3])} are saved "
                "inversions: edit them with `diffinv predict` (--data.records DIR)")

    def predict_step(self, batch: list[Item], batch_idx: int = 0) -> list[ItemResult]:
        self.refuse_fresh_items(batch)
        return self.run_batch(batch)

    def log_results(self, results: list[ItemResult]) -> None:
        """TensorBoard: per-step loss and inner iterations of every image, its PSNR and images."""
        from lightning.pytorch.loggers import TensorBoardLogger

        from ..metrics import psnr

        values = [psnr(r.reconstruction, r.source) for r in results]
        finite = [v for v in values if v != float("inf")]
        if finite:
            self.log("reconstruction_psnr", sum(finite) / len(finite), batch_size=len(results), on_step=True)
        tb = next((lg.experiment for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tb is None:
            return
        for r, value in zip(results, values):
            extra = r.inversion.extra
            for k, (loss, its) in enumerate(zip(extra["step_loss"].tolist(), extra["inner_iterations"].tolist())):
                tb.add_scalar(f"{r.id}/step_loss", loss, k)
                tb.add_scalar(f"{r.id}/inner_iterations", its, k)
            tb.add_scalar(f"{r.id}/reconstruction_psnr", value, 0)
            tb.add_image(f"{r.id}/source", r.source, 0)
            tb.add_image(f"{r.id}/reconstruction", r.reconstruction, 0)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the frozen backbone out of checkpoints: only the method's settings are worth saving."""
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("_backbone.")]:
            del state[key]
