"""companion.models.diffusion: DDPM schedule, forward process, loss, sampler, learnable schedule."""
import functools
import math

import numpy as np
import pytest
import torch
from torch import nn

from companion.data import two_moons
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


# --------------------------------------------------------------------------- the continuous-time loss


def _random_schedule(num_knots=8, scale=0.7, seed=10):
    schedule = dm.MonotoneSchedule(ABAR, num_knots)
    with torch.no_grad():
        schedule.phi.add_(scale * torch.randn(num_knots, generator=_gen(seed), dtype=torch.float64))
    return schedule


def _gauss_denoiser(s2=1.0):
    return functools.partial(dm.gaussian_denoiser, data_var=s2)


def test_slope_is_the_derivative_of_the_log_snr():
    schedule = _random_schedule()
    t = torch.tensor([1.3, 2.0, 7.7, 55.5, 400.0, 999.0], dtype=torch.float64, requires_grad=True)
    lam = schedule.log_snr(t)
    (dlam_dt,) = torch.autograd.grad(lam.sum(), t)  # autograd through the interpolation
    assert torch.allclose(schedule.slope(t), dlam_dt, rtol=1e-12, atol=0)
    # summed over the segments, the slope integrates to lambda_min - lambda_max (rounding only)
    knots = schedule.knots
    total = (schedule.slope(knots[:-1]) * knots.diff()).sum()
    assert total.item() == pytest.approx(schedule.log_snr_min - schedule.log_snr_max, rel=1e-12)


def test_schedule_with_a_knot_at_every_step_equals_the_reference():
    linear = dm.MonotoneSchedule(ABAR, knots=torch.arange(1.0, 1001.0))
    assert linear.phi.numel() == 999
    assert torch.allclose(linear().detach(), ABAR, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="knots"):
        dm.MonotoneSchedule(ABAR, knots=torch.tensor([1.0, 500.0, 900.0]))


def test_reference_time_inverts_the_reference_log_snr():
    lam_ref = torch.logit(ABAR)
    t = torch.tensor([1, 2, 10, 500, 1000])
    assert torch.allclose(dm.reference_time(lam_ref[t - 1], lam_ref), t.double(), rtol=0, atol=1e-9)
    # between steps: the piecewise-linear reference is inverted exactly
    linear = dm.MonotoneSchedule(ABAR, knots=torch.arange(1.0, 1001.0))
    t_real = torch.tensor([1.25, 3.5, 77.7, 999.9], dtype=torch.float64)
    lam = linear.log_snr(t_real).detach()
    assert torch.allclose(dm.reference_time(lam, lam_ref), t_real, rtol=0, atol=1e-9)


def test_log_snr_denoiser_is_the_step_denoiser_at_the_reference_steps():
    torch.manual_seed(4)
    model = dm.EpsMLP(2, hidden=16, depth=2).double()
    denoiser = dm.LogSNRDenoiser(model, ABAR)
    z, t = torch.randn(6, 2, dtype=torch.float64), torch.tensor([1, 3, 40, 300, 800, 1000])
    expected = model(z, t.double())  # the step denoiser at the same (real-valued) steps
    assert torch.allclose(denoiser(z, torch.logit(ABAR)[t - 1]), expected, rtol=0, atol=1e-9)
    # integer t gives float32 time features, real t keeps float64: they agree to float32 rounding
    assert dm.timestep_embedding(t.double(), 8).dtype == torch.float64
    assert torch.allclose(dm.timestep_embedding(t.double(), 8).float(), dm.timestep_embedding(t, 8), atol=1e-6)


