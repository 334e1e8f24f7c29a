"""companion.distributions: truncated normal/logistic, KL(Kumaraswamy || Beta), clipping."""
import math

import numpy as np
import pytest
import scipy.integrate
import scipy.optimize
import scipy.special
import scipy.stats
import torch
from torch.distributions import Beta, Kumaraswamy

from companion.distributions import (
    TruncatedLogistic,
    TruncatedNormal,
    fit_kumaraswamy,
    hard_clip,
    kl_kumaraswamy_beta,
    soft_clip,
)
from helpers import assert_mc_close

INF = math.inf
BOUNDS = [(-1.0, 2.0), (-INF, 0.5), (0.3, INF), (8.0, INF), (-INF, -8.0), (40.0, 41.0), (-INF, INF), (2.0, 2.001)]
FAMILIES = [TruncatedNormal, TruncatedLogistic]


def _scipy(family, loc, scale, low, high):
    if family is TruncatedNormal:
        return scipy.stats.truncnorm((low - loc) / scale, (high - loc) / scale, loc=loc, scale=scale)
    return scipy.stats.truncate(scipy.stats.Logistic(), (low - loc) / scale, (high - loc) / scale) * scale + loc


def _f64(*xs):
    return [torch.tensor(x, dtype=torch.float64) for x in xs]


# --------------------------------------------------------------------------- interface


