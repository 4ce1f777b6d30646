"""The flow-native solvers and editors (issue 24): RF-Solver, FireFlow, RF-Inversion's controlled ODEs and FlowEdit,
first as pure math on hand-made velocity fields, then as step objects through the real sampler on the tiny SD 3 and
FLUX.1 components (their velocity replaced by a hand-made field where exactness is checked)."""

import math
from dataclasses import replace

import pytest
import torch

from diffinv.editing.flowedit import flowedit, keyed_noise
from diffinv.editing.sampler import sample
from diffinv.steps import ControlledStep, FireFlowStep, RFSolverStep
from diffinv.steps.controlled import eta_at, forward_field, reverse_field, rf_invert, rf_sample
from diffinv.steps.fireflow import FireFlowMover, fireflow_solve
from diffinv.steps.rf_solver import (
    backbone_velocity, invert_with, rf_solver_move, rf_solver_solve, rf_solver_step)

G = torch.Generator().manual_seed(0)
X = torch.randn(3, 4, 5, 5, generator=G, dtype=torch.float64)
A = torch.randn(3, 4, 5, 5, generator=G, dtype=torch.float64)
B = torch.randn(3, 4, 5, 5, generator=G, dtype=torch.float64)


class Counting:
    """A velocity field v(x, s) that counts its evaluations."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, s):
        self.calls += 1
        return self.fn(x, s)


def linear_in_s(x, s):
    return A + B * s  # no x: the exact solution is x + a ds + b (s'^2 - s^2) / 2


def euler_solve(v, x, sigmas):
    for s, s_to in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_to - s) * v(x, s)
    return x


def sigmas_of(n, descending=True):
    s = [math.sin(math.pi / 2 * i / n) ** 2 for i in range(n + 1)]  # uneven steps, 0 .. 1
    return s[::-1] if descending else s


# --- RF-Solver ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("descending", [True, False])
def test_rf_solver_is_exact_on_a_velocity_linear_in_s(descending):
    sigmas = sigmas_of(7, descending)
    v = Counting(linear_in_s)
    x, evaluations = rf_solver_solve(v, X, sigmas)
    s0, s1 = sigmas[0], sigmas[-1]
    exact = X + A * (s1 - s0) + B * (s1**2 - s0**2) / 2
    torch.testing.assert_close(x, exact, atol=1e-12, rtol=0)
    assert evaluations == v.calls == 14  # two per step
    assert (euler_solve(linear_in_s, X, sigmas) - exact).abs().max() > 1e-2  # Euler is not exact there


def test_rf_solver_is_second_order_where_euler_is_first():
    """dx/ds = -x + s: errors at N and 2N steps shrink 4x for RF-Solver, 2x for Euler."""

    def v(x, s):
        return -x + s

    def exact(x, s0, s1):  # x(s) = s - 1 + C e^{-s}
        c = (x - (s0 - 1)) * math.exp(s0)
        return s1 - 1 + c * math.exp(-s1)

    def errors(solve):
        out = []
        for n in (8, 16):
            sigmas = [1 - i / n for i in range(n + 1)]
            out.append((solve(v, X, sigmas) - exact(X, 1.0, 0.0)).abs().max().item())
        return out[0] / out[1]

    assert 3.6 < errors(lambda v, x, s: rf_solver_solve(v, x, s)[0]) < 4.4
    assert 1.8 < errors(euler_solve) < 2.2
    assert 3.6 < errors(lambda v, x, s: fireflow_solve(v, x, s)[0]) < 4.4  # FireFlow: second order too


def test_rf_solver_step_is_the_papers_expansion_and_the_midpoint_rule():
    def v(x, s):
        return torch.sin(x) * (1 + s)

    s, s_to = 0.8, 0.55
    ds = s_to - s
    v0 = v(X, s)
    v_mid = v(X + ds / 2 * v0, s + ds / 2)
    taylor = X + ds * v0 + 0.5 * ds**2 * (v_mid - v0) / (ds / 2)  # RF-Solver's expansion, as its paper writes it
    ours = rf_solver_step(v, X, s, s_to)
    torch.testing.assert_close(ours, taylor, atol=0, rtol=0)
    torch.testing.assert_close(ours, X + ds * v_mid, atol=1e-14, rtol=0)  # = the explicit midpoint rule


# --- FireFlow -------------------------------------------------------------------------------------------------
def test_fireflow_one_step_is_the_midpoint_rule_and_counts_steps_plus_one():
    def v(x, s):
        return torch.cos(x) - s * x

    one = Counting(v)
    x, evaluations = fireflow_solve(one, X, [0.9, 0.4])
    torch.testing.assert_close(x, rf_solver_step(v, X, 0.9, 0.4), atol=1e-14, rtol=0)
    assert evaluations == one.calls == 2
    many = Counting(v)
    _, evaluations = fireflow_solve(many, X, sigmas_of(10))
    assert evaluations == many.calls == 11  # N + 1: the start of each later step is the previous midpoint's


def test_fireflow_reuses_the_previous_midpoint_velocity():
    seen = []

    def v(x, s):
        seen.append(s)
        return A * s

    fireflow_solve(v, X, [1.0, 0.6, 0.2])
    assert seen == [1.0, 0.8, 0.4]  # start of step 1, its midpoint, step 2's midpoint; never 0.6


# --- RF-Inversion ---------------------------------------------------------------------------------------------
def field(x, s):
    return torch.tanh(x) * (0.5 + s) + A


def test_rf_inversion_limits_are_plain_euler():
    up, down = sigmas_of(6, descending=False), sigmas_of(6)
    y1 = torch.randn(X.shape, generator=torch.Generator().manual_seed(3), dtype=X.dtype)
    traj, evaluations = rf_invert(field, X, up, y1, gamma=0.0)
    torch.testing.assert_close(traj[-1], euler_solve(field, X, up), atol=1e-13, rtol=0)
    assert evaluations == 6 and traj.shape == (7, *X.shape)
    x, evaluations = rf_sample(field, y1, down, X, eta=0.0)
    torch.testing.assert_close(x, euler_solve(field, y1, down), atol=1e-13, rtol=0)
    assert evaluations == 6


def test_rf_inversion_full_control_lands_on_its_targets():
    """gamma = 1 follows the straight path to y1 (reached at s = 1); eta = 1 throughout lands on y0 at s = 0."""
    y1 = torch.randn(X.shape, generator=torch.Generator().manual_seed(3), dtype=X.dtype)
    traj, _ = rf_invert(field, X, sigmas_of(5, descending=False), y1, gamma=1.0)
    torch.testing.assert_close(traj[-1], y1, atol=1e-12, rtol=0)
    x, _ = rf_sample(field, y1, sigmas_of(5), X, eta=1.0)
    torch.testing.assert_close(x, X, atol=1e-12, rtol=0)


def test_rf_inversion_steps_are_the_papers_equations():
    """One forward and one reverse step by hand (eq. 8; eq. 17 in the paper's time t = 1 - s), and eta's window."""
    y1, y0 = A, B
    gamma, eta, s, s_to = 0.5, 0.9, 0.3, 0.45
    u = field(X, s)
    u_cond = (y1 - X) / (1 - s)
    by_hand = X + (u + gamma * (u_cond - u)) * (s_to - s)  # Y_{t+dt} = Y_t + [u_t + gamma (u_t(.|y1) - u_t)] dt
    torch.testing.assert_close(X + (s_to - s) * forward_field(u, X, y1, s, gamma), by_hand, atol=1e-14, rtol=0)
    t, t_to = 1 - s_to, 1 - s  # reverse: from s_to down to s, the paper's time t up
    v_t = -field(X, s_to)  # its field in t: minus the model's dx/ds
    v_cond = (y0 - X) / (1 - t)
    by_hand = X + (v_t + eta * (v_cond - v_t)) * (t_to - t)  # X_{t+dt} = X_t + [v_t + eta (v_t(.|y0) - v_t)] dt
    ours = X + (s - s_to) * reverse_field(field(X, s_to), X, y0, s_to, eta)
    torch.testing.assert_close(ours, by_hand, atol=1e-14, rtol=0)
    assert [eta_at(i, 0.9, 1, 3) for i in range(5)] == [0.0, 0.9, 0.9, 0.0, 0.0]


# --- FlowEdit -------------------------------------------------------------------------------------------------
def velocity_of(prompt_shift):
    """A hand-made 'prompt-conditioned' field, row-wise: a different shift per prompt."""

    def v(x, k):
        return torch.tanh(x) * 0.7 + prompt_shift.to(x) + 0.1 * k

    return v


def test_flowedit_with_target_equal_to_source_returns_the_source():
    sigmas = torch.tensor(sigmas_of(10, descending=False), dtype=torch.float64)
    src = velocity_of(torch.zeros(1))
    noise = keyed_noise(tuple(X.shape[1:]), 0, [("item", f"t{i}") for i in range(3)])
    out, evaluations = flowedit(X, sigmas, src, src, noise, n_max=8, n_avg=2)
    torch.testing.assert_close(out, X, atol=1e-12, rtol=0)
    assert evaluations == 2 * 2 * 8
    edited, _ = flowedit(X, sigmas, src, velocity_of(torch.ones(1)), noise, n_max=8)
    assert (edited - X).abs().max() > 0.1


def test_flowedit_rows_do_not_depend_on_their_batch():
    sigmas = torch.tensor(sigmas_of(8, descending=False), dtype=torch.float64)
    keys = [("a", "a dog"), ("b", "a cat"), ("a", "a car")]
    src, tar = velocity_of(torch.zeros(1)), velocity_of(torch.full((1,), 0.5))
    batch, _ = flowedit(X, sigmas, src, tar, keyed_noise(tuple(X.shape[1:]), 4, keys), n_max=6, n_min=2)
    for b in range(3):
        alone, evaluations = flowedit(X[b:b + 1], sigmas, src, tar, keyed_noise(tuple(X.shape[1:]), 4, keys[b:b + 1]),
                                      n_max=6, n_min=2)
        torch.testing.assert_close(alone, batch[b:b + 1], atol=1e-12, rtol=0)
    assert evaluations == 2 * 4 + 2
    other_seed, _ = flowedit(X, sigmas, src, tar, keyed_noise(tuple(X.shape[1:]), 5, keys), n_max=6, n_min=2)
    assert (other_seed - batch).abs().max() > 1e-3
    with pytest.raises(ValueError, match="n_min < n_max"):
        flowedit(X, sigmas, src, tar, keyed_noise(tuple(X.shape[1:]), 4, keys), n_max=9)


# --- the steps through the sampler, on the tiny flow families ----------------------------------------------------
@pytest.fixture(params=["sd3", "flux"])
def flow(request, tiny_sd3, tiny_flux):
    return {"sd3": tiny_sd3, "flux": tiny_flux}[request.param]


def hand_made(monkeypatch, bb, fn):
    """Replace the family's transformer by ``fn(x, t)`` (t in the scheduler's 0..1000)."""
    monkeypatch.setattr(bb, "family", replace(bb.family))
    monkeypatch.setattr(type(bb.family), "denoise", lambda self, _bb, x, t, cond: fn(x, t))


def latents(seed):
    return torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("step", [RFSolverStep, FireFlowStep])
def test_steps_invert_and_sample_a_velocity_linear_in_s_exactly(flow, step, monkeypatch):
    a, b = latents(1), latents(2)
    channels = flow.vae.config.latent_channels
    a, b = a[:, :channels], b[:, :channels]
    hand_made(monkeypatch, flow, lambda x, t: (a + b * (t / 1000)).expand_as(x))
    z0 = latents(3)[:, :channels]
    cond = flow.encode_prompts(["a photo of a cat"])
    schedule = flow.schedule(6)
    velocity = backbone_velocity(lambda z, t, alpha: flow.predict(z, t, cond, alpha), schedule)
    move = rf_solver_move if step is RFSolverStep else FireFlowMover().move
    trajectory = invert_with(move, z0, schedule, velocity)
    exact_top = z0 + a + b / 2  # x_1 = x_0 + int_0^1 (a + b s) ds; z = x at s = 0 and 1
    torch.testing.assert_close(trajectory[-1], exact_top, atol=1e-5, rtol=0)
    rule = step()
    back = sample(flow, schedule, trajectory[-1], cond, cond, 1.0, step=rule)
    torch.testing.assert_close(back, z0, atol=1e-5, rtol=0)
    assert rule.evaluations == (12 if step is RFSolverStep else 7)
    plain = sample(flow, schedule, trajectory[-1], cond, cond, 1.0)  # Euler (DDIM) is not exact here
    assert (plain - z0).abs().max() > 1e-2


def test_the_midpoint_is_evaluated_between_the_levels(tiny_sd3, monkeypatch):
    seen = []

    def fn(x, t):
        seen.append(float(t))
        return torch.zeros_like(x)

    hand_made(monkeypatch, tiny_sd3, fn)
    cond = tiny_sd3.encode_prompts(["a photo of a cat"])
    schedule = tiny_sd3.schedule(3)
    sample(tiny_sd3, schedule, latents(0)[:, :4], cond, cond, 1.0, step=RFSolverStep())
    t = [float(x) for x in schedule.timesteps]
    want = [t[2], (t[2] + t[1]) / 2, t[1], (t[1] + t[0]) / 2, t[0], t[0] / 2]
    assert seen == pytest.approx(want, abs=1e-3)


def test_controlled_step_at_eta_zero_is_the_plain_sampler_and_one_pulls_to_the_image(flow):
    channels = flow.vae.config.latent_channels
    z_T, y0 = latents(4)[:, :channels], latents(5)[:, :channels]
    cond, null = flow.encode_prompts(["a photo of a cat"]), flow.encode_prompts([""])
    schedule = flow.schedule(4)
    with torch.no_grad():
        plain = sample(flow, schedule, z_T, cond, null, 2.0)
        zero = sample(flow, schedule, z_T, cond, null, 2.0, step=ControlledStep(y0=y0, eta=0.0, eta_stop=1.0))
        full = sample(flow, schedule, z_T, cond, null, 2.0, step=ControlledStep(y0=y0, eta=1.0, eta_stop=1.0))
        off = sample(flow, schedule, z_T, cond, null, 2.0,
                     step=ControlledStep(y0=y0, eta=1.0, eta_stop=1.0, rows=torch.tensor([False])))
    torch.testing.assert_close(zero, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(off, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(full, y0, atol=1e-5, rtol=0)


def test_one_step_fireflow_and_rf_solver_agree_on_the_real_tiny_model(flow):
    """Both are the midpoint rule for a single step; the steps run on the real (random) transformer, finite."""
    channels = flow.vae.config.latent_channels
    z_T = latents(6)[:, :channels]
    cond, null = flow.encode_prompts(["a photo of a cat"]), flow.encode_prompts([""])
    schedule = flow.schedule(1)
    with torch.no_grad():
        one = [sample(flow, schedule, z_T, cond, null, 1.5, step=s()) for s in (RFSolverStep, FireFlowStep)]
        many = [sample(flow, flow.schedule(4), z_T, cond, null, 1.5, step=s()) for s in (RFSolverStep, FireFlowStep)]
    torch.testing.assert_close(one[0], one[1], atol=1e-5, rtol=0)
    assert all(bool(torch.isfinite(z).all()) for z in many)


# --- the methods: RF-Solver, FireFlow, RF-Inversion on flow models -------------------------------------------------
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from diffinv import BackboneConfig, DiffinvError  # noqa: E402
from diffinv.data import Item  # noqa: E402
from diffinv.inversion import FireFlowInversion, Inversion, RFInversion, RFSolverInversion  # noqa: E402
from test_cli import FLOW_CONFIGS, REPO, cli, read_lines  # noqa: E402

FLOW_METHODS = {"rf_solver": RFSolverInversion, "fireflow": FireFlowInversion, "rf_inversion": RFInversion}
N = 3


def item(seed: int, targets=("a photo of a dog",)) -> Item:
    image = (np.random.default_rng(seed).random((16, 16, 3)) * 255).astype(np.uint8)
    return Item(f"img{seed}", image, "a photo of a cat", list(targets))


@pytest.fixture(params=["sd3", "flux"])
def flow_dir(request, tiny_sd3_dir, tiny_flux_dir):
    return {"sd3": tiny_sd3_dir, "flux": tiny_flux_dir}[request.param]


@pytest.mark.parametrize("name", sorted(FLOW_METHODS))
def test_a_flow_method_is_refused_on_a_diffusion_model_before_any_work(name, tiny_model_dir):
    method = FLOW_METHODS[name](BackboneConfig(pretrained=str(tiny_model_dir)), N)
    with pytest.raises(DiffinvError, match=f"{name} solves a rectified flow's ODE.*SD 1.x/2.x"):
        method.check_items([item(0)])


@pytest.mark.parametrize("name, inverting, sampling", [("rf_solver", 2 * N, 2 * N), ("fireflow", N + 1, N + 1),
                                                       ("rf_inversion", N, N)])
def test_each_method_counts_its_evaluations_and_its_records_re_edit_exactly(name, inverting, sampling, flow_dir):
    method = FLOW_METHODS[name](BackboneConfig(pretrained=str(flow_dir)), N)
    [r] = method.run_batch([item(0)])
    assert (r.extra["evaluations_inversion"], r.extra["evaluations_sampling"]) == (inverting, sampling)
    assert r.inversion.plan.step == name and torch.isfinite(r.reconstruction).all()
    record = Inversion.load(r.inversion.save(Path(flow_dir).parent / f"{name}.safetensors"))
    with torch.no_grad():
        [(z, [edit])] = method.edit([record], [["a photo of a dog"]], ids=["img0"])
        decoded = method.backbone.decode(torch.stack([z, edit])).cpu()
    assert torch.equal(decoded[0], r.reconstruction) and torch.equal(decoded[1], r.edits[0])


@pytest.mark.parametrize("name", sorted(FLOW_METHODS))
def test_a_flow_methods_items_do_not_depend_on_their_batch(name, tiny_flux_dir):
    method = FLOW_METHODS[name](BackboneConfig(pretrained=str(tiny_flux_dir)), N)
    batch = method.run_batch([item(0), item(1, targets=("a photo of a red car", "a big dog"))])
    alone = method.run_batch([item(1, targets=("a photo of a red car", "a big dog"))])[0]
    for a, b in zip([alone.reconstruction, *alone.edits], [batch[1].reconstruction, *batch[1].edits]):
        assert (a - b).abs().max() < 1e-4


def test_rf_inversions_noise_is_keyed_by_the_item_and_gamma_pulls_toward_it(tiny_sd3_dir):
    def top(gamma, seed=0, key=0):
        m = RFInversion(BackboneConfig(pretrained=str(tiny_sd3_dir)), N, gamma=gamma, seed=seed)
        return m.run_batch([item(key)])[0].inversion.start_latent

    assert torch.equal(top(0.5), top(0.5)) and not torch.equal(top(0.5), top(0.5, seed=1))
    y1 = __import__("diffinv.seeds", fromlist=["keyed_normal"]).keyed_normal((4, 8, 8), 0, "rf_inversion", "img0")
    assert torch.allclose(top(1.0), y1, atol=1e-5)  # gamma = 1: the controlled ODE lands on its noise sample
    assert not torch.allclose(top(0.0), y1, atol=1e-2)


def test_rf_inversion_refuses_bad_settings_in_one_line():
    with pytest.raises(DiffinvError, match="gamma must be in"):
        RFInversion(gamma=1.5)
    with pytest.raises(DiffinvError, match="eta_start and eta_stop"):
        RFInversion(eta_start=0.5, eta_stop=0.2)


def test_a_flow_record_is_refused_on_a_diffusion_model(tiny_sd3_dir, tiny_model_dir, tmp_path):
    [r] = RFSolverInversion(BackboneConfig(pretrained=str(tiny_sd3_dir)), N).run_batch([item(0)])
    other = RFSolverInversion(BackboneConfig(pretrained=str(tiny_model_dir)), N)
    with pytest.raises(DiffinvError):
        other.edit([r.inversion], [[]])


@pytest.mark.parametrize("config", FLOW_CONFIGS)
def test_flow_configs_run_through_the_cli_and_refuse_a_diffusion_model(config, flow_dir, tiny_model_dir, tmp_path):
    Image.fromarray((np.random.default_rng(1).random((20, 28, 3)) * 255).astype(np.uint8)).save(tmp_path / "x.png")
    args = ["-c", str(REPO / "configs" / config), "--model.num_inference_steps", str(N), "--trainer.accelerator",
            "cpu", "--data.image", str(tmp_path / "x.png"), "--data.source_prompt", "a photo of a cat",
            "--data.target_prompts", '["a photo of a dog"]', "--data.resolution", "16"]
    if config.endswith("_flux.yaml") and flow_dir.name.startswith("tiny_sd3"):  # SD 3 has no guidance embedding
        with pytest.raises(SystemExit) as e:
            cli("predict", *args, "--model.backbone.pretrained", str(flow_dir), "--output_dir", str(tmp_path / "o"))
        assert e.value.code not in (0, None) and not (tmp_path / "o" / "x").exists()
        return
    cli("predict", *args, "--model.backbone.pretrained", str(flow_dir), "--output_dir", str(tmp_path / "out"))
    lines = read_lines(tmp_path / "out" / "metrics.jsonl")
    assert [x["target_prompt"] for x in lines] == [None, "a photo of a dog"]
    assert all(np.isfinite(x["psnr"]) and x["evaluations_sampling"] > 0 for x in lines)
    # the saved record re-edits through the CLI (--data.records), with a new target
    cli("predict", "-c", str(REPO / "configs" / config), "--model.backbone.pretrained", str(flow_dir),
        "--trainer.accelerator", "cpu", "--data.records", str(tmp_path / "out"), "--data.target_prompts",
        '["a photo of a red car"]', "--output_dir", str(tmp_path / "again"))
    again = read_lines(tmp_path / "again" / "metrics.jsonl")
    assert again[0]["psnr"] == lines[0]["psnr"]  # the same reconstruction, from the record
    with pytest.raises(SystemExit) as e:
        cli("predict", *args, "--model.backbone.pretrained", str(tiny_model_dir), "--output_dir", str(tmp_path / "sd"))
    assert e.value.code not in (0, None)


# --- FlowEdit, the editor ------------------------------------------------------------------------------------------
from diffinv import DDIMInversion  # noqa: E402
from diffinv.editing import FlowEdit  # noqa: E402


def test_flowedit_with_the_source_as_target_returns_the_source_latent(tiny_sd3_dir):
    """Target = source at equal guidance: every velocity difference is 0, the edit is the source latent itself
    (decoded: the VAE's reconstruction of the image), whatever the noise."""
    method = DDIMInversion(BackboneConfig(pretrained=str(tiny_sd3_dir)), 4, guidance_scale=1.0,
                           editor=FlowEdit(n_max=1.0, source_guidance=2.0, target_guidance=2.0))
    [r] = method.run_batch([item(0, targets=("a photo of a cat",))])
    with torch.no_grad():
        vae_only = method.backbone.decode(r.inversion.z0[None])[0].cpu()
    assert (r.edits[0] - vae_only).abs().max() < 1e-5
    other = DDIMInversion(BackboneConfig(pretrained=str(tiny_sd3_dir)), 4, guidance_scale=1.0,
                          editor=FlowEdit(n_max=1.0, source_guidance=2.0, target_guidance=2.0))
    [d] = other.run_batch([item(0, targets=("a photo of a dog",))])
    assert (d.edits[0] - vae_only).abs().max() > 1e-3  # another target does edit: the check can fail
    assert d.extra["evaluations_sampling"] == 4 + 2 * 4  # the reconstruction's 4, then 2 a step (source, target)


@pytest.mark.parametrize("flow", ["sd3", "flux"])
def test_flowedit_edits_do_not_depend_on_their_batch(flow, tiny_sd3_dir, tiny_flux_dir):
    folder = {"sd3": tiny_sd3_dir, "flux": tiny_flux_dir}[flow]
    editor = FlowEdit(n_max=0.75, n_avg=2, embedded_guidance=flow == "flux", source_guidance=1.5, target_guidance=4.0)
    method = DDIMInversion(BackboneConfig(pretrained=str(folder)), 4, guidance_scale=1.0, editor=editor)
    batch = method.run_batch([item(0), item(1, targets=("a photo of a red car", "a big dog"))])
    alone = method.run_batch([item(1, targets=("a big dog",))])[0]
    assert (alone.edits[0] - batch[1].edits[1]).abs().max() < 1e-4


def test_flowedit_is_refused_before_any_work_where_it_cannot_run(tiny_model_dir, tiny_sd3_dir):
    sd = DDIMInversion(BackboneConfig(pretrained=str(tiny_model_dir)), 4, editor=FlowEdit())
    with pytest.raises(DiffinvError, match="FlowEdit solves a rectified flow's ODE"):
        sd.check_items([item(0)])
    sd3 = DDIMInversion(BackboneConfig(pretrained=str(tiny_sd3_dir)), 4, editor=FlowEdit(embedded_guidance=True))
    with pytest.raises(DiffinvError, match="not guidance-distilled"):
        sd3.check_items([item(0)])
    with pytest.raises(DiffinvError, match="n_min < n_max"):
        FlowEdit(n_max=0.2, n_min=0.5)


def test_every_records_reconstruction_is_its_own_under_every_config_on_a_flow(tiny_sd3_dir):
    """The record-pinning matrix of tests/test_record_pinning.py on SD 3, where the flow solvers run too: each
    method's record re-edited by every method's config reconstructs as its own (within float noise), or is refused
    in one line (ProxNPI's record by the others)."""
    from diffinv.inversion import registry

    bb = BackboneConfig(pretrained=str(tiny_sd3_dir))
    settings = {"null_text": {"num_inner_steps": 2}, "latent_top": {"num_inner_steps": 2, "num_starts": 1}}
    makers = {m.name: (lambda m=m: m.cls(bb, N, **settings.get(m.name, {}))) for m in registry.METHODS}
    optimizing = {m.name for m in registry.METHODS if m.optimizes}
    for record in ("rf_solver", "fireflow", "rf_inversion", "npi", "edict", "proxnpi"):
        method = makers[record]()
        with torch.enable_grad() if record in optimizing else torch.inference_mode():
            inv = method.run_batch([item(0, targets=[])])[0].inversion
            (own, _), = method.edit([inv], [["a photo of a dog"]])
        refused = []
        for name, make in makers.items():
            try:
                with torch.inference_mode():
                    (rec, _), = make().edit([inv], [["a photo of a dog"]])
            except DiffinvError as e:
                assert "\n" not in str(e)
                refused.append(name)
                continue
            assert (rec - own).abs().max() < 1e-5, (record, name)
        # ProxNPI's record is refused by the others; a flow solver's record by ProxNPI, whose reconstruction and
        # inversion guidances correct a DDIM step's x0 and latent, which a flow solver's step has not
        flow = record in ("rf_solver", "fireflow", "rf_inversion")
        assert refused == ([n for n in makers if n != "proxnpi"] if record == "proxnpi"
                           else ["proxnpi"] if flow else []), record


def test_a_flow_method_run_directly_on_a_diffusion_model_is_refused_in_one_line(tiny_model_dir):
    with pytest.raises(DiffinvError, match="fireflow solves a rectified flow's ODE"):
        FireFlowInversion(BackboneConfig(pretrained=str(tiny_model_dir)), N).run_batch([item(0)])


@pytest.mark.parametrize("method", ["rf_solver", "ddim"])
def test_progress_counts_every_step_of_a_flow_solver_and_of_ddim(method, tiny_sd3_dir):
    """A flow solver's inversion evaluates the level each step leaves (0 .. N - 1), DDIM's the level it reaches
    (1 .. N): both count 1..N inverting, then 1..N sampling."""
    import diffinv

    model = diffinv.load(str(tiny_sd3_dir), device="cpu")
    seen = []
    model.invert(np.full((16, 16, 3), 120, np.uint8), "a photo of a cat", method=method, steps=3,
                 progress=lambda fraction, what: seen.append(what))
    steps = ["step 1/3", "step 2/3", "step 3/3"]
    assert [w.split(": ")[1] for w in seen if w.startswith("inverting")] == steps
    assert [w.split(": ")[1] for w in seen if w.startswith("sampling")] == steps
