"""Null-text inversion and latent-TOP: the per-sample optimiser, early stopping, batching, records, Lightning."""

import pytest
import torch

from diffinv import BackboneConfig, LatentTrajectoryOptimization, NullTextInversion
from diffinv.optim import AdamState, masked_adam_step
from test_methods import item

STEPS = 4


def test_masked_adam_matches_torch_adam_and_freezes_inactive_samples():
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(3, 5, generator=g)
    grads = [torch.randn(3, 5, generator=g) for _ in range(4)]
    ref = p0.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=0.1)
    ours, state = p0.clone(), AdamState.zeros_like(p0)
    active = torch.tensor([True, False, True])
    for grad in grads:
        ref.grad = grad.clone()
        opt.step()
        masked_adam_step(ours, grad, state, 0.1, active)
    torch.testing.assert_close(ours[active], ref.detach()[active])
    assert torch.equal(ours[1], p0[1])
    assert state.steps.tolist() == [4, 0, 4]


@pytest.fixture(scope="module")
def bb(tiny_model_dir):
    return BackboneConfig(pretrained=str(tiny_model_dir))


def nti(bb, **kw):
    return NullTextInversion(bb, STEPS, **kw)


def test_optimisation_lowers_the_step_loss(bb):
    none = nti(bb, num_inner_steps=0).run_batch([item(0)])[0].inversion.extra["step_loss"]
    opt = nti(bb, num_inner_steps=10, early_stop_epsilon=0, early_stop_delta=0).run_batch([item(0)])[0]
    loss = opt.inversion.extra["step_loss"]
    assert loss[0] < 0.95 * none[0]  # same start z*_T: the first step's loss is directly comparable
    assert opt.inversion.unconditional.shape[0] == STEPS


def test_early_stopping_stops(bb):
    easy = nti(bb, early_stop_epsilon=1e9).run_batch([item(0)])[0].inversion
    hard = nti(bb, early_stop_epsilon=0, early_stop_delta=0).run_batch([item(0)])[0].inversion.extra["inner_iterations"]
    # the reference steps, then checks: a loss already below the threshold still gets one update per step
    assert easy.extra["inner_iterations"].tolist() == [1] * STEPS
    null = nti(bb).backbone.encode_prompts([""])[0]
    assert all((easy.unconditional[k] - null).abs().max() > 0 for k in range(STEPS))
    assert hard.tolist() == [10] * STEPS


def test_source_init_starts_from_the_npi_solution(bb):
    r = nti(bb, init="source", num_inner_steps=0).run_batch([item(0)])[0]
    src = r.inversion.unconditional[0]
    from diffinv import NegativePromptInversion

    npi = NegativePromptInversion(bb, STEPS)
    assert torch.allclose(src, npi.backbone.encode_prompts([item(0).source_prompt])[0])


@pytest.mark.parametrize("make", [
    lambda bb: NullTextInversion(bb, STEPS, num_inner_steps=4),
    lambda bb: LatentTrajectoryOptimization(bb, STEPS, num_inner_steps=3, num_starts=3, hops=2),
])
def test_batch_of_three_equals_three_runs_of_one(bb, make):
    m = make(bb)
    items = [item(0), item(1, targets=["a red car"]), item(2, targets=[])]
    together = m.run_batch(items)
    for it, r in zip(items, together):
        alone = m.run_batch([it])[0]
        # Adam's normalised steps turn last-bit differences of batched matmuls into ~1e-3 on the embeddings (up
        # to 5.1e-3 in 1 of 512 values on an AMD EPYC); the mean stays at float noise
        torch.testing.assert_close(r.inversion.unconditional, alone.inversion.unconditional, atol=1e-2, rtol=0)
        assert (r.inversion.unconditional - alone.inversion.unconditional).abs().mean() < 1e-3
        torch.testing.assert_close(r.reconstruction, alone.reconstruction, atol=1e-3, rtol=0)
        assert torch.equal(r.inversion.extra["inner_iterations"], alone.inversion.extra["inner_iterations"])


def test_latent_top_biases_and_multi_start(bb):
    one = LatentTrajectoryOptimization(bb, STEPS, num_starts=1, hops=0).run_batch([item(0)])[0].inversion
    many = LatentTrajectoryOptimization(bb, STEPS, num_starts=6, hops=2).run_batch([item(0)])[0].inversion
    assert many.extra["start_losses"].shape == (6,)
    assert one.extra["start_losses"].isnan().all() and int(one.extra["start_chosen"]) == 0  # one start: no rollout
    assert many.extra["start_losses"].min() <= many.extra["start_losses"][0]  # never worse than the prior
    assert many.extra["text_bias"].shape == many.unconditional.shape
    torch.testing.assert_close(many.z_T, many.trajectory[-1] + many.extra["noise_bias"])
    assert many.extra["noise_bias"].abs().sum() > 0  # the noise bias is learnt
    assert one.extra["step_loss"][0] >= many.extra["step_loss"][0] - 1e-6 or many.extra["start_losses"].argmin() == 0


