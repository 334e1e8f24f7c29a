"""companion.science.causal: interface, correctness against statsmodels, scipy and closed forms."""
import math

import numpy as np
import pytest
import statsmodels.api as sm
import torch
from scipy import integrate, stats

from companion.science import causal
from helpers import Z, assert_mc_close

F64 = torch.float64
TRUTH = causal.ConfoundedSCM(w=2.0, tau=1.0, mu=0.5, sigma=1.0, propensity=1.5)
# X -> Y -> Z, X -> Z: Y = 2X + U_y, Z = X - Y + U_z, unit noises
SCM = causal.LinearGaussianSCM(
    ("X", "Y", "Z"),
    torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [1.0, -1.0, 0.0]], dtype=F64),
    torch.ones(3, dtype=F64),
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _data(n=500, seed=0, **kwargs):
    return causal.simulate(TRUTH, n, generator=_gen(seed), **kwargs)


# --------------------------------------------------------------------------- interface


@pytest.mark.parametrize("field,value", [("sigma", 0.0), ("sigma", -1.0), ("tau", math.nan),
                                         ("w", True), ("propensity", "1"), ("mu", math.inf)])
def test_confounded_scm_rejects_bad_parameters(field, value):
    args = {"w": 1.0, "tau": 1.0, "mu": 0.0, "sigma": 1.0, "propensity": 1.0, field: value}
    with pytest.raises(ValueError, match=field):
        causal.ConfoundedSCM(**args)


def test_simulate_shapes_and_bad_arguments():
    x, t, y = _data(50)
    assert x.shape == t.shape == y.shape == (50,)
    assert set(t.unique().tolist()) <= {0.0, 1.0}
    x, t, y = _data(40, num_datasets=3)
    assert x.shape == (3, 40)
    with pytest.raises(ValueError, match="n must"):
        causal.simulate(TRUTH, 1)
    with pytest.raises(ValueError, match="num_datasets"):
        causal.simulate(TRUTH, 10, num_datasets=0)
    with pytest.raises(ValueError, match="model"):
        causal.simulate((2.0, 1.0), 10)


def test_data_checks_reject_bad_inputs():
    x, t, y = _data(30)
    args = (0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="only 0s and 1s"):
        causal.outcome_log_likelihood(x, t + 0.5, y, *args)
    with pytest.raises(ValueError, match="one shape"):
        causal.outcome_log_likelihood(x, t[:-1], y, *args)
    with pytest.raises(ValueError, match="floating-point"):
        causal.outcome_log_likelihood(x, t.long(), y, *args)
    with pytest.raises(ValueError, match="floating-point"):
        causal.fit_outcome_model(x.reshape(1, 1, -1), t.reshape(1, 1, -1), y.reshape(1, 1, -1))
    with pytest.raises(ValueError, match="max_iter"):
        causal.fit_outcome_model(x, t, y, max_iter=0)
    with pytest.raises(ValueError, match="only 0s and 1s"):
        causal.naive_difference(2 * t, y)
    with pytest.raises(ValueError, match="at least 2"):
        causal.naive_difference(torch.ones_like(y), y)


def test_fit_raises_when_it_cannot_converge():
    x, t, y = _data(200)
    with pytest.raises(RuntimeError, match="converge"):
        causal.fit_outcome_model(x, t, y, max_iter=1)


@pytest.mark.parametrize("kwargs,match", [
    ({"names": ("X", "X")}, "names"),
    ({"names": ["X", "Y"]}, "names"),
    ({"weights": torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=F64)}, "lower triangular"),
    ({"weights": torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64)}, "lower triangular"),
    ({"weights": torch.zeros(3, 3, dtype=F64)}, "weights"),
    ({"noise_scale": torch.tensor([1.0, 0.0], dtype=F64)}, "noise_scale"),
    ({"noise_scale": torch.ones(3, dtype=F64)}, "noise_scale"),
])
def test_linear_scm_rejects_bad_parameters(kwargs, match):
    args = {"names": ("X", "Y"), "weights": torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=F64),
            "noise_scale": torch.ones(2, dtype=F64), **kwargs}
    with pytest.raises(ValueError, match=match):
        causal.LinearGaussianSCM(**args)


