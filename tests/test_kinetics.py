"""companion.science.kinetics: interface and bad input, the solver against closed forms and the
matrix exponential, the three gradients against the closed form's derivative, the grid
posterior, and variational inference against it."""
import math

import numpy as np
import pytest
import torch
from scipy.linalg import expm

from companion.science import kinetics as kin

DT = torch.float64
TIMES = torch.tensor([0.5, 1.0, 2.0, 3.0, 5.0, 8.0], dtype=DT)
LOG_K = torch.tensor([0.8, 0.25], dtype=DT).log()
SIGMA = 0.03


def _data(seed=0):
    return kin.simulate_data(LOG_K, TIMES, SIGMA, generator=torch.Generator().manual_seed(seed))


def _chain_expm(k: np.ndarray, times: np.ndarray) -> np.ndarray:
    """y(t) = expm(K t) y(0) for the chain: an independent reference for any P, (T, P + 1)."""
    n = len(k) + 1
    rates = np.zeros((n, n))
    for i, ki in enumerate(k):  # reaction i: A_i -> A_{i+1}
        rates[i, i] -= ki
        rates[i + 1, i] += ki
    y0 = np.eye(n)[0]
    return np.stack([expm(rates * t) @ y0 for t in times])


# --------------------------------------------------------------------------- interface


def test_shapes_of_solutions_and_gradients():
    log_k = torch.zeros(4, 5, 3, dtype=DT)  # a (4, 5) batch of P = 3 chains
    assert kin.initial_state(log_k).shape == (4, 5, 4)
    y = kin.solve(log_k, TIMES, rtol=1e-5, atol=1e-7)
    assert y.shape == (6, 4, 5, 4)
    sens = kin.solve_sensitivities(log_k[:2, :1], TIMES, rtol=1e-5, atol=1e-7)
    assert sens.y.shape == (6, 2, 1, 4) and sens.s.shape == (6, 2, 1, 4, 3)
    assert kin.consecutive_reactions(torch.zeros(7, 2, dtype=DT), TIMES).shape == (6, 7, 3)
    assert kin.consecutive_sensitivities(LOG_K.expand(7, 2), TIMES).shape == (6, 7, 3, 2)
    data = _data()
    for method in kin.METHODS:
        grad = kin.log_likelihood_gradient(method, LOG_K.expand(3, 2), TIMES, data, SIGMA, rtol=1e-5, atol=1e-7)
        assert grad.shape == (3, 2) and not grad.requires_grad


def test_solve_keeps_the_graph_and_sensitivities_do_not():
    log_k = LOG_K.clone().requires_grad_(True)
    for adjoint in (False, True):
        y = kin.solve(log_k, TIMES, adjoint=adjoint, rtol=1e-5, atol=1e-7)
        assert y.requires_grad
    sens = kin.solve_sensitivities(log_k, TIMES, rtol=1e-5, atol=1e-7)
    assert not sens.y.requires_grad and not sens.s.requires_grad


def test_mass_is_conserved():
    y = torch.rand(10, 6, dtype=DT)
    k = torch.rand(10, 5, dtype=DT)
    assert torch.allclose(kin.reaction_rates(y, k).sum(-1), torch.zeros(10, dtype=DT), atol=1e-15)
    sol = kin.solve(torch.randn(4, 5, dtype=DT, generator=torch.Generator().manual_seed(0)), TIMES)
    assert torch.allclose(sol.sum(-1), torch.ones(6, 4, dtype=DT), atol=1e-8)


