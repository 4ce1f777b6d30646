"""A saved record re-edits as it was inverted, whatever method's config edits it, or the run refuses in one line
(issue 21): its typed sampling pins the step rule and its parameters, the start level, the reconstruction's
guidance scale and unconditional branch, DirectInversion's snap and ProxNPI's pull."""

import dataclasses
import json

import pytest
import torch

from diffinv import EDICT, BackboneConfig, NegativePromptInversion
from diffinv.errors import DiffinvError
from diffinv.inversion import registry
from diffinv.inversion.record import FORMAT, Inversion, Sampling, legacy_sampling
from test_methods import item

STEPS = 6
TARGET = "a photo of a dog"
SETTINGS = {"null_text": {"num_inner_steps": 2}, "latent_top": {"num_inner_steps": 2, "num_starts": 1}}
METHODS = {  # every registered method that runs on the tiny SD (the flow solvers: tests/test_flow_methods.py), and
    # EDICT at another scale (the re-edit)
    **{m.name: (lambda bb, m=m: m.cls(bb, STEPS, **SETTINGS.get(m.name, {}))) for m in registry.METHODS
       if not m.cls.needs_flow},
    "edict_w75": lambda bb: EDICT(bb, STEPS, guidance_scale=7.5),
}
OPTIMIZING = {m.name for m in registry.METHODS if m.optimizes}


@pytest.fixture(scope="module")
def made(tiny_model_dir, tmp_path_factory):
    """Each method's record saved and loaded back, with the reconstruction its own run sampled."""
    bb = BackboneConfig(pretrained=str(tiny_model_dir))
    folder = tmp_path_factory.mktemp("records")
    out = {}
    for name, make in METHODS.items():
        method = make(bb)
        with torch.enable_grad() if name in OPTIMIZING else torch.inference_mode():
            inv = method.run_batch([item(0, targets=[])])[0].inversion
            (own, _), = method.edit([inv], [[TARGET]])  # the same rows as the re-edits: no batch float noise
        out[name] = (Inversion.load(inv.save(folder / f"{name}.safetensors")), own)
    return bb, out


@pytest.mark.parametrize("record", list(METHODS))
def test_every_config_reconstructs_every_record_as_its_own_or_refuses(made, record):
    bb, records = made
    inv, own = records[record]
    refused = []
    for name, make in METHODS.items():
        method = make(bb)
        try:
            with torch.inference_mode():
                (rec, edits), = method.edit([inv], [[TARGET]])
        except DiffinvError as e:
            assert "\n" not in str(e) and str(inv.path) in str(e)
            refused.append(name)
            continue
        torch.testing.assert_close(rec, own, atol=1e-5, rtol=0, msg=lambda m: f"{name} on {record}'s record: {m}")
        assert (edits[0] - rec).abs().max() > 1e-3
    # only ProxNPI's record (whose reconstruction is pulled by its proximal settings) is refused, by the others
    assert refused == ([n for n in METHODS if n != "proxnpi"] if record == "proxnpi" else [])


def test_edict_record_keeps_its_scale_and_null_prompt(made):
    """The issue's case: an EDICT record re-edited at CFG 7.5 or by NPI reconstructed at 6-18 dB; now exactly."""
    bb, records = made
    inv, own = records["edict"]
    assert inv.sampling == Sampling(step="coupled", mix=0.93, guidance_scale=3.0, unconditional="null")
    # EDICT is exact but for float32 round-off of the denoiser, which its inverse mixing (1 / p a step) grows
    torch.testing.assert_close(own.float(), inv.z0.float(), atol=5e-3, rtol=0)
    with torch.inference_mode():
        (npi_rec, npi_edits), = NegativePromptInversion(bb, STEPS).edit([inv], [[TARGET]])
        (w_rec, w_edits), = EDICT(bb, STEPS, guidance_scale=7.5).edit([inv], [[TARGET]])
    torch.testing.assert_close(npi_rec, own, atol=1e-5, rtol=0)
    torch.testing.assert_close(w_rec, own, atol=1e-5, rtol=0)
    assert (npi_edits[0] - w_edits[0]).abs().max() > 1e-3  # the edits do follow the config (source as negative)


@pytest.mark.parametrize("name", list(METHODS))
def test_version_1_records_keep_loading_with_the_same_sampling(made, name, tmp_path):
    """A record written before the typed sampling (its method name and meta strings) reads back the same."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, records = made
    inv, _ = records[name]
    with safe_open(str(inv.path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    plan = Sampling.from_json(metadata.pop("sampling"))
    legacy = {}  # what version 1 wrote into meta
    if plan.step == "stochastic":
        legacy |= {"eta": repr(plan.eta), "reconstruction_guidance_scale": repr(plan.guidance_scale)}
    if plan.step == "coupled":
        legacy["mix"] = repr(plan.mix)
    if plan.start_level is not None:
        legacy["start_level"] = str(plan.start_level)
    metadata |= {"format": "diffinv.inversion/1", "meta": json.dumps(json.loads(metadata["meta"]) | legacy)}
    path = tmp_path / "v1.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    old = Inversion.load(path)
    # version 1 never recorded ProxNPI's settings: its records read as NPI's
    assert old.sampling == (dataclasses.replace(plan, rule=None) if name == "proxnpi" else plan)
    assert FORMAT.endswith("/2") and Inversion.load(old.save(tmp_path / "v2.safetensors")).sampling == old.sampling


def test_legacy_sampling_reads_each_method():
    assert legacy_sampling("npi", 7.5, {}, {}, False).unconditional == "source"
    assert legacy_sampling("null_text", 7.5, {}, {}, True).unconditional == "learned"
    assert legacy_sampling("direct_inversion", 7.5, {}, {}, False).snap_source
    cycle = legacy_sampling("cycle_diffusion", 7.5, {"eta": "0.5", "reconstruction_guidance_scale": "1.0",
                                                     "start_level": "4"}, {"step_noise": None}, False)
    assert cycle == Sampling(step="stochastic", eta=0.5, guidance_scale=1.0, start_level=4)


def test_an_option_typed_against_the_records_own_is_refused_in_one_line(made, tmp_path, capsys):
    """A record is re-edited with its own eta; `--model.eta 0.5` typed beside it was silently ignored."""
    from pathlib import Path

    from diffinv.cli import main

    bb, records = made
    inv, _ = records["cycle_diffusion"]
    repo = Path(__file__).resolve().parents[1]
    argv = ["predict", "-c", str(repo / "configs/cycle_diffusion.yaml"), "--model.backbone.pretrained", bb.pretrained,
            "--trainer.accelerator", "cpu", "--output_dir", str(tmp_path / "out"),
            "--data.records", str(inv.path)]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--model.eta", "0.5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert (f"inversion record {inv.path} was made with eta 1.0, not --model.eta 0.5: a record is re-edited with "
            "its own eta; drop the option or give 1.0") in err
    assert main([*argv, "--model.eta", "1.0"]) in (0, None)  # the record's own value is accepted
