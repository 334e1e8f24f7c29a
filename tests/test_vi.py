"""companion.vi: interface, correctness against closed forms and libraries, agreement of estimators."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch.distributions import Normal, kl_divergence

from companion.runtime import rng
from companion.vi import (
    NormalNormal,
    elbo,
    elbo_estimate,
    elbo_gradient_samples,
    fit_gaussian_vi,
    log_evidence,
    log_joint,
    posterior,
    sample_data,
)
from helpers import Z, assert_mc_close

MODEL = NormalNormal(prior_loc=0.5, prior_scale=1.5, noise_scale=0.8)


def _data(n=12, seed=0):
    return sample_data(MODEL, n, generator=torch.Generator().manual_seed(seed))[1]


def _var_stderr(g: torch.Tensor) -> float:
    """Standard error of the sample variance: sqrt((m4 - var^2) / n), m4 the 4th central moment."""
    c = g - g.mean()
    return math.sqrt(((c**4).mean() - (c**2).mean() ** 2).item() / g.shape[0])


# --------------------------------------------------------------------------- interface


@pytest.mark.parametrize("field,value", [("prior_scale", 0.0), ("noise_scale", -1.0), ("prior_loc", math.nan),
                                         ("prior_scale", True), ("noise_scale", "1")])
def test_model_rejects_bad_parameters(field, value):
    args = {"prior_loc": 0.0, "prior_scale": 1.0, "noise_scale": 1.0, field: value}
    with pytest.raises(ValueError, match=field):
        NormalNormal(**args)


def test_functions_reject_bad_data_and_model():
    with pytest.raises(ValueError, match="x must be"):
        posterior(MODEL, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="x must be"):
        log_joint(MODEL, torch.tensor([], dtype=torch.float64), torch.zeros(3))
    with pytest.raises(ValueError, match="model"):
        posterior((0.0, 1.0, 1.0), _data())
    with pytest.raises(ValueError, match="num_points"):
        sample_data(MODEL, 0)


def test_estimators_reject_bad_arguments():
    x = _data()
    with pytest.raises(ValueError, match="method"):
        elbo_estimate("finite_difference", MODEL, x, 0.0, 1.0, 10)
    with pytest.raises(ValueError, match="baseline"):
        elbo_estimate("pathwise", MODEL, x, 0.0, 1.0, 10, baseline="mean")
    with pytest.raises(ValueError, match="baseline"):
        elbo_gradient_samples("pathwise", MODEL, x, 0.0, 1.0, 10, baseline="mean")
    with pytest.raises(ValueError, match="scale"):
        elbo_gradient_samples("pathwise", MODEL, x, 0.0, -1.0, 10)
    for bad in [{"num_steps": 0}, {"num_samples": 0}, {"num_runs": 0}, {"lr": 0.0}, {"init_scale": 0.0},
                {"init_loc": math.inf}]:
        kwargs = {"num_steps": 5, "num_samples": 10, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            fit_gaussian_vi("pathwise", MODEL, x, **kwargs)
    with pytest.raises(ValueError, match="method"):
        fit_gaussian_vi("reinforce", MODEL, x, num_steps=5, num_samples=10)


def test_log_joint_keeps_shape_and_graph():
    x = _data()
    z = torch.zeros(7, 3, dtype=torch.float64, requires_grad=True)
    lj = log_joint(MODEL, x, z)
    assert lj.shape == (7, 3)
    (grad,) = torch.autograd.grad(lj.sum(), z)
    assert grad.shape == (7, 3)


def test_sample_data_is_reproducible_and_shaped():
    z1, x1 = sample_data(MODEL, 5, generator=torch.Generator().manual_seed(3))
    z2, x2 = sample_data(MODEL, 5, generator=torch.Generator().manual_seed(3))
    assert z1.shape == () and x1.shape == (5,) and x1.dtype == torch.float64
    assert torch.equal(z1, z2) and torch.equal(x1, x2)


def test_elbo_estimate_shapes_and_value():
    x = _data()
    loc = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    for method in ("pathwise", "score_function"):
        est = elbo_estimate(method, MODEL, x, loc, torch.ones(4, dtype=torch.float64), 50,
                            generator=torch.Generator().manual_seed(0))
        assert est.value.shape == (4,) and est.surrogate.dim() == 0 and not est.value.requires_grad
        assert torch.allclose(est.surrogate.detach(), est.value.sum())


def test_fit_shapes_and_determinism():
    x = _data()
    runs = [fit_gaussian_vi("score_function", MODEL, x, num_steps=20, num_samples=30, num_runs=3,
                            baseline="mean", generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    assert runs[0].loc.shape == runs[0].scale.shape == (21, 3) and runs[0].elbo.shape == (20, 3)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert torch.all(runs[0].loc[0] == 0.0) and torch.all(runs[0].scale[0] == 1.0)  # the classic start


# --------------------------------------------------------------------------- correctness


def test_log_joint_matches_a_sum_of_normal_log_densities():
    x, z = _data(), torch.linspace(-2, 3, 11, dtype=torch.float64)
    m0, s0 = (torch.tensor(v, dtype=torch.float64) for v in (MODEL.prior_loc, MODEL.prior_scale))
    direct = Normal(m0, s0).log_prob(z) + Normal(z.unsqueeze(-1), MODEL.noise_scale).log_prob(x).sum(-1)
    # the sufficient-statistic form rounds differently: agreement to float64 rounding of ~20 terms
    assert torch.allclose(log_joint(MODEL, x, z), direct, rtol=1e-12, atol=1e-12)


def test_posterior_matches_quadrature():
    x = _data()
    lj = lambda z: math.exp(log_joint(MODEL, x, torch.tensor(z, dtype=torch.float64)).item())  # noqa: E731
    moments = [integrate.quad(lambda z, k=k: z**k * lj(z), -np.inf, np.inf, epsabs=0, epsrel=1e-12)[0]
               for k in range(3)]
    mean = moments[1] / moments[0]
    sd = math.sqrt(moments[2] / moments[0] - mean**2)
    post = posterior(MODEL, x)
    # quadrature is accurate to ~1e-10 relative; the conjugate formulas are exact
    assert post.loc.item() == pytest.approx(mean, rel=1e-8)
    assert post.scale.item() == pytest.approx(sd, rel=1e-8)
    assert log_evidence(MODEL, x).item() == pytest.approx(math.log(moments[0]), rel=1e-8)


def test_log_evidence_matches_scipy_marginal():
    x = _data()
    n = x.numel()
    # x ~ N(m0 1, sigma^2 I + s0^2 1 1^T) once z is integrated out
    cov = MODEL.noise_scale**2 * np.eye(n) + MODEL.prior_scale**2 * np.ones((n, n))
    reference = stats.multivariate_normal(np.full(n, MODEL.prior_loc), cov).logpdf(x.numpy())
    assert log_evidence(MODEL, x).item() == pytest.approx(reference, rel=1e-12)


@pytest.mark.parametrize("loc,scale", [(0.0, 1.0), (-1.0, 0.2), (2.0, 3.0)])
def test_elbo_is_log_evidence_minus_kl(loc, scale):
    x = _data()
    q = Normal(torch.tensor(loc, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64))
    reference = log_evidence(MODEL, x) - kl_divergence(q, posterior(MODEL, x))
    # two exact formulas: agreement to float64 rounding
    assert elbo(MODEL, x, loc, scale).item() == pytest.approx(reference.item(), rel=1e-12, abs=1e-12)


def test_elbo_is_maximal_at_the_posterior():
    x = _data()
    post = posterior(MODEL, x)
    loc = post.loc.clone().requires_grad_(True)
    scale = post.scale.clone().requires_grad_(True)
    value = elbo(MODEL, x, loc, scale)
    grads = torch.autograd.grad(value, (loc, scale))
    assert all(abs(g.item()) < 1e-10 for g in grads)  # zero up to float64 rounding
    assert value.item() == pytest.approx(log_evidence(MODEL, x).item(), rel=1e-12)


@pytest.mark.parametrize("method", ["pathwise", "score_function"])
def test_elbo_estimate_value_is_unbiased(method):
    x, n = _data(), 100_000
    loc, scale = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    est = elbo_estimate(method, MODEL, x, loc, scale, 1, generator=torch.Generator().manual_seed(4))
    # n independent one-sample estimates: mean within Z standard errors of the closed form
    assert_mc_close(est.value, elbo(MODEL, x, 0.0, 1.0))


@pytest.mark.parametrize("method,baseline", [("pathwise", None), ("score_function", None),
                                             ("score_function", "mean")])
def test_elbo_gradient_samples_are_unbiased(method, baseline):
    x = _data()
    loc = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    exact = torch.autograd.grad(elbo(MODEL, x, loc, scale), (loc, scale))
    grads = elbo_gradient_samples(method, MODEL, x, 0.0, 1.0, 200_000, baseline=baseline,
                                  generator=torch.Generator().manual_seed(5))
    assert_mc_close(torch.stack(grads, 1), torch.stack(exact))


def test_variance_at_the_optimum_matches_closed_form():
    # at q = p(z | x), log p(x, z) - log q(z) = log p(x) for every z, so the pathwise sample is
    # -grad log q = (-eps / s, -(eps^2 - 1) / s): variances 1 / s^2 and 2 / s^2; the score
    # function's is (log p(x) - 1) times that, squared
    x = _data()
    post = posterior(MODEL, x)
    s, log_px = post.scale.item(), log_evidence(MODEL, x).item()
    for method, factor in [("pathwise", 1.0), ("score_function", (log_px - 1) ** 2)]:
        g_loc, g_scale = elbo_gradient_samples(method, MODEL, x, post.loc.item(), s, 200_000,
                                               generator=torch.Generator().manual_seed(6))
        for g, v in [(g_loc, factor / s**2), (g_scale, 2 * factor / s**2)]:
            assert abs(g.var().item() - v) <= Z * _var_stderr(g), (method, g.var().item(), v)


def test_pathwise_fit_converges_to_the_posterior():
    model = NormalNormal(0.0, 1.0, 1.0)
    x = sample_data(model, 10, generator=torch.Generator().manual_seed(7))[1]
    post = posterior(model, x)
    runs = 8
    fit = fit_gaussian_vi("pathwise", model, x, num_steps=1500, num_samples=1000, num_runs=runs,
                          generator=torch.Generator().manual_seed(8))
    # Polyak average of the last 500 iterates of each run (past the transient, which ends near
    # step 1000 at lr 0.01); the runs are independent, so the spread of their averages gives the
    # standard error of the mean over runs
    for trace, exact in [(fit.loc, post.loc), (fit.scale, post.scale)]:
        averages = trace[-500:].mean(0)
        assert abs(averages.mean() - exact) <= Z * averages.std() / math.sqrt(runs)


# --------------------------------------------------------------------------- agreement


def test_rsample_is_the_location_scale_formula():
    """torch's Normal.rsample is z = mu + sigma eps for the same noise, bit for bit."""
    mu = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    with rng(torch.Generator().manual_seed(13)):
        z = Normal(mu, sigma).rsample((100,))
    with rng(torch.Generator().manual_seed(13)):
        eps = torch.randn(100, dtype=torch.float64)
    assert torch.equal(z, mu + sigma * eps)
    d_mu, d_sigma = torch.autograd.grad(z.sum(), (mu, sigma))
    assert d_mu.item() == 100.0 and torch.isclose(d_sigma, eps.sum(), rtol=1e-14)