@pytest.mark.parametrize("s2", [1.0, 0.3])
def test_gaussian_denoiser_is_the_posterior_mean(s2):
    # x ~ N(0, s2 I), z = alpha x + sigma eps: E[eps | z] is linear in z, so the error is
    # uncorrelated with z, and its mean square per coordinate is sigmoid(lambda + log s2).
    n, lam = 200_000, torch.tensor(0.7, dtype=torch.float64)
    g = _gen(11)
    x = s2**0.5 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 3, generator=g, dtype=torch.float64)
    z = torch.sigmoid(lam).sqrt() * x + torch.sigmoid(-lam).sqrt() * eps
    err = eps - dm.gaussian_denoiser(z, lam.expand(n), s2)
    assert_mc_close(err * z, torch.zeros(3))  # orthogonal to z: the least-squares projection
    assert_mc_close(err.square(), torch.sigmoid(lam + math.log(s2)).expand(3))


def test_gaussian_loss_moments_against_quadrature():
    # E[L_hat^2] = (T-1)/4 (D^2 + 2D) sum_k |lambda'_k| int_segment a(lambda)^2 d lambda; the
    # integrals by scipy's adaptive quadrature (independent of the softplus - sigmoid antiderivative)
    from scipy import integrate

    schedule, s2, dim = _random_schedule(), 0.5, 3
    lam = schedule.log_snr(schedule.knots).detach().numpy()
    knots = schedule.knots.numpy()
    a2 = lambda l: (1 / (1 + np.exp(-(l + np.log(s2))))) ** 2  # noqa: E731
    second = sum((lam[k] - lam[k + 1]) / (knots[k + 1] - knots[k]) * integrate.quad(a2, lam[k + 1], lam[k])[0]
                 for k in range(len(knots) - 1)) * (1000 - 1) / 4 * (dim**2 + 2 * dim)
    mean = dim / 2 * integrate.quad(lambda l: 1 / (1 + np.exp(-(l + np.log(s2)))), lam[-1], lam[0])[0]
    m, s = dm.gaussian_loss_moments(schedule.log_snr(schedule.knots), schedule.knots, s2, dim)
    assert m.item() == pytest.approx(mean, rel=1e-9) and s.item() == pytest.approx(second, rel=1e-9)
    # the mean depends on the ends only; Cauchy-Schwarz bounds the second moment from below
    m0, s0 = dm.gaussian_loss_moments(torch.logit(ABAR), torch.arange(1.0, 1001.0), s2, dim)
    assert m.item() == pytest.approx(m0.item(), rel=1e-12)
    assert s.item() > (1 + 2 / dim) * m.item() ** 2 and s0.item() > (1 + 2 / dim) * m.item() ** 2


@pytest.mark.parametrize("knots", ["every_step", "random"])
def test_continuous_loss_moments_match_the_gaussian_closed_form(knots):
    schedule = dm.MonotoneSchedule(ABAR, knots=torch.arange(1.0, 1001.0)) if knots == "every_step" \
        else _random_schedule(num_knots=16, scale=1.0)
    s2, dim, n = 0.5, 3, 200_000
    g = _gen(12)
    x0 = s2**0.5 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        l_hat = dm.schedule_loss(_gauss_denoiser(s2), schedule, x0, generator=g)
        mean, second = dm.gaussian_loss_moments(schedule.log_snr(schedule.knots), schedule.knots, s2, dim)
    assert l_hat.shape == (n,)
    assert_mc_close(l_hat, mean)
    assert_mc_close(l_hat**2, second)


def test_schedule_loss_is_deterministic_and_keeps_its_graph():
    schedule, x0 = _random_schedule(), torch.randn(5, 2, dtype=torch.float64)
    a = dm.schedule_loss(_gauss_denoiser(), schedule, x0, generator=_gen(13))
    b = dm.schedule_loss(_gauss_denoiser(), schedule, x0, generator=_gen(13))
    assert torch.equal(a, b) and a.requires_grad
    (grad,) = torch.autograd.grad(a.sum(), schedule.phi)
    assert grad.shape == (8,) and torch.all(torch.isfinite(grad))


