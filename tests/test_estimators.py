"""companion.estimators: interface, unbiasedness against closed forms, agreement."""
import math

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Independent, Normal, OneHotCategorical, Poisson

from companion import closed_forms as cf
from companion.estimators import (
    METHODS,
    enumerate_expectation,
    gaussian_expectation,
    gradient_samples,
    mc_summary,
    measure_valued,
    pathwise,
    score_function,
)
from helpers import Z, assert_mc_close

ESTIMATORS = {"pathwise": pathwise, "score_function": score_function, "measure_valued": measure_valued}
TEST_FUNCTIONS = [cf.identity(), cf.square(), cf.exponential(), cf.cosine(3.0)]
MU, SIGMA = 0.4, 0.9


def _params(dtype=torch.float64):
    return (torch.tensor(MU, dtype=dtype, requires_grad=True), torch.tensor(SIGMA, dtype=dtype, requires_grad=True))


# --------------------------------------------------------------------------- interface


@pytest.mark.parametrize("method", METHODS)
def test_surrogate_has_the_value_and_leaves_a_gradient(method):
    mu, sigma = _params()
    est = ESTIMATORS[method](lambda x: x**2, Normal(mu, sigma), 64, generator=torch.Generator().manual_seed(0))
    assert not est.value.requires_grad and est.surrogate.dim() == 0
    assert torch.allclose(est.surrogate.detach(), est.value)
    est.surrogate.backward()
    assert mu.grad is not None and sigma.grad is not None


@pytest.mark.parametrize("method", METHODS)
def test_generator_makes_estimates_repeat(method):
    def grad():
        mu, sigma = _params()
        ESTIMATORS[method](torch.cos, Normal(mu, sigma), 32, generator=torch.Generator().manual_seed(9)).surrogate.backward()
        return mu.grad.item(), sigma.grad.item()

    assert grad() == grad()


@pytest.mark.parametrize("method", METHODS)
def test_value_without_grad_is_the_value_with_grad(method):
    # under no_grad the estimators skip the surrogate's correction terms: the same draws, the
    # same value
    def value():
        mu, sigma = _params()
        return ESTIMATORS[method](torch.cos, Normal(mu, sigma), 32, generator=torch.Generator().manual_seed(4)).value

    with_grad = value()
    with torch.no_grad():
        assert torch.equal(value(), with_grad)


def test_score_function_draws_the_numbers_of_sample():
    # a reparameterizable distribution is drawn as a no-grad rsample: the numbers of sample()
    mu, sigma = _params()
    x = []
    est = score_function(lambda v: x.append(v) or v, Normal(mu, sigma), 16, generator=torch.Generator().manual_seed(8))
    from companion.runtime import rng

    with rng(torch.Generator().manual_seed(8)):
        reference = Normal(mu, sigma).sample((16,))
    assert torch.equal(x[0], reference) and torch.equal(est.value, reference.mean())


def test_score_function_checks_only_the_samples_it_did_not_draw(monkeypatch):
    # samples drawn from dist itself skip log_prob's support check; samples made from the
    # caller's eps keep it
    mu, sigma = _params()
    q = Normal(mu, sigma)
    checked = []
    monkeypatch.setattr(q, "_validate_sample", lambda value: checked.append(value.shape))
    score_function(torch.cos, q, 8, generator=torch.Generator().manual_seed(1)).surrogate.backward()
    assert checked == [] and torch.distributions.Distribution._validate_args  # default restored
    score_function(torch.cos, q, 8, eps=torch.randn(8, dtype=torch.float64)).surrogate.backward()
    assert checked == [(8,)]


def test_pathwise_needs_rsample():
    rate = torch.tensor(2.0, requires_grad=True)
    with pytest.raises(ValueError, match="has_rsample"):
        pathwise(lambda x: x, Poisson(rate), 10)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_num_samples_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="num_samples"):
        pathwise(lambda x: x, Normal(0.0, 1.0), bad)


