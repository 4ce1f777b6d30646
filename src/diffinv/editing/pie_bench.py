"""PIE-Bench's Prompt-to-Prompt protocol (Ju et al. 2024, "PnP Inversion"): each item's editor derived from its
annotations, for any inversion.

The settings are those of the authors' run script (cure-lab/PnPInversion ``run_editing_p2p.py``, the ``__main__``
loop, through ``models/p2p_editor.py`` and ``make_controller`` in ``models/p2p/attention_control.py``):

* ``blended_word`` "w_src w_tgt" (split on spaces; an empty annotation: neither of the next two):
  local blend on w_src in the source prompt and w_tgt in the target (``blend_word=((w_src,), (w_tgt,))``,
  threshold 0.3, from 20% of the steps), and the target's w_tgt reweighted by 2 (``eq_params={"words": (w_tgt,),
  "values": (2,)}``, an ``AttentionReweight`` around the mode's controller);
* cross-attention replaced during 0.4 of the steps (``{'default_': 0.4}``), self-attention during 0.6;
* mode: that script never passes ``is_replace_controller``, whose default in ``P2PEditor.__call__`` is False, so
  every PIE-Bench P2P row of the published table is a *refinement* (``AttentionRefine``), word swaps included
  (``mode="refine"``, the default). Their edit-friendly-DDPM script (``run_editing_edit_friendly_p2p.py``) chooses
  ``AttentionReplace`` when the two prompts have as many words (``len(p.split(" "))``) and ``AttentionRefine``
  otherwise: ``mode="word_count"``;
* only the conditional branch is controlled (``AttentionControl.__call__`` edits ``attn[h // 2:]``):
  ``control_unconditional=False``.

:class:`PieBenchP2P` builds one :class:`~diffinv.editing.PromptToPrompt` per distinct setting and delegates to
it; the rows of items whose settings differ are sampled in separate runs, so an item's edit never depends on its
batch neighbours' annotations. We differ from the reference in one place: our local blend takes the listed words
in both prompts (w_src and w_tgt each wherever they occur in either), theirs w_src in the source and w_tgt in the
target only; the two agree unless w_tgt occurs in the source prompt or w_src in the target.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..errors import DiffinvError
from .editor import EditContext, Editor, Row, SampleRows
from .prompt_to_prompt import PromptToPrompt

Setting = tuple[str, tuple[str, ...], tuple[str, ...]]
"""(mode, local-blend words, reweighted words) of one edit."""


class PieBenchP2P(Editor):
    """Prompt-to-Prompt with each item's settings derived from its PIE-Bench annotations (the authors' protocol)."""

    edit_name = "prompt_to_prompt"

    def __init__(self, annotations: str | None = None, mode: Literal["refine", "word_count"] = "refine",
                 cross_replace_steps: float = 0.4, self_replace_steps: float = 0.6, reweight_scale: float = 2.0,
                 local_blend_threshold: float = 0.3, local_blend_start: float = 0.2,
                 control_unconditional: bool = False):
        """
        Args:
            annotations: PIE-Bench's folder (or its mapping_file.json), read by item id (the mapping's key, as
                ``--data.pie_bench`` and saved records name items) instead of the annotations the items carry
                (``--data.pie_bench``'s): for editing saved records, which carry none. None: the items'; an item
                without any is refined with no blend and no reweighting (the authors' script on an empty
                ``blended_word``).
            mode: 'refine' for every edit (the authors' P2P run script, which made the published table) or
                'word_count': replace where source and target have as many words, refine otherwise (their
                edit-friendly-DDPM script).
            cross_replace_steps: Fraction of the steps with the source's cross-attention (reference: 0.4).
            self_replace_steps: Fraction of the steps with the source's self-attention (reference: 0.6).
            reweight_scale: The equalizer of the target's blended word (reference: 2).
            local_blend_threshold: Threshold of the normalised attention mask (reference: 0.3).
            local_blend_start: Fraction of the steps after which latents are blended (reference: 0.2).
            control_unconditional: Also control a target row's unconditional branch (see
                :class:`~diffinv.editing.PromptToPrompt`); False: the reference, which controls the conditional
                branch only.
        """
        self.annotations = annotations
        from ..data.sources import pie_bench_annotations  # {item id: annotation} of the folder or mapping file

        self._table = pie_bench_annotations(annotations) if annotations is not None else {}
        self.mode = mode
        self.options = dict(cross_replace_steps=cross_replace_steps, self_replace_steps=self_replace_steps,
                            reweight_scale=reweight_scale, local_blend_threshold=local_blend_threshold,
                            local_blend_start=local_blend_start, control_unconditional=control_unconditional)
        self.editor_for(("refine", ("a",), ("a",)))  # the options checked now, in one line, by PromptToPrompt

    def setting(self, annotation: dict | None, source: str, target: str) -> Setting:
        """The edit's (mode, blend words, reweighted words) from its item's annotation (``run_editing_p2p.py``)."""
        words = str((annotation or {}).get("blended_word") or "").split(" ")
        mode = "replace" if self.mode == "word_count" and len(source.split()) == len(target.split()) else "refine"
        if len(words) < 2 or not all(words[:2]):  # "" (no blend in their script), or a malformed annotation
            return mode, (), ()
        w_src, w_tgt = words[:2]
        return mode, tuple(dict.fromkeys((w_src, w_tgt))), (w_tgt,)

    def editor_for(self, setting: Setting) -> PromptToPrompt:
        mode, blend, reweight = setting
        return PromptToPrompt(mode=mode, local_blend_words=list(blend) or None, reweight_words=list(reweight) or None,
                              **self.options)

    def item_annotations(self, ctx: EditContext) -> list[dict | None]:
        """Each item's annotation: the pipeline's (``ctx.annotations``, where it hands them), else this editor's
        file, by item id."""
        given = ctx.annotations
        if given is not None and not self._table:
            return list(given)
        return [self._table.get(i) for i in ctx.item_ids]

    def check_model(self, denoiser) -> None:
        PromptToPrompt().check_model(denoiser)

    def check(self, layout, source: str, targets: list[str]) -> None:
        """Each target's editor takes its prompts (the mode does not depend on the annotation: nothing else to
        check before the item's id is known; 'refine' takes any prompts, 'word_count' picks replace only where the
        counts agree)."""
        for t in targets:
            self.editor_for(self.setting(None, source, t)).check(layout, source, [t])

    def sample(self, run: SampleRows, rows: list[Row], starts: Tensor, ctx: EditContext) -> Tensor:
        """The edit rows grouped by setting, each group sampled by its own PromptToPrompt with its items'
        reconstruction rows; rows no group covers (items without edits) sampled plainly."""
        annotations = self.item_annotations(ctx)
        if len(annotations) != len(ctx.item_ids):
            raise DiffinvError(f"the pipeline handed {len(annotations)} annotations for {len(ctx.item_ids)} items")
        first = ctx.first_row(rows)
        groups: dict[Setting, list[int]] = {}
        for r, row in enumerate(rows):
            if row.is_edit:
                key = self.setting(annotations[row.item], ctx.sources[row.item], row.target)
                groups.setdefault(key, []).append(r)
        out: list[Tensor | None] = [None] * len(rows)
        for key, edits in groups.items():
            items = list(dict.fromkeys(rows[r].item for r in edits))
            picked = sorted({first[g] for g in items} | set(edits))
            latents = self.editor_for(key).sample(
                lambda sub, z, **options: run([picked[k] for k in sub], z, **options),
                [rows[r] for r in picked], starts[picked], ctx)
            for k, r in enumerate(picked):
                if out[r] is None:  # a reconstruction row sampled in several groups: the same each time
                    out[r] = latents[k]
        rest = [r for r in range(len(rows)) if out[r] is None]
        if rest:
            for r, z in zip(rest, run(rest, starts[rest])):
                out[r] = z
        return torch.stack(out)
