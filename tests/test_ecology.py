"""companion.science.ecology: interface, the quasi-extinction formula against scipy and Monte Carlo."""
import math

import pytest
import torch
from scipy import stats

from companion.estimators import mc_summary, per_sample_gradients
from companion.science import ecology as eco
from helpers import Z

F64 = torch.float64
SURVIVAL = torch.tensor(eco.LOGGERHEAD_SURVIVAL, dtype=F64)
DURATION = torch.tensor(eco.LOGGERHEAD_DURATION, dtype=F64)
FECUNDITY = torch.tensor(eco.LOGGERHEAD_FECUNDITY, dtype=F64)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _model(noise=0.1):
    a = eco.stage_matrix(SURVIVAL, DURATION, FECUNDITY)
    return eco.StageModel(a, noise * (a > 0).to(F64))


# --------------------------------------------------------------------------- interface


@pytest.mark.parametrize("args,name", [
    ((-0.1, -0.05, 0.01, 10.0), "x_d"),
    ((1.0, -0.05, 0.0, 10.0), "sigma2"),
    ((1.0, -0.05, -1.0, 10.0), "sigma2"),
    ((1.0, -0.05, 0.01, 0.0), "horizon"),
    ((1.0, math.nan, 0.01, 1.0), "mu"),
])
def test_quasi_extinction_rejects_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        eco.quasi_extinction_probability(*args)


def test_model_and_simulation_reject_bad_arguments():
    a = eco.stage_matrix(SURVIVAL, DURATION, FECUNDITY)
    with pytest.raises(ValueError, match="matrix_mean"):
        eco.StageModel(-a, torch.zeros_like(a))
    with pytest.raises(ValueError, match="matrix_noise"):
        eco.StageModel(a, -torch.ones_like(a))
    with pytest.raises(ValueError, match="matrix_noise"):
        eco.StageModel(a, torch.zeros(3, 3, dtype=F64))
    with pytest.raises(ValueError, match="survival"):
        eco.stage_matrix(SURVIVAL * 2, DURATION, FECUNDITY)
    with pytest.raises(ValueError, match="duration"):
        eco.stage_matrix(SURVIVAL, DURATION * 0, FECUNDITY)
    with pytest.raises(ValueError, match="fecundity"):
        eco.stage_matrix(SURVIVAL, DURATION, -FECUNDITY)
    with pytest.raises(ValueError, match=r"\(K,\)"):
        eco.stage_matrix(SURVIVAL, DURATION[:-1], FECUNDITY)
    model = _model()
    with pytest.raises(ValueError, match="n0"):
        eco.simulate_log_census(model, -torch.ones(7, dtype=F64), 5, 3)
    with pytest.raises(ValueError, match="years"):
        eco.simulate_log_census(model, torch.ones(7, dtype=F64), 0, 3)
    with pytest.raises(ValueError, match="eps"):
        eco.simulate_log_census(model, torch.ones(7, dtype=F64), 5, 3, eps=torch.zeros(3, 4, 1, dtype=F64))
    with pytest.raises(ValueError, match="census"):
        eco.simulate_log_census(model, torch.ones(7, dtype=F64), 5, 3, census=torch.zeros(7))
    with pytest.raises(ValueError, match="model"):
        eco.estimate_growth("turtles", 10, 5)
    with pytest.raises(ValueError, match="temperature"):
        eco.soft_quasi_extinction(torch.zeros(3, 4, dtype=F64), -1.0, -0.1)
    with pytest.raises(ValueError, match="steps"):
        eco.simulate_diffusion(1.0, -0.1, 0.01, 10.0, 0, 5)