def test_f_must_return_one_value_per_sample():
    with pytest.raises(ValueError, match="f must map"):
        pathwise(lambda x: x.sum(), Normal(0.0, 1.0), 10)


def test_dist_must_be_a_distribution():
    with pytest.raises(ValueError, match="dist"):
        score_function(lambda x: x, "normal", 10)


@pytest.mark.parametrize("bad", ["median", object(), True])
def test_bad_baseline_is_rejected(bad):
    with pytest.raises(ValueError, match="baseline"):
        score_function(lambda x: x, Normal(0.0, 1.0), 10, baseline=bad)


def test_mean_baseline_needs_two_samples():
    with pytest.raises(ValueError, match="num_samples >= 2"):
        score_function(lambda x: x, Normal(0.0, 1.0), 1, baseline="mean")


def test_measure_valued_is_for_gaussians():
    with pytest.raises(ValueError, match="Normal"):
        measure_valued(lambda x: x, Bernoulli(torch.tensor(0.3)), 10)


def test_gradient_samples_checks_method_and_dist_fn():
    mu, sigma = _params()
    with pytest.raises(ValueError, match="method"):
        gradient_samples("finite_difference", lambda x: x, Normal, (mu, sigma), 10)
    with pytest.raises(ValueError, match="batch shape"):
        gradient_samples("pathwise", lambda x: x, lambda m, s: Normal(0.0, 1.0), (mu, sigma), 10)


def test_gradient_samples_shapes_and_mean_equal_estimate():
    loc = torch.zeros(3, requires_grad=True)
    scale = torch.ones(3, requires_grad=True)
    f = lambda x: (x**2).sum(-1)  # noqa: E731
    grads = gradient_samples("pathwise", f, lambda m, s: Independent(Normal(m, s), 1), (loc, scale), 50,
                             generator=torch.Generator().manual_seed(1))
    assert [g.shape for g in grads] == [(50, 3), (50, 3)]
    est = pathwise(f, Independent(Normal(loc, scale), 1), 50, generator=torch.Generator().manual_seed(1))
    est.surrogate.backward()
    assert torch.allclose(grads[0].mean(0), loc.grad, atol=1e-6)
    assert torch.allclose(grads[1].mean(0), scale.grad, atol=1e-6)


def test_gradient_samples_vectorised_speed():
    import time

    mu, sigma = _params(torch.float32)
    start = time.perf_counter()
    for method in METHODS:
        gradient_samples(method, torch.cos, Normal, (mu, sigma), 1_000_000, generator=torch.Generator().manual_seed(0))
    assert time.perf_counter() - start < 10.0  # about a second each on a 2-core CPU


# --------------------------------------------------------------------------- unbiasedness


CASES = [("pathwise", {}), ("score_function", {}), ("score_function", {"baseline": "mean"}),
         ("score_function", {"baseline": 1.0}), ("measure_valued", {}), ("measure_valued", {"coupling": False})]


@pytest.mark.parametrize("f", TEST_FUNCTIONS, ids=lambda f: f.name)
@pytest.mark.parametrize("method,options", CASES, ids=lambda c: str(c))
def test_per_sample_gradients_are_unbiased(f, method, options):
    grads = gradient_samples(method, f, Normal, _params(), 200_000, generator=torch.Generator().manual_seed(2), **options)
    exact = cf.gradient(f, MU, SIGMA)
    assert_mc_close(torch.stack(grads, 1), exact)