def test_bad_input_raises_value_error():
    data = _data()
    bad_times = [torch.tensor([1.0, 0.5], dtype=DT), torch.tensor([-1.0, 1.0], dtype=DT),
                 torch.tensor([1.0, 1.0], dtype=DT), torch.tensor([], dtype=DT), torch.tensor([1, 2]),
                 torch.ones(2, 2, dtype=DT), torch.tensor([1.0, math.inf], dtype=DT)]
    for times in bad_times:
        with pytest.raises(ValueError, match="times"):
            kin.solve(LOG_K, times)
    for log_k in (torch.tensor([0.0, math.nan], dtype=DT), torch.tensor(0.0, dtype=DT),
                  torch.tensor([0, 1]), torch.zeros(3, 0, dtype=DT), [0.0, 1.0]):
        with pytest.raises(ValueError, match="log_k"):
            kin.solve(log_k, TIMES)
    for name, kwargs in (("rtol", {"rtol": 0.0}), ("atol", {"atol": -1.0}), ("rtol", {"rtol": True})):
        with pytest.raises(ValueError, match=name):
            kin.solve(LOG_K, TIMES, **kwargs)
    with pytest.raises(ValueError, match="method"):
        kin.log_likelihood_gradient("finite_differences", LOG_K, TIMES, data, SIGMA)
    with pytest.raises(ValueError, match="data"):
        kin.log_likelihood_gradient("autodiff", LOG_K, TIMES, data[:-1], SIGMA)  # shapes disagree
    with pytest.raises(ValueError, match="data"):
        kin.log_likelihood_gradient("autodiff", torch.zeros(3, dtype=DT), TIMES, data, SIGMA)  # P = 3
    for noise in (0.0, -0.1, math.nan):
        with pytest.raises(ValueError, match="noise_scale"):
            kin.log_likelihood_gradient("autodiff", LOG_K, TIMES, data, noise)
    with pytest.raises(ValueError, match="P = 2"):
        kin.consecutive_reactions(torch.zeros(3, dtype=DT), TIMES)
    with pytest.raises(ValueError, match="k_1 != k_2"):
        kin.consecutive_sensitivities(torch.zeros(2, dtype=DT), TIMES)
    with pytest.raises(ValueError, match="species"):
        kin.reaction_rates(torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="disagree"):
        kin.log_likelihood(torch.zeros(6, 4, dtype=DT), data, SIGMA)
    with pytest.raises(ValueError, match="prior_scale"):
        kin.log_prior(LOG_K, 0.0, 0.0)
    with pytest.raises(ValueError, match="one parameter vector"):
        kin.simulate_data(LOG_K.expand(2, 2), TIMES, SIGMA)
    axis = torch.linspace(-1, 1, 5, dtype=DT)
    with pytest.raises(ValueError, match="log_k1"):
        kin.grid_posterior(axis.flip(0), axis, TIMES, data, SIGMA, 0.0, 1.0)
    for kwargs in ({"num_steps": 0}, {"num_samples": 0}, {"num_runs": 0}, {"lr": 0.0}, {"init_scale": -1.0}):
        options = {"num_steps": 2, "num_samples": 2, **kwargs}
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            kin.fit_vi(TIMES, data, SIGMA, 0.0, 1.0, **options)
    with pytest.raises(ValueError, match="method"):
        kin.gradient_cost("exact", 2)
    with pytest.raises(ValueError, match="num_params"):
        kin.gradient_cost("autodiff", 0)


# --------------------------------------------------------------------------- correctness


def test_closed_form_against_the_matrix_exponential_and_its_limit():
    y = kin.consecutive_reactions(LOG_K, TIMES).numpy()
    assert np.allclose(y, _chain_expm(LOG_K.exp().numpy(), TIMES.numpy()), atol=1e-13)
    # k_1 = k_2 = k: B(t) = k t exp(-k t), and the formula is continuous there
    k = 0.6
    equal = kin.consecutive_reactions(torch.full((2,), math.log(k), dtype=DT), TIMES)[:, 1]
    assert torch.allclose(equal, k * TIMES * torch.exp(-k * TIMES), rtol=1e-14)
    near = kin.consecutive_reactions(torch.tensor([math.log(k), math.log(k) + 1e-9], dtype=DT), TIMES)[:, 1]
    assert torch.allclose(near, equal, rtol=1e-8)


@pytest.mark.parametrize("num_params", [1, 2, 5])
def test_solver_against_the_matrix_exponential(num_params):
    log_k = torch.linspace(-0.7, 0.7, num_params, dtype=DT)
    y = kin.solve(log_k, TIMES, rtol=1e-9, atol=1e-11).numpy()
    # global error of a tight adaptive solve: within 100 x atol
    assert np.allclose(y, _chain_expm(log_k.exp().numpy(), TIMES.numpy()), atol=1e-9, rtol=0)


def test_closed_form_sensitivities_against_autograd_and_finite_differences():
    for log_k in (LOG_K, torch.tensor([0.3, 0.6], dtype=DT).log()):
        s = kin.consecutive_sensitivities(log_k, TIMES)
        jac = torch.func.jacfwd(lambda lk: kin.consecutive_reactions(lk, TIMES))(log_k)
        assert torch.allclose(s, jac, atol=1e-13)
        h = 1e-6  # central differences: error O(h^2) ~ 1e-12, plus rounding ~ 1e-10
        for p in range(2):
            step = torch.zeros(2, dtype=DT)
            step[p] = h
            fd = (kin.consecutive_reactions(log_k + step, TIMES) - kin.consecutive_reactions(log_k - step, TIMES))
            assert torch.allclose(s[..., p], fd / (2 * h), atol=1e-8)


def test_forward_sensitivities_against_the_matrix_exponential():
    log_k = torch.tensor([0.2, -0.4, 0.5], dtype=DT)
    sens = kin.solve_sensitivities(log_k, TIMES, rtol=1e-7, atol=1e-9)
    h = 1e-6
    for p in range(3):
        step = np.zeros(3)
        step[p] = h
        k = log_k.numpy()
        fd = (_chain_expm(np.exp(k + step), TIMES.numpy()) - _chain_expm(np.exp(k - step), TIMES.numpy())) / (2 * h)
        assert np.allclose(sens.s[..., p].numpy(), fd, atol=1e-6)  # 1000 x atol: the global error


