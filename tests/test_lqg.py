"""companion.control.lqg: interface, exact costs against simulation and scipy's DARE, agreement."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from companion.control.lqg import expected_cost, feedback_cost, feedback_rollout_cost, riccati, rollout_cost
from companion.estimators import per_sample_gradients
from helpers import assert_mc_close

f64 = torch.float64
SYSTEM = dict(a=0.9, b=0.5, q=1.0, r=0.1, x0=1.0, noise_std=0.5)
PHI = (1 + math.sqrt(5)) / 2


def _policy(T=6):
    return torch.linspace(-1.0, 0.5, T, dtype=f64), torch.linspace(0.3, 0.9, T, dtype=f64)


def _matrices():
    a = torch.tensor([[1.0, 0.25], [0.0, 1.0]], dtype=f64)
    b = torch.tensor([[0.03125], [0.25]], dtype=f64)
    q = torch.diag(torch.tensor([1.0, 0.1], dtype=f64))
    r = torch.tensor([[0.1]], dtype=f64)
    return a, b, q, r


# --------------------------------------------------------------------------- interface


def test_shapes_and_graph():
    mu, sigma = (p.clone().requires_grad_(True) for p in _policy())
    a = torch.tensor(0.9, dtype=f64, requires_grad=True)
    J = expected_cost(mu, sigma, **{**SYSTEM, "a": a})
    assert J.shape == () and J.requires_grad
    grads = torch.autograd.grad(J, (mu, sigma, a))
    assert all(torch.isfinite(g).all() for g in grads)
    batch = expected_cost(mu.detach().expand(3, -1), sigma.detach().expand(3, -1), **SYSTEM)
    assert batch.shape == (3,) and torch.allclose(batch, J.detach().expand(3))
    costs = rollout_cost(mu, sigma, **SYSTEM, num_samples=7, generator=torch.Generator().manual_seed(0))
    assert costs.shape == (7,) and costs.requires_grad


def test_noise_is_explicit_and_reproducible():
    mu, sigma = _policy()
    one = rollout_cost(mu, sigma, **SYSTEM, num_samples=5, generator=torch.Generator().manual_seed(3))
    two = rollout_cost(mu, sigma, **SYSTEM, num_samples=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(one, two)
    eps, w = torch.randn(5, 6, dtype=f64), torch.randn(5, 6, dtype=f64)
    assert torch.equal(rollout_cost(mu, sigma, **SYSTEM, num_samples=5, eps=eps, w=w),
                       rollout_cost(mu, sigma, **SYSTEM, num_samples=5, eps=eps, w=w))
    # without process noise w may be left out
    quiet = {**SYSTEM, "noise_std": 0.0}
    assert rollout_cost(mu, sigma, **quiet, num_samples=5, eps=eps).shape == (5,)


@pytest.mark.parametrize("change,match", [
    ({"sigma": torch.zeros(6, dtype=f64)}, "sigma"),
    ({"sigma": -torch.ones(6, dtype=f64)}, "sigma"),
    ({"sigma": torch.ones(5, dtype=f64)}, "sigma"),
    ({"mu": torch.zeros(0, dtype=f64), "sigma": torch.zeros(0, dtype=f64)}, "T >= 1"),
    ({"mu": [0.0] * 6}, "mu and sigma"),
    ({"q": -1.0}, "q"),
    ({"r": -0.1}, "r"),
    ({"noise_std": -1.0}, "noise_std"),
    ({"q_final": -1.0}, "q_final"),
    ({"a": torch.ones(2, dtype=f64)}, "a must be a scalar"),
    ({"x0": math.nan}, "x0"),
])
def test_open_loop_rejects_bad_input(change, match):
    mu, sigma = _policy()
    args = {"mu": mu, "sigma": sigma, **SYSTEM, **change}
    with pytest.raises(ValueError, match=match):
        expected_cost(args.pop("mu"), args.pop("sigma"), **args)


def test_rollout_rejects_bad_noise():
    mu, sigma = _policy()
    with pytest.raises(ValueError, match="num_samples"):
        rollout_cost(mu, sigma, **SYSTEM, num_samples=0)
    with pytest.raises(ValueError, match="eps"):
        rollout_cost(mu, sigma, **SYSTEM, num_samples=5, eps=torch.zeros(4, 6, dtype=f64),
                     w=torch.zeros(4, 6, dtype=f64))
    with pytest.raises(ValueError, match="w= is missing"):
        rollout_cost(mu, sigma, **SYSTEM, num_samples=5, eps=torch.zeros(5, 6, dtype=f64))
    with pytest.raises(ValueError, match="not both"):
        rollout_cost(mu, sigma, **SYSTEM, num_samples=5, eps=torch.zeros(5, 6, dtype=f64),
                     w=torch.zeros(5, 6, dtype=f64), generator=torch.Generator())
    with pytest.raises(ValueError, match="shape"):
        rollout_cost(mu.expand(2, -1), sigma.expand(2, -1), **SYSTEM, num_samples=5)


def test_riccati_rejects_bad_input():
    a, b, q, r = _matrices()
    with pytest.raises(ValueError, match="b must have shape"):
        riccati(a, b.T, q, r)
    with pytest.raises(ValueError, match="all be scalars or all be matrices"):
        riccati(a, 1.0, q, r)
    with pytest.raises(ValueError, match="r must be positive definite"):
        riccati(a, b, q, torch.zeros(1, 1, dtype=f64))
    with pytest.raises(ValueError, match="q must be symmetric"):
        riccati(a, b, q + torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=f64), r)
    with pytest.raises(ValueError, match="q must be positive semi-definite"):
        riccati(a, b, -q, r)
    with pytest.raises(ValueError, match="tol"):
        riccati(1.0, 1.0, 1.0, 1.0, tol=0.0)
    with pytest.raises(ValueError, match="stabilizable"):
        riccati(2.0, 0.0, 1.0, 1.0)  # an unstable mode no action reaches


def test_feedback_rejects_bad_input():
    a, b, q, r = _matrices()
    x0 = torch.ones(2, dtype=f64)
    ok = dict(a=a, b=b, q=q, r=r, x0=x0, horizon=5)
    with pytest.raises(ValueError, match="k must have shape"):
        feedback_cost(torch.zeros(2, 1, dtype=f64), **ok)
    with pytest.raises(ValueError, match="x0 must have 2 entries"):
        feedback_cost(torch.zeros(1, 2, dtype=f64), **{**ok, "x0": torch.ones(3, dtype=f64)})
    with pytest.raises(ValueError, match="horizon"):
        feedback_cost(torch.zeros(1, 2, dtype=f64), **{**ok, "horizon": 0})
    with pytest.raises(ValueError, match="sigma must be positive"):
        feedback_cost(torch.zeros(1, 2, dtype=f64), **ok, sigma=0.0)
    with pytest.raises(ValueError, match="x0_cov"):
        feedback_cost(torch.zeros(1, 2, dtype=f64), **ok, x0_cov=-torch.eye(2, dtype=f64))
    with pytest.raises(ValueError, match="q_final"):
        feedback_cost(torch.zeros(1, 2, dtype=f64), **ok, q_final=-torch.eye(2, dtype=f64))
    with pytest.raises(ValueError, match="noise_std"):
        feedback_cost(torch.zeros(1, 2, dtype=f64), **ok, noise_std=-1.0)
    with pytest.raises(ValueError, match="num_samples"):
        feedback_rollout_cost(torch.zeros(1, 2, dtype=f64), **ok, num_samples=0)


# --------------------------------------------------------------------------- correctness


def test_expected_cost_one_step_by_hand():
    mu, sigma = torch.tensor([0.3], dtype=f64), torch.tensor([0.7], dtype=f64)
    a, b, q, r, x0, w, qf = 0.9, 0.5, 1.0, 0.1, 1.0, 0.5, 2.0
    by_hand = q * x0**2 + r * (0.3**2 + 0.7**2) + qf * ((a * x0 + b * 0.3) ** 2 + b**2 * 0.7**2 + w**2)
    J = expected_cost(mu, sigma, a=a, b=b, q=q, r=r, x0=x0, noise_std=w, q_final=qf)
    assert abs(J.item() - by_hand) < 1e-12


def test_rollout_matches_expected_cost_and_its_gradient():
    mu, sigma = _policy()
    gen = torch.Generator().manual_seed(0)
    costs = rollout_cost(mu, sigma, **SYSTEM, num_samples=40_000, generator=gen)
    assert_mc_close(costs, expected_cost(mu, sigma, **SYSTEM))
    # the pathwise gradient, one per trajectory, against autograd of the closed form
    n = 20_000
    noise = (torch.randn(n, 6, generator=gen, dtype=f64), torch.randn(n, 6, generator=gen, dtype=f64))

    def program(params, noise):
        return rollout_cost(params[0], params[1], **SYSTEM, num_samples=1, eps=noise[0][None], w=noise[1][None])[0]

    per_path = per_sample_gradients(program, (mu, sigma), noise)
    exact_params = [p.clone().requires_grad_(True) for p in (mu, sigma)]
    exact = torch.autograd.grad(expected_cost(*exact_params, **SYSTEM), exact_params)
    for mc, ex in zip(per_path, exact):
        assert_mc_close(mc, ex)


def test_riccati_golden_ratio_and_scipy():
    P, K = riccati(1.0, 1.0, 1.0, 1.0)
    assert P.shape == () and abs(P.item() - PHI) < 1e-10 and abs(K.item() - (PHI - 1)) < 1e-10
    gen = np.random.default_rng(0)
    for n, m in [(2, 1), (3, 2)]:
        a = torch.as_tensor(gen.normal(size=(n, n)), dtype=f64)
        b = torch.as_tensor(gen.normal(size=(n, m)), dtype=f64)
        l = torch.as_tensor(gen.normal(size=(n, n)), dtype=f64)
        q, r = l @ l.T + 0.1 * torch.eye(n, dtype=f64), torch.eye(m, dtype=f64)
        P, K = riccati(a, b, q, r)
        P_ref = torch.as_tensor(scipy.linalg.solve_discrete_are(a.numpy(), b.numpy(), q.numpy(), r.numpy()))
        K_ref = torch.linalg.solve(r + b.T @ P_ref @ b, b.T @ P_ref @ a)
        # two solvers of one equation: agreement to rounding
        assert torch.allclose(P, P_ref, rtol=1e-9, atol=1e-9) and torch.allclose(K, K_ref, rtol=1e-9, atol=1e-9)
        assert torch.linalg.eigvals(a - b @ K).abs().max() < 1  # the gain stabilizes


def test_feedback_bellman_identity_and_open_loop_limit():
    a, b, q, r = _matrices()
    P, K = riccati(a, b, q, r)
    x0, cov, w = torch.tensor([1.0, -0.5], dtype=f64), 0.2 * torch.eye(2, dtype=f64), 0.3
    for horizon in (1, 7, 30):
        J = feedback_cost(K, a=a, b=b, q=q, r=r, x0=x0, x0_cov=cov, horizon=horizon, noise_std=w, q_final=P)
        exact = x0 @ P @ x0 + torch.trace(P @ cov) + horizon * w**2 * torch.trace(P)
        assert abs(J - exact) <= 1e-10 * exact
    # k = 0 with action noise is the open-loop policy with mu = 0
    sig = torch.full((5,), 0.4, dtype=f64)
    open_loop = expected_cost(torch.zeros(5, dtype=f64), sig, **SYSTEM)
    fb = feedback_cost(0.0, **{k: v for k, v in SYSTEM.items()}, horizon=5, sigma=0.4)
    assert abs(open_loop - fb) < 1e-12
    # scalars and 1 x 1 matrices are the same system
    one = torch.ones(1, 1, dtype=f64)
    assert abs(feedback_cost(0.6, a=1.0, b=1.0, q=1.0, r=1.0, x0=1.0, horizon=9, sigma=0.2, noise_std=0.1)
               - feedback_cost(0.6 * one, a=one, b=one, q=one, r=one, x0=torch.ones(1, dtype=f64), horizon=9,
                               sigma=0.2, noise_std=0.1)) < 1e-12


def test_feedback_rollout_matches_exact_cost_batched():
    a, b, q, r = _matrices()
    _, K = riccati(a, b, q, r)
    k = torch.stack([K, 0.5 * K])  # (2, 1, 2): a batch of gains
    sigma = torch.tensor([[0.2], [0.5]], dtype=f64)
    setting = dict(a=a, b=b, q=q, r=r, x0=torch.tensor([1.0, 0.0], dtype=f64), horizon=12, sigma=sigma, noise_std=0.3)
    costs = feedback_rollout_cost(k, **setting, num_samples=50_000, generator=torch.Generator().manual_seed(1))
    assert costs.shape == (50_000, 2)
    assert_mc_close(costs, feedback_cost(k, **setting))


# --------------------------------------------------------------------------- agreement


def test_gradient_descent_on_the_gain_reaches_riccati():
    gain = torch.zeros((), dtype=f64, requires_grad=True)
    opt = torch.optim.LBFGS([gain], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = feedback_cost(gain, a=1.0, b=1.0, q=1.0, r=1.0, x0=1.0, horizon=30)
        loss.backward()
        return loss

    opt.step(closure)
    assert abs(gain.item() - (PHI - 1)) < 1e-6
    plan = torch.zeros(30, dtype=f64, requires_grad=True)
    opt = torch.optim.LBFGS([plan], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")
    sigma = torch.full((30,), 0.5, dtype=f64)

    def closure_plan():
        opt.zero_grad()
        loss = expected_cost(plan, sigma, a=1.0, b=1.0, q=1.0, r=1.0, x0=1.0)
        loss.backward()
        return loss

    opt.step(closure_plan)
    assert abs(-plan[0].item() - (PHI - 1)) < 1e-6