@pytest.mark.parametrize("f", TEST_FUNCTIONS, ids=lambda f: f.name)
@pytest.mark.parametrize("method", ["pathwise", "score_function"])
def test_per_sample_variance_matches_closed_form(f, method):
    grads = gradient_samples(method, f, Normal, _params(), 400_000, generator=torch.Generator().manual_seed(3))
    exact = cf.per_sample_variance(method, f, MU, SIGMA)
    for g, v in zip(grads, exact):
        if v < 1e-12:  # pathwise d/dmu of f = x is exactly 1 every time
            assert torch.allclose(g, g[:1])
            continue
        # the sample variance has standard error sqrt((m4 - s^4) / n), m4 the 4th central moment
        c = g - g.mean()
        se = math.sqrt(((c**4).mean() - (c**2).mean() ** 2).item() / g.shape[0])
        assert abs(g.var().item() - v) < Z * se, (f.name, method, g.var().item(), v, se)


def test_direct_dependence_of_f_on_parameters_is_kept():
    # f(x; c) = (x - c)^2, E f = (mu - c)^2 + sigma^2, d/dc = -2 (mu - c)
    for method in METHODS:
        c = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
        mu, sigma = _params()
        est = ESTIMATORS[method](lambda x: (x - c) ** 2, Normal(mu, sigma), 1000, generator=torch.Generator().manual_seed(4))
        est.surrogate.backward()
        # d/dc does not involve the sampling, so every method gets -2 (mean of x - c) per sample
        assert c.grad is not None and abs(c.grad.item() + 2 * (MU - 1.5)) < 0.2, (method, c.grad)


def test_multivariate_measure_valued_and_score_function_unbiased():
    loc = torch.tensor([0.2, -0.5, 1.0], dtype=torch.float64)
    scale = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    f = lambda x: (w * torch.cos(x)).sum(-1)  # noqa: E731
    # E cos(x_d) = cos(mu_d) exp(-sigma_d^2/2)
    exact_mu = -w * torch.sin(loc) * torch.exp(-scale**2 / 2)
    exact_sigma = -w * scale * torch.cos(loc) * torch.exp(-scale**2 / 2)
    for method in METHODS:
        grads = gradient_samples(method, f, lambda m, s: Independent(Normal(m, s), 1), (loc, scale), 100_000,
                                 generator=torch.Generator().manual_seed(5))
        assert_mc_close(grads[0], exact_mu)
        assert_mc_close(grads[1], exact_sigma)


def test_score_function_on_a_categorical_matches_enumeration():
    logits = torch.tensor([0.3, -1.0, 0.8, 0.0], dtype=torch.float64, requires_grad=True)
    values = torch.tensor([1.0, 4.0, -2.0, 0.5], dtype=torch.float64)
    f = lambda k: values[k]  # noqa: E731
    exact = torch.autograd.grad(enumerate_expectation(f, Categorical(logits=logits)), logits)[0]
    grads = gradient_samples("score_function", f, lambda l: Categorical(logits=l), (logits,), 100_000,
                             generator=torch.Generator().manual_seed(6), baseline="mean")
    assert_mc_close(grads[0], exact)


# --------------------------------------------------------------------------- exact references


@pytest.mark.parametrize("f", TEST_FUNCTIONS, ids=lambda f: f.name)
def test_gauss_hermite_matches_closed_form_value_and_gradient(f):
    mu, sigma = _params()
    value = gaussian_expectation(f, mu, sigma)
    g_mu, g_sigma = torch.autograd.grad(value, (mu, sigma))
    assert value.item() == pytest.approx(cf.expectation(f, MU, SIGMA), rel=1e-10, abs=1e-12)
    assert (g_mu.item(), g_sigma.item()) == pytest.approx(cf.gradient(f, MU, SIGMA), rel=1e-9, abs=1e-12)


def test_gaussian_expectation_is_scalar_only():
    with pytest.raises(ValueError, match="scalar"):
        gaussian_expectation(torch.cos, torch.zeros(2), torch.ones(2))