def test_linear_scm_functions_reject_bad_arguments():
    with pytest.raises(ValueError, match="unknown variable"):
        causal.moments(SCM, do={"W": 1.0})
    with pytest.raises(ValueError, match="unknown variable"):
        causal.conditional_mean(SCM, "W", {"Y": 1.0})
    with pytest.raises(ValueError, match="unknown variable"):
        causal.counterfactual_moments(SCM, {"Q": 1.0}, {"Y": 0.0})
    with pytest.raises(ValueError, match="evidence"):
        causal.conditional_mean(SCM, "Z", [("Y", 1.0)])
    with pytest.raises(ValueError, match="eps"):
        causal.sample(SCM, 5, eps=torch.zeros(5, 2, dtype=F64))
    with pytest.raises(ValueError, match="num_samples"):
        causal.sample(SCM, 0)
    with pytest.raises(ValueError, match="v must"):
        causal.abduct(SCM, torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="scm"):
        causal.moments("X -> Y")
    with pytest.raises(ValueError, match="loss"):
        causal.counterfactual_loss_gradients(1.0, SCM, {}, "Y", 0.0, 10)
    with pytest.raises(ValueError, match="scalar"):
        causal.counterfactual_loss_gradients(lambda v, d: v[2], SCM, {}, "Y", torch.zeros(2), 10)
    with pytest.raises(ValueError, match="unknown variable"):
        causal.counterfactual_loss_gradients(lambda v, d: v[2], SCM, {}, "D", 0.0, 10)


# --------------------------------------------------------------------------- correctness


def test_log_likelihood_equals_scipy():
    x, t, y = _data(100)
    w, tau, mu, sigma = 1.7, 0.8, 0.3, 1.3
    ours = causal.outcome_log_likelihood(x, t, y, w, tau, mu, math.log(sigma))
    ref = stats.norm.logpdf(y.numpy(), loc=(w * x + tau * t + mu).numpy(), scale=sigma).sum()
    assert math.isclose(ours.item(), ref, rel_tol=1e-12)


def test_fit_equals_statsmodels_ols():
    x, t, y = _data(800, seed=3)
    fit = causal.fit_outcome_model(x, t, y)
    ols = sm.OLS(y.numpy(), sm.add_constant(torch.stack([x, t], 1).numpy())).fit()
    se = ols.bse
    # the same estimator: agreement to 1e-4 of a standard error (the optimizer's tolerance)
    for ours, ref, s in [(fit.mu, ols.params[0], se[0]), (fit.w, ols.params[1], se[1]),
                         (fit.tau, ols.params[2], se[2])]:
        assert abs(ours.item() - ref) < 1e-4 * s
    # ML standard errors use RSS / n, OLS uses RSS / (n - 3)
    ratio = math.sqrt(800 / 797)
    for ours, ref in [(fit.se_mu, se[0]), (fit.se_w, se[1]), (fit.se_tau, se[2])]:
        assert math.isclose(ours.item() * ratio, ref, rel_tol=1e-6)
    assert math.isclose(fit.sigma.item() ** 2, ols.ssr / 800, rel_tol=1e-6)
    assert math.isclose(fit.log_likelihood.item(), ols.llf, rel_tol=1e-9)


def test_batched_fit_equals_separate_fits():
    x, t, y = _data(300, seed=4, num_datasets=3)
    joint = causal.fit_outcome_model(x, t, y)
    assert joint.tau.shape == (3,)
    for r in range(3):
        alone = causal.fit_outcome_model(x[r], t[r], y[r])
        assert abs(joint.tau[r] - alone.tau) < 1e-4 * alone.se_tau
        assert math.isclose(joint.se_tau[r].item(), alone.se_tau.item(), rel_tol=1e-5)


