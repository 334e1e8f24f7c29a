"""companion.models.hierarchical: the two-level chain against its closed forms, and the VAE.

Tolerances are Z = 5 standard errors (helpers.Z): of a mean, sqrt(var / S); of a variance,
sqrt((m4 - var^2) / S) with m4 the fourth central moment; of a covariance estimated as the mean
of products, the standard deviation of the products over sqrt(S). Exact references: the chain's
closed forms, companion.closed_forms for the marginal N(c alpha, c^2 beta^2 + d^2), and log p(x)
of a tiny hierarchical VAE by two-dimensional Gauss-Hermite quadrature.
"""
import functools
import math

import numpy as np
import pytest
import torch

from companion import closed_forms as cf
from companion.models.hierarchical import (
    HierarchicalVAE,
    active_units,
    importance_weighted_bound,
    independent_pixels_log_likelihood,
    chain_gradient_samples,
    chain_moments,
    negative_elbo,
    sample_chain,
    square_expectation,
    square_gradient,
    square_gradient_variance,
)
from companion.train import train
from helpers import Z, assert_mc_close

S = 400_000
ALPHA, BETA, C, D = 0.7, 1.3, 2.0, 0.5


def test_importance_weighted_bound_lies_between_the_elbo_and_log_px():
    # E[L_K] increases with K from the ELBO (K = 1) towards log p(x) (Burda et al. 2016): the mean
    # of R independent L_K is within Z standard errors below log p(x) and above the ELBO
    model = _model(1, z1_dim=1, x_dim=6, hidden=8, seed=3).double()
    x = _binary(4, dim=6, seed=7).double()
    log_px = _log_px_by_quadrature(model, x)
    reps = torch.stack([importance_weighted_bound(model, x, 50, generator=_gen(10 + r)) for r in range(100)])
    with torch.no_grad():
        elbo = model.log_weights(x, 20_000, generator=_gen(5))
    bound, se = reps.mean(0), reps.std(0) / math.sqrt(reps.shape[0])
    assert torch.all(bound <= log_px + Z * se)
    assert torch.all(bound >= elbo.mean(0) + Z * (se + elbo.std(0) / math.sqrt(elbo.shape[0])))
    # one chunk draws the same noise as log_weights itself
    direct = torch.logsumexp(model.log_weights(x, 50, generator=_gen(1)), 0) - math.log(50)
    assert torch.allclose(importance_weighted_bound(model, x, 50, generator=_gen(1), chunk_size=4), direct.detach())


def test_independent_pixels_is_the_bernoulli_log_likelihood():
    from scipy.stats import bernoulli

    train_x, test_x = _binary(30, seed=1), _binary(5, seed=2)
    p = (train_x.sum(0).numpy() + 1) / 32  # add-one smoothing
    exact = bernoulli.logpmf(test_x.numpy(), p).sum(1)
    assert np.allclose(independent_pixels_log_likelihood(train_x, test_x).numpy(), exact, atol=1e-5)  # float32
    with pytest.raises(ValueError, match="train_x and test_x"):
        independent_pixels_log_likelihood(train_x, test_x[:, :5])


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _assert_variance_close(samples, exact, z=Z):
    """Sample variance within z standard errors of a variance: sqrt((m4 - var^2) / S)."""
    centred = samples.double() - samples.double().mean()
    var = (centred**2).mean()
    se = math.sqrt(((centred**4).mean() - var**2).item() / samples.shape[0])
    assert abs(samples.double().var().item() - exact) <= z * se, (samples.var().item(), exact, se)


# --------------------------------------------------------------------------- chain: interface


def test_sample_chain_is_the_formula_for_given_noise():
    eps2, eps1 = torch.randn(7, generator=_gen()), torch.randn(7, generator=_gen(1))
    z2, z1 = sample_chain(ALPHA, BETA, C, D, eps2=eps2, eps1=eps1)
    assert torch.equal(z2, ALPHA + BETA * eps2)
    assert torch.equal(z1, C * (ALPHA + BETA * eps2) + D * eps1)


