"""RF-Edit's feature sharing (diffinv.editing.rf_edit): the features are the inversion's own evaluations, paired as
the option says; injection changes only the edits and pulls them toward the source; no edit depends on its batch
neighbours; records re-edit exactly; what cannot run is refused in one line."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from diffinv import BackboneConfig, DiffinvError
from diffinv.editing import RFEdit
from diffinv.editing.joint_attention import joint_sequence_layers
from diffinv.editing.rf_edit import ValueStore, default_blocks, value_injection
from diffinv.inversion import FireFlowInversion, Inversion, RFSolverInversion

from test_flow_methods import N, item  # 3 steps; a 16-px random image, "a photo of a cat" -> its targets


@pytest.fixture(params=["sd3", "flux"])
def flow(request, tiny_sd3_dir, tiny_flux_dir):
    return request.param, {"sd3": tiny_sd3_dir, "flux": tiny_flux_dir}[request.param]


def editor_for(name: str, **kw) -> RFEdit:
    return RFEdit(**kw)  # FLUX.1-dev: the features at its guidance embedding (1), found by default


class Log(ValueStore):
    """Every V the installed layers compute, in call order (an inversion's evaluations, here)."""

    def __init__(self):
        super().__init__(steps=0, mode="record")
        self.log: dict[str, list[Tensor]] = {}

    def values(self, layer, v):
        self.log.setdefault(layer, []).append(v.detach().clone())
        return v


def test_default_blocks_are_fluxs_share_of_the_joint_layers():
    assert default_blocks(57) == 18  # FLUX.1: single-stream blocks 20..37
    assert default_blocks(24) == 8 and default_blocks(38) == 12 and default_blocks(4) == 1 and default_blocks(2) == 1


def test_the_joint_layers_are_found_in_depth_order(tiny_sd3_dir, tiny_flux_dir, tiny_model_dir):
    from diffinv.backbone import Backbone

    sd3 = Backbone.load(BackboneConfig(pretrained=str(tiny_sd3_dir)))
    names = [n for n, single in joint_sequence_layers(sd3.unet)]
    assert names and all(".attn.processor" in n for n in names)
    assert names == sorted(names, key=lambda n: int(n.split(".")[1]))
    flux = Backbone.load(BackboneConfig(pretrained=str(tiny_flux_dir)))
    layers = joint_sequence_layers(flux.unet)
    singles = [single for _, single in layers]
    assert any(singles) and not all(singles) and singles == sorted(singles)  # double-stream first, then single
    unet = Backbone.load(BackboneConfig(pretrained=str(tiny_model_dir)))
    assert joint_sequence_layers(unet.unet) == []


@pytest.mark.parametrize("pairing", ["level", "interval"])
def test_the_features_are_the_inversions_own_evaluations_at_the_paired_level(pairing, flow, monkeypatch):
    """RF-Solver's inversion evaluates level k (then its midpoint) going up: its V there is what the editor injects
    into the sampling step it pairs with (level: the step from k; interval: the step from k + 1). The other pairing
    reads another level's V, which differs: the check can fail."""
    name, folder = flow
    bb = BackboneConfig(pretrained=str(folder))
    editor = editor_for(name, inject_steps=N, pairing=pairing, blocks=2)  # interval: down to level 0
    plain = RFSolverInversion(bb, N)
    layers = editor.layers(plain.backbone.unet)
    log = Log()
    with value_injection(plain.backbone.unet, log, layers), torch.no_grad():
        plain.run_batch([item(0)])  # 2N inversion evaluations first, then the sampling's
    recorded: dict[tuple[int, str], Tensor] = {}
    injected: dict[str, list[int]] = {}
    original = ValueStore.values

    def spy(self, layer, v):
        if self.mode == "record":
            recorded[(self.step, layer)] = v[: self.items].detach().clone()
        out = original(self, layer, v)
        if self.mode == "inject":  # the sampling step this call belongs to, and what its rows attend with
            injected.setdefault(layer, []).append(self.step)
            edit = self.row_items >= 0
            assert torch.equal(out[edit], recorded[(self.step, layer)][self.row_items[edit]])
            assert torch.equal(out[~edit], v[~edit])  # the reconstruction rows keep their own
        return out

    monkeypatch.setattr(ValueStore, "values", spy)
    with torch.no_grad():
        RFSolverInversion(bb, N, editor=editor).run_batch([item(0)])
    offset = 1 if pairing == "interval" else 0
    compared = 0
    for s in range(N):
        level = N - s - offset  # the step from level N - s
        for layer, _ in layers:
            assert len(log.log[layer]) >= 2 * N
            if level < N:  # the inversion evaluated level k as its step k -> k + 1's first evaluation
                own = log.log[layer][2 * level]
                torch.testing.assert_close(recorded[(s, layer)], own, atol=1e-5, rtol=0)
                other = level - 1 + 2 * offset  # the level the other pairing reads
                if 0 <= other < N:
                    assert (recorded[(s, layer)] - log.log[layer][2 * other]).abs().max() > 1e-3
                compared += 1
    assert compared >= len(layers)
    for layer, _ in layers:  # RF-Solver evaluates twice a step; step s (from level N - s) reads step s's features
        assert injected[layer] == [s for s in range(N) for _ in range(2)]


def test_no_injection_is_the_prompt_swap_and_injection_changes_only_the_edits(flow):
    name, folder = flow
    bb = BackboneConfig(pretrained=str(folder))
    with torch.no_grad():
        [plain] = RFSolverInversion(bb, N).run_batch([item(0)])
        [none] = RFSolverInversion(bb, N, editor=editor_for(name, inject_steps=0)).run_batch([item(0)])
        [full] = RFSolverInversion(bb, N, editor=editor_for(name, inject_steps=N, blocks=2)).run_batch([item(0)])
    assert torch.equal(none.edits[0], plain.edits[0]) and torch.equal(none.reconstruction, plain.reconstruction)
    assert torch.equal(full.reconstruction, plain.reconstruction)  # the reconstruction row is left alone
    assert (full.edits[0] - plain.edits[0]).abs().max() > 1e-3
    # one feature evaluation per injected step and item, on top of the sampling's
    assert full.extra["evaluations_sampling"] == plain.extra["evaluations_sampling"] + N


def test_injection_pulls_the_edit_toward_the_source_on_the_trained_flow_model():
    """On the embedded flow model, the more steps and layers take the source's V, the closer the edit stays to the
    reconstruction (a prompt swap that changes shape and colour)."""
    import diffinv
    from diffinv.shapes.world import render_striped, sample_striped_scenes

    torch.manual_seed(0)
    source, other = sample_striped_scenes(2, seed=5, split="held_out")
    m = diffinv.load("shapes-flow", device="cpu")
    inv = m.invert(render_striped(source), source.caption, method="rf_solver", steps=8, progress=False)

    def distance(editor):
        edit = inv.edit(other.caption, editor=editor)
        return float(np.abs(np.asarray(edit.image, float) - np.asarray(inv.reconstruction, float)).mean())

    swap, some, full = distance(None), distance(RFEdit(inject_steps=3)), distance(RFEdit(inject_steps=8, blocks=4))
    assert full < some < swap and full < 0.5 * swap


@pytest.mark.parametrize("method", [RFSolverInversion, FireFlowInversion])
def test_an_edit_does_not_depend_on_its_batch_neighbours(method, flow):
    name, folder = flow
    guidance = 3.0 if name == "sd3" else 1.0  # SD 3 under CFG: the unconditional rows are injected too
    m = method(BackboneConfig(pretrained=str(folder)), N, guidance_scale=guidance,
               editor=editor_for(name, inject_steps=2, blocks=2))
    with torch.no_grad():
        batch = m.run_batch([item(0), item(1, targets=("a photo of a red car", "a big dog"))])
        alone = m.run_batch([item(1, targets=("a big dog",))])[0]
        first = m.run_batch([item(0)])[0]
    assert (alone.edits[0] - batch[1].edits[1]).abs().max() < 1e-4
    assert (first.edits[0] - batch[0].edits[0]).abs().max() < 1e-4
    assert (batch[0].edits[0] - batch[1].edits[1]).abs().max() > 1e-3  # items do differ: the check can fail


def test_a_record_re_edits_exactly(flow, tmp_path):
    name, folder = flow
    method = FireFlowInversion(BackboneConfig(pretrained=str(folder)), N, editor=editor_for(name, inject_steps=2))
    with torch.no_grad():
        [r] = method.run_batch([item(0)])
        record = Inversion.load(r.inversion.save(Path(tmp_path) / "r.safetensors"))
        [(z, [edit])] = method.edit([record], [["a photo of a dog"]], ids=["img0"])
        decoded = method.backbone.decode(torch.stack([z, edit])).cpu()
    assert torch.equal(decoded[0], r.reconstruction) and torch.equal(decoded[1], r.edits[0])


def test_what_cannot_run_is_refused_in_one_line(tiny_model_dir, tiny_sd3_dir):
    sd = RFSolverInversion  # refused on a diffusion model by the method already; the editor says so too
    from diffinv import DDIMInversion

    with pytest.raises(DiffinvError, match="RFEdit injects a flow model's attention values.*flow models"):
        DDIMInversion(BackboneConfig(pretrained=str(tiny_model_dir)), N, editor=RFEdit()).check_items([item(0)])
    bb = BackboneConfig(pretrained=str(tiny_sd3_dir))
    with pytest.raises(DiffinvError, match="not guidance-distilled"):
        sd(bb, N, editor=RFEdit(embedded_guidance=True)).check_items([item(0)])
    with pytest.raises(DiffinvError, match="blocks is 99, and this model has"):
        sd(bb, N, editor=RFEdit(blocks=99)).check_items([item(0)])
    with pytest.raises(DiffinvError, match="injects 5 steps, and this edit samples 3"):
        sd(bb, N, editor=RFEdit(inject_steps=5)).check_items([item(0)])
    for bad in (dict(inject_steps=-1), dict(blocks=0), dict(pairing="step"), dict(feature_guidance=float("nan")),
                dict(features_on="gpu")):
        with pytest.raises(DiffinvError):
            RFEdit(**bad)
