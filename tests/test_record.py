import pytest
import torch

from diffinv import Inversion
from diffinv.errors import DiffinvError


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