def test_latent_top_starts_are_ranked_by_their_whole_trajectory_loss(bb):
    """A start's initial loss is the whole-trajectory loss of its rollout before any per-step optimisation."""
    from diffinv.ddim import invert
    from diffinv.inversion.latent_top import trajectory_loss

    m = LatentTrajectoryOptimization(bb, STEPS, num_starts=4, hops=0, num_inner_steps=1)
    r = m.run_batch([item(0)])[0].inversion
    cond = m.backbone.encode_prompts([item(0).source_prompt])
    null = m.backbone.encode_prompts([""])
    schedule = m.backbone.schedule(STEPS)
    with torch.no_grad():
        traj = invert(lambda z, t, alpha: m.backbone.eps(z, t, cond, alpha), r.z0[None], schedule)
        prior = trajectory_loss(m.backbone.predict, schedule, traj, cond, null, 7.5, traj[-1])
    torch.testing.assert_close(r.extra["start_losses"][0], prior[0], rtol=1e-4, atol=0)
    assert int(r.extra["start_chosen"]) == int(r.extra["start_losses"].argmin())


def test_trajectory_loss_recomputed_steps_give_the_same_value_and_gradient(bb):
    from diffinv.inversion.latent_top import trajectory_loss

    m = nti(bb)
    schedule = m.backbone.schedule(STEPS)
    cond, null = m.backbone.encode_prompts(["a photo of a cat"]), m.backbone.encode_prompts([""])
    g = torch.Generator().manual_seed(0)
    traj = torch.randn(STEPS + 1, 1, 4, 8, 8, generator=g)
    results = []
    for recompute in (False, True):
        z = traj[-1].clone().requires_grad_(True)
        loss = trajectory_loss(m.backbone.predict, schedule, traj, cond, null, 7.5, z, recompute=recompute)
        results.append((loss.detach(), torch.autograd.grad(loss.sum(), [z])[0]))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    assert results[0][1].abs().sum() > 0


def test_noise_bias_rounds_move_z_T_along_the_whole_trajectory_gradient(bb):
    plain = LatentTrajectoryOptimization(bb, STEPS, num_starts=1, hops=0, num_inner_steps=2).run_batch([item(0)])[0]
    rounds = LatentTrajectoryOptimization(bb, STEPS, num_starts=1, hops=0, num_inner_steps=2, noise_bias_rounds=2,
                                          noise_bias_lr=0.05).run_batch([item(0)])[0]
    assert rounds.inversion.extra["round_losses"].shape == (2,)
    assert (rounds.inversion.z_T - plain.inversion.z_T).abs().max() > 1e-3


def test_backbone_stays_out_of_checkpoints(bb):
    m = nti(bb)
    m.configure_model()
    ckpt = {"state_dict": m.state_dict()}
    assert any(k.startswith("_backbone.") for k in ckpt["state_dict"])
    m.on_save_checkpoint(ckpt)
    assert not any(k.startswith("_backbone.") for k in ckpt["state_dict"])


def test_sampling_with_the_learnt_embeddings_retraces_the_tracked_trajectory(bb):
    """The embeddings are stored by level: sampling from z_T with them must land where the optimisation's own
    trajectory ended (a reversed order lands elsewhere)."""
    from diffinv.inversion.tracking import TrackingSchedule, track_trajectory

    m = nti(bb, num_inner_steps=3)
    it = item(0)
    images = torch.stack([__import__("diffinv").data.image_tensor(m.fitted_image(it))])
    schedule = m.backbone.schedule(STEPS)
    cond = m.backbone.encode_prompts([it.source_prompt])
    z0 = m.backbone.encode_image(images)
    from diffinv.ddim import invert

    with torch.no_grad():
        traj = invert(lambda z, t, alpha: m.backbone.eps(z, t, cond, alpha), z0, schedule)
    out = track_trajectory(m.backbone.predict, schedule, traj, cond, m.backbone.encode_prompts([""]), 7.5,
                           TrackingSchedule(num_inner_steps=3))
    from diffinv.editing.sampler import sample

    with torch.no_grad():
        z = sample(m.backbone, schedule, out["z_T"], cond, out["unconditional"].transpose(0, 1), 7.5)
    torch.testing.assert_close(z, out["z_0"], atol=1e-4, rtol=0)


