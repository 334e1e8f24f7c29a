"""companion.control.state_space: interface, BPTT against finite differences, the posterior
family against statsmodels' Kalman smoother, the local-level fit against maximum likelihood."""
import math

import numpy as np
import pytest
import statsmodels.api as sm
import torch

from companion.control.state_space import MarkovGaussian, elbo_samples, fit_local_level, log_joint, sample_path
from companion.estimators import per_sample_gradients
from helpers import assert_mc_close

f64 = torch.float64
NILE = torch.tensor(sm.datasets.nile.load_pandas().data["volume"].to_numpy(), dtype=f64)


def _level_model(params):
    """statsmodels' local level with the exact diffuse start, smoothed at (obs var, level var)."""
    model = sm.tsa.UnobservedComponents(NILE.numpy(), "local level", use_exact_diffuse=True)
    return model, model.smooth(np.asarray(params, dtype=float))


# --------------------------------------------------------------------------- interface


def test_sample_path_shapes_graph_and_noise():
    a = torch.tensor(0.8, dtype=f64, requires_grad=True)
    z = sample_path(a, 0.5, 0.7, num_steps=6, num_samples=4, generator=torch.Generator().manual_seed(0))
    assert z.shape == (4, 6) and z.requires_grad
    eps = torch.randn(4, 6, dtype=f64)
    manual, prev = [], torch.zeros(4, dtype=f64)
    for t in range(6):  # the recursion itself
        prev = 0.8 * prev + 0.5 + 0.7 * eps[:, t]
        manual.append(prev)
    assert torch.allclose(sample_path(0.8, 0.5, 0.7, eps=eps), torch.stack(manual, 1))