def test_library_loop_is_the_classic_program():
    """fit_gaussian_vi equals the classic program written out: z = mu + sigma eps, Adam on -ELBO."""
    x = _data()
    steps, n = 30, 200
    mu = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    log_sigma = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([mu, log_sigma], lr=0.01)
    trace = []
    with rng(torch.Generator().manual_seed(9)):
        for _ in range(steps):
            eps = torch.randn(n, dtype=torch.float64)
            sigma = log_sigma.exp()
            z = mu + sigma * eps
            loss = -(log_joint(MODEL, x, z) - Normal(mu, sigma).log_prob(z)).mean()
            trace.append((mu.item(), sigma.item()))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    fit = fit_gaussian_vi("pathwise", MODEL, x, num_steps=steps, num_samples=n,
                          generator=torch.Generator().manual_seed(9))
    ours = torch.stack([fit.loc[:-1, 0], fit.scale[:-1, 0]], 1)
    # same draws, same arithmetic up to summation order: float64 rounding
    assert torch.allclose(ours, torch.tensor(trace, dtype=torch.float64), rtol=0, atol=1e-10)


def test_pathwise_and_baselined_score_function_coincide_at_the_optimum():
    # with the same draws, the score function with a leave-one-out baseline multiplies
    # grad log q by f - b = 0 at the optimum, leaving -grad log q, the pathwise sample
    x = _data()
    post = posterior(MODEL, x)
    args = (MODEL, x, post.loc.item(), post.scale.item(), 1000)
    a = elbo_gradient_samples("pathwise", *args, generator=torch.Generator().manual_seed(10))
    b = elbo_gradient_samples("score_function", *args, baseline="mean",
                              generator=torch.Generator().manual_seed(10))
    for ga, gb in zip(a, b):
        # f - b is log p(x) minus a mean of log p(x) values: float64 rounding of terms of size ~20
        assert torch.allclose(ga, gb, rtol=0, atol=1e-9)


