"""companion.science.survival: interface and bad input, correctness against scipy, closed forms
and lifelines, and the analytic gradient against autograd."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from companion.science import survival as sv

DT = torch.float64


def _data(n=300, censor=0.3, seed=0, mu=2.0, sigma=0.8):
    gen = torch.Generator().manual_seed(seed)
    t = torch.exp(mu + sigma * torch.randn(n, generator=gen, dtype=DT))
    event = (torch.rand(n, generator=gen) >= censor).long()
    return t, event


# --------------------------------------------------------------------------- interface


def test_shapes_broadcast_over_subjects_in_the_last_dimension():
    t, event = _data(50)
    assert sv.lognormal_log_likelihood(t, event, 2.0, 0.8).shape == ()
    mu = torch.linspace(1.0, 3.0, 7, dtype=DT).reshape(7, 1)  # 7 draws
    ll = sv.lognormal_log_likelihood(t, event, mu, 0.8)
    assert ll.shape == (7,)
    for i in range(7):
        assert torch.allclose(ll[i], sv.lognormal_log_likelihood(t, event, mu[i, 0].item(), 0.8))
    per_subject = torch.full((50,), 2.0, dtype=DT)  # one mu per subject (AFT)
    assert torch.allclose(sv.lognormal_log_likelihood(t, event, per_subject, 0.8),
                          sv.lognormal_log_likelihood(t, event, 2.0, 0.8))


def test_event_may_be_bool_int_or_float():
    t, event = _data(40)
    values = [sv.lognormal_log_likelihood(t, e, 2.0, 0.8) for e in (event.bool(), event, event.double())]
    assert values[0] == values[1] == values[2]


def test_log_likelihood_is_differentiable_and_gradient_has_parameter_shapes():
    t, event = _data(40)
    mu = torch.tensor(2.0, dtype=DT, requires_grad=True)
    sigma = torch.tensor(0.8, dtype=DT, requires_grad=True)
    sv.lognormal_log_likelihood(t, event, mu, sigma).backward()
    assert mu.grad is not None and sigma.grad is not None
    grad = sv.lognormal_gradient(t, event, 2.0, 0.8)
    assert grad.mu.shape == () and grad.sigma.shape == ()
    per_subject = torch.full((40,), 2.0, dtype=DT)
    grad = sv.lognormal_gradient(t, event, per_subject, 0.8)
    assert grad.mu.shape == (40,) and grad.sigma.shape == ()
    assert not grad.mu.requires_grad


@pytest.mark.parametrize("fn", [sv.lognormal_log_likelihood, sv.lognormal_gradient])
def test_bad_input_raises_value_error(fn):
    t, event = _data(10)
    bad = [
        ((-t, event, 2.0, 0.8), "t must"),  # negative times
        ((t * 0, event, 2.0, 0.8), "t must"),  # zero times
        ((t.clone().fill_(math.nan), event, 2.0, 0.8), "t must"),
        ((t.tolist(), event, 2.0, 0.8), "t must"),  # not a tensor
        ((t.long(), event, 2.0, 0.8), "t must"),  # not floating point
        ((t, event * 2, 2.0, 0.8), "event must"),  # events not 0/1
        ((t, event * 0.5, 2.0, 0.8), "event must"),
        ((t, -event, 2.0, 0.8), "event must"),
        ((t, event[:-1], 2.0, 0.8), "event must have the shape"),  # shapes disagree
        ((t, event.tolist(), 2.0, 0.8), "event must"),
        ((t, event, 2.0, 0.0), "sigma must be positive"),  # sigma <= 0
        ((t, event, 2.0, -1.0), "sigma must be positive"),
        ((t, event, 2.0, torch.tensor([0.8, -0.1], dtype=DT).reshape(2, 1)), "sigma must be positive"),
        ((t, event, math.nan, 0.8), "mu must be finite"),
        ((t, event, "2", 0.8), "mu must be"),
        ((t, event, torch.zeros(11, dtype=DT), 0.8), "broadcast"),  # shapes disagree
        ((t, event, 2.0, torch.ones(3, dtype=DT)), "broadcast"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            fn(*args)


def test_fits_reject_bad_input():
    t, event = _data(30)
    with pytest.raises(ValueError, match="at least one observed event"):
        sv.fit_lognormal(t, torch.zeros_like(event))
    with pytest.raises(ValueError, match="1-D"):
        sv.fit_lognormal(t.reshape(3, 10), event.reshape(3, 10))
    with pytest.raises(ValueError, match="t must"):
        sv.fit_lognormal(-t, event)
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    with pytest.raises(ValueError, match="x must be"):
        sv.fit_lognormal_aft(t, event, x[:-1])
    with pytest.raises(ValueError, match="x must be"):
        sv.fit_lognormal_aft(t, event, x[:, 0])
    with pytest.raises(ValueError, match="constant column"):
        sv.fit_lognormal_aft(t, event, torch.cat([x, torch.ones(30, 1, dtype=DT)], 1))
    for bad in ({"num_steps": 0}, {"num_samples": 0}, {"num_runs": 0}, {"lr": 0.0},
                {"prior_scale": (1.0, 0.0)}):
        with pytest.raises(ValueError):
            sv.fit_lognormal_vi(t, event, **bad)
    with pytest.raises(ValueError, match="tau"):
        sv.lognormal_restricted_mean(0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="sigma"):
        sv.lognormal_restricted_mean(5.0, 1.0, -1.0)
    with pytest.raises(ValueError, match="sigma"):
        sv.lognormal_survival(t, 1.0, 0.0)
    with pytest.raises(ValueError, match="t must"):
        sv.lognormal_survival(-t, 1.0, 1.0)


# --------------------------------------------------------------------------- correctness


def test_log_likelihood_equals_scipy_lognorm():
    t, event = _data(200)
    mu, sigma = 1.7, 1.1
    ours = sv.lognormal_log_likelihood(t, event, mu, sigma).item()
    x, d = t.numpy(), event.numpy().astype(bool)
    dist = stats.lognorm(s=sigma, scale=math.exp(mu))
    reference = dist.logpdf(x[d]).sum() + dist.logsf(x[~d]).sum()
    assert ours == pytest.approx(reference, rel=1e-12)
    assert torch.distributions.LogNormal(mu, sigma).log_prob(t[event.bool()].float()).sum().item() == pytest.approx(
        dist.logpdf(x[d]).sum(), rel=1e-5)  # torch's LogNormal is the same density (float32)


def test_tails_stay_finite_and_match_scipy():
    # z = (log t - 1) / 0.2 from -40 to +40: log S underflows as log(1 - Phi) beyond z ~ 8
    z = torch.tensor([-40.0, -25.0, -5.0, 0.0, 5.0, 25.0, 40.0], dtype=DT)
    t = torch.exp(1.0 + 0.2 * z)
    for event in (torch.zeros(7), torch.ones(7)):
        ours = sv.lognormal_log_likelihood(t, event, 1.0, 0.2).item()
        dist = stats.lognorm(s=0.2, scale=math.e)
        ref = (dist.logpdf(t.numpy()) if event[0] else dist.logsf(t.numpy())).sum()
        assert math.isfinite(ours) and ours == pytest.approx(ref, rel=1e-10)
        grad = sv.lognormal_gradient(t, event, 1.0, 0.2)
        assert torch.isfinite(grad.mu) and torch.isfinite(grad.sigma)


@pytest.mark.parametrize("censor", [0.0, 0.3, 0.99, 1.0])
def test_analytic_gradient_equals_autograd(censor):
    t, event = _data(2000, censor=censor, seed=1)
    for mu0, sigma0 in [(2.0, 0.8), (-3.0, 0.3), (8.0, 2.5)]:  # at, below and above the data
        mu = torch.tensor(mu0, dtype=DT, requires_grad=True)
        sigma = torch.tensor(sigma0, dtype=DT, requires_grad=True)
        sv.lognormal_log_likelihood(t, event, mu, sigma).backward()
        grad = sv.lognormal_gradient(t, event, mu, sigma)
        assert torch.isfinite(grad.mu) and torch.isfinite(grad.sigma)
        assert grad.mu.item() == pytest.approx(mu.grad.item(), rel=1e-10, abs=1e-10)
        assert grad.sigma.item() == pytest.approx(sigma.grad.item(), rel=1e-10, abs=1e-10)


def test_per_subject_gradient_equals_autograd_and_gradcheck():
    t, event = _data(30, censor=0.5, seed=2)
    mu = torch.linspace(1.0, 3.0, 30, dtype=DT, requires_grad=True)
    sigma = torch.tensor(0.7, dtype=DT, requires_grad=True)
    sv.lognormal_log_likelihood(t, event, mu, sigma).backward()
    grad = sv.lognormal_gradient(t, event, mu, sigma)
    assert torch.allclose(grad.mu, mu.grad, rtol=1e-12, atol=1e-12)
    assert torch.allclose(grad.sigma, sigma.grad, rtol=1e-12)
    assert torch.autograd.gradcheck(
        lambda m, s: sv.lognormal_log_likelihood(t, event, m, s), (mu.detach().requires_grad_(),
                                                                  sigma.detach().requires_grad_()))


def test_fit_without_censoring_is_the_gaussian_mle_of_log_t():
    t, _ = _data(400, seed=3)
    fit = sv.fit_lognormal(t, torch.ones(400))
    log_t = t.log()
    assert fit.mu == pytest.approx(log_t.mean().item(), abs=1e-8)
    assert fit.sigma == pytest.approx(log_t.std(correction=0).item(), abs=1e-8)


def test_fit_with_censoring_is_a_stationary_point_and_beats_neighbours():
    t, event = _data(400, censor=0.6, seed=4)
    fit = sv.fit_lognormal(t, event)
    grad = sv.lognormal_gradient(t, event, fit.mu, fit.sigma)
    assert abs(grad.mu.item()) < 1e-5 and abs(grad.sigma.item()) < 1e-5
    best = sv.lognormal_log_likelihood(t, event, fit.mu, fit.sigma)
    for dm, ds in [(0.01, 0), (-0.01, 0), (0, 0.01), (0, -0.01)]:
        assert sv.lognormal_log_likelihood(t, event, fit.mu + dm, fit.sigma + ds) < best


def test_fit_equals_lifelines_on_rossi():
    lifelines = pytest.importorskip("lifelines")
    from lifelines.datasets import load_rossi

    rossi = load_rossi()
    t = torch.tensor(rossi["week"].to_numpy(), dtype=DT)
    event = torch.tensor(rossi["arrest"].to_numpy())
    fit = sv.fit_lognormal(t, event)
    ref = lifelines.LogNormalFitter().fit(rossi["week"], rossi["arrest"])
    assert abs(fit.mu - ref.mu_) < 1e-4 and abs(fit.sigma - ref.sigma_) < 1e-4
    at_ref = sv.lognormal_log_likelihood(t, event, ref.mu_, ref.sigma_).item()
    assert at_ref == pytest.approx(ref.log_likelihood_, abs=1e-8)  # the same likelihood


def test_aft_without_censoring_is_least_squares_on_log_t():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(500, 3, generator=gen, dtype=DT) * torch.tensor([1.0, 10.0, 0.1], dtype=DT) + 3.0
    log_t = 1.0 + x @ torch.tensor([0.5, -0.02, 2.0], dtype=DT) + 0.7 * torch.randn(500, generator=gen, dtype=DT)
    aft = sv.fit_lognormal_aft(log_t.exp(), torch.ones(500), x)
    design = np.column_stack([np.ones(500), x.numpy()])
    beta, rss, *_ = np.linalg.lstsq(design, log_t.numpy(), rcond=None)
    assert aft.intercept == pytest.approx(beta[0], abs=1e-6)
    assert np.allclose(aft.coef.numpy(), beta[1:], atol=1e-7)
    assert aft.sigma == pytest.approx(math.sqrt(rss[0] / 500), rel=1e-7)


def test_survival_and_restricted_mean_against_scipy():
    t = torch.tensor([0.5, 3.0, 40.0], dtype=DT)
    mu, sigma = 2.5, 0.9
    ref = stats.lognorm(s=sigma, scale=math.exp(mu))
    assert np.allclose(sv.lognormal_survival(t, mu, sigma).numpy(), ref.sf(t.numpy()), rtol=1e-12)
    for tau in (1.0, 12.0, 300.0):
        quad = integrate.quad(ref.sf, 0, tau, epsabs=1e-12, epsrel=1e-12)[0]
        assert sv.lognormal_restricted_mean(tau, mu, sigma).item() == pytest.approx(quad, rel=1e-9)


def test_vi_matches_the_grid_posterior():
    t, event = _data(400, censor=0.4, seed=6)  # the chapter's regime: ~400 subjects
    vi = sv.fit_lognormal_vi(t, event, num_steps=400, num_samples=16, num_runs=2,
                             generator=torch.Generator().manual_seed(0))
    assert vi.loc.shape == (2, 2) and vi.scale_tril.shape == (2, 2, 2) and vi.elbo.shape == (400, 2)
    fit = sv.fit_lognormal(t, event)
    mus = torch.linspace(fit.mu - 0.6, fit.mu + 0.6, 121, dtype=DT)
    log_sigmas = torch.linspace(math.log(fit.sigma) - 0.5, math.log(fit.sigma) + 0.5, 121, dtype=DT)
    grid = torch.stack(torch.meshgrid(mus, log_sigmas, indexing="ij"), -1)
    log_post = sv.lognormal_log_likelihood(t, event, grid[..., :1], grid[..., 1:].exp())
    log_post = log_post + torch.distributions.Normal(0.0, 10.0).log_prob(grid[..., 0])
    log_post = log_post + torch.distributions.Normal(0.0, 1.0).log_prob(grid[..., 1])
    w = torch.softmax(log_post.flatten(), 0).reshape(log_post.shape)
    assert w[0].sum() + w[-1].sum() + w[:, 0].sum() + w[:, -1].sum() < 1e-6  # the grid holds the mass
    mean = torch.einsum("ab,abi->i", w, grid)
    sd = torch.einsum("ab,abi->i", w, (grid - mean) ** 2).sqrt()
    vi_sd = (vi.scale_tril @ vi.scale_tril.mT).diagonal(dim1=-2, dim2=-1).sqrt()
    # the chapter's claims: means within 0.25 posterior sd, sds within 10 %
    assert torch.all(((vi.loc - mean) / sd).abs() < 0.25)
    assert torch.all((vi_sd / sd - 1).abs() < 0.10)
