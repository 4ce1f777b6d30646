import pytest
import torch

from diffinv import Inversion
from diffinv.errors import DiffinvError
from diffinv.inversion.record import Sampling


def record(**kw):
    n = 4
    base = dict(z0=torch.randn(4, 2, 2), trajectory=torch.randn(n + 1, 4, 2, 2), timesteps=torch.arange(n) * 10 + 1,
                source_image=torch.zeros(3, 8, 8, dtype=torch.uint8), source_prompt="a cat", method="npi",
                model="shapes", guidance_scale=7.5)
    return Inversion(**(base | kw))


def test_round_trip_with_optional_fields(tmp_path):
    r = record(unconditional=torch.randn(4, 8, 16), z_T=torch.randn(4, 2, 2), extra={"bias": torch.ones(3)},
               meta={"iterations": "10"})
    loaded = Inversion.load(r.save(tmp_path / "r.safetensors"))
    for name in ("z0", "trajectory", "timesteps", "source_image", "unconditional", "z_T"):
        assert torch.equal(getattr(loaded, name), getattr(r, name))
    assert torch.equal(loaded.extra["bias"], r.extra["bias"])
    assert loaded.meta == {"iterations": "10"} and loaded.guidance_scale == 7.5 and loaded.num_steps == 4
    assert torch.equal(loaded.start_latent, r.z_T)


def test_save_is_atomic_and_leaves_no_temporary(tmp_path):
    record().save(tmp_path / "r.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.safetensors"]


def test_corrupt_truncated_and_foreign_files_are_named(tmp_path):
    path = record().save(tmp_path / "r.safetensors")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DiffinvError, match="trunc.safetensors is corrupt"):
        Inversion.load(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(DiffinvError, match="junk.safetensors is corrupt"):
        Inversion.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DiffinvError, match="not a diffinv inversion record"):
        Inversion.load(tmp_path / "other.safetensors")
    with pytest.raises(DiffinvError, match="does not exist"):
        Inversion.load(tmp_path / "none.safetensors")


def test_pie_bench_metrics_are_computed_outside_the_edit_mask():
    """An edit that changes only the masked (edited) region scores perfectly on the unedited region."""
    from diffinv.callbacks import metric_lines
    from diffinv.inversion.result import ItemResult

    rle = []
    for y in range(128, 384):  # the central half of the 512x512 annotation grid
        rle += [y * 512 + 128, 256]
    source = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    edit = source.clone()
    edit[:, 10:22, 10:22] = 0.5  # inside the edit mask only (it covers rows/cols 8..23 at 32x32)
    r = ItemResult(id="x", source=source, reconstruction=source.clone(), edits=[edit], target_prompts=["a dog"],
                   inversion=record(), seconds_inversion=1.0, seconds_sampling=1.0,
                   meta={"mask_rle": rle, "editing_type_id": "1"})
    recon, edited = metric_lines(r, "npi", "shapes", 7.5)
    assert recon["psnr"] == "inf" and recon["psnr_unedited"] == "inf"
    assert isinstance(edited["psnr"], float) and edited["psnr_unedited"] == "inf" and edited["mse_unedited"] == 0.0
    assert edited["editing_type_id"] == "1" and "mask_rle" not in edited


def test_load_refuses_model_independent_damage_naming_the_file(tmp_path):
    cases = {
        "meta.safetensors": (record(meta=[1, 2]), "has meta of type list"),
        "level.safetensors": (record(sampling=Sampling(start_level="x")), "start_level 'x', expected a level"),
        "eta.safetensors": (record(sampling=Sampling(eta="lots")), "sampling eta 'lots', expected a finite number"),
        "noise.safetensors": (record(sampling=Sampling(step="stochastic")), "stochastic step but lacks extra.step_"),
        "nan.safetensors": (record(z0=torch.full((4, 2, 2), float("nan"))), "NaN or infinite values in z0"),
        "w.safetensors": (record(guidance_scale=float("inf")), "guidance_scale inf"),
        "zt.safetensors": (record(z_T=torch.zeros(4, 3, 2)), "z_T of shape 4x3x2, expected 4x2x2"),
    }
    for name, (r, message) in cases.items():
        path = r.save(tmp_path / name)
        with pytest.raises(DiffinvError, match=f"inversion record {path} .*{message}"):
            Inversion.load(path)


def test_diagnostic_extras_may_be_nan():
    """latent-TOP's start losses are NaN with one start by design: only what sampling reads must be finite."""
    from diffinv.inversion.record import record_problem

    assert record_problem(record(extra={"start_losses": torch.tensor([float("nan")])})) is None
    assert "extra.step_noise" in record_problem(record(extra={"step_noise": torch.full((4, 4, 2, 2), float("inf"))}))


def test_check_record_against_the_model(tiny_backbone):
    from diffinv.inversion import check_record as exported
    from diffinv.inversion.record import check_record

    assert exported is check_record
    sched = tiny_backbone.schedule(4).timesteps.cpu()
    fits = dict(z0=torch.zeros(4, 4, 5), trajectory=torch.zeros(5, 4, 4, 5), timesteps=sched,
                source_image=torch.zeros(3, 8, 10, dtype=torch.uint8), unconditional=torch.zeros(4, 8, 16))
    check_record(record(**fits), tiny_backbone)  # sound: no error
    with pytest.raises(DiffinvError, match="holds 3-channel latents; this model's .* have 4"):
        check_record(record(**fits | dict(z0=torch.zeros(3, 4, 5), trajectory=torch.zeros(5, 3, 4, 5))), tiny_backbone)
    with pytest.raises(DiffinvError, match=r"holds 4x5 latents for a 8x12 source image; .*needs 4x6"):
        check_record(record(**fits | dict(source_image=torch.zeros(3, 8, 12, dtype=torch.uint8))), tiny_backbone)
    with pytest.raises(DiffinvError, match="unconditional embeddings of shape 8x32 per step; .*conditioning is 8x16"):
        check_record(record(**fits | dict(unconditional=torch.zeros(4, 8, 32))), tiny_backbone)
    with pytest.raises(DiffinvError, match="4 timesteps do not match this model's 4-step schedule"):
        check_record(record(**fits | dict(timesteps=sched + 1)), tiny_backbone)
