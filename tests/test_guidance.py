import torch

from diffinv.guidance import ProximalGuidance, cfg, prox_l0, prox_l1, proximal_eps, quantile_threshold


def test_soft_threshold_eq8():
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.5])
    torch.testing.assert_close(prox_l1(x, 1.0), torch.tensor([-2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.5]))


def test_hard_threshold_eq9_keeps_values_above_sqrt_2_lambda():
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.5])
    # lambda = 0.5 -> sqrt(2 lambda) = 1: strictly larger magnitudes survive unchanged
    torch.testing.assert_close(prox_l0(x, 0.5), torch.tensor([-3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.5]))
    torch.testing.assert_close(prox_l0(x, 0.0), x)


def test_quantile_threshold_scopes():
    d = torch.stack([torch.full((1, 2, 2), 1.0), torch.arange(4.0).view(1, 2, 2)])
    item = quantile_threshold(d, 1.0, torch.tensor([0, 0]))
    assert item.flatten().tolist() == [3.0, 3.0]
    per = quantile_threshold(d, 1.0, torch.tensor([0, 1]))
    assert per.flatten().tolist() == [1.0, 3.0]
    assert quantile_threshold(d, 0.0, torch.tensor([0, 1])).abs().sum() == 0


def test_proximal_eps_limits_are_ddim_and_npi():
    g = torch.Generator().manual_seed(0)
    src, tar = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    groups = torch.tensor([0, 0])
    for prox in ("l0", "l1"):
        eps, keep = proximal_eps(src, tar, 7.5, ProximalGuidance(prox=prox, quantile=1.0), groups)
        torch.testing.assert_close(eps, src)  # everything thresholded away: plain DDIM with eps_src
        assert keep.min() == 1
        eps, keep = proximal_eps(src, tar, 7.5, ProximalGuidance(prox=prox, quantile=0.0, mask_dilation=0), groups)
        torch.testing.assert_close(eps, cfg(src, tar, 7.5))  # nothing thresholded: NPI
        assert keep.max() == 0


def test_mask_marks_the_edited_region_and_dilates():
    src = torch.zeros(1, 1, 7, 7)
    tar = torch.zeros(1, 1, 7, 7)
    tar[0, 0, 3, 3] = 5.0
    cfgp = ProximalGuidance(quantile=0.5, mask_dilation=0)
    eps, keep = proximal_eps(src, tar, 2.0, cfgp, torch.tensor([0]))
    assert keep.sum() == 48 and keep[0, 0, 3, 3] == 0
    assert eps[0, 0, 3, 3] == 10.0  # l0 keeps the spike, scaled by w
    _, keep = proximal_eps(src, tar, 2.0, ProximalGuidance(quantile=0.5, mask_dilation=1), torch.tensor([0]))
    assert keep.sum() == 49 - 9


def test_authors_operators_on_hand_made_tensors():
    from diffinv.guidance import apply_prox

    x = torch.tensor([-3.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.5])
    tau = torch.tensor(1.0)
    # the authors' 'l0': x - clamp(x, -tau, tau), i.e. a soft threshold (eq. 8), not eq. 9's hard one
    torch.testing.assert_close(apply_prox(x, tau, "authors_l0"), torch.tensor([-2.0, -0.5, 0, 0, 0, 0, 0, 0.5, 1.5]))
    torch.testing.assert_close(apply_prox(x, tau, "authors_l0"), apply_prox(x, tau, "l1"))
    # the authors' 'l1': x + 2 tau below -tau (-1.5 flips sign), x - tau on (tau, 2 tau), x - 2 tau from 2 tau on
    torch.testing.assert_close(apply_prox(x, tau, "authors_l1"), torch.tensor([-1.0, 0.5, 0, 0, 0, 0, 0, 0.5, 0.5]))
    jump = apply_prox(torch.tensor([1.999, 2.0]), tau, "authors_l1")
    torch.testing.assert_close(jump, torch.tensor([0.999, 0.0]))
    torch.testing.assert_close(apply_prox(x, tau, "l0"), torch.tensor([-3.0, -1.5, 0, 0, 0, 0, 0, 1.5, 2.5]))


def test_row_scope_thresholds_each_target_at_its_own_quantile():
    g = torch.Generator().manual_seed(1)
    src = torch.randn(3, 4, 8, 8, generator=g)
    tar = torch.cat([src[:1], torch.randn(2, 4, 8, 8, generator=g)])  # row 0: a reconstruction, delta = 0
    edit_rows = torch.tensor([False, True, True])
    cfgp = ProximalGuidance(quantile=0.7, mask_dilation=0)
    eps, keep = proximal_eps(src, tar, 1.0, cfgp, torch.tensor([0, 0, 0]), edit_rows)
    zeroed = ((eps - src) == 0).flatten(1).float().mean(1)
    assert abs(zeroed[1] - 0.7) < 0.01 and abs(zeroed[2] - 0.7) < 0.01
    assert keep[0].min() == 1  # the reconstruction row: plain CFG, nothing edited
    alone, _ = proximal_eps(src[1:2], tar[1:2], 1.0, cfgp, torch.tensor([0]), edit_rows[1:2])
    torch.testing.assert_close(eps[1:2], alone)
    # the authors' scope: tau over the reconstruction row's zeros too, so only ~40% of a target's entries go
    item, _ = proximal_eps(src[:2], tar[:2], 1.0, ProximalGuidance(quantile=0.7, scope="item", mask_dilation=0),
                           torch.tensor([0, 0]), edit_rows[:2])
    assert abs(((item[1] - src[1]) == 0).float().mean() - 0.4) < 0.02


