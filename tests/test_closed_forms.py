"""companion.closed_forms against Gauss-Hermite quadrature and elementary identities."""
import math

import numpy as np
import pytest
import torch

from companion import closed_forms as cf

MU, SIGMA = -0.3, 1.2


def _quadrature(fn, mu, sigma, n=120):
    t, w = np.polynomial.hermite_e.hermegauss(n)
    return float(np.sum(w * fn(mu + sigma * t, t)) / math.sqrt(2 * math.pi))


@pytest.mark.parametrize("f", [cf.identity(), cf.square(), cf.exponential(), cf.cosine(0.5), cf.cosine(4.0)],
                         ids=lambda f: f.name)
@pytest.mark.parametrize("m", [0, 1, 2, 4])
def test_expectation_times_eps_power_matches_quadrature(f, m):
    ref = _quadrature(lambda x, t: f(torch.as_tensor(x)).numpy() * t**m, MU, SIGMA)
    assert cf.expectation(f, MU, SIGMA, m) == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_known_values():
    assert cf.expectation(cf.square(), MU, SIGMA) == pytest.approx(MU**2 + SIGMA**2)
    assert cf.expectation(cf.exponential(), MU, SIGMA) == pytest.approx(math.exp(MU + SIGMA**2 / 2))
    w = 3.0
    assert cf.expectation(cf.cosine(w), MU, SIGMA) == pytest.approx(math.cos(w * MU) * math.exp(-(w * SIGMA) ** 2 / 2))
    assert cf.gradient(cf.square(), MU, SIGMA) == pytest.approx((2 * MU, 2 * SIGMA))


def test_algebra_and_evaluation():
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)
    f = cf.cosine(2.0) * cf.exponential() - 3.0 + cf.square()
    assert torch.allclose(f(x), torch.cos(2 * x) * torch.exp(x) - 3 + x**2)
    df = f.derivative()
    ref = -2 * torch.sin(2 * x) * torch.exp(x) + torch.cos(2 * x) * torch.exp(x) + 2 * x
    assert torch.allclose(df(x), ref)
    with pytest.raises(ValueError):
        cf.square() * "x"


def test_variances_are_rejected_for_unknown_methods_and_bad_sigma():
    with pytest.raises(ValueError, match="method"):
        cf.per_sample_variance("measure_valued", cf.square(), 0.0, 1.0)
    with pytest.raises(ValueError, match="sigma"):
        cf.expectation(cf.square(), 0.0, 0.0)


def test_score_function_beats_pathwise_for_high_frequency_cosine():
    # Mohamed et al. (2020, sec. 3): for cos(w x) with large w the pathwise estimator's variance
    # grows like w^2 while the score function's stays bounded
    pw = cf.per_sample_variance("pathwise", cf.cosine(10.0), 0.5, 1.0)
    sf = cf.per_sample_variance("score_function", cf.cosine(10.0), 0.5, 1.0)
    assert pw.mu > 10 * sf.mu and pw.sigma > 10 * sf.sigma
    pw, sf = (cf.per_sample_variance(m, cf.square(), 0.5, 1.0) for m in ("pathwise", "score_function"))
    assert pw.mu < sf.mu and pw.sigma < sf.sigma