def test_sample_chain_shapes_generator_and_graph():
    alpha = torch.zeros(3, requires_grad=True)
    z2, z1 = sample_chain(alpha, 1.0, 2.0, 0.1, 5, generator=_gen())
    assert z2.shape == z1.shape == (5, 3) and z1.requires_grad
    again = sample_chain(alpha, 1.0, 2.0, 0.1, 5, generator=_gen())
    assert torch.equal(z1, again.z1)
    z1.sum().backward()
    assert torch.allclose(alpha.grad, torch.full((3,), 5 * 2.0))  # dz1/dalpha = c per sample


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(beta=-1.0), "beta"),
        (dict(d=-0.1), "d"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(c=float("inf")), "c"),
        (dict(num_samples=0), "num_samples"),
        (dict(num_samples=None), "num_samples"),
        (dict(eps2=torch.zeros(3), eps1=torch.zeros(4)), "same shape"),
    ],
)
def test_sample_chain_rejects_bad_arguments(kwargs, match):
    args = dict(alpha=0.0, beta=1.0, c=1.0, d=1.0, num_samples=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sample_chain(**args)


def test_chain_gradient_samples_are_the_per_sample_chain_rule():
    # on given noise, each gradient is the chain rule of that draw: d z1^2 / d alpha = 2 z1 c,
    # d z1^2 / d beta = 2 z1 c eps2 (float64 rounding only)
    g = _gen(11)
    eps2, eps1 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    grads = chain_gradient_samples(lambda z: z**2, ALPHA, BETA, C, D, eps2=eps2, eps1=eps1)
    z1 = C * (ALPHA + BETA * eps2) + D * eps1
    assert torch.allclose(grads.alpha, 2 * z1 * C, rtol=1e-12, atol=0)
    assert torch.allclose(grads.beta, 2 * z1 * C * eps2, rtol=1e-12, atol=1e-12)


def test_chain_gradient_samples_rejects_bad_f():
    with pytest.raises(ValueError, match="f must be callable"):
        chain_gradient_samples("square", ALPHA, BETA, C, D, 10)
    with pytest.raises(ValueError, match="f must map"):
        chain_gradient_samples(lambda z: torch.stack([z, z]), ALPHA, BETA, C, D, 10)
    with pytest.raises(ValueError, match="num_samples"):
        chain_gradient_samples(lambda z: z**2, ALPHA, BETA, C, D, 0)
    with pytest.raises(ValueError, match=r"shape \(S,\)"):
        chain_gradient_samples(lambda z: z**2, ALPHA, BETA, C, D, eps2=torch.zeros(3, 2), eps1=torch.zeros(3, 2))


# --------------------------------------------------------------------------- chain: closed forms


def test_chain_moments_match_samples():
    z2, z1 = sample_chain(torch.tensor(ALPHA, dtype=torch.float64), BETA, C, D, S, generator=_gen())
    mean, var, cov = chain_moments(ALPHA, BETA, C, D)
    assert_mc_close(z1, mean)
    _assert_variance_close(z1, var)
    products = (z1 - mean) * (z2 - ALPHA)  # exact means: Cov = E[products], stderr = sd / sqrt(S)
    assert_mc_close(products, cov)
    assert_mc_close(z1**2, square_expectation(ALPHA, BETA, C, D))


@pytest.mark.parametrize("c", [0.5, 2.0, -3.0])
def test_pathwise_gradient_is_unbiased_and_its_variance_is_the_closed_form(c):
    grads = chain_gradient_samples(lambda z: z**2, ALPHA, BETA, c, D, S, generator=_gen(2))
    exact = square_gradient(ALPHA, BETA, c, D)
    var = square_gradient_variance(ALPHA, BETA, c, D)
    assert_mc_close(grads.alpha, exact[0])
    assert_mc_close(grads.beta, exact[1])
    _assert_variance_close(grads.alpha, var.alpha)
    _assert_variance_close(grads.beta, var.beta)


def test_variance_splits_into_eps2_and_eps1_parts():
    # pick-freeze: two draws sharing eps2 with independent eps1. Cov(g, g') = Var(E[g | eps2]),
    # and (g - g')^2 / 2 has mean E[Var(g | eps2)] (law of total variance)
    g = _gen(3)
    eps2 = torch.randn(S, generator=g, dtype=torch.float64)
    ga = chain_gradient_samples(lambda z: z**2, ALPHA, BETA, C, D, eps2=eps2,
                                eps1=torch.randn(S, generator=g, dtype=torch.float64)).alpha
    gb = chain_gradient_samples(lambda z: z**2, ALPHA, BETA, C, D, eps2=eps2,
                                eps1=torch.randn(S, generator=g, dtype=torch.float64)).alpha
    exact = square_gradient_variance(ALPHA, BETA, C, D)
    mean = square_gradient(ALPHA, BETA, C, D)[0]
    assert_mc_close((ga - mean) * (gb - mean), exact.alpha_eps2)
    assert_mc_close((ga - gb) ** 2 / 2, exact.alpha_eps1)
    assert math.isclose(exact.alpha_eps2 + exact.alpha_eps1, exact.alpha, rel_tol=1e-12)


@pytest.mark.parametrize("c", [0.3, 1.0, 4.0])
def test_closed_forms_agree_with_the_marginal(c):
    # z1 ~ N(c alpha, s^2) and g_alpha = c f'(z1), so Var g_alpha = c^2 Var f'(z1), which
    # companion.closed_forms computes independently (float rounding only: rel 1e-9)
    mean, var, _ = chain_moments(ALPHA, BETA, c, D)
    s = math.sqrt(var)
    assert math.isclose(square_expectation(ALPHA, BETA, c, D), cf.expectation(cf.square(), mean, s), rel_tol=1e-9)
    assert math.isclose(square_gradient(ALPHA, BETA, c, D)[0], c * cf.gradient(cf.square(), mean, s)[0],
                        rel_tol=1e-9)
    marginal = c**2 * cf.per_sample_variance("pathwise", cf.square(), mean, s).mu
    assert math.isclose(square_gradient_variance(ALPHA, BETA, c, D).alpha, marginal, rel_tol=1e-9)


def test_gradient_variance_of_a_cosine_through_the_chain():
    # a non-polynomial f: Var g_alpha = c^2 Var[f'(z1)] under the marginal, by closed_forms
    w = 1.5
    grads = chain_gradient_samples(lambda z: torch.cos(w * z), ALPHA, BETA, C, D, S, generator=_gen(4))
    mean, var, _ = chain_moments(ALPHA, BETA, C, D)
    exact_grad = C * cf.gradient(cf.cosine(w), mean, math.sqrt(var))[0]
    assert_mc_close(grads.alpha, exact_grad)
    _assert_variance_close(grads.alpha, C**2 * cf.per_sample_variance("pathwise", cf.cosine(w), mean,
                                                                       math.sqrt(var)).mu)


# --------------------------------------------------------------------------- the VAE: interface


def _model(z2_dim=3, seed=0, **kw):
    torch.manual_seed(seed)
    return HierarchicalVAE(x_dim=kw.get("x_dim", 12), z1_dim=kw.get("z1_dim", 4), z2_dim=z2_dim,
                           hidden=kw.get("hidden", 16))


def _binary(n, dim=12, seed=0):
    return (torch.rand(n, dim, generator=_gen(seed)) > 0.5).float()


@pytest.mark.parametrize("z2_dim", [0, 3])
def test_vae_shapes(z2_dim):
    model, x = _model(z2_dim), _binary(5)
    terms = model.elbo(x, generator=_gen())
    for t in terms:
        assert t.shape == (5,)
    assert torch.allclose(terms.elbo, terms.reconstruction - terms.kl1 - terms.kl2)
    assert model.log_weights(x, 7, generator=_gen()).shape == (7, 5)
    samples = model.sample(6, generator=_gen())
    assert samples.shape == (6, 12) and samples.min() >= 0 and samples.max() <= 1
    if z2_dim == 0:
        assert torch.all(terms.kl2 == 0)


def test_elbo_is_a_function_of_the_noise_and_reaches_every_parameter():
    model, x = _model(), _binary(5)
    eps1, eps2 = torch.randn(5, 4, generator=_gen()), torch.randn(5, 3, generator=_gen(1))
    a, b = model.elbo(x, eps1=eps1, eps2=eps2), model.elbo(x, eps1=eps1, eps2=eps2)
    assert torch.equal(a.elbo, b.elbo)
    (-a.elbo.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_one_level_model_is_the_standard_vae():
    model, x = _model(z2_dim=0), _binary(5)
    h = model.features(x)
    prior = model.p_z1(None, x)
    q = model.q_z1(h, None, prior)
    assert torch.equal(prior.loc, torch.zeros(5, 4)) and torch.equal(prior.scale, torch.ones(5, 4))
    # closed-form Gaussian KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1)/2 - log s; float32 rounding
    kl = (q.loc**2 + q.scale**2 - 1) / 2 - q.scale.log()
    eps1 = torch.randn(5, 4, generator=_gen())
    assert torch.allclose(model.elbo(x, eps1=eps1).kl1, kl.sum(-1), atol=1e-5)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: HierarchicalVAE(0, 4, 2), "x_dim"),
        (lambda: HierarchicalVAE(8, 0, 2), "z1_dim"),
        (lambda: HierarchicalVAE(8, 4, -1), "z2_dim"),
        (lambda: HierarchicalVAE(8, 4, 2, hidden=2.5), "hidden"),
    ],
)
def test_vae_rejects_bad_sizes(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_vae_rejects_bad_inputs():
    model = _model()
    with pytest.raises(ValueError, match="x must have shape"):
        model.elbo(torch.zeros(5, 11))
    with pytest.raises(ValueError, match="eps2"):
        model.elbo(_binary(5), eps2=torch.zeros(5, 2))
    with pytest.raises(ValueError, match="num_samples"):
        model.log_weights(_binary(5), 0)
    with pytest.raises(ValueError, match="free_bits"):
        negative_elbo(model, _binary(5), free_bits=-1.0)
    with pytest.raises(ValueError, match="means"):
        active_units(torch.zeros(1, 3))


def test_free_bits_loss():
    model, x = _model(), _binary(8)
    torch.manual_seed(5)
    plain = negative_elbo(model, x)
    torch.manual_seed(5)
    terms = model.elbo(x)
    assert torch.allclose(plain, -terms.elbo.mean())
    torch.manual_seed(5)
    big = negative_elbo(model, x, free_bits=1e3)  # every KL below the floor: -rec + 2 lambda
    assert torch.allclose(big, -terms.reconstruction.mean() + 2e3)


def test_active_units():
    means = torch.stack([torch.linspace(-1, 1, 50), torch.full((50,), 0.3), 0.01 * torch.linspace(-1, 1, 50)], 1)
    assert active_units(means).tolist() == [True, False, False]


# --------------------------------------------------------------------------- the VAE: correctness


@pytest.mark.parametrize("z2_dim", [0, 3])
def test_elbo_agrees_with_an_independent_monte_carlo(z2_dim):
    # elbo() uses closed-form KLs; log_weights() only log-densities of the drawn latents: the
    # two have the same expectation. Tolerance: Z standard errors of the difference of means.
    model, x = _model(z2_dim), _binary(3)
    n = 40_000
    with torch.no_grad():
        xs = x.repeat(n, 1)
        analytic = model.elbo(xs, generator=_gen(1)).elbo.reshape(n, 3)
        sampled = model.log_weights(x, n, generator=_gen(2))
    a, b = analytic.mean(0), sampled.mean(0)
    se = (analytic.var(0) / n + sampled.var(0) / n).sqrt()
    assert torch.all((a - b).abs() <= Z * se), (a, b, se)


def _log_px_by_quadrature(model, x, nodes=60):
    """log p(x) of a model with one-dimensional z1 and z2, by nested Gauss-Hermite quadrature."""
    t, w = np.polynomial.hermite_e.hermegauss(nodes)
    t = torch.as_tensor(t, dtype=torch.float64)
    w = torch.as_tensor(w / math.sqrt(2 * math.pi), dtype=torch.float64)
    with torch.no_grad():
        if model.hierarchical:
            z2 = t.unsqueeze(-1)  # p(z2) = N(0, 1): nodes t_i, weights w_i
            prior = model.p_z1(z2, z2)  # (n, 1)
            z1 = prior.loc + prior.scale * t.unsqueeze(0)  # (n, n): node j of p(z1 | z2_i)
            weights = w.unsqueeze(1) * w.unsqueeze(0)
        else:
            z1, weights = t.unsqueeze(0), w.unsqueeze(0)
        log_lik = model.p_x(z1.reshape(-1, 1)).log_prob(x.unsqueeze(1)).sum(-1)  # (B, nodes)
        return torch.logsumexp(log_lik + weights.reshape(1, -1).log(), dim=1)


@pytest.mark.parametrize("z2_dim", [0, 1])
def test_importance_weights_are_unbiased_for_the_exact_likelihood(z2_dim):
    # E_q[p(x, z) / q(z | x)] = p(x), with p(x) by quadrature (smooth integrand, 60 x 60 nodes):
    # the mean weight lies within Z standard errors of p(x); and ELBO <= log p(x)
    model = _model(z2_dim, z1_dim=1, x_dim=6, hidden=8, seed=3).double()
    x = _binary(4, dim=6, seed=7).double()
    log_px = _log_px_by_quadrature(model, x)
    with torch.no_grad():
        log_w = model.log_weights(x, 200_000, generator=_gen(4))
    ratio = (log_w - log_px).exp()  # w / p(x): mean 1
    assert_mc_close(ratio, torch.ones(4))
    elbo = log_w.mean(0)
    se = log_w.std(0) / math.sqrt(log_w.shape[0])
    assert torch.all(elbo <= log_px + Z * se)
    assert torch.all(elbo < log_px)  # the gap is KL(q || posterior) > 0 for this untrained q


def test_loss_falls_on_a_tiny_problem():
    # four prototype patterns with 5 % flipped pixels: the loss must fall by more than 1.5 nats
    # (over seeds 1 to 3 it fell from about 9.2 to about 4.9 nats in these 300 steps)
    g = _gen(6)
    protos = _binary(4, seed=11)
    x = protos[torch.randint(0, 4, (256,), generator=g)]
    x = torch.where(torch.rand(x.shape, generator=g) < 0.05, 1 - x, x)
    model = _model(seed=1)
    hist = train(model, functools.partial(negative_elbo, free_bits=0.5), x, steps=300, batch_size=64,
                 lr=3e-3, seed=0, device="cpu", progress=False)
    start, end = np.mean(hist.loss[:10]), np.mean(hist.loss[-30:])
    assert end < start - 1.5, (start, end)