def test_score_function_fit_is_further_from_the_posterior():
    model = NormalNormal(0.0, 1.0, 1.0)
    x = sample_data(model, 10, generator=torch.Generator().manual_seed(11))[1]
    post = posterior(model, x)
    kl = {}
    for method in ("pathwise", "score_function"):
        fit = fit_gaussian_vi(method, model, x, num_steps=1000, num_samples=1000, num_runs=8,
                              generator=torch.Generator().manual_seed(12))
        kl[method] = kl_divergence(Normal(fit.loc[-300:], fit.scale[-300:]), post).mean(0).log10()
    # every score-function run ends further from the posterior than every pathwise run
    assert kl["score_function"].min() > kl["pathwise"].max()


def test_elbo_gradient_samples_equal_the_copy_per_sample_estimators():
    # per_sample_gradients (vmap over grad) against companion.estimators.gradient_samples, which
    # copies (mu, s) once per sample and backpropagates once, on the same noise
    from companion.estimators import gradient_samples

    x = _data()
    eps = torch.randn(500, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    for method, baseline in [("pathwise", None), ("score_function", None), ("score_function", "mean")]:
        got = elbo_gradient_samples(method, MODEL, x, 0.4, 0.7, 500, baseline=baseline, eps=eps)
        built = []

        def q_fn(m, s):
            built.append(Normal(m, s))
            return built[-1]

        def f(z):
            return log_joint(MODEL, x, z) - built[-1].log_prob(z)

        params = (torch.tensor(0.4, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64))
        options = {} if baseline is None else {"baseline": baseline}
        ref = gradient_samples(method, f, q_fn, params, 500, eps=eps, **options)
        for g, r in zip(got, ref):  # float64 rounding of sums of terms of size ~20
            assert torch.allclose(g, r, rtol=0, atol=1e-10), (method, baseline)


def test_elbo_gradient_samples_take_eps_and_refuse_bad_noise():
    x = _data()
    eps = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(16))
    with rng(torch.Generator().manual_seed(17)):
        drawn = torch.randn(50, dtype=torch.float64)
    # generator= draws exactly the normals that eps= would be given
    a = elbo_gradient_samples("pathwise", MODEL, x, 0.0, 1.0, 50, generator=torch.Generator().manual_seed(17))
    b = elbo_gradient_samples("pathwise", MODEL, x, 0.0, 1.0, 50, eps=drawn)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    # pathwise d/dmu: d/dz log p(x, z) at z = mu + s eps (log q(mu + s eps) does not depend on mu)
    c = elbo_gradient_samples("pathwise", MODEL, x, 0.0, 1.0, 50, eps=eps, chunk_size=7)
    z = eps.clone().requires_grad_(True)
    (dz,) = torch.autograd.grad(log_joint(MODEL, x, z).sum(), z)
    assert torch.allclose(c[0], dz, rtol=1e-12)
    with pytest.raises(ValueError, match="not both"):
        elbo_gradient_samples("pathwise", MODEL, x, 0.0, 1.0, 50, eps=eps, generator=torch.Generator())
    with pytest.raises(ValueError, match="eps must have shape"):
        elbo_gradient_samples("pathwise", MODEL, x, 0.0, 1.0, 40, eps=eps)
    with pytest.raises(ValueError, match="num_samples"):
        elbo_gradient_samples("score_function", MODEL, x, 0.0, 1.0, 1, baseline="mean")


