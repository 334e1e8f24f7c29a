"""companion.estimators: explicit noise (eps=, reparameterize) and per_sample_gradients."""
import pytest
import torch
from torch.distributions import (
    Gamma,
    Independent,
    LogNormal,
    MultivariateNormal,
    Normal,
    Uniform,
)

from companion import closed_forms as cf
from companion.estimators import (
    gradient_samples,
    pathwise,
    per_sample_gradients,
    reparameterize,
    score_function,
)
from helpers import assert_mc_close

MU, SIGMA = 0.4, 0.9
F64 = torch.float64


def _theta():
    return torch.tensor(MU, dtype=F64), torch.tensor(SIGMA, dtype=F64)


# --------------------------------------------------------------------------- reparameterize


def test_reparameterize_is_the_location_scale_map():
    eps = torch.randn(5, 3, dtype=F64)
    loc, scale = torch.randn(3, dtype=F64), torch.rand(3, dtype=F64) + 0.5
    assert torch.equal(reparameterize(Normal(loc, scale), eps), loc + scale * eps)
    assert torch.equal(reparameterize(Independent(Normal(loc, scale), 1), eps), loc + scale * eps)
    assert torch.allclose(reparameterize(LogNormal(loc, scale), eps), (loc + scale * eps).exp())
    u = torch.rand(5, 3, dtype=F64)
    assert torch.allclose(reparameterize(Uniform(loc, loc + scale), u), loc + scale * u)


def test_reparameterize_multivariate_normal_uses_the_cholesky_factor():
    a = torch.randn(3, 3, dtype=F64)
    cov = a @ a.T + torch.eye(3, dtype=F64)
    loc = torch.randn(3, dtype=F64)
    eps = torch.randn(200_000, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    x = reparameterize(MultivariateNormal(loc, cov), eps)
    assert torch.allclose(x[0], loc + torch.linalg.cholesky(cov) @ eps[0])
    # sample covariance within 5 standard errors of each entry (SE of a covariance ~ sqrt((s_ii s_jj + s_ij^2)/n))
    se = ((cov.diag()[:, None] * cov.diag()[None, :] + cov**2) / eps.shape[0]).sqrt()
    assert torch.all((x.T.cov() - cov).abs() < 5 * se)


def test_reparameterize_refuses_other_families_and_bad_shapes():
    with pytest.raises(ValueError, match="Gamma"):
        reparameterize(Gamma(torch.tensor(2.0), torch.tensor(1.0)), torch.randn(3))
    with pytest.raises(ValueError, match="batch and event"):
        reparameterize(Normal(torch.zeros(3), torch.ones(3)), torch.randn(4, 2))
    with pytest.raises(ValueError, match="eps must be a tensor"):
        reparameterize(Normal(0.0, 1.0), [0.1])


# --------------------------------------------------------------------------- eps= in the estimators


def test_pathwise_and_score_function_share_draws_through_eps():
    mu, sigma = (p.requires_grad_(True) for p in _theta())
    eps = torch.randn(1000, dtype=F64, generator=torch.Generator().manual_seed(1))
    a = pathwise(torch.cos, Normal(mu, sigma), 1000, eps=eps)
    b = score_function(torch.cos, Normal(mu, sigma), 1000, eps=eps)
    assert torch.equal(a.value, torch.cos(mu + sigma * eps).mean().detach()) and torch.equal(a.value, b.value)
    (g_path,) = torch.autograd.grad(a.surrogate, mu)
    assert torch.allclose(g_path, -torch.sin(mu + sigma * eps).mean())
    (g_score,) = torch.autograd.grad(b.surrogate, mu)
    z = eps  # score of N(mu, sigma^2) w.r.t. mu is (x - mu) / sigma^2 = eps / sigma
    assert torch.allclose(g_score, (torch.cos(mu + sigma * eps) * z / sigma).mean())


def test_eps_with_generator_or_wrong_shape_is_refused():
    mu, sigma = _theta()
    with pytest.raises(ValueError, match="not both"):
        pathwise(torch.cos, Normal(mu, sigma), 4, eps=torch.randn(4), generator=torch.Generator())
    with pytest.raises(ValueError, match="eps must give samples of shape"):
        pathwise(torch.cos, Normal(mu, sigma), 4, eps=torch.randn(5))
    with pytest.raises(ValueError, match="pathwise and score-function"):
        gradient_samples("measure_valued", torch.cos, Normal, _theta(), 4, eps=torch.randn(4))


# --------------------------------------------------------------------------- per_sample_gradients


def _pathwise_program(f):
    def program(theta, eps):
        mu, sigma = theta
        return f(mu + sigma * eps)
    return program


def _score_program(f):
    def program(theta, draw):
        x, b = draw
        log_p = Normal(*theta).log_prob(x)
        fx = f(x)
        return fx + (fx - b).detach() * (log_p - log_p.detach())
    return program


def test_per_sample_gradients_equal_gradient_samples_on_the_same_noise():
    eps = torch.randn(4000, dtype=F64, generator=torch.Generator().manual_seed(2))
    f = torch.cos
    ref = gradient_samples("pathwise", f, Normal, _theta(), 4000, eps=eps)
    got = per_sample_gradients(_pathwise_program(f), _theta(), eps)
    assert all(torch.allclose(r, g) for r, g in zip(ref, got))
    # the score function, its leave-one-out baseline passed in with the draws
    ref = gradient_samples("score_function", f, Normal, _theta(), 4000, eps=eps, baseline="mean")
    x = MU + SIGMA * eps
    b = (f(x).sum() - f(x)) / (x.shape[0] - 1)
    got = per_sample_gradients(_score_program(f), _theta(), (x, b))
    assert all(torch.allclose(r, g) for r, g in zip(ref, got))


@pytest.mark.parametrize("chunk_size", [None, 777])
def test_per_sample_gradients_are_unbiased_for_the_closed_form(chunk_size):
    square = cf.square()
    eps = torch.randn(200_000, dtype=F64, generator=torch.Generator().manual_seed(3))
    g_mu, g_sigma = per_sample_gradients(_pathwise_program(lambda x: x**2), _theta(), eps, chunk_size=chunk_size)
    exact = cf.gradient(square, MU, SIGMA)
    assert_mc_close(g_mu, exact[0])
    assert_mc_close(g_sigma, exact[1])


def test_per_sample_gradients_take_dicts_and_modules():
    net = torch.nn.Linear(3, 1).double()
    params = dict(net.named_parameters())
    noise = torch.randn(6, 3, dtype=F64)

    def program(p, x):
        return torch.func.functional_call(net, p, (x,)).squeeze() ** 2

    grads = per_sample_gradients(program, params, noise)
    assert set(grads) == {"weight", "bias"} and grads["weight"].shape == (6, 1, 3)
    for i in range(6):  # against one backward pass per draw
        net.zero_grad()
        program(params, noise[i]).backward()
        assert torch.allclose(grads["weight"][i], net.weight.grad)
        assert torch.allclose(grads["bias"][i], net.bias.grad)


@pytest.mark.parametrize("kwargs, message", [
    ({"program": 3}, "program"),
    ({"params": []}, "params"),
    ({"params": torch.tensor([1, 2])}, "params"),
    ({"noise": torch.tensor(1.0)}, "noise"),
    ({"noise": (torch.randn(3), torch.randn(4))}, "same leading"),
    ({"chunk_size": 0}, "chunk_size"),
])
def test_per_sample_gradients_bad_input(kwargs, message):
    args = {"program": _pathwise_program(torch.cos), "params": _theta(), "noise": torch.randn(3, dtype=F64)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        per_sample_gradients(**args)
