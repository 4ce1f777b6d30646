import numpy as np
import pytest
import torch

from diffinv import (
    BackboneConfig,
    DDIMInversion,
    Inversion,
    NegativePromptInversion,
    ProximalGuidance,
    ProximalNegativePromptInversion,
)
from diffinv.data import Item

STEPS = 6


def image(seed: int, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
    return np.kron(base, np.ones((size // 4, size // 4, 1), dtype=np.uint8))


def item(seed=0, targets=("a photo of a dog",), source="a photo of a cat"):
    return Item(f"img{seed}", image(seed), source, list(targets))


@pytest.fixture(scope="module")
def methods(tiny_model_dir):
    bb = BackboneConfig(pretrained=str(tiny_model_dir))
    return {
        "ddim_w1": DDIMInversion(bb, STEPS, guidance_scale=1.0),
        "ddim": DDIMInversion(bb, STEPS),
        "npi": NegativePromptInversion(bb, STEPS),
        "prox_inf": ProximalNegativePromptInversion(
            bb, STEPS, proximal=ProximalGuidance(quantile=1.0, reconstruction_guidance=False, inversion_guidance=False)),
        "prox_zero": ProximalNegativePromptInversion(
            bb, STEPS, proximal=ProximalGuidance(quantile=0.0, reconstruction_guidance=False, inversion_guidance=False)),
        "prox": ProximalNegativePromptInversion(bb, STEPS, proximal=ProximalGuidance(until_timestep=1000)),
    }


@torch.inference_mode()
def run(method, items):
    return method.predict_step(items)


def test_npi_reconstruction_equals_ddim_at_w1(methods):
    npi = run(methods["npi"], [item()])[0]
    ddim = run(methods["ddim_w1"], [item()])[0]
    torch.testing.assert_close(npi.reconstruction, ddim.reconstruction, atol=1e-5, rtol=0)
    # and NPI's reconstruction does not depend on w, unlike the DDIM baseline's
    ddim75 = run(methods["ddim"], [item()])[0]
    assert (ddim75.reconstruction - npi.reconstruction).abs().max() > 1e-3


def test_npi_edit_with_target_equal_to_source_is_the_reconstruction(methods):
    r = run(methods["npi"], [item(targets=["a photo of a cat"])])[0]
    torch.testing.assert_close(r.edits[0], r.reconstruction, atol=1e-5, rtol=0)


def test_proxnpi_limits(methods):
    npi = run(methods["npi"], [item()])[0]
    inf = run(methods["prox_inf"], [item()])[0]
    zero = run(methods["prox_zero"], [item()])[0]
    # lambda -> inf: every delta thresholded away, the edit is the plain DDIM (= NPI) reconstruction
    torch.testing.assert_close(inf.edits[0], npi.reconstruction, atol=1e-5, rtol=0)
    # lambda = 0: nothing thresholded, the edit is NPI's edit
    torch.testing.assert_close(zero.edits[0], npi.edits[0], atol=1e-5, rtol=0)
    assert (npi.edits[0] - npi.reconstruction).abs().max() > 1e-3  # the edit does change the image


def test_proxnpi_guidance_pulls_reconstruction_towards_source_latent(methods):
    inv = run(methods["npi"], [item()])[0].inversion
    with torch.inference_mode():
        (plain, _), = methods["npi"].edit([inv], [[]])
        (guided, _), = methods["prox"].edit([inv], [[]])
    err = lambda z: float(((z - inv.z0) ** 2).mean())  # noqa: E731
    assert err(guided) < 0.5 * err(plain)


@pytest.mark.parametrize("name", ["ddim", "npi", "prox"])
def test_batching_never_changes_a_result(methods, name):
    items = [item(0), item(1, targets=["a red car", "a blue car on the grass"]), item(2, targets=[])]
    together = run(methods[name], items)
    alone = [run(methods[name], [i])[0] for i in items]
    for a, b in zip(together, alone):
        assert a.id == b.id and len(a.edits) == len(b.edits)
        torch.testing.assert_close(a.reconstruction, b.reconstruction, atol=1e-4, rtol=0)
        for x, y in zip(a.edits, b.edits):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=0)


def test_mixed_image_sizes_in_one_batch(methods):
    big = Item("big", image(3, size=32), "a cat", ["a dog"], resolution=24)
    small = item(4)
    out = run(methods["npi"], [big, small])
    assert [r.id for r in out] == ["big", "img4"]
    assert out[0].source.shape[-2:] == (24, 24) and out[1].source.shape[-2:] == (16, 16)


@pytest.mark.parametrize("name", ["npi", "prox", "ddim"])
def test_saved_record_reproduces_reconstruction_bit_for_bit(methods, name, tmp_path):
    m = methods[name]
    r = run(m, [item()])[0]
    path = r.inversion.save(tmp_path / "inv.safetensors")
    loaded = Inversion.load(path)
    assert loaded.source_prompt == "a photo of a cat" and loaded.method == m.method_name
    assert torch.equal(loaded.trajectory, r.inversion.trajectory)
    with torch.inference_mode():
        (rec, edits), = m.edit([loaded], [["a photo of a dog"]])
        again = m.backbone.decode(torch.stack([rec, *edits]))
    assert torch.equal(again[0], r.reconstruction)
    assert torch.equal(again[1], r.edits[0])


def test_each_record_keeps_its_own_target_prompts(methods):
    out = run(methods["npi"], [item(0, targets=["a red car"]), item(1, targets=["a blue car", "a dog"])])
    assert out[0].inversion.meta["target_prompts"] == '["a red car"]'
    assert out[1].inversion.meta["target_prompts"] == '["a blue car", "a dog"]'