def authors_step(eps_uncond, eps_text, w, quantile, prox, dilate_mask):
    """The ProxNPI authors' guidance step, transcribed from their released code's formulas: tau over the whole
    batched tensor, 'l0' = x - clamp(x), 'l1' = that minus tau again, mask from the shrunk delta, dilated."""
    score_delta = eps_text - eps_uncond
    threshold = score_delta.abs().quantile(quantile)
    score_delta = score_delta - score_delta.clamp(-threshold, threshold)
    if prox == "l1":
        score_delta = torch.where(score_delta > 0, score_delta - threshold, score_delta)
        score_delta = torch.where(score_delta < 0, score_delta + threshold, score_delta)
    mask_edit = (score_delta.abs() > threshold).float()
    if dilate_mask > 0:
        mask_edit = torch.nn.functional.max_pool2d(mask_edit, 2 * dilate_mask + 1, 1, dilate_mask)
    return eps_uncond + w * score_delta, 1 - mask_edit


def test_reference_config_matches_the_authors_code():
    import yaml

    from test_cli import REPO

    cfg_ = yaml.safe_load((REPO / "configs/reference/proxnpi.yaml").read_text())["model"]["init_args"]
    g = torch.Generator().manual_seed(2)
    src_row = torch.randn(1, 4, 8, 8, generator=g)
    uncond = src_row.repeat(2, 1, 1, 1)  # NPI: the source prompt is every row's negative
    text = torch.cat([src_row, torch.randn(1, 4, 8, 8, generator=g)])  # their batch: [source, target]
    for prox in ("authors_l0", "authors_l1"):
        config = ProximalGuidance(**{**cfg_["proximal"], "prox": prox})
        ours = proximal_eps(uncond, text, cfg_["guidance_scale"], config, torch.tensor([0, 0]),
                            torch.tensor([False, True]))
        theirs = authors_step(uncond, text, cfg_["guidance_scale"], config.quantile, prox.removeprefix("authors_"),
                              config.mask_dilation)
        torch.testing.assert_close(ours[0], theirs[0])
        torch.testing.assert_close(ours[1], theirs[1])


def test_guidance_rules_on_hand_made_tensors():
    import pytest

    from diffinv.guidance import ClassifierFree, Proximal, row_scale

    u, c = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    eps, mask = ClassifierFree(3.0).combine(u, c)
    assert torch.equal(eps, torch.full_like(u, 3.0)) and mask is None
    per_row = row_scale(torch.tensor([1.0, 2.0]), u)
    assert per_row.shape == (2, 1, 1, 1) and torch.equal(ClassifierFree(per_row).combine(u, c)[0][:, 0, 0, 0],
                                                         torch.tensor([1.0, 2.0]))
    z0, traj = torch.full((2, 1, 2, 2), 10.0), torch.stack([torch.full((2, 1, 2, 2), float(i)) for i in range(3)])
    config = ProximalGuidance(step_size=0.5, until_timestep=400)
    rule = Proximal(config, 7.5, groups=torch.arange(2), z0=z0, trajectory=traj)
    keep = torch.tensor([1.0, 0.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    x0 = torch.zeros(2, 1, 2, 2)
    # Alg. 1 line 10: x0 - eta M (x0 - z0), only where M = 1 and only while t < T_rec
    assert torch.equal(rule.correct_x0(x0, 399, 2, keep)[:, 0, 0, 0], torch.tensor([5.0, 0.0]))
    assert torch.equal(rule.correct_x0(x0, 400, 2, keep), x0)
    # inversion guidance pulls towards z*_{k-1}
    assert torch.equal(rule.correct_z(x0, 10, 2, keep)[:, 0, 0, 0], torch.tensor([0.5, 0.0]))
    assert torch.equal(ClassifierFree(7.5).correct_x0(x0, 10, 2, None), x0)
    with pytest.raises(ValueError, match="needs the source latents"):
        Proximal(config, 7.5, groups=torch.arange(2), trajectory=traj)


def test_the_sampler_takes_any_guidance_rule(tiny_backbone):
    """A rule the sampler has never heard of plugs in: one that keeps the conditional branch only is CFG at 1."""
    from diffinv.editing.sampler import sample

    class ConditionalOnly:
        def combine(self, eps_uncond, eps_cond):
            return eps_cond, None

        def correct_x0(self, x0, t, k, mask):
            return x0

        def correct_z(self, z, t, k, mask):
            return z

    bb = tiny_backbone
    schedule = bb.schedule(3)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, null = bb.encode_prompts(["a photo of a cat", "a red car"]), bb.encode_prompts(["", ""])
    with torch.no_grad():
        ours = sample(bb, schedule, z, cond, null, ConditionalOnly())
        cfg1 = sample(bb, schedule, z, cond, null, 1.0)
        cfg7 = sample(bb, schedule, z, cond, null, 7.5)
    assert torch.allclose(ours, cfg1, atol=1e-6) and not torch.allclose(ours, cfg7, atol=1e-3)
