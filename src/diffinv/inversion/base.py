"""The LightningModule every inversion method derives from: invert, then reconstruct and edit, under predict.

The method-specific parts are small hooks: :meth:`InversionMethod.invert_latents` (what the method computes
from the DDIM trajectory, and its record's typed :class:`~diffinv.inversion.record.Sampling`), the unconditional
branch it samples with, its guidance rule, and what its records pin. Everything else — preprocessing, batching,
sampling a record as it was made, decoding, timing — is shared.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from typing import ClassVar, Literal, Protocol

import lightning as L
import torch
from torch import Tensor

from ..backbone import Backbone, BackboneConfig
from ..data import Item, fit_to_model, image_tensor
from ..ddim import Schedule, flow_z, invert
from ..editing.editor import EditContext, Editor, FlowVelocity, Row
from ..editing.sampler import sample
from ..errors import DiffinvError, check_at_least, check_finite
from ..guidance import ClassifierFree, GuidanceRule, cfg, row_scale
from ..steps import Controlled, Finite, Observe, Snap, Step
from .record import Inversion, Sampling, check_record
from .step_kinds import STEP_KINDS, batch_key
from .result import ItemResult, optimization_summary


class StepObserver(Protocol):
    """Told after each sampling step: the rows being sampled, the level k the step left, their latents and
    ProxNPI's unedited-region mask (None under plain CFG)."""

    def __call__(self, rows: list[Row], k: int, z: Tensor, keep: Tensor | None) -> None: ...


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class InversionMethod(L.LightningModule):
    """Base of all inversion methods (not used directly: pick a subclass in the config)."""

    method_name: ClassVar[str] = "base"
    given: frozenset[str] = frozenset()
    """The model options the user set on the command line (set by :mod:`diffinv.lightning_cli`). A saved record
    (``--data.records``) is sampled with its own step count and pinned settings; one of those given here with
    another value is refused rather than silently ignored."""

    def __init__(self, backbone: BackboneConfig | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, editor: Editor | None = None):
        """
        Args:
            backbone: The Stable Diffusion to use; default: the embedded shapes model.
            num_inference_steps: DDIM steps of inversion and sampling (the papers use 50).
            guidance_scale: Classifier-free guidance scale w of reconstruction and edits (the papers use 7.5).
            editor: How target prompts edit: none (plain prompt swap), Prompt-to-Prompt or SDEdit.
        """
        super().__init__()
        self.editor = editor
        if num_inference_steps < 1:
            raise DiffinvError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        check_finite({"guidance_scale": guidance_scale})
        check_at_least("guidance_scale", guidance_scale, 0, hint="the papers use 7.5; 0 samples unconditionally")
        self.backbone_config = backbone or BackboneConfig()
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self._backbone: Backbone | None = None

    def configure_model(self) -> None:
        """Load the frozen backbone (Lightning calls this before moving the module to its device; loading here,
        not in ``__init__``, keeps config parsing, ``--help`` and errors free of weight loading)."""
        if self._backbone is None:
            backbone = Backbone.load(self.backbone_config)
            self._backbone = backbone.to(self.device)

    @property
    def backbone(self) -> Backbone:
        self.configure_model()
        return self._backbone

    def configure_optimizers(self):
        return None

    # --- hooks ------------------------------------------------------------------------------------------------
    def invert_latents(self, z0: Tensor, source_emb: Tensor, schedule: Schedule, ids: list[str] | None = None) -> dict:
        """DDIM inversion at w = 1 with the source prompt (NPI eq. 3), then :meth:`optimize`. Returns Inversion
        fields per batch: ``trajectory`` (N + 1, B, ...) plus any of ``unconditional`` (B, N, L, D), ``z_T``,
        ``extra``, ``sampling`` (default: :meth:`sampling`). ``ids``: the items' ids (a stochastic method seeds
        each item's noise with its id)."""
        with torch.no_grad():
            trajectory = invert(lambda z, t, alpha: self.backbone.eps(z, t, source_emb, alpha), z0, schedule)
        return {"trajectory": trajectory, **self.optimize(trajectory, source_emb, schedule)}

    def optimize(self, trajectory: Tensor, source_emb: Tensor, schedule: Schedule) -> dict:
        """What an optimizing method learns from the trajectory; nothing for the optimization-free ones."""
        return {}

    unconditional_branch: ClassVar[Literal["null", "source"]] = "null"
    """The unconditional branch of this method's sampling: the null prompt (CFG, NPI eq. 1) or the source prompt
    (NPI section 3.4). A record with learned per-step embeddings (null-text inversion, latent-TOP) uses those."""

    def guidance(self, scale: float | Tensor, rows: list[Row], inversions: list[Inversion]) -> GuidanceRule:
        """The guidance of one sampling run over ``rows`` (of the items ``inversions``): classifier-free at
        ``scale`` (a number, or (B, 1, 1, 1) one per row); ProxNPI's proximal guidance overrides it."""
        return ClassifierFree(scale)

    def reconstruction_rule(self) -> dict | None:
        """What this method's guidance does to a reconstruction row beyond classifier-free guidance (ProxNPI's
        proximal settings), pinned in its records; None: nothing."""
        return None

    def snaps_source(self) -> bool:
        """True where sampling puts each reconstruction (source) row back onto its inversion trajectory after
        every step (DirectInversion), so the source branch the edits read is exact."""
        return False

    def sampling(self) -> Sampling:
        """How this method's records are sampled (:class:`~diffinv.inversion.record.Sampling`); a method with
        its own step rule (CycleDiffusion, EDICT) returns it from :meth:`invert_latents` instead."""
        return Sampling(guidance_scale=float(self.guidance_scale), unconditional=self.unconditional_branch,
                        snap_source=self.snaps_source(), rule=self.reconstruction_rule())

    # --- pipeline ---------------------------------------------------------------------------------------------
    def fitted_image(self, item: Item):
        """The item's image resized/cropped for this model (:func:`diffinv.data.fit_to_model`)."""
        bb = self.backbone
        return fit_to_model(item.image, item.resolution or bb.native_resolution, bb.size_multiple, item.square)

    def invert_items(self, items: list[Item], images: Tensor) -> list[Inversion]:
        """Invert a batch of same-size images; one Inversion per item."""
        z0 = self.backbone.encode_image(images)
        schedule = self.backbone.schedule(self.num_inference_steps, latent_size=tuple(z0.shape[-2:]))
        self.check_flow(schedule)  # also where a caller skipped check_items (a run_batch of its own)
        source_emb = self.backbone.encode_prompts([i.source_prompt for i in items])
        out = self.invert_latents(z0, source_emb, schedule, ids=[i.id for i in items])
        sampling = out.get("sampling") or self.sampling()
        if "unconditional" in out:
            sampling = dataclasses.replace(sampling, unconditional="learned")
        guidance = self.backbone.family.embedded_guidance(self.backbone)
        if guidance is not None:  # pinned: a record re-edits under the guidance it was made with, or is refused
            sampling = dataclasses.replace(sampling, embedded_guidance=guidance)
        records = []
        for b, item in enumerate(items):
            records.append(Inversion(
                z0=z0[b],
                trajectory=out["trajectory"][:, b],
                timesteps=schedule.timesteps,
                source_image=(images[b] * 255).round().to(torch.uint8),
                source_prompt=item.source_prompt,
                method=self.method_name,
                model=self.backbone_config.pretrained,
                guidance_scale=self.guidance_scale,
                unconditional=out["unconditional"][b] if "unconditional" in out else None,
                z_T=out["z_T"][b] if "z_T" in out else None,
                extra={k: v[b] for k, v in out.get("extra", {}).items()},
                meta=dict(out.get("meta", {})),  # one dict per record: run_items adds per-item entries
                sampling=sampling,
            ))
        return records

    def edit(self, inversions: list[Inversion], target_prompts: list[list[str]],
             ids: list[str] | None = None, observe: StepObserver | None = None,
             annotations: list[dict] | None = None) -> list[tuple[Tensor, list[Tensor]]]:
        """Reconstruct each inversion (row 0: its source prompt) and apply its target prompts (rows 1..K), all
        rows of all items batched, with the configured editor. ``ids``: the items' ids (seed SDEdit's noise;
        default: their source prompts). ``observe``: told each sampling step of each run (progress, ProxNPI's
        masks). ``annotations``: each item's dataset annotations, for an editor that reads them (PIE-Bench's
        protocol). Returns (reconstruction latent, [edit latents]) per item."""
        ids = ids if ids is not None else [inv.source_prompt for inv in inversions]
        n = inversions[0].num_steps
        if any(inv.num_steps != n for inv in inversions):
            raise DiffinvError("inversions with different step counts cannot be sampled in one batch")
        sizes = {tuple(inv.z0.shape[-2:]) for inv in inversions}
        if len(sizes) > 1:
            raise DiffinvError("inversions of different latent sizes cannot be sampled in one batch")
        schedule = self.backbone.schedule(n, latent_size=sizes.pop())
        if not torch.equal(schedule.timesteps.cpu(), inversions[0].timesteps.cpu()):
            raise DiffinvError(f"the inversion's timesteps do not match this model's {n}-step schedule "
                               "(was it made with another model or scheduler?)")
        rows = [row for g, (inv, targets) in enumerate(zip(inversions, target_prompts))
                for row in [Row(g, inv.source_prompt, None), *(Row(g, t, t) for t in targets)]]
        dev = self.device
        plans = self.check_plans(inversions)
        kind = STEP_KINDS[plans[0].step]  # one for the batch (check_plans)
        if kind.flow and not schedule.is_flow:
            raise DiffinvError(f"the inversion record was made by a flow solver ({plans[0].step}), which steps a "
                               "rectified flow: sample it on a flow model (SD 3 / 3.5, FLUX.1)")
        level = inversions[0].start_level
        null = self.backbone.encode_prompts([""])[0].to(dev)

        def uncond_of(row: Row) -> Tensor:
            """A row's unconditional branch: the record's own for its reconstruction, this method's for its edits
            (a record's learned per-step embeddings for both)."""
            inv, plan = inversions[row.item], plans[row.item]
            if plan.unconditional == "learned":
                return inv.unconditional.to(dev)
            kind = self.unconditional_branch if row.is_edit else plan.unconditional
            return self.backbone.encode_prompts([inv.source_prompt])[0].to(dev) if kind == "source" else null

        def is_cond(row: Row) -> bool:
            """The reconstruction row of a record whose unconditional branch is its source prompt: computed once."""
            return not row.is_edit and plans[row.item].unconditional == "source"

        def row_guidance(picked_rows: list[Row]) -> float | Tensor:
            ws = [self.guidance_scale if row.is_edit else plans[row.item].guidance_scale for row in picked_rows]
            return ws[0] if len(set(ws)) == 1 else torch.tensor(ws)

        def step_rule(sel: list[Row], from_editor: bool) -> Step:
            """The records' step rule for the rows ``sel`` (:data:`diffinv.inversion.step_kinds.STEP_KINDS`)."""
            return kind.build(plans[0], [inversions[row.item] for row in sel], dev, from_editor)

        def run(picked: list[int], z_start: Tensor, controller=None, start_level: int | None = None) -> Tensor:
            """Sample the rows ``picked`` from ``z_start`` (diffinv.editing.editor.SampleRows)."""
            sel = [rows[r] for r in picked]
            top = level if start_level is None else start_level
            uncond = [uncond_of(row) for row in sel]
            if any(u.dim() == 3 for u in uncond):
                uncond = [u if u.dim() == 3 else u.expand(n, *u.shape) for u in uncond]
            recon_cond = torch.tensor([is_cond(row) for row in sel], device=dev)
            hooks = [Finite(n, schedule.timesteps)]
            snap = torch.tensor([not row.is_edit and plans[row.item].snap_source for row in sel], device=dev)
            if bool(snap.any()):
                hooks.append(Snap(snap, torch.stack([inversions[row.item].trajectory for row in sel], dim=1).to(dev)))
            if controller is not None:
                controller.set_unconditional_rows(~recon_cond)
                hooks.append(Controlled(controller, top))
            if observe is not None:
                hooks.append(Observe(lambda k, z, keep: observe(sel, k, z, keep)))
            guidance = self.guidance(row_scale(row_guidance(sel), z_start), sel, inversions)
            if kind.flow and guidance.corrects:
                raise DiffinvError(f"{self.method_name}'s reconstruction or inversion guidance corrects a DDIM step's "
                                   f"x0 and latent, which the flow solver's step ({plans[0].step}) has not: turn them "
                                   "off (--model.proximal.reconstruction_guidance false, --model.proximal."
                                   "inversion_guidance false) to edit this record")
            return sample(
                self.backbone, schedule,
                z_T=z_start,
                cond=self.backbone.encode_prompts([row.prompt for row in sel]),
                uncond=torch.stack(uncond, dim=1 if uncond[0].dim() == 3 else 0),
                guidance=guidance,
                step=step_rule(sel, start_level is not None),
                hooks=hooks,
                uncond_is_cond=recon_cond,
                start_level=None if top == n else top,
            )

        start_of = [inv.trajectory[level] if level < n else inv.start_latent for inv in inversions]
        starts = torch.stack([start_of[row.item] for row in rows]).to(dev)
        ctx = EditContext(
            layout=self.backbone.layout, schedule=schedule, item_ids=ids,
            sources=[inv.source_prompt for inv in inversions], z0=[inv.z0 for inv in inversions],
            trajectories=[inv.trajectory for inv in inversions],
            negative_is_source=self.unconditional_branch == "source" and all(
                plan.unconditional == "source" for plan in plans),
            unet=self.backbone.unet, device=dev, start_level=level, annotations=annotations,
            velocity=self.flow_velocity(schedule, null) if schedule.is_flow else None,
            guidance_embedding=self.backbone.family.embedded_guidance(self.backbone) is not None)
        latents = (self.editor or Editor()).sample(run, rows, starts, ctx)
        out, start = [], 0
        for g, targets in enumerate(target_prompts):
            count = 1 + len(targets)
            out.append((latents[start], list(latents[start + 1 : start + count])))
            start += count
        return out

    def flow_velocity(self, schedule: Schedule, null: Tensor) -> FlowVelocity:
        """The model's velocity on a flow schedule for any latents and prompts (:data:`~diffinv.editing.editor.
        FlowVelocity`): classifier-free guidance with ``null`` as the unconditional branch (one denoiser call for
        both), or the scale given to a guidance-distilled denoiser's embedding."""
        bb = self.backbone

        def velocity(x: Tensor, k: int, prompts: list[str], scale: float, embedded: bool) -> Tensor:
            # the level's own timestep and alpha, as the flow solvers evaluate it (level 0: timestep 0, the image)
            s, t, alpha = schedule.sigmas[k], schedule.level_timestep(k), schedule.alphas[k]
            z, cond = flow_z(x, s), bb.encode_prompts(prompts).to(x.device)
            if embedded or scale == 1:
                with bb.embedded_guidance_of(scale if embedded else None):
                    eps, x0 = bb.predict(z, t, cond, alpha)
                return eps - x0
            eps, x0 = bb.predict(torch.cat([z, z]), t, torch.cat([cond, null.to(x.device).expand_as(cond)]), alpha)
            B = len(prompts)
            return cfg(eps[B:], eps[:B], scale) - cfg(x0[B:], x0[:B], scale)  # CFG is linear: v's guidance

        return velocity

    def check_plans(self, inversions: list[Inversion]) -> list[Sampling]:
        """The records' sampling, refused in one line where one batch cannot sample them together (other step
        rules or start levels) or where this method cannot reproduce a record's reconstruction."""
        plans = [inv.plan for inv in inversions]
        if len({batch_key(p) for p in plans}) > 1:
            raise DiffinvError("records of different step rules (stochastic: CycleDiffusion, DDPM; coupled: EDICT; "
                               "the flow solvers; deterministic), or of different eta or mixing, cannot be sampled "
                               "in one batch")
        if len({inv.start_level for inv in inversions}) > 1:
            raise DiffinvError("records that start sampling at different levels (DDPM inversion's skip, a strength) "
                               "cannot be sampled in one batch")
        for inv in inversions:
            self.check_reproducible(inv)
        return plans

    def pinned(self, plan: Sampling) -> dict[str, tuple[object, object]]:
        """{option: (this config's value, the record's)} for this method's options that a record of its kind
        pins (CycleDiffusion's eta, EDICT's mix, ...); none here."""
        return {}

    def check_reproducible(self, record: Inversion) -> None:
        """Refuse a record whose reconstruction this method cannot sample as it was made (ProxNPI's pull under
        other settings, or by a method without it)."""
        rule, own = record.plan.rule, self.reconstruction_rule()
        if rule is not None and rule != own:
            name = f"inversion record {record.path}" if record.path is not None else "the inversion record"
            # named from this method's own settings, never echoing the record's values (a file from anyone)
            differ = [key for key in own or {} if rule.get(key) != own[key]]
            detail = ("this config applies none" if own is None
                      else f"they differ in {', '.join(differ)}" if differ else "they differ")
            raise DiffinvError(f"{name} ({record.method}) reconstructs under guidance settings that "
                               f"{self.method_name}'s config does not reproduce ({detail}): edit it with its own "
                               "method and settings")

    needs_flow: ClassVar[bool] = False
    """The method solves a rectified flow's ODE (RF-Solver, FireFlow, RF-Inversion): it runs on flow models only
    (SD 3 / 3.5, FLUX.1), and is refused on the others in one line before any work."""

    def check_flow(self, schedule: Schedule) -> None:
        """Refuse in one line a method or an editor that needs a flow (:attr:`needs_flow`) on a model that is none."""
        if schedule.is_flow:
            return
        editor = self.editor or Editor()
        for what, needs, does in ((self.method_name, self.needs_flow, "solves a rectified flow's ODE"),
                                  (type(self.editor).__name__, editor.needs_flow, editor.flow_need)):
            if needs:
                raise DiffinvError(f"{what} {does}: it runs on flow models (SD 3 / 3.5, "
                                   f"FLUX.1), and this model is {self.backbone.family.name}")

    def check_items(self, items: list[Item]) -> None:
        """Before any work: the method runs on this model (:attr:`needs_flow`), the step count fits the model's
        scheduler, the editor can take every item's prompts (e.g. replace with other word counts); warn where the
        model is a poor match for the inputs."""
        bb = self.backbone
        self.check_flow(bb.schedule(self.num_inference_steps))
        for message in bb.prompt_warnings([p for i in items for p in (i.source_prompt, *i.target_prompts)]):
            warnings.warn(message, stacklevel=2)
        native = bb.native_resolution
        big = [i for i in items if i.inversion is None and (i.resolution or native) > 2 * native]
        if big:
            r = big[0].resolution
            warnings.warn(f"--data.resolution {r} is {r / native:.0f}x the model's native "
                          f"{native}: each step costs about {(r / native) ** 2:.0f}x as "
                          "much and the model was not trained at that size (results are usually poor)", stacklevel=2)
        if self.editor is not None:
            self.editor.check_model(bb.unet)
            self.editor.check_backbone(bb)
            self.editor.check_steps(self.num_inference_steps)
            for item in items:
                self.editor.check(bb.layout, item.source_prompt, item.target_prompts)
        for item in items:
            if item.inversion is not None:
                self.check_saved(Inversion.load(item.inversion))

    def check_saved(self, record: Inversion) -> None:
        """A saved record this model can sample (:func:`~diffinv.inversion.record.check_record`) and this method
        can reproduce, with no option typed against its own values (the step count, :meth:`pinned`)."""
        check_record(record, self.backbone)
        self.check_reproducible(record)
        pinned = {"num_inference_steps": (self.num_inference_steps, record.num_steps), **self.pinned(record.plan)}
        for option, (mine, theirs) in pinned.items():
            if option in self.given and mine != theirs:
                raise DiffinvError(f"inversion record {record.path} was made with {option} {theirs}, not "
                                   f"--model.{option} {mine}: a record is re-edited with its own {option}; drop the "
                                   f"option or give {theirs}")

    def check_subcommand(self, subcommand: str, items: list[Item]) -> None:
        """Before the trainer starts (nothing written yet but the output lock): the method runs under this
        ``diffinv`` subcommand. The optimization-free methods run with ``predict`` only."""
        if subcommand != "predict":
            raise DiffinvError(f"{self.method_name} does not optimise: run it with `diffinv predict` "
                               f"(`diffinv fit` is for null-text inversion and latent-TOP)")

    def on_predict_start(self) -> None:
        self.check_items(getattr(self.trainer.datamodule, "items", None) or [])

    def on_train_start(self) -> None:
        self.check_items(getattr(self.trainer.datamodule, "items", None) or [])

    def run_items(self, items: list[Item], fitted: list | None = None) -> list[ItemResult]:
        """Invert (or load the saved inversion of), reconstruct and edit items of one image size; ``fitted``:
        their images already passed through :meth:`fitted_image`."""
        _sync(self.device)
        t0 = time.perf_counter()
        calls = [0, 0]  # the denoiser's calls (each on every row of the batch at once) inverting, then sampling
        if items[0].inversion is not None:
            inversions = [self.load_inversion(i) for i in items]
            images = torch.stack([inv.source_image.float() / 255 for inv in inversions]).to(self.device)
        else:
            fitted = fitted if fitted is not None else [self.fitted_image(i) for i in items]
            images = torch.stack([image_tensor(a) for a in fitted]).to(self.device)
            with self.backbone.watch(lambda t: calls.__setitem__(0, calls[0] + 1)):
                inversions = self.invert_items(items, images)
        _sync(self.device)
        t1 = time.perf_counter()
        with torch.no_grad(), self.backbone.watch(lambda t: calls.__setitem__(1, calls[1] + 1)):
            edited = self.edit(inversions, [i.target_prompts for i in items], [i.id for i in items],
                               annotations=[i.meta for i in items])
        with torch.no_grad():
            flat = [z for rec, edits in edited for z in (rec, *edits)]
            decoded = self.backbone.decode(torch.stack(flat)).cpu()
        _sync(self.device)
        t2 = time.perf_counter()
        for inv, item in zip(inversions, items):
            inv.meta["target_prompts"] = json.dumps(item.target_prompts)
            inv.meta.setdefault("item_id", item.id)  # what its edits' seeded noise is keyed by (SDEdit, FlowEdit)
        results, start = [], 0
        for b, (item, inv) in enumerate(zip(items, inversions)):
            count = 1 + len(item.target_prompts)
            results.append(ItemResult(
                id=item.id,
                source=images[b].cpu(),
                reconstruction=decoded[start],
                edits=list(decoded[start + 1 : start + count]),
                target_prompts=item.target_prompts,
                inversion=inv,
                seconds_inversion=(t1 - t0) / len(items),
                seconds_sampling=(t2 - t1) / len(items),
                extra={**optimization_summary(inv), "evaluations_inversion": calls[0],
                       "evaluations_sampling": calls[1]},
                meta=item.meta,
            ))
            start += count
        return results

    def load_inversion(self, item: Item) -> Inversion:
        inv = Inversion.load(item.inversion, device=self.device)
        self.check_saved(inv)
        if inv.model != self.backbone_config.pretrained:
            warnings.warn(f"{item.inversion} was made with model {inv.model!r}, editing it with "
                          f"{self.backbone_config.pretrained!r}", stacklevel=2)
        return inv

    def run_batch(self, batch: list[Item]) -> list[ItemResult]:
        """Group a batch by image size (and saved vs new inversions), run each group, keep the batch order.
        An empty batch (a padding step of a distributed run) does nothing."""
        groups: dict[tuple, tuple[list[Item], list]] = {}
        for item in batch:
            if item.inversion is not None:
                groups[("record", item.id)] = ([item], None)
            else:
                image = self.fitted_image(item)
                group = groups.setdefault(image.shape, ([], []))
                group[0].append(item)
                group[1].append(image)
        by_id = {r.id: r for items, fitted in groups.values() for r in self.run_items(items, fitted)}
        return [by_id[item.id] for item in batch]

    def predict_step(self, batch: list[Item], batch_idx: int = 0) -> list[ItemResult]:
        return self.run_batch(batch)