def _manual_rows(method, schedule, denoiser, x0, t, eps, power):
    """One autograd pass per example: the reference for variance_gradient_samples."""
    rows = []
    for i in range(x0.shape[0]):
        f = dm.schedule_loss(denoiser, schedule, x0[i].expand(eps.shape[0], -1), t=t[i].expand(eps.shape[0]),
                             eps=eps[:, i]) ** power
        if method == "pathwise":
            grads = torch.autograd.grad(f.mean(), schedule.phi)[0]
        else:  # the score-function surrogate, with the leave-one-out baseline
            lam = schedule.log_snr(t[i].expand(eps.shape[0]))
            a = torch.sigmoid(lam).unsqueeze(-1)
            z = (a.sqrt() * x0[i] + (1 - a).sqrt() * eps[:, i]).detach()
            eps_z = (z - a.sqrt() * x0[i]) / (1 - a).sqrt()
            slope = schedule.slope(t[i].expand(eps.shape[0]))
            f_z = dm.continuous_loss(denoiser, x0[i].expand_as(z), eps_z, lam, slope) ** power
            log_q = torch.distributions.Normal(a.sqrt() * x0[i], (1 - a).sqrt()).log_prob(z).sum(-1)
            b = (f_z.sum() - f_z) / (eps.shape[0] - 1)
            surrogate = f_z + (f_z - b).detach() * (log_q - log_q.detach())
            grads = torch.autograd.grad(surrogate.mean(), schedule.phi)[0]
        rows.append(grads)
    return torch.stack(rows)


@pytest.mark.parametrize("method", ["pathwise", "score_function"])
def test_variance_gradient_samples_equal_one_backward_pass_per_example(method):
    torch.manual_seed(5)
    denoiser = dm.LogSNRDenoiser(dm.EpsMLP(2, hidden=16, depth=2).double(), ABAR)
    schedule = _random_schedule()
    g = _gen(14)
    x0, t = torch.randn(6, 2, generator=g, dtype=torch.float64), dm.sample_time(6, generator=g)
    eps = torch.randn(3, 6, 2, generator=g, dtype=torch.float64)
    for power in (1, 2):
        rows = dm.variance_gradient_samples(method, denoiser, schedule, x0, t, eps, power=power,
                                            baseline="mean", chunk_size=4)
        assert rows.shape == (6, 8)
        expected = _manual_rows(method, schedule, denoiser, x0, t, eps, power)
        assert torch.allclose(rows, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["pathwise", "score_function"])
def test_variance_gradient_samples_are_unbiased_for_the_gaussian_closed_form(method):
    # grad_phi E[L_hat] = 0 (the loss depends on the ends only) and grad_phi E[L_hat^2] is the
    # autograd gradient of the closed-form second moment; rows i.i.d. over (x0, t): Z stderr
    schedule, n, dim = _random_schedule(scale=0.5), 30_000, 2
    g = _gen(15)
    x0 = torch.randn(n, dim, generator=g, dtype=torch.float64)
    t = dm.sample_time(n, generator=g)
    eps = torch.randn(2, n, dim, generator=g, dtype=torch.float64)
    mean, second = dm.gaussian_loss_moments(schedule.log_snr(schedule.knots), schedule.knots, 1.0, dim)
    exact = {1: torch.autograd.grad(mean, schedule.phi, retain_graph=True)[0],
             2: torch.autograd.grad(second, schedule.phi)[0]}
    assert exact[1].abs().max() < 1e-10 and exact[2].abs().max() > 1
    baseline = "mean" if method == "score_function" else None
    for power in (1, 2):
        rows = dm.variance_gradient_samples(method, _gauss_denoiser(), schedule, x0, t, eps, power=power,
                                            baseline=baseline)
        assert_mc_close(rows, exact[power])