# --------------------------------------------------------------------------- fit_full_gaussian


def test_fit_full_gaussian_reaches_a_gaussian_target():
    """For a Gaussian log-joint the best q is the target itself: the fit must land on it."""
    from torch.distributions import MultivariateNormal

    from companion.vi import fit_full_gaussian

    mean = torch.tensor([0.5, -1.0], dtype=torch.float64)
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
    target = MultivariateNormal(mean, cov)
    fit = fit_full_gaussian(target.log_prob, torch.zeros(2, 2, dtype=torch.float64), init_scale=0.3,
                            num_steps=1500, num_samples=16, lr=0.05,
                            generator=torch.Generator().manual_seed(0), progress=False)
    assert fit.loc.shape == (2, 2) and fit.scale_tril.shape == (2, 2, 2) and fit.elbo.shape == (1500, 2)
    # optimization tolerance: both runs within 0.05 of the target's mean and covariance entries
    # (the noise of the last steps, with the step size decayed to zero, is far below that)
    assert torch.allclose(fit.loc, mean.expand(2, 2), atol=0.05)
    assert torch.allclose(fit.scale_tril @ fit.scale_tril.mT, cov.expand(2, 2, 2), atol=0.05)
    # at the optimum the ELBO equals log Z = 0 for a normalized target
    assert abs(fit.elbo[-100:].mean().item()) < 0.05


@pytest.mark.parametrize("kwargs, name", [
    ({"init_loc": torch.zeros(2)}, "init_loc"),
    ({"num_steps": 0}, "num_steps"),
    ({"num_samples": 1.5}, "num_samples"),
    ({"init_scale": 0.0}, "init_scale"),
    ({"lr": -1.0}, "lr"),
])
def test_fit_full_gaussian_bad_input(kwargs, name):
    from companion.vi import fit_full_gaussian

    args = {"init_loc": torch.zeros(1, 2), "init_scale": 0.1, "num_steps": 5, "num_samples": 2, "lr": 0.1}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        fit_full_gaussian(lambda th: -(th**2).sum(-1), **args)