def test_enumeration_over_independent_coordinates():
    p = torch.tensor([0.2, 0.7, 0.5], dtype=torch.float64)
    # E[x1 + 2 x2 x3] = p1 + 2 p2 p3 for independent Bernoullis
    f = lambda x: x[:, 0] + 2 * x[:, 1] * x[:, 2]  # noqa: E731
    assert enumerate_expectation(f, Independent(Bernoulli(p), 1)).item() == pytest.approx(0.2 + 2 * 0.7 * 0.5)
    probs = torch.tensor([[0.1, 0.9], [0.6, 0.4]], dtype=torch.float64)
    # two one-hot coordinates: E[x_1 . x_2] = sum_k p1k p2k
    g = lambda x: (x[:, 0] * x[:, 1]).sum(-1)  # noqa: E731
    assert enumerate_expectation(g, OneHotCategorical(probs)).item() == pytest.approx(0.1 * 0.6 + 0.9 * 0.4)
    with pytest.raises(ValueError, match="enumerate"):
        enumerate_expectation(g, Normal(0.0, 1.0))


def test_mc_summary():
    s = mc_summary(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert s.mean.item() == 2.5 and s.variance.item() == pytest.approx(5 / 3)
    assert s.stderr.item() == pytest.approx(math.sqrt(5 / 12))
    with pytest.raises(ValueError):
        mc_summary(torch.tensor([1.0]))


# --------------------------------------------------------------------------- agreement


def test_the_three_estimators_agree():
    f = cf.cosine(2.0)
    results = {}
    for method in METHODS:
        g = gradient_samples(method, f, Normal, _params(), 200_000, generator=torch.Generator().manual_seed(7))
        results[method] = mc_summary(torch.stack(g, 1))
    for a in METHODS:
        for b in METHODS:
            diff = (results[a].mean - results[b].mean).abs()
            assert torch.all(diff <= Z * (results[a].stderr**2 + results[b].stderr**2).sqrt()), (a, b)


def test_a_batch_of_independent_problems():
    # f returning (S, B): one problem per batch element, baselines per element, value (B,)
    mu0 = [0.0, 1.0, -2.0]
    mu = torch.tensor(mu0, dtype=torch.float64, requires_grad=True)
    n = 100_000
    f = cf.square()
    # standard errors from the closed-form per-sample variances (the leave-one-out baseline has
    # nearly the variance of the constant baseline E f)
    se_value = torch.tensor([math.sqrt((2 + 4 * m**2) / n) for m in mu0], dtype=torch.float64)
    for method, options in [("pathwise", {}), ("score_function", {"baseline": "mean"})]:
        mu.grad = None
        est = ESTIMATORS[method](lambda x: x**2, Normal(mu, 1.0), n, generator=torch.Generator().manual_seed(8),
                                 **options)
        assert est.value.shape == (3,)
        assert torch.all((est.value - (mu.detach() ** 2 + 1)).abs() <= Z * se_value)
        est.surrogate.backward()
        baseline = [cf.expectation(f, m, 1.0) if method == "score_function" else 0.0 for m in mu0]
        var = [cf.per_sample_variance(method, f, m, 1.0, baseline=b).mu for m, b in zip(mu0, baseline)]
        se_grad = torch.tensor([math.sqrt(1.1 * v / n) for v in var], dtype=torch.float64)  # 10% for LOO noise
        assert torch.all((mu.grad - 2 * mu.detach()).abs() <= Z * se_grad), method
    with pytest.raises(ValueError, match="f must map"):
        measure_valued(lambda x: x**2, Normal(mu, 1.0), 10)


def test_variance_stderr_matches_the_normal_theory_value():
    # for Gaussian samples, m4 = 3 sigma^4, so the s.e. of the variance is sigma^2 sqrt(2 / S)
    from companion.estimators import variance_stderr

    x = 2.0 * torch.randn(100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # the estimate itself has relative error ~ 0.5% at 1e5 samples (from m8 = 105 sigma^8); 3% is ~6 s.e.
    assert variance_stderr(x).item() == pytest.approx(4.0 * math.sqrt(2 / 100_000), rel=0.03)
    with pytest.raises(ValueError):
        variance_stderr(torch.ones(1))