def test_pathwise_training_of_the_schedule_reaches_the_closed_form_optimum():
    # Gaussian data, exact denoiser: minimize the exact E[L_hat^2] over phi with L-BFGS (the
    # reference), then train phi by Adam on Monte Carlo pathwise gradients of mean(L_hat^2).
    # The SGD run must recover at least 95% of the possible reduction (an optimization
    # tolerance: Adam's noise leaves a few percent; a wrong gradient does not come close).
    def second(s):
        return dm.gaussian_loss_moments(s.log_snr(s.knots), s.knots, 1.0, 2)[1]

    start = dm.MonotoneSchedule(ABAR, 8)
    best = dm.MonotoneSchedule(ABAR, 8)
    opt = torch.optim.LBFGS(best.parameters(), max_iter=500, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-15)

    def closure():
        opt.zero_grad()
        value = second(best)
        value.backward()
        return value

    opt.step(closure)
    learned = dm.MonotoneSchedule(ABAR, 8)
    g = _gen(16)
    data = torch.randn(4096, 2, generator=g, dtype=torch.float64)
    train(learned, lambda m, b: dm.schedule_loss(_gauss_denoiser(), m, b, generator=g).square().mean(),
          data, steps=200, batch_size=256, lr=0.1, seed=0, device="cpu")
    s0, s_best, s_sgd = second(start).item(), second(best).item(), second(learned).item()
    assert s_best < s0 / 5  # the interior matters: a 5-fold reduction is available
    assert (s0 - s_sgd) > 0.95 * (s0 - s_best)
    # and the loss itself did not move (ends fixed)
    m0 = dm.gaussian_loss_moments(start.log_snr(start.knots), start.knots, 1.0, 2)[0]
    m1 = dm.gaussian_loss_moments(learned.log_snr(learned.knots), learned.knots, 1.0, 2)[0]
    assert m1.item() == pytest.approx(m0.item(), rel=1e-12)


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
    schedule, t_real = dm.MonotoneSchedule(ABAR, 4), dm.sample_time(4)
    eps = torch.randn(2, 4, 2)
    with pytest.raises(ValueError, match="method"):
        dm.variance_gradient_samples("reinforce", model, schedule, x0, t_real, eps)
    with pytest.raises(ValueError, match="power"):
        dm.variance_gradient_samples("pathwise", model, schedule, x0, t_real, eps, power=3)
    with pytest.raises(ValueError, match="baseline"):
        dm.variance_gradient_samples("score_function", model, schedule, x0, t_real, eps, baseline="median")
    with pytest.raises(ValueError, match="S >= 2"):
        dm.variance_gradient_samples("score_function", model, schedule, x0, t_real, eps[:1], baseline="mean")
    with pytest.raises(ValueError, match="eps"):
        dm.variance_gradient_samples("pathwise", model, schedule, x0, t_real, eps[0])
    with pytest.raises(ValueError, match="t must be a real"):
        dm.variance_gradient_samples("pathwise", model, schedule, x0, torch.ones(4, dtype=torch.long), eps)
    with pytest.raises(ValueError, match="schedule"):
        dm.variance_gradient_samples("pathwise", model, ABAR, x0, t_real, eps)
    with pytest.raises(ValueError, match="schedule"):
        dm.schedule_loss(model, ABAR, x0)
    with pytest.raises(ValueError, match="x0 and eps"):
        dm.continuous_loss(model, x0, torch.randn(3, 2), torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match="log_snr"):
        dm.continuous_loss(model, x0, torch.randn(4, 2), torch.zeros(3), torch.ones(4))
    with pytest.raises(ValueError, match="data_var"):
        dm.gaussian_denoiser(x0, torch.zeros(4), 0.0)
    with pytest.raises(ValueError, match="log_snr_knots"):
        dm.gaussian_loss_moments(torch.zeros(3), torch.arange(4.0), 1.0, 2)
    with pytest.raises(ValueError, match="log_snr_ref"):
        dm.reference_time(torch.zeros(2), torch.zeros(1))
    with pytest.raises(ValueError, match="num_knots"):
        dm.geometric_knots(1000, 0)
