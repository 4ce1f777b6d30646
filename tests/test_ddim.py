import torch
from diffusers import DDIMScheduler

from diffinv.ddim import ddim_step, from_x0, invert, make_schedule, predict_x0


def sd_scheduler(**kw):
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, **kw)


def test_inversion_step_then_sampling_step_with_same_eps_returns_input():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    a_prev, a_t = torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    up = ddim_step(z, eps, a_prev, a_t)  # eq. 3
    down = ddim_step(up, eps, a_t, a_prev)  # eq. 2
    assert not torch.allclose(up, z)
    torch.testing.assert_close(down, z, rtol=0, atol=1e-12)


def test_step_matches_paper_closed_form_eq2():
    z, eps = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    a_t, a_p = torch.tensor(0.2, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    eq2 = (a_p / a_t).sqrt() * z + a_p.sqrt() * ((1 / a_p - 1).sqrt() - (1 / a_t - 1).sqrt()) * eps
    torch.testing.assert_close(ddim_step(z, eps, a_t, a_p), eq2)
    torch.testing.assert_close(from_x0(predict_x0(z, eps, a_t), eps, a_t), z)


def test_sampling_steps_match_diffusers_ddim_scheduler():
    sched = sd_scheduler()
    sched.set_timesteps(10)
    s = make_schedule(sched.alphas_cumprod, sched.timesteps, float(sched.final_alpha_cumprod))
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 8, 8, generator=g)
    for i, t in enumerate(sched.timesteps):  # descending
        eps = torch.randn(1, 4, 8, 8, generator=g)
        k = s.num_steps - i  # level of z
        assert s.timesteps[k - 1] == t
        ours = ddim_step(z.double(), eps.double(), s.alphas[k], s.alphas[k - 1]).float()
        ref = sched.step(eps, t, z).prev_sample
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        z = ref


def test_inversion_and_sampling_use_the_same_timestep_per_step():
    """Pin the alignment: with a noise prediction that depends only on t, sampling undoes inversion exactly.
    An off-by-one (inverting level k-1 -> k with t_{k-1}) would break this."""
    sched = sd_scheduler()
    sched.set_timesteps(20)
    s = make_schedule(sched.alphas_cumprod, sched.timesteps, float(sched.final_alpha_cumprod))
    table = {int(t): torch.randn(1, 4, 4, 4, dtype=torch.float64) for t in s.timesteps}
    seen = []

    def eps_fn(z, t, alpha):
        seen.append(int(t))
        assert float(alpha) == float(s.alphas[len(seen) - 1])  # z*_{k-1} sits at level k - 1
        return table[int(t)]

    z0 = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    traj = invert(eps_fn, z0, s)
    assert seen == sorted(seen) and seen[0] == int(sched.timesteps[-1])  # t_1 .. t_N ascending
    assert traj.shape == (21, 1, 4, 4, 4)
    z = traj[-1]
    for k in range(s.num_steps, 0, -1):
        z = ddim_step(z, table[int(s.timesteps[k - 1])], s.alphas[k], s.alphas[k - 1])
        torch.testing.assert_close(z, traj[k - 1], rtol=0, atol=1e-10)
    assert s.alphas[0] == sched.alphas_cumprod[0]  # set_alpha_to_one=False: level 0 is alphas_cumprod[0]


def test_inversion_is_diffusers_inverse_scheduler_for_epsilon_and_differs_for_v(tiny_model_dir, tmp_path):
    """For an ε-prediction model our inversion is diffusers' DDIMInverseScheduler, step for step; for
    v-prediction the two convert v to ε at different levels (ours at the timestep the UNet is told)."""
    import json
    import shutil

    from diffusers import DDIMInverseScheduler

    from diffinv.backbone import Backbone, BackboneConfig
    from diffinv.ddim import invert

    v_dir = tmp_path / "v"
    shutil.copytree(tiny_model_dir, v_dir)
    config = v_dir / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"prediction_type": "v_prediction"}))
    gaps = {}
    for name, folder in (("epsilon", tiny_model_dir), ("v_prediction", v_dir)):
        bb = Backbone.load(BackboneConfig(pretrained=str(folder)))
        schedule, cond = bb.schedule(10), bb.encode_prompts(["a photo of a cat"])
        theirs = DDIMInverseScheduler.from_config(bb.scheduler.config)
        theirs.set_timesteps(10)
        assert theirs.timesteps.tolist() == schedule.timesteps.tolist()
        z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours = invert(lambda z, t, alpha: bb.eps(z, t, cond, alpha), z0, schedule)[-1]
            z = z0.clone()
            for t in theirs.timesteps:
                z = theirs.step(bb.unet(z, t, encoder_hidden_states=cond).sample, t, z).prev_sample
        gaps[name] = float((ours - z).abs().max())
    assert gaps["epsilon"] < 1e-5 and gaps["v_prediction"] > 1e-3, gaps