def test_shapes_and_gradients_flow():
    a = eco.stage_matrix(SURVIVAL.clone().requires_grad_(), DURATION, FECUNDITY)
    model = eco.StageModel(a, 0.1 * (a.detach() > 0).to(F64))
    logs, structure = eco.simulate_log_census(model, eco.stable_stage_distribution(a.detach()), 6, 4,
                                              generator=_gen())
    assert logs.shape == (4, 7) and structure.shape == (4, 7)
    assert torch.allclose(structure.sum(-1), torch.ones(4, dtype=F64))
    assert logs.requires_grad
    est = eco.estimate_growth(model, 10, 5, burn_in=3, generator=_gen())
    assert est.mu.shape == () and est.sigma2.shape == () and est.mu.requires_grad


# --------------------------------------------------------------------------- correctness


def test_loggerhead_matrix_and_lambda():
    a = eco.stage_matrix(SURVIVAL, DURATION, FECUNDITY)
    published = torch.tensor(eco.LOGGERHEAD_MATRIX, dtype=F64)
    assert (a - published).abs().max() < 2e-4  # vital rates printed to 4 decimals
    assert abs(eco.dominant_eigenvalue(published).item() - 0.9450) < 5e-5
    w = eco.stable_stage_distribution(published)
    assert torch.all(w > 0) and torch.allclose(published @ w, eco.dominant_eigenvalue(published) * w)


def test_stage_matrix_is_a_geometric_duration_model():
    # a stage of duration d with survival s: the expected time spent in it, for an individual that
    # survives through, is d: the number of years before leaving is geometric with stay prob P
    s, d = 0.8, 5.0
    a = eco.stage_matrix(torch.tensor([s, 0.9], dtype=F64), torch.tensor([d], dtype=F64),
                         torch.tensor([0.0, 1.0], dtype=F64))
    p, g = a[0, 0].item(), a[1, 0].item()
    assert math.isclose(p + g, s, rel_tol=1e-12)
    # probability of growing out eventually = s^d (survive d years in the stage)
    assert math.isclose(g / (1 - p), s**d, rel_tol=1e-12)


def test_quasi_extinction_equals_the_inverse_gaussian_cdf():
    # mu < 0: the first passage time to -x_d is inverse Gaussian, mean x_d/|mu|, shape x_d^2/sigma2
    for x_d, mu, s2, t in [(2.3, -0.06, 0.003, 40.0), (1.0, -0.5, 2.0, 3.0), (0.5, -0.01, 0.05, 100.0)]:
        mean, shape = x_d / abs(mu), x_d**2 / s2
        reference = stats.invgauss(mean / shape, scale=shape).cdf(t)
        ours = eco.quasi_extinction_probability(x_d, mu, s2, t).item()
        assert math.isclose(ours, reference, rel_tol=1e-9, abs_tol=1e-12)
    # mu > 0 (defective): against the textbook formula in scipy, where it does not overflow
    x_d, mu, s2, t = 1.0, 0.05, 0.1, 30.0
    sd = math.sqrt(s2 * t)
    textbook = stats.norm.cdf((-x_d - mu * t) / sd) + math.exp(-2 * mu * x_d / s2) * stats.norm.cdf(
        (-x_d + mu * t) / sd)
    assert math.isclose(eco.quasi_extinction_probability(x_d, mu, s2, t).item(), textbook, rel_tol=1e-12)
    # the horizon to infinity: certain for mu <= 0, exp(-2 mu x_d / sigma2) for mu > 0
    assert math.isclose(eco.quasi_extinction_probability(x_d, mu, s2, 1e9).item(), math.exp(-2 * mu * x_d / s2),
                        rel_tol=1e-9)