@pytest.mark.parametrize("family", FAMILIES)
def test_interface(family):
    loc, scale = torch.tensor(0.5, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    d = family(loc, scale, -1.0, 3.0)
    x = d.rsample((5,))
    assert x.shape == (5,) and x.requires_grad
    assert not d.sample((5,)).requires_grad
    assert d.has_rsample and d.support.check(x).all()
    assert family(torch.zeros(2, 3), 1.0, -1.0, 1.0).rsample((4,)).shape == (4, 2, 3)
    assert family(torch.zeros(3), 1.0, -1.0, 1.0).expand((2, 3)).rsample().shape == (2, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_parameters_raise_value_errors_naming_them(family):
    with pytest.raises(ValueError, match="scale"):
        family(0.0, -1.0, -1.0, 1.0, validate_args=True)
    with pytest.raises(ValueError, match="low < high"):
        family(0.0, 1.0, 2.0, 1.0, validate_args=True)
    with pytest.raises(ValueError):
        family(0.0, 1.0, -1.0, 1.0, validate_args=True).log_prob(torch.tensor(3.0))


# --------------------------------------------------------------------------- against scipy


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("low,high", BOUNDS)
def test_icdf_cdf_log_prob_match_scipy(family, low, high):
    loc, scale = 0.3, 1.5
    ref = _scipy(family, loc, scale, low, high)
    d = family(*_f64(loc, scale, low, high))
    u = torch.tensor([1e-6, 0.1, 0.5, 0.9, 1 - 1e-6], dtype=torch.float64)
    x = d.icdf(u)
    assert torch.all((x >= low) & (x <= high))
    ppf = torch.as_tensor(np.asarray(ref.icdf(u.numpy()) if hasattr(ref, "icdf") else ref.ppf(u.numpy())))
    assert torch.allclose(x, ppf, rtol=1e-6, atol=1e-6 * scale)
    assert torch.allclose(d.cdf(x), u, rtol=1e-8, atol=1e-12)
    pdf = ref.logpdf(x.numpy()) if hasattr(ref, "logpdf") else np.log(ref.pdf(x.numpy()))
    assert np.allclose(d.log_prob(x).numpy(), pdf, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("low,high", BOUNDS)
def test_truncated_normal_moments_match_scipy(low, high):
    loc, scale = 0.3, 1.5
    ref = scipy.stats.truncnorm((low - loc) / scale, (high - loc) / scale, loc=loc, scale=scale)
    d = TruncatedNormal(*_f64(loc, scale, low, high))
    assert d.mean.item() == pytest.approx(ref.mean(), rel=1e-9)
    assert d.variance.item() == pytest.approx(ref.var(), rel=1e-4 if high - low < 0.01 else 1e-8)


@pytest.mark.parametrize("family", FAMILIES)
def test_samples_follow_the_distribution(family):
    # Kolmogorov-Smirnov against scipy's CDF; seeded, p > 1e-3 with 20k samples
    loc, scale, low, high = 0.3, 1.5, -1.0, 2.0
    torch.manual_seed(0)
    x = family(*_f64(loc, scale, low, high)).sample((20_000,)).numpy()
    assert scipy.stats.kstest(x, _scipy(family, loc, scale, low, high).cdf).pvalue > 1e-3


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("low,high", [(-1.0, 2.0), (-INF, 0.5), (0.3, INF), (8.0, INF), (3.0, 6.0)])
def test_gradcheck_of_reparameterized_sample(family, low, high):
    u = torch.tensor([0.05, 0.4, 0.93], dtype=torch.float64)

    def sample(loc, scale, lo, hi):
        return family(loc, scale, lo, hi).icdf(u)

    args = [t.requires_grad_(math.isfinite(t.item())) for t in _f64(0.2, 1.3, low, high)]
    assert torch.autograd.gradcheck(sample, args)


@pytest.mark.parametrize("family", FAMILIES)
def test_far_tail_gives_finite_samples_inside_and_finite_gradients(family):
    # a truncation 8 scales out (and 30, where a naive Phi^{-1}(Phi(a) + u (1 - Phi(a))) returns inf)
    for a in (8.0, 30.0):
        loc, scale = torch.tensor(0.0, requires_grad=True), torch.tensor(1.0, requires_grad=True)
        torch.manual_seed(1)
        x = family(loc, scale, a, INF).rsample((10_000,))  # float32, as a model would use
        assert torch.isfinite(x).all() and (x >= a).all()
        g = torch.autograd.grad(x.mean(), (loc, scale))
        assert all(torch.isfinite(t) for t in g)


def test_naive_inverse_cdf_fails_where_ours_holds():
    a = torch.tensor(30.0, dtype=torch.float64)
    u = torch.tensor(0.5, dtype=torch.float64)
    normal = torch.distributions.Normal(0.0, 1.0)
    naive = normal.icdf(normal.cdf(a) + u * (1 - normal.cdf(a)))
    assert not torch.isfinite(naive)
    ours = TruncatedNormal(*_f64(0.0, 1.0, 30.0, INF)).icdf(u)
    ref = -scipy.special.ndtri_exp(scipy.special.log_ndtr(-30.0) + math.log(0.5))
    assert ours.item() == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_pathwise_gradient_of_the_mean_is_unbiased(family):
    # d/dloc E[x] and d/dscale E[x] by finite differences of the exact mean (quadrature)
    low, high, loc0, scale0 = -0.5, 2.5, 0.4, 1.1

    def mean(loc, scale):
        ref = _scipy(family, loc, scale, low, high)
        return scipy.integrate.quad(lambda x: x * ref.pdf(x), low, high, epsabs=1e-13)[0]

    h = 1e-5
    exact = [(mean(loc0 + h, scale0) - mean(loc0 - h, scale0)) / (2 * h),
             (mean(loc0, scale0 + h) - mean(loc0, scale0 - h)) / (2 * h)]
    loc, scale = _f64(loc0, scale0)
    from companion.estimators import gradient_samples

    grads = gradient_samples("pathwise", lambda x: x, lambda m, s: family(m, s, low, high), (loc, scale),
                             200_000, generator=torch.Generator().manual_seed(2))
    assert_mc_close(torch.stack(grads, 1), exact)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("low,high", [(-1.0, 2.0), (5.0, 6.0), (0.3, INF)])
def test_derivative_in_u_is_one_over_the_truncated_density(family, low, high):
    # dz/du = 1 / f_t(z): central differences of icdf in u (h = 1e-6: error ~1e-10)
    d = family(*_f64(0.2, 1.3, low, high))
    u, h = torch.tensor([0.05, 0.4, 0.93], dtype=torch.float64), 1e-6
    dz_du = (d.icdf(u + h) - d.icdf(u - h)) / (2 * h)
    assert torch.allclose(dz_du, torch.exp(-d.log_prob(d.icdf(u))), rtol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_location_derivative_lies_in_unit_interval_at_every_truncation(family):
    # log-concave f: f(F^-1(p)) is concave in p, so 0 <= dz/dloc <= 1 however far out
    lows = torch.tensor([-2.0, 0.0, 4.0, 8.0, 16.0, 30.0, 4.0, 30.0], dtype=torch.float64)
    highs = torch.cat([lows[:6] + 1.0, torch.full((2,), INF, dtype=torch.float64)])
    from companion.estimators import gradient_samples

    d_loc, _ = gradient_samples("pathwise", lambda x: x, lambda m, s: family(m, s, lows, highs),
                                (torch.zeros_like(lows), torch.ones_like(lows)), 5_000,
                                generator=torch.Generator().manual_seed(4))
    assert d_loc.min() >= -1e-12 and d_loc.max() <= 1 + 1e-12  # float64 rounding of 1 - chord / f


# --------------------------------------------------------------------------- KL(Kumaraswamy || Beta)


def _kl_by_quadrature(a, b, alpha, beta):
    """E_q[log q - log p] as an integral over v = 1 - u = e^{-s}, x = (1 - v^{1/b})^{1/a}."""
    log_b = scipy.special.betaln(alpha, beta)

    def integrand(s):
        if s == 0.0:
            return 0.0
        lv = -s / b  # log v^{1/b}
        lx = (math.log(-math.expm1(lv)) if lv > -1 else math.log1p(-math.exp(lv))) / a
        l1mx = math.log(-math.expm1(lx)) if lx < 0 else lv - math.log(a)
        log_q = math.log(a * b) + (a - 1) * lx + (b - 1) * lv
        log_p = (alpha - 1) * lx + (beta - 1) * l1mx - log_b
        return (log_q - log_p) * math.exp(-s)

    return scipy.integrate.quad(integrand, 0, np.inf, limit=4000, epsabs=1e-13, epsrel=1e-11)[0]


@pytest.mark.parametrize("a", [0.05, 0.5, 1.0, 5.0, 50.0])
@pytest.mark.parametrize("b", [0.05, 0.3, 1.0, 5.0, 50.0])
@pytest.mark.parametrize("alpha,beta", [(0.5, 0.2), (1.0, 1.0), (3.0, 4.0)])
def test_kl_kumaraswamy_beta_matches_numerical_integration(a, b, alpha, beta):
    kl = kl_kumaraswamy_beta(*_f64(a, b, alpha, beta)).item()
    assert kl == pytest.approx(_kl_by_quadrature(a, b, alpha, beta), rel=1e-7, abs=1e-10)


def test_kl_is_zero_for_the_uniform_and_matches_monte_carlo():
    assert kl_kumaraswamy_beta(*_f64(1.0, 1.0, 1.0, 1.0)).item() == pytest.approx(0.0, abs=1e-12)
    a, b, alpha, beta = _f64(2.0, 0.3, 1.0, 4.0)
    torch.manual_seed(3)
    q, p = Kumaraswamy(a, b), Beta(alpha, beta)
    x = q.sample((400_000,)).clamp(1e-12, 1 - 1e-12)
    assert_mc_close(q.log_prob(x) - p.log_prob(x), kl_kumaraswamy_beta(a, b, alpha, beta))


def test_ten_term_truncation_is_badly_wrong_for_small_b():
    a, b, alpha, beta = 0.5, 0.1, 1.0, 3.0
    exact = _kl_by_quadrature(a, b, alpha, beta)
    m = np.arange(1, 11)
    series10 = np.sum(np.exp(scipy.special.betaln(m / a, b)) / (m + a * b))
    full = kl_kumaraswamy_beta(*_f64(a, b, alpha, beta)).item()
    truncated = full - (beta - 1) * b * (np.sum(np.exp(scipy.special.betaln(np.arange(1, 100001) / a, b))
                                                / (np.arange(1, 100001) + a * b)) - series10)
    assert full == pytest.approx(exact, rel=1e-8)
    assert abs(truncated - exact) / exact > 0.1


@pytest.mark.parametrize("a,b", [(0.7, 0.4), (0.05, 0.05), (50.0, 0.05), (0.05, 50.0), (50.0, 50.0)])
def test_kl_gradients_match_finite_differences(a, b):
    args = [t.requires_grad_() for t in _f64(a, b, 2.0, 3.0)]
    assert torch.autograd.gradcheck(kl_kumaraswamy_beta, args)


# the documented range of (a, b), and a few targets on both sides of 1
KL_RANGE = [0.05, 0.07, 0.1, 0.3, 1.0, 5.0, 50.0]


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.2), (3.0, 4.0), (0.5, 4.0)])
def test_kl_is_finite_and_accurate_in_float32_over_the_documented_range(alpha, beta):
    # float32 inputs once overflowed (x = M s^(-1/b) ~ 1e70 in the tail integral) and gave NaN
    # for b < 0.1; computed from logarithms, value and gradient are finite and agree with float64.
    # Tolerance from float32 rounding (eps = 6e-8): the log-gamma terms reach ~1e4 for a = 0.05,
    # so an absolute error of ~1e-3 x 6e-8 x 1e4 relative to KL values of order 1-100: 1e-3.
    a, b = torch.meshgrid(torch.tensor(KL_RANGE), torch.tensor(KL_RANGE), indexing="ij")
    a32, b32 = a.clone().requires_grad_(), b.clone().requires_grad_()
    kl32 = kl_kumaraswamy_beta(a32, b32, alpha, beta)
    g32 = torch.autograd.grad(kl32.sum(), (a32, b32))
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    kl64 = kl_kumaraswamy_beta(a64, b64, alpha, beta)
    g64 = torch.autograd.grad(kl64.sum(), (a64, b64))
    assert kl32.dtype == torch.float32 and torch.isfinite(kl32).all()
    assert all(torch.isfinite(g).all() for g in g32)
    assert torch.allclose(kl32.double(), kl64, rtol=1e-3, atol=0)
    error = (torch.stack(g32).double() - torch.stack(g64)).norm(dim=0)
    assert torch.all(error <= 1e-3 * torch.stack(g64).norm(dim=0))
    # and float64 against quadrature at the corners of the range (the full grid is tested above)
    for i, j in [(0, 0), (0, -1), (-1, 0), (-1, -1), (2, 1)]:
        ref = _kl_by_quadrature(KL_RANGE[i], KL_RANGE[j], alpha, beta)
        assert kl64[i, j].item() == pytest.approx(ref, rel=1e-7, abs=1e-10)


def test_kl_rejects_non_positive_parameters():
    with pytest.raises(ValueError, match="parameter b"):
        kl_kumaraswamy_beta(1.0, 0.0, 1.0, 1.0)


# --------------------------------------------------------------------------- fit_kumaraswamy


@pytest.mark.parametrize("alpha,beta", [(1.0, 3.0), (0.4, 1.0), (1.0, 1.0)])
def test_fit_kumaraswamy_is_exact_when_a_beta_parameter_is_one(alpha, beta):
    # Kumaraswamy(1, b) = Beta(1, b) and Kumaraswamy(a, 1) = Beta(a, 1): the fit is exact
    fit = fit_kumaraswamy(alpha, beta)
    assert fit.a.item() == pytest.approx(alpha, rel=1e-6) and fit.b.item() == pytest.approx(beta, rel=1e-6)
    assert abs(fit.kl.item()) < 1e-10


def test_fit_kumaraswamy_matches_an_independent_minimisation():
    # Nelder-Mead on the KL by quadrature (no closed form, no gradient) finds the same optimum;
    # the KL is flat there, so the parameters agree to ~sqrt(fatol / curvature) ~ 1e-5
    alpha, beta = 3.0, 9.0
    fit = fit_kumaraswamy(alpha, beta)
    res = scipy.optimize.minimize(lambda x: _kl_by_quadrature(math.exp(x[0]), math.exp(x[1]), alpha, beta),
                                  [0.0, 0.0], method="Nelder-Mead",
                                  options={"xatol": 1e-8, "fatol": 1e-14, "maxiter": 2000})
    assert fit.a.item() == pytest.approx(math.exp(res.x[0]), rel=1e-4)
    assert fit.b.item() == pytest.approx(math.exp(res.x[1]), rel=1e-4)
    assert fit.kl.item() == pytest.approx(res.fun, rel=1e-6)
    assert fit.kl.item() > 1e-3  # a Beta(3, 9) is not a Kumaraswamy: the bias is real


def test_fit_kumaraswamy_is_a_stationary_point_and_broadcasts():
    alpha, beta = torch.tensor([3.0, 0.5, 2.0]), torch.tensor([9.0, 0.5, 0.3])
    fit = fit_kumaraswamy(alpha, beta)
    assert fit.a.shape == fit.b.shape == fit.kl.shape == (3,)
    log_a, log_b = fit.a.log().requires_grad_(), fit.b.log().requires_grad_()
    kl = kl_kumaraswamy_beta(log_a.exp(), log_b.exp(), alpha.double(), beta.double()).sum()
    grads = torch.autograd.grad(kl, (log_a, log_b))
    assert all(g.abs().max() < 1e-7 for g in grads)
    single = fit_kumaraswamy(0.5, 0.5)
    assert fit.a[1].item() == pytest.approx(single.a.item(), rel=1e-6)
    assert torch.all(fit.kl > 0)


def test_fit_kumaraswamy_rejects_non_positive_parameters():
    with pytest.raises(ValueError, match="parameter beta"):
        fit_kumaraswamy(1.0, -2.0)


# --------------------------------------------------------------------------- clipping


def test_hard_clip_kills_gradient_outside_and_soft_clip_does_not():
    z = torch.tensor([-3.0, 0.5, 4.0], requires_grad=True)
    (g_hard,) = torch.autograd.grad(hard_clip(z, 0.0, 1.0).sum(), z)
    assert g_hard.tolist() == [0.0, 1.0, 0.0]
    (g_soft,) = torch.autograd.grad(soft_clip(z, 0.0, 1.0, tau=0.5).sum(), z)
    assert torch.all(g_soft > 0)


def test_clipped_gaussian_learns_with_soft_clip_and_stalls_with_hard_clip():
    # z = mu + 0.3 eps clipped into [0, 1], loss (y - 0.7)^2, mu starting at 3: every draw is
    # outside, so the hard clip's gradient is exactly 0; the soft clip's is not, and gradient
    # descent brings mu into the interval
    eps = torch.randn(2048, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for clip, moves in [(lambda z: hard_clip(z, 0.0, 1.0), False), (lambda z: soft_clip(z, 0.0, 1.0, 0.5), True)]:
        mu = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
        for _ in range(150):
            (grad,) = torch.autograd.grad(((clip(mu + 0.3 * eps) - 0.7) ** 2).mean(), mu)
            with torch.no_grad():
                mu -= grad
            if not moves:
                assert grad.item() == 0.0
        assert (mu.item() < 1.2) if moves else (mu.item() == 3.0)


def test_soft_clip_tends_to_hard_clip():
    z = torch.linspace(-3, 4, 50, dtype=torch.float64)
    for tau, tol in [(0.1, 0.07), (0.01, 0.007), (0.001, 0.0007)]:
        assert (soft_clip(z, 0.0, 1.0, tau) - hard_clip(z, 0.0, 1.0)).abs().max() <= tol  # <= tau log 2
    s = soft_clip(z, 0.0, 1.0, 0.2)
    assert torch.all((s > 0) & (s < 1)) and torch.all(s[1:] > s[:-1])
    with pytest.raises(ValueError, match="low < high"):
        soft_clip(z, 1.0, 0.0)
    with pytest.raises(ValueError, match="tau"):
        soft_clip(z, 0.0, 1.0, 0.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_with_respect_to_the_uniform(family):
    # dz/du = scale (F(beta) - F(alpha)) / f(xi) = 1 / density of the truncated law at z
    d = family(*_f64(0.2, 1.3, -0.5, 3.0))
    u = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64, requires_grad=True)
    z = d.icdf(u)
    (dz_du,) = torch.autograd.grad(z.sum(), u)
    assert torch.allclose(dz_du, torch.exp(-d.log_prob(z.detach())), rtol=1e-10)
    assert torch.autograd.gradcheck(lambda v: d.icdf(v), (u,))