@pytest.mark.parametrize("tol", [1e-4, 1e-6])
def test_three_gradients_agree_with_the_closed_form_within_the_solver_tolerance(tol):
    data = _data()
    points = torch.tensor([[0.8, 0.25], [1.5, 0.1], [0.3, 0.6]], dtype=DT).log()
    exact = kin.log_likelihood_gradient("exact", points, TIMES, data, SIGMA)
    y, s = kin.consecutive_reactions(points, TIMES), kin.consecutive_sensitivities(points, TIMES)
    # the error each sensitivity may carry, atol + rtol |S|, through the chain rule
    residual = ((data[:, None] - y) / SIGMA**2).abs()
    bound = torch.einsum("tbi,tbip->bp", residual, tol * s.abs() + tol / 100)
    for method in ("autodiff", "forward", "adjoint"):
        grad = kin.log_likelihood_gradient(method, points, TIMES, data, SIGMA, rtol=tol, atol=tol / 100)
        assert torch.all((grad - exact).abs() <= bound), method


def test_exact_gradient_equals_autograd_of_the_closed_form_likelihood():
    data = _data()
    log_k = torch.tensor([0.1, -1.2], dtype=DT, requires_grad=True)
    kin.log_likelihood(kin.consecutive_reactions(log_k, TIMES), data, SIGMA).backward()
    exact = kin.log_likelihood_gradient("exact", log_k, TIMES, data, SIGMA)
    assert torch.allclose(exact, log_k.grad, rtol=1e-12)


def test_simulated_noise_has_the_stated_scale():
    times = torch.linspace(0.1, 10.0, 300, dtype=DT)
    data = kin.simulate_data(LOG_K, times, SIGMA, generator=torch.Generator().manual_seed(0))
    residual = data - kin.consecutive_reactions(LOG_K, times)
    n = residual.numel()
    # the sample variance of n normals: relative standard error sqrt(2 / n)
    assert abs(residual.var().item() / SIGMA**2 - 1) < 5 * math.sqrt(2 / n)
    assert abs(residual.mean().item()) < 5 * SIGMA / math.sqrt(n)
    again = kin.simulate_data(LOG_K, times, SIGMA, generator=torch.Generator().manual_seed(0))
    assert torch.equal(data, again)  # seeded


def test_grid_posterior_with_uninformative_data_is_the_prior():
    data = _data()
    axis = torch.linspace(0.5 - 8.0, 0.5 + 8.0, 161, dtype=DT)  # the prior's mean +- 8 sd
    post = kin.grid_posterior(axis, axis, TIMES, data, 1e4, 0.5, 1.0)  # noise 10^4: no information
    assert torch.allclose(post.mean, torch.full((2,), 0.5, dtype=DT), atol=1e-4)
    assert torch.allclose(post.cov, torch.eye(2, dtype=DT), atol=1e-3)
    cell = (axis[1] - axis[0]) ** 2
    assert (post.density.sum() * cell).item() == pytest.approx(1.0, abs=1e-12)


def test_vi_matches_the_grid_posterior():
    data = _data()
    axis = torch.linspace(-4.0, 2.0, 121, dtype=DT)
    coarse = kin.grid_posterior(axis, axis, TIMES, data, SIGMA, math.log(0.5), 1.0)
    sd = coarse.cov.diagonal().sqrt()
    fine = [torch.linspace((m - 8 * s).item(), (m + 8 * s).item(), 161, dtype=DT) for m, s in zip(coarse.mean, sd)]
    post = kin.grid_posterior(*fine, TIMES, data, SIGMA, math.log(0.5), 1.0)
    post_sd = post.cov.diagonal().sqrt()
    fit = kin.fit_vi(TIMES, data, SIGMA, math.log(0.5), 1.0, num_steps=100, num_samples=8, num_runs=2, lr=0.1,
                     rtol=1e-3, atol=1e-5, generator=torch.Generator().manual_seed(0))
    assert fit.loc.shape == (2, 2) and fit.scale_tril.shape == (2, 2, 2) and fit.elbo.shape == (100, 2)
    assert torch.all(fit.elbo[-10:].mean(0) > fit.elbo[:10].mean(0))  # it climbed
    vi_sd = (fit.scale_tril @ fit.scale_tril.mT).diagonal(dim1=-2, dim2=-1).sqrt()
    # 100 steps have not settled (the chapter's longer run checks 0.25 sd and 10 %); a q that
    # got no gradient through the solver would still sit at the prior, ~10 sd away
    assert torch.all(((fit.loc - post.mean) / post_sd).abs() < 0.5)
    assert torch.all((vi_sd / post_sd - 1).abs() < 0.3)


def test_cost_counts_memory_and_evaluations():
    costs = {m: kin.gradient_cost(m, 3, rtol=1e-4, atol=1e-6, repeats=1) for m in ("autodiff", "forward", "adjoint")}
    assert costs["forward"].saved_bytes == 0 and costs["forward"].backward_evaluations == 0
    assert costs["autodiff"].backward_evaluations == 0
    assert 0 < costs["adjoint"].saved_bytes < costs["autodiff"].saved_bytes
    assert costs["adjoint"].forward_evaluations == costs["autodiff"].forward_evaluations  # the same forward solve
    assert costs["adjoint"].backward_evaluations > 0
    assert all(c.seconds > 0 for c in costs.values())