def test_naive_difference_equals_welch_and_its_confounded_target():
    x, t, y = _data(400, seed=5)
    est, se = causal.naive_difference(t, y)
    a, b = y[t == 1].numpy(), y[t == 0].numpy()
    assert math.isclose(est.item(), a.mean() - b.mean(), rel_tol=1e-12)
    welch = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    assert math.isclose(se.item(), welch, rel_tol=1e-12)
    # over many studies the mean sits on tau + 4 w E[X sigmoid(a X)] (scipy quadrature)
    shift = integrate.quad(lambda u: u / (1 + math.exp(-TRUTH.propensity * u)) * stats.norm.pdf(u),
                           -12, 12)[0]
    _, ts, ys = _data(400, seed=6, num_datasets=2000)
    assert_mc_close(causal.naive_difference(ts, ys)[0], TRUTH.tau + 4 * TRUTH.w * shift)


def test_tau_estimates_are_unbiased_with_calibrated_standard_errors():
    x, t, y = _data(500, seed=7, num_datasets=400)
    fit = causal.fit_outcome_model(x, t, y)
    z = (fit.tau - TRUTH.tau) / fit.se_tau
    assert abs(z.mean()) <= Z / math.sqrt(400)
    assert abs(z.std() - 1) <= Z / math.sqrt(800)


def test_sample_runs_the_equations_and_matches_the_structural_map():
    eps = torch.randn(1000, 3, generator=_gen(1), dtype=F64)
    v = causal.sample(SCM, 0, eps=eps)
    x, y, z = eps[:, 0], 2 * eps[:, 0] + eps[:, 1], None
    z = x - y + eps[:, 2]
    assert torch.allclose(v, torch.stack([x, y, z], 1))
    m_mat, m_vec = causal.structural_map(SCM)
    assert torch.allclose(v, eps @ m_mat.T + m_vec)
    v_do = causal.sample(SCM, 0, do={"Y": 1.5}, eps=eps)
    m_mat, m_vec = causal.structural_map(SCM, {"Y": 1.5})
    assert torch.allclose(v_do, eps @ m_mat.T + m_vec)
    assert torch.all(v_do[:, 1] == 1.5)
    assert torch.allclose(causal.abduct(SCM, v), eps)  # abduction inverts the equations


def test_moments_match_simulation():
    v = causal.sample(SCM, 200_000, generator=_gen(2))
    mean, cov = causal.moments(SCM)
    assert torch.allclose(cov, torch.tensor([[1.0, 2.0, -1.0], [2.0, 5.0, -3.0], [-1.0, -3.0, 3.0]],
                                            dtype=F64))
    assert_mc_close(v, mean)
    assert_mc_close(v[:, 1] * v[:, 2], cov[1, 2])


def test_seeing_doing_imagining_closed_forms():
    assert math.isclose(causal.conditional_mean(SCM, "Z", {"Y": 1.0}).item(), -0.6, abs_tol=1e-12)
    assert math.isclose(causal.moments(SCM, {"Y": 1.0})[0][2].item(), -1.0, abs_tol=1e-12)
    unit = torch.tensor([1.0, 3.0, 0.0], dtype=F64)
    assert torch.allclose(causal.abduct(SCM, unit), torch.tensor([1.0, 1.0, 2.0], dtype=F64))
    assert torch.allclose(causal.counterfactual(SCM, unit, {"Y": 0.0}),
                          torch.tensor([1.0, 0.0, 3.0], dtype=F64))
    # a counterfactual along an edge not intervened on: had X been 0, Y = U_y = 1, Z = -1 + 2
    assert torch.allclose(causal.counterfactual(SCM, unit, {"X": 0.0}),
                          torch.tensor([0.0, 1.0, 1.0], dtype=F64))


def test_conditioning_two_ways_agree():
    # E[v | v_E = e] from the covariance (conditional_mean) and from the noise posterior
    for evidence in [{"Y": 1.0}, {"Z": -2.0}, {"X": 0.5, "Z": 1.0}]:
        mean, _ = causal.counterfactual_moments(SCM, evidence, {})
        for target in ("X", "Y", "Z"):
            ref = causal.conditional_mean(SCM, target, evidence)
            assert math.isclose(mean[SCM.index(target)].item(), ref.item(), abs_tol=1e-12)


