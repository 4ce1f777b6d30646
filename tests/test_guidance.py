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