def test_quasi_extinction_is_finite_in_unit_interval_on_extreme_grid():
    values = [0.0, 1e-300, 1e-8, 1.0, 1e3]
    grid = torch.cartesian_prod(
        torch.tensor(values, dtype=F64),  # x_d
        torch.tensor([-1e6, -30.0, -1e-9, 0.0, 1e-9, 30.0, 1e6], dtype=F64),  # mu
        torch.tensor([1e-300, 1e-10, 1.0, 1e10], dtype=F64),  # sigma2
        torch.tensor([1e-10, 1.0, 1e10], dtype=F64),  # horizon
    )
    g = eco.quasi_extinction_probability(*grid.unbind(1))
    assert torch.all(torch.isfinite(g)) and torch.all((g >= 0) & (g <= 1))
    # gradients: finite wherever 1 / sigma2 and 1 / x_d do not overflow
    moderate = grid[(grid[:, 2] >= 1e-10) & (grid[:, 0] != 1e-300)]
    leaves = [v.clone().requires_grad_() for v in moderate.unbind(1)]
    grads = torch.autograd.grad(eco.quasi_extinction_probability(*leaves).sum(), leaves)
    assert all(torch.all(torch.isfinite(gr)) for gr in grads)


def test_gradcheck():
    args = [torch.tensor(v, dtype=F64, requires_grad=True) for v in (2.3, -0.06, 0.003, 40.0)]
    assert torch.autograd.gradcheck(eco.quasi_extinction_probability, args)
    args = [torch.tensor(v, dtype=F64, requires_grad=True) for v in (0.5, 0.3, 0.5, 5.0)]
    assert torch.autograd.gradcheck(eco.quasi_extinction_probability, args)


# --------------------------------------------------------------------------- agreement


def test_bridge_monte_carlo_equals_the_closed_form_and_its_gradient():
    x_d, mu, s2, t, steps = 1.0, -0.1, 0.05, 10.0, 10
    mu_t, s2_t = torch.tensor(mu, dtype=F64), torch.tensor(s2, dtype=F64)
    eps = torch.randn(20_000, steps, generator=_gen(1), dtype=F64)
    paths = eco.simulate_diffusion(x_d, mu_t, s2_t, t, steps, 20_000, eps=eps)
    p = mc_summary(eco.bridge_crossing_probability(paths, s2_t, t / steps))
    leaves = (mu_t.clone().requires_grad_(), s2_t.clone().requires_grad_())
    exact = eco.quasi_extinction_probability(x_d, *leaves, t)
    assert abs(p.mean - exact) <= Z * p.stderr
    yearly = mc_summary((paths.amin(1) <= 0).to(F64))
    assert exact - yearly.mean > Z * yearly.stderr  # grid monitoring misses crossings

    def program(params, e):
        y = eco.simulate_diffusion(x_d, params[0], params[1], t, steps, 1, eps=e.unsqueeze(0))
        return eco.bridge_crossing_probability(y, params[1], t / steps)[0]

    grads = per_sample_gradients(program, (mu_t, s2_t), eps)
    for per_path, ex in zip(grads, torch.autograd.grad(exact, leaves)):
        s = mc_summary(per_path)
        assert abs(s.mean - ex) <= Z * s.stderr


def test_growth_estimate_matches_a_deterministic_model():
    a = eco.stage_matrix(SURVIVAL, DURATION, FECUNDITY)
    est = eco.estimate_growth(eco.StageModel(a, torch.zeros_like(a)), 50, 3, burn_in=200)
    assert math.isclose(est.mu.item(), math.log(eco.dominant_eigenvalue(a).item()), rel_tol=1e-9)
    assert est.sigma2.item() < 1e-20


def test_mean_matrix_is_the_mean():
    model = _model(0.3)
    eps = torch.randn(100_000, 1, generator=_gen(2), dtype=F64)
    mats = model.yearly_matrices(eps)  # (S, K, K)
    s = mc_summary(mats.flatten(1))
    assert torch.all((s.mean - model.matrix_mean.flatten()).abs() <= Z * s.stderr + 1e-12)


def test_soft_indicator_tends_to_the_indicator():
    logs = torch.randn(5_000, 30, generator=_gen(3), dtype=F64).cumsum(1) * 0.1
    hard = eco.soft_quasi_extinction(logs, -0.5, 0.0)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    gaps = [(eco.soft_quasi_extinction(logs, -0.5, tau) - hard).abs().mean().item() for tau in (0.1, 0.01, 0.001)]
    assert gaps[0] > gaps[1] > gaps[2]
