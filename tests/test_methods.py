import dataclasses

import numpy as np
import pytest
import torch

from diffinv import (
    BackboneConfig,
    CycleDiffusion,
    DDIMInversion,
    Inversion,
    NegativePromptInversion,
    ProximalGuidance,
    ProximalNegativePromptInversion,
)
from diffinv.data import Item
from diffinv.errors import DiffinvError
from diffinv.inversion.record import Sampling

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
        "cycle": CycleDiffusion(bb, STEPS),
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
    own = run(methods["prox"], [item()])[0].inversion
    assert own.sampling.rule == dataclasses.asdict(methods["prox"].proximal) and inv.sampling.rule is None
    with torch.inference_mode():
        (plain, _), = methods["npi"].edit([inv], [[]])
        (guided, _), = methods["prox"].edit([own], [[]])
        (kept, _), = methods["prox"].edit([inv], [[]])  # NPI's record keeps NPI's reconstruction
    err = lambda z: float(((z - inv.z0) ** 2).mean())  # noqa: E731
    assert err(guided) < 0.5 * err(plain)
    torch.testing.assert_close(kept, plain, atol=1e-6, rtol=0)
    with pytest.raises(DiffinvError, match="reconstructs under guidance settings that npi's config does not "
                                           r"reproduce \(this config applies none\)"):
        methods["npi"].edit([own], [[]])  # the pull is pinned in ProxNPI's record: NPI cannot reproduce it
    other = ProximalNegativePromptInversion(methods["prox"].backbone_config, STEPS,
                                            proximal=ProximalGuidance(until_timestep=1000, step_size=0.2))
    with pytest.raises(DiffinvError, match=r"proxnpi's config does not reproduce \(they differ in step_size\)"):
        other.edit([own], [[]])


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


@pytest.mark.parametrize("name", ["npi", "prox", "ddim", "cycle"])
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


def test_dpm_encoder_code_returns_z0_exactly_in_float64(tiny_model_dir):
    """CycleDiffusion's exactness: the stochastic sampler with the encoder's residuals lands on z0 (float64)."""
    from diffinv.backbone import Backbone
    from diffinv.editing.sampler import sample
    from diffinv.guidance import cfg
    from diffinv.inversion.cycle_diffusion import dpm_encode
    from diffinv.steps import StochasticStep

    bb = Backbone.load(BackboneConfig(pretrained=str(tiny_model_dir))).to(torch.float64)
    schedule = bb.schedule(STEPS)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    cond = bb.encode_prompts(["a photo of a cat", "a red car"]).double()
    null = bb.encode_prompts(["", ""]).double()
    for eta in (1.0, 0.3, 0.0):
        def guided(z, t):
            both = bb.eps(torch.cat([z, z]), t, torch.cat([cond, null]))
            return cfg(both[2:], both[:2], 7.5)

        noise = torch.randn(STEPS, *z0.shape, generator=g, dtype=torch.float64)
        chain, residuals = dpm_encode(guided, z0, schedule, eta, noise)
        assert torch.equal(chain[0], z0) and chain.shape[0] == STEPS + 1
        z = sample(bb, schedule, chain[-1], cond, null, 7.5, step=StochasticStep(eta=eta, noise=residuals))
        torch.testing.assert_close(z, z0, atol=1e-9, rtol=0)


def test_cycle_diffusion_reconstructs_exactly_and_edits_with_the_same_noise(tiny_model_dir):
    from diffinv import CycleDiffusion

    bb = BackboneConfig(pretrained=str(tiny_model_dir))
    m = CycleDiffusion(bb, STEPS)
    with torch.inference_mode():
        r = m.predict_step([item(0)])[0]
        (rec, edits), = m.edit([r.inversion], [["a photo of a dog"]], ["img0"])
    inv = r.inversion
    assert inv.extra["step_noise"].shape == (STEPS, *inv.z0.shape)
    # float32 round-off along the chain (exact in float64, above); encoded at w = 1, where it stays small
    torch.testing.assert_close(rec, inv.z0, atol=1e-4, rtol=0)
    torch.testing.assert_close(inv.trajectory[0], inv.z0)
    assert (edits[0] - rec).abs().max() > 1e-3
    # the code is stochastic: z_N is not DDIM's deterministic inversion, and the residuals have the scale sigma_k
    ddim = run(methods_for(bb)["ddim"], [item(0)])[0].inversion
    assert (inv.trajectory[-1] - ddim.trajectory[-1]).abs().max() > 0.1
    a_N = float(m.backbone.schedule(STEPS).alphas[-1])
    n_T = (inv.trajectory[-1] - a_N**0.5 * inv.z0) / (1 - a_N) ** 0.5  # z_N ~ q(z_N | z0): standard normal noise
    assert 0.7 < float(n_T.std()) < 1.3
    with torch.inference_mode():
        other = CycleDiffusion(bb, STEPS, seed=1).predict_step([item(0)])[0].inversion
    assert (other.trajectory[-1] - inv.trajectory[-1]).abs().max() > 0.1  # the run seed draws another code
    # eta = 0 is still exact (residuals, not noise / sigma, are stored)
    with torch.inference_mode():
        r0 = CycleDiffusion(bb, STEPS, eta=0.0).predict_step([item(0)])[0]
        (rec0, _), = CycleDiffusion(bb, STEPS, eta=0.0).edit([r0.inversion], [[]])
    torch.testing.assert_close(rec0, r0.inversion.z0, atol=1e-4, rtol=0)


def methods_for(bb):
    return {"ddim": DDIMInversion(bb, STEPS)}


def test_another_method_samples_a_cycle_diffusion_record_with_its_code(methods, tmp_path):
    r = run(methods["cycle"], [item()])[0]
    loaded = Inversion.load(r.inversion.save(tmp_path / "inv.safetensors"))
    assert loaded.sampling == Sampling(step="stochastic", eta=1.0, guidance_scale=1.0)
    assert loaded.extra["step_noise"].shape[0] == STEPS
    with torch.inference_mode():  # both at w = 7.5 for edits; the record pins its reconstruction's w = 1
        (rec, edits), = methods["ddim"].edit([loaded], [["a photo of a dog"]])
        (npi_rec, npi_edits), = methods["npi"].edit([loaded], [["a photo of a dog"]])
    torch.testing.assert_close(rec, r.inversion.z0, atol=1e-4, rtol=0)
    torch.testing.assert_close(npi_rec, r.inversion.z0, atol=1e-4, rtol=0)
    assert (npi_edits[0] - edits[0]).abs().max() > 1e-3  # another unconditional branch, the same noise
