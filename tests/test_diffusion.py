"""companion.models.diffusion: DDPM schedule, forward process, loss, sampler, learnable schedule."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from companion.data import two_moons
from companion.estimators import mc_summary
from companion.models import diffusion as dm
from companion.train import train
from helpers import Z, assert_mc_close

ABAR = dm.abar(dm.linear_betas())


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- the fixed schedule


def test_linear_schedule_values():
    betas = dm.linear_betas()
    assert betas.dtype == torch.float64 and betas.shape == (dm.T,) and dm.T == 1000
    assert betas[0].item() == 1e-4 and betas[-1].item() == pytest.approx(0.02, rel=1e-15)
    assert torch.all(betas[1:] > betas[:-1])
    assert ABAR.dtype == torch.float64 and torch.all(ABAR[1:] < ABAR[:-1])
    # abar_T = prod (1 - beta_t), computed independently with numpy in log space (rounding only)
    exact = math.exp(np.log1p(-np.linspace(1e-4, 0.02, 1000)).sum())
    assert ABAR[-1].item() == pytest.approx(exact, rel=1e-10)
    assert ABAR[0].item() == 1 - 1e-4
    assert torch.allclose(dm.betas_from_abar(ABAR), betas, rtol=0, atol=1e-12)


def test_q_sample_matches_the_formula_and_its_moments():
    x0 = torch.tensor([[1.5, -0.5]], dtype=torch.float64)
    t = torch.tensor([300])
    eps = torch.tensor([[0.3, -1.2]], dtype=torch.float64)
    a = ABAR[299]
    expected = a.sqrt() * x0 + (1 - a).sqrt() * eps
    assert torch.allclose(dm.q_sample(x0, t, ABAR, eps=eps), expected, rtol=0, atol=1e-15)
    # moments over 100k draws: mean sqrt(abar) x0, variance 1 - abar, within Z standard errors
    n = 100_000
    xt = dm.q_sample(x0.expand(n, 2), t.expand(n), ABAR, generator=_gen(0))
    assert_mc_close(xt, a.sqrt() * x0[0])
    assert_mc_close((xt - a.sqrt() * x0[0]) ** 2, (1 - a).expand(2))


def test_q_sample_is_deterministic_given_a_generator():
    x0, t = torch.randn(5, 2), torch.randint(1, 1001, (5,))
    assert torch.equal(dm.q_sample(x0, t, ABAR, generator=_gen(1)), dm.q_sample(x0, t, ABAR, generator=_gen(1)))


# --------------------------------------------------------------------------- the loss


def test_given_eps_x_t_is_a_constant_for_the_gradient_in_theta():
    torch.manual_seed(0)
    model = dm.EpsMLP(2, hidden=16, depth=2)
    x0 = torch.randn(64, 2, requires_grad=True)
    t, eps = torch.randint(1, 1001, (64,)), torch.randn(64, 2)
    loss = dm.ddpm_loss(model, x0, ABAR, t=t, eps=eps)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    # the same loss with x_t cut from its graph: identical gradients for theta
    x_t = dm.q_sample(x0, t, ABAR, eps=eps).detach()
    loss_const = (eps - model(x_t, t)).square().sum(-1).mean()
    grads_const = torch.autograd.grad(loss_const, list(model.parameters()))
    assert loss.item() == loss_const.item()
    for a, b in zip(grads, grads_const):
        assert torch.equal(a, b)
    # and the parameters of the denoiser do not appear in x_t at all
    assert dm.q_sample(x0.detach(), t, ABAR, eps=eps).grad_fn is None


def test_loss_falls_on_a_tiny_problem():
    torch.manual_seed(0)
    data = two_moons(512, generator=_gen(2))
    model = dm.EpsMLP(2, hidden=32, depth=2)
    hist = train(model, lambda m, b: dm.ddpm_loss(m, b, ABAR), data, steps=200, batch_size=64,
                 lr=3e-3, seed=0, device="cpu")
    first, last = torch.tensor(hist.loss[:50]), torch.tensor(hist.loss[-50:])
    # the loss is noisy (random t and eps): compare means with Z standard errors of their difference
    se = math.sqrt(first.var() / 50 + last.var() / 50)
    assert first.mean() - last.mean() > Z * se


# --------------------------------------------------------------------------- the denoiser and sampler


def test_eps_mlp_shapes():
    for dim in (2, 64):
        model = dm.EpsMLP(dim, hidden=16, depth=2)
        out = model(torch.randn(7, dim), torch.randint(1, 1001, (7,)))
        assert out.shape == (7, dim)
    emb = dm.timestep_embedding(torch.tensor([1, 500, 1000]), 8)
    assert emb.shape == (3, 8) and torch.all(emb.abs() <= 1)


def test_sampling_shapes_and_determinism():
    torch.manual_seed(0)
    model = dm.EpsMLP(2, hidden=16, depth=2)
    abar_t = dm.abar(dm.linear_betas(50, 1e-3, 0.2))
    a = dm.sample(model, abar_t, 20, 2, generator=_gen(3))
    b = dm.sample(model, abar_t, 20, 2, generator=_gen(3))
    c = dm.sample(model, abar_t, 20, 2, generator=_gen(4))
    assert a.shape == (20, 2) and torch.equal(a, b) and not torch.equal(a, c)
    assert not a.requires_grad


def test_ancestral_sampling_is_exact_with_the_exact_denoiser_for_gaussian_data():
    # For x0 ~ N(0, I), x_t ~ N(0, I) and E[eps | x_t] = sqrt(1 - abar_t) x_t. With that eps_theta
    # and sigma_t^2 = beta_t, each reverse step maps N(0, I) to N(0, I); the last (noise-free) step
    # scales by sqrt(alpha_1), so x0 ~ N(0, alpha_1 I). Checked to Z standard errors.
    def exact_eps(x_t, t):
        return (1 - ABAR[t - 1]).sqrt().unsqueeze(-1).to(x_t.dtype) * x_t

    x = dm.sample(exact_eps, ABAR, 20_000, 2, generator=_gen(5))
    assert_mc_close(x, torch.zeros(2))
    assert_mc_close(x**2, torch.full((2,), 1 - 1e-4))


# --------------------------------------------------------------------------- the learnable schedule


def test_monotone_schedule_is_monotone_for_random_parameters():
    schedule = dm.MonotoneSchedule(ABAR, num_knots=16)
    g = _gen(6)
    for scale in (0.1, 1.0, 3.0):
        for _ in range(10):
            with torch.no_grad():
                schedule.phi.copy_(scale * torch.randn(16, generator=g, dtype=torch.float64))
            abar_t = schedule()
            assert abar_t.shape == (1000,) and abar_t.dtype == torch.float64
            assert torch.all(abar_t[1:] < abar_t[:-1])
            lam = schedule.log_snr()
            assert lam[0].item() == pytest.approx(torch.logit(ABAR[0]).item(), abs=1e-12)
            assert lam[-1].item() == pytest.approx(torch.logit(ABAR[-1]).item(), abs=1e-12)


def test_monotone_schedule_starts_at_the_reference_on_its_knots():
    schedule = dm.MonotoneSchedule(ABAR, num_knots=32)
    lam_ref = torch.logit(ABAR)
    steps = torch.arange(1, 1001, dtype=torch.float64)
    expected = torch.from_numpy(np.interp(schedule.knots.numpy(), steps.numpy(), lam_ref.numpy()))
    assert torch.allclose(schedule.log_snr(schedule.knots).detach(), expected, rtol=0, atol=1e-10)


def test_schedule_gradient_through_x_t_matches_finite_differences():
    # with t and eps fixed, the loss is a smooth function of phi; central differences in float64
    torch.manual_seed(1)
    model = dm.EpsMLP(2, hidden=16, depth=2).double()
    schedule = dm.MonotoneSchedule(ABAR, num_knots=8)
    x0 = torch.randn(32, 2, dtype=torch.float64)
    t, eps = torch.randint(1, 1001, (32,)), torch.randn(32, 2, dtype=torch.float64)

    def loss_at(phi):
        with torch.no_grad():
            schedule.phi.copy_(phi)
        return dm.ddpm_loss(model, x0, schedule(), t=t, eps=eps)

    phi0 = schedule.phi.detach().clone()
    (grad,) = torch.autograd.grad(loss_at(phi0), schedule.phi)
    h = 1e-6
    fd = torch.stack([(loss_at(phi0 + h * e) - loss_at(phi0 - h * e)).detach() / (2 * h)
                      for e in torch.eye(8, dtype=torch.float64)])
    assert torch.allclose(grad, fd, rtol=1e-5, atol=1e-8)  # O(h^2) truncation + rounding / h
    assert grad.abs().max() > 1e-4  # the schedule does receive a gradient


def test_both_schedule_gradient_estimators_are_unbiased():
    # A linear denoiser eps_theta(x, t) = c x in 1-D has a closed-form expected loss:
    # E||eps - c (s x0 + r eps)||^2 = (1 - c r)^2 + c^2 s^2 x0^2, s = sqrt(abar_t), r = sqrt(1 - abar_t).
    c = 0.6
    schedule = dm.MonotoneSchedule(ABAR, num_knots=8)
    n = 20_000
    g = _gen(7)
    x0 = torch.randn(n, 1, generator=g, dtype=torch.float64)
    t = torch.randint(1, 1001, (n,), generator=g)
    a = schedule(t)
    exact_loss = ((1 - c * (1 - a).sqrt()) ** 2 + c**2 * a * x0[:, 0] ** 2).mean()
    (exact,) = torch.autograd.grad(exact_loss, schedule.phi)

    def linear(x, _):
        return c * x

    for method, baseline in (("pathwise", None), ("score_function", None), ("score_function", "mean")):
        rows = dm.schedule_gradient_samples(method, linear, schedule, x0, t, num_samples=2,
                                            baseline=baseline, generator=g)
        assert rows.shape == (n, 8)
        # the rows are i.i.d. over (x0, t): their mean is within Z standard errors of the exact value
        assert_mc_close(rows, exact)


def test_pathwise_schedule_gradient_has_lower_variance():
    torch.manual_seed(2)
    model = dm.EpsMLP(2, hidden=16, depth=2).double()
    schedule = dm.MonotoneSchedule(ABAR, num_knots=8)
    g = _gen(8)
    x0 = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    t = torch.randint(1, 200, (4000,), generator=g)
    variances = {}
    for method in ("pathwise", "score_function"):
        rows = dm.schedule_gradient_samples(method, model, schedule, x0, t, generator=g)
        d = (rows - rows.mean(0)).square().sum(1)  # squared distance to the mean: trace of the covariance
        variances[method] = mc_summary(d)
    pw, sf = variances["pathwise"], variances["score_function"]
    assert sf.mean - pw.mean > Z * (sf.stderr**2 + pw.stderr**2).sqrt()


def test_joint_training_moves_the_schedule():
    torch.manual_seed(3)
    data = two_moons(256, generator=_gen(9))
    both = nn.ModuleDict({"eps": dm.EpsMLP(2, hidden=16, depth=2), "schedule": dm.MonotoneSchedule(ABAR, 8)})
    phi0 = both["schedule"].phi.detach().clone()

    def loss_fn(m, batch):
        return dm.ddpm_loss(m["eps"], batch, m["schedule"]())

    train(both, loss_fn, data, steps=20, batch_size=64, lr=1e-2, seed=0, device="cpu")
    phi1 = both["schedule"].phi.detach()
    assert not torch.allclose(phi0, phi1)
    assert torch.all(both["schedule"]()[1:] < both["schedule"]()[:-1])


# --------------------------------------------------------------------------- bad arguments


def test_bad_arguments_raise():
    model = dm.EpsMLP(2, hidden=8, depth=1)
    x0 = torch.randn(4, 2)
    with pytest.raises(ValueError, match="num_steps"):
        dm.linear_betas(1)
    with pytest.raises(ValueError, match="beta_1"):
        dm.linear_betas(10, 0.5, 0.1)
    with pytest.raises(ValueError, match="betas"):
        dm.abar(torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match="abar"):
        dm.q_sample(x0, torch.ones(4, dtype=torch.long), torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="t must lie"):
        dm.q_sample(x0, torch.full((4,), 1001), ABAR)
    with pytest.raises(ValueError, match="t must be an integer"):
        dm.q_sample(x0, torch.ones(4), ABAR)
    with pytest.raises(ValueError, match="eps"):
        dm.q_sample(x0, torch.ones(4, dtype=torch.long), ABAR, eps=torch.randn(3, 2))
    with pytest.raises(ValueError, match="x0"):
        dm.q_sample(torch.randn(4), torch.ones(4, dtype=torch.long), ABAR)
    with pytest.raises(ValueError, match="dim"):
        dm.EpsMLP(0)
    with pytest.raises(ValueError, match="x_t"):
        model(torch.randn(4, 3), torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="variance"):
        dm.p_sample(model, x0, 5, ABAR, variance="large")
    with pytest.raises(ValueError, match="num_samples"):
        dm.sample(model, ABAR, 0, 2)
    with pytest.raises(ValueError, match="knots"):
        dm.monotone_log_snr(torch.ones(3), torch.zeros(4), torch.arange(1.0, 5.0), 5.0, -5.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        dm.MonotoneSchedule(torch.tensor([0.9, 0.9, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="method"):
        dm.schedule_gradient_samples("reinforce", model, dm.MonotoneSchedule(ABAR, 4), x0,
                                     torch.ones(4, dtype=torch.long))