def test_noise_posterior_extremes():
    eps = torch.randn(50, 3, generator=_gen(3), dtype=F64)
    # no evidence: the prior draw itself; full evidence: the abducted noise, for every draw
    assert torch.allclose(causal.noise_posterior_samples(SCM, {}, 0, eps=eps), eps)
    full = causal.noise_posterior_samples(SCM, {"X": 1.0, "Y": 3.0, "Z": 0.0}, 0, eps=eps)
    assert torch.allclose(full, torch.tensor([1.0, 1.0, 2.0], dtype=F64).expand(50, 3))
    # empty evidence: counterfactual = interventional
    m1, c1 = causal.counterfactual_moments(SCM, {}, {"Y": 2.0})
    m2, c2 = causal.moments(SCM, {"Y": 2.0})
    assert torch.allclose(m1, m2) and torch.allclose(c1, c2)


def test_counterfactual_samples_match_their_moments():
    draws = causal.counterfactual_samples(SCM, {"Y": 3.0}, {"Y": 0.0}, 200_000, generator=_gen(4))
    mean, cov = causal.counterfactual_moments(SCM, {"Y": 3.0}, {"Y": 0.0})
    assert torch.allclose(mean, torch.tensor([1.2, 0.0, 1.2], dtype=F64))
    assert math.isclose(cov[2, 2].item(), 1.2, rel_tol=1e-12)
    assert_mc_close(draws, mean)
    centred = draws[:, 2] - mean[2]
    assert_mc_close(centred**2, cov[2, 2])
    # Y is fixed by the action, in every draw
    assert torch.all(draws[:, 1] == 0.0)


def test_counterfactual_is_differentiable_in_the_action():
    d = torch.tensor(0.7, dtype=F64, requires_grad=True)
    draws = causal.counterfactual_samples(SCM, {"Y": 3.0}, {"Y": d}, 10, generator=_gen(5))
    (grad,) = torch.autograd.grad(draws[:, 2].sum(), d)
    assert math.isclose(grad.item(), -10.0, rel_tol=1e-12)  # dZ/dd = -1 per draw


def _loss(v, d):
    return 1 - torch.exp(-((v[2] - 0.5) ** 2) / 2) + 0.05 * d**2


def test_expected_counterfactual_loss_and_gradient_against_closed_form():
    evidence = {"Y": 3.0}
    for dose in (-1.0, 0.5, 2.0):
        values, grads = causal.counterfactual_loss_gradients(
            _loss, SCM, evidence, "Y", dose, 100_000, generator=_gen(6))
        d = torch.tensor(dose, dtype=F64, requires_grad=True)
        m, var = 1.2 - d, 1.2  # Z_(Y:=d) | Y = 3 ~ N(1.2 - d, 1.2)
        exact = 1 - 1 / math.sqrt(1 + var) * torch.exp(-((m - 0.5) ** 2) / (2 * (1 + var))) \
            + 0.05 * d**2
        (exact_grad,) = torch.autograd.grad(exact, d)
        assert_mc_close(values, exact.detach())
        assert_mc_close(grads, exact_grad)


def test_pathwise_gradients_equal_finite_differences_with_common_noise():
    eps = torch.randn(2000, 3, generator=_gen(7), dtype=F64)
    _, grads = causal.counterfactual_loss_gradients(_loss, SCM, {"Y": 3.0}, "Y", 0.4, 0, eps=eps)
    h = 1e-5
    up, _ = causal.counterfactual_loss_gradients(_loss, SCM, {"Y": 3.0}, "Y", 0.4 + h, 0, eps=eps)
    down, _ = causal.counterfactual_loss_gradients(_loss, SCM, {"Y": 3.0}, "Y", 0.4 - h, 0, eps=eps)
    assert torch.allclose(grads, (up - down) / (2 * h), atol=1e-7)  # central difference, O(h^2)
    assert np.isfinite(grads.numpy()).all()