def test_lr_and_stop_schedules_are_the_reference_at_50_steps_and_follow_the_step_count():
    from diffinv.inversion.tracking import TrackingSchedule

    s = TrackingSchedule()
    # the NTI reference's formulas, written for 50 steps: lr 1e-2 (1 - i / 100), stop below 1e-5 + i 2e-5
    assert all(abs(s.lr_at(i, 50) - 1e-2 * (1 - i / 100)) < 1e-15 for i in range(50))
    assert all(abs(s.threshold_at(i, 50) - (1e-5 + i * 2e-5)) < 1e-15 for i in range(50))
    for n in (10, 20, 100, 200):  # the same span over any step count: lr -> lr / 2, threshold up to ~1e-3
        scale = max(1.0, 50 / n)  # and, below 50 steps, a larger lr: 5e-2 at 10 steps
        assert abs(s.lr_at(0, n) - 1e-2 * scale) < 1e-15 and abs(s.lr_at(n, n) - 0.5e-2 * scale) < 1e-15
        assert all(s.lr_at(i, n) > s.lr_at(i + 1, n) for i in range(n - 1))
        assert abs(s.threshold_at(n // 2, n) - (1e-5 + 25 * 2e-5)) < 1e-12
    verbatim = TrackingSchedule(schedule_steps=None)
    assert abs(verbatim.threshold_at(150, 200) - (1e-5 + 150 * 2e-5)) < 1e-15
    assert min(verbatim.lr_at(i, 200) for i in range(200)) == 0.5e-2  # floored where 1 - i / 100 would reach 0
    assert verbatim.lr_at(0, 10) == 1e-2 and abs(verbatim.lr_at(9, 10) - 1e-2 * 0.91) < 1e-15


def test_proxnpi_on_a_null_text_record_keeps_its_reconstruction_and_thresholds_only_edits(bb):
    """The proximal operator acts on an edit's delta only: a null-text record's reconstruction row stays its own
    CFG reconstruction (its delta eps(C) - eps(null_t) is not thresholded); guidances off to compare exactly."""
    from diffinv import ProximalGuidance, ProximalNegativePromptInversion

    r = nti(bb, num_inner_steps=3).run_batch([item(0)])[0]
    off = ProximalGuidance(reconstruction_guidance=False, inversion_guidance=False)
    prox = ProximalNegativePromptInversion(bb, STEPS, proximal=off)
    with torch.inference_mode():
        (rec, edits), = prox.edit([r.inversion], [["a photo of a dog"]])
        (nti_rec, nti_edits), = nti(bb).edit([r.inversion], [["a photo of a dog"]])
        images = prox.backbone.decode(torch.stack([rec, *edits]))
    torch.testing.assert_close(images[0], r.reconstruction, atol=1e-5, rtol=0)
    torch.testing.assert_close(rec, nti_rec, atol=1e-6, rtol=0)
    assert (edits[0] - nti_edits[0]).abs().max() > 1e-3  # the edit's delta is thresholded


@pytest.mark.parametrize("make", [
    lambda bb, **kw: NullTextInversion(bb, STEPS, num_inner_steps=3, **kw),
    lambda bb, **kw: LatentTrajectoryOptimization(bb, STEPS, num_inner_steps=2, num_starts=2, hops=1, **kw),
])
def test_gradient_checkpointing_changes_memory_not_results(bb, make):
    plain = make(bb).run_batch([item(0)])[0]
    m = make(bb, gradient_checkpointing=True)
    ckpt = m.run_batch([item(0)])[0]
    assert m.backbone.unet.is_gradient_checkpointing
    torch.testing.assert_close(ckpt.inversion.unconditional, plain.inversion.unconditional, atol=1e-6, rtol=0)
    torch.testing.assert_close(ckpt.reconstruction, plain.reconstruction, atol=1e-6, rtol=0)


def test_latent_top_starts_never_batch_the_unet_over_starts(bb):
    """Memory must not grow with num_starts: every UNet call of the start selection has the rows of one start."""
    from diffinv.inversion.latent_top import choose_start

    m = LatentTrajectoryOptimization(bb, STEPS)
    r = NullTextInversion(bb, STEPS, num_inner_steps=0).run_batch([item(0), item(1)])[0]
    traj = torch.stack([r.inversion.trajectory] * 2, dim=1)
    cond = m.backbone.encode_prompts(["a photo of a cat"] * 2)
    null = m.backbone.encode_prompts([""] * 2)
    for k in (1, 8):
        rows = []

        def pred(z, t, emb):
            rows.append(z.shape[0])
            return m.backbone.predict(z, t, emb)

        choose_start(pred, m.backbone.schedule(STEPS), traj, cond, null, 7.5, k, 2, 1e-2, 0.1, 0.1,
                     torch.Generator().manual_seed(0))
        assert max(rows) == 4  # the two images' conditional and unconditional rows, for any K
        assert len(rows) == (2 if k == 1 else k * (2 + STEPS))  # K starts: hops + one rollout each, in turn