@pytest.mark.parametrize("call,match", [
    (lambda: sample_path(0.8, 0.0, 0.0, num_steps=3, num_samples=2), "s must be positive"),
    (lambda: sample_path(0.8, 0.0, 1.0, num_steps=0, num_samples=2), "num_steps"),
    (lambda: sample_path(0.8, 0.0, 1.0, eps=torch.zeros(3, dtype=f64)), "eps must be"),
    (lambda: sample_path(0.8, 0.0, 1.0, eps=torch.zeros(2, 3, dtype=f64), generator=torch.Generator()), "eps="),
    (lambda: sample_path(torch.ones(2), 0.0, 1.0, num_steps=3, num_samples=2), "a must be a scalar"),
    (lambda: log_joint(torch.zeros(2, 3, dtype=f64), torch.zeros(4, dtype=f64), a=1, b=0, s=1, o=1), "z must have"),
    (lambda: log_joint(torch.zeros(2, 3, dtype=f64), torch.zeros(3, 1, dtype=f64), a=1, b=0, s=1, o=1), "y must be"),
    (lambda: log_joint(torch.zeros(2, 3, dtype=f64), torch.zeros(3, dtype=f64), a=1, b=0, s=1, o=0), "o must be"),
    (lambda: log_joint(torch.zeros(2, 3, dtype=f64), torch.zeros(3, dtype=f64), a=1, b=0, s=1, o=1, init_scale=1.0),
     "init_loc"),
    (lambda: MarkovGaussian(1), "num_steps"),
    (lambda: MarkovGaussian(5, init_site_prec=0.0), "init_site_prec"),
    (lambda: MarkovGaussian(5, init_pseudo=torch.zeros(4)), "init_pseudo"),
    (lambda: MarkovGaussian(5).rsample(a=1, b=0, s=1, eps=torch.zeros(2, 4, dtype=f64)), "eps must have shape"),
    (lambda: MarkovGaussian(5).rsample(a=1, b=0, s=-1.0, num_samples=2), "s must be positive"),
    (lambda: elbo_samples("q", torch.zeros(5, dtype=f64), 2, a=1, b=0, s=1, o=1), "q must be"),
    (lambda: elbo_samples(MarkovGaussian(5), torch.zeros(4, dtype=f64), 2, a=1, b=0, s=1, o=1), "y must be"),
    (lambda: fit_local_level(torch.zeros(10, 2, dtype=f64), steps=2), "y must be"),
    (lambda: fit_local_level(torch.ones(10, dtype=f64), steps=2), "constant"),
    (lambda: fit_local_level(torch.tensor([1.0, math.nan, 2.0, 3.0], dtype=f64), steps=2), "finite"),
    (lambda: fit_local_level(NILE, steps=0), "steps"),
    (lambda: fit_local_level(NILE, steps=2, lr=0.0), "lr"),
    (lambda: fit_local_level(NILE, steps=2, average_last=1.5), "average_last"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_family_matches_torch_multivariate_normal():
    gen = torch.Generator().manual_seed(0)
    for mean_field in (False, True):
        q = MarkovGaussian(6, init_pseudo=torch.randn(6, generator=gen, dtype=f64), init_site_prec=2.0,
                           mean_field=mean_field)
        model = dict(a=0.9, b=0.3, s=0.5)
        dist = q.distribution(**model)
        # the map eps -> z is affine: applying it to the unit vectors gives L with L L' = Cov
        zero = q.rsample(a=0.9, b=0.3, s=0.5, eps=torch.zeros(1, 6, dtype=f64))[0]
        lin = (q.rsample(**model, eps=torch.eye(6, dtype=f64)) - zero).T
        assert torch.allclose(zero, dist.loc) and torch.allclose(lin @ lin.T, dist.covariance_matrix)
        assert torch.allclose(q.entropy(**model), dist.entropy())
        assert torch.allclose(q.marginal_std(**model), dist.variance.sqrt())
        z = q.rsample(3, **model, generator=gen)
        assert z.shape == (3, 6) and z.requires_grad


# --------------------------------------------------------------------------- correctness


def test_bptt_gradient_against_finite_differences_and_the_exact_gradient():
    b, s, z0, T = 0.5, 0.7, 1.0, 10
    eps = torch.randn(5_000, T, generator=torch.Generator().manual_seed(1), dtype=f64)

    def objective(a, eps):
        return (sample_path(a, b, s, z0=z0, eps=eps) ** 2).sum(1)

    a = torch.tensor(0.8, dtype=f64)
    grads = per_sample_gradients(lambda a, e: objective(a, e[None])[0], a, eps)
    h = 1e-5
    fd = (objective(a + h, eps).mean() - objective(a - h, eps).mean()) / (2 * h)
    # common random numbers: the same function, so only the difference quotient's error remains
    assert abs(grads.mean() - fd) <= 1e-7 * abs(fd)
    a_ = torch.tensor(0.8, dtype=f64, requires_grad=True)
    m, v, total = torch.tensor(z0, dtype=f64), torch.tensor(0.0, dtype=f64), 0.0
    for _ in range(T):
        m, v = a_ * m + b, a_**2 * v + s**2
        total = total + m**2 + v
    (exact,) = torch.autograd.grad(total, a_)
    assert_mc_close(grads, exact)


def test_family_contains_the_kalman_smoother_and_elbo_equals_the_likelihood():
    obs_var, level_var = 15000.0, 1500.0
    model, smoothed = _level_model([obs_var, level_var])
    q = MarkovGaussian(100, init_pseudo=NILE, init_site_prec=1 / obs_var)  # pseudo = y, site_prec = 1 / o^2
    level = dict(a=1.0, b=0.0, s=math.sqrt(level_var))
    mean = q.distribution(**level).loc.detach().numpy()
    sd = q.marginal_std(**level).detach().numpy()
    # deterministic: two exact computations of one posterior, agreement to rounding
    assert np.allclose(mean, smoothed.smoothed_state[0], rtol=1e-9, atol=1e-7)
    assert np.allclose(sd, np.sqrt(smoothed.smoothed_state_cov[0, 0]), rtol=1e-9)
    terms = elbo_samples(q, NILE, 20_000, **level, o=math.sqrt(obs_var), generator=torch.Generator().manual_seed(2))
    # at the exact posterior the ELBO is the flat-prior likelihood, which is statsmodels'
    # exact diffuse log-likelihood plus log(2 pi) / 2 (its diffuse first step counts -log(2 pi) / 2)
    assert_mc_close(terms.detach(), smoothed.llf + math.log(2 * math.pi) / 2)


def test_local_level_fit_recovers_maximum_likelihood():
    model = sm.tsa.UnobservedComponents(NILE.numpy(), "local level", use_exact_diffuse=True)
    ml = model.fit(disp=False, pgtol=1e-12, factr=10, maxiter=5000)
    fit = fit_local_level(NILE, steps=300, generator=torch.Generator().manual_seed(0))
    assert fit.level_mean.shape == fit.level_std.shape == (100,) and fit.elbo.shape == (300,)
    # within a tenth of the ML standard errors, a difference the data cannot tell apart
    assert abs(fit.obs_var - ml.params[0]) <= 0.1 * ml.bse[0]
    assert abs(fit.level_var - ml.params[1]) <= 0.1 * ml.bse[1]
    sd = np.sqrt(ml.smoothed_state_cov[0, 0])
    assert (np.abs(fit.level_mean.numpy() - ml.smoothed_state[0]) / sd).max() <= 0.1
