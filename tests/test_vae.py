"""companion.models.vae: interface, the ELBO against exact references, estimator agreement, training."""
import math
from functools import partial

import pytest
import torch
from scipy import stats
from torch import nn
from torch.distributions import Independent, Normal, kl_divergence

from companion.estimators import gaussian_expectation, mc_summary
from companion.models import vae
from companion.models.vae import VAE, VAEConfig
from companion.train import train
from helpers import Z, assert_mc_close


def _model(seed=0, **config):
    torch.manual_seed(seed)
    return VAE(VAEConfig(**config)).double()


def _smooth_model(seed=3):
    """A 5-pixel Bernoulli VAE with a 1-D latent and tanh hidden units: log p(x | z) is smooth in
    z, so Gauss-Hermite quadrature of it and of its derivatives is exact to rounding (a ReLU's
    kink would leave a quadrature error in the gradient larger than the Monte Carlo error)."""
    model = _model(seed, x_dim=5, z_dim=1, hidden=(6,))
    model.encoder[1], model.decoder[1] = nn.Tanh(), nn.Tanh()
    return model


def _binary(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, d, generator=g) > 0.5).double()


# --------------------------------------------------------------------------- interface


def test_shapes():
    model = _model(x_dim=6, z_dim=3, hidden=(5,))
    x = _binary(4, 6)
    q = model.encode(x)
    assert q.batch_shape == (4,) and q.event_shape == (3,)
    z = vae.reparameterize(q.base_dist.loc, q.base_dist.scale, 7)
    assert z.shape == (7, 4, 3)
    assert model.decode(z).log_prob(x).shape == (7, 4)
    for fn in (vae.elbo_analytic_kl, vae.elbo_monte_carlo_kl):
        assert fn(model, x, num_samples=7).shape == (4,)
    for estimator in vae.ESTIMATORS:
        est = vae.elbo_estimate(model, x, estimator=estimator, num_samples=3)
        assert est.value.shape == (4,) and est.surrogate.dim() == 0 and not est.value.requires_grad
    assert vae.loss(model, x).dim() == 0
    assert vae.reconstruct(model, x).shape == (4, 6)
    assert isinstance(vae.evaluate_elbo(model, x, batch_size=3), float)
    eps = torch.randn(3, 2, 4, 3, dtype=torch.float64)
    draws = vae.encoder_gradient_draws(
        lambda m, x, e: vae.elbo_analytic_kl(m, x, num_samples=2, eps=e).sum(), model, x, eps)
    assert draws.shape == (3, sum(p.numel() for p in model.encoder.parameters()))


def test_gaussian_decoder_learns_its_scale():
    model = _model(x_dim=5, z_dim=2, hidden=(4,), likelihood="gaussian", init_log_scale=-1.0)
    p = model.decode(torch.zeros(2, 2, dtype=torch.float64))
    assert isinstance(p.base_dist, Normal) and torch.allclose(p.base_dist.scale, torch.tensor(math.exp(-1.0)).double())
    vae.loss(model, torch.randn(3, 5, dtype=torch.float64)).backward()
    assert model.log_scale.grad is not None


def test_reparameterize_is_normal_rsample_and_keeps_the_graph():
    mu = torch.randn(4, 3, requires_grad=True)
    sigma = torch.rand(4, 3) + 0.5
    z = vae.reparameterize(mu, sigma, 5, generator=torch.Generator().manual_seed(3))
    from companion.runtime import rng

    with rng(torch.Generator().manual_seed(3)):
        reference = Normal(mu, sigma).rsample((5,))
    assert torch.equal(z, reference)  # the same stream and the same formula, bit for bit
    z.sum().backward()
    assert torch.allclose(mu.grad, torch.full_like(mu, 5.0))
    eps = torch.randn(5, 4, 3)
    assert torch.equal(vae.reparameterize(mu, sigma, 5, eps=eps), mu + sigma * eps)


def test_pathwise_estimate_is_the_reparameterized_elbo():
    # the estimator library's pathwise draws the same eps as reparameterize from one generator
    model = _model(x_dim=6, z_dim=3, hidden=(5,))
    x = _binary(4, 6)
    direct = vae.elbo_analytic_kl(model, x, num_samples=3, generator=torch.Generator().manual_seed(1))
    est = vae.elbo_estimate(model, x, num_samples=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(direct.detach(), est.value)
    g1 = torch.autograd.grad(direct.sum(), list(model.parameters()))
    g2 = torch.autograd.grad(est.surrogate, list(model.parameters()))
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(g1, g2))


def test_training_loss_is_the_pathwise_estimate_without_its_machinery():
    # vae.loss writes the pathwise estimate out (no distribution objects, no sample dimension
    # for one draw): the same draws and, to rounding, the same value and gradient
    model, x = _model(x_dim=6, z_dim=3, hidden=(5,)), _binary(4, 6)
    for s in (1, 3):
        fast = vae.loss(model, x, num_samples=s, generator=torch.Generator().manual_seed(4))
        est = vae.elbo_estimate(model, x, num_samples=s, generator=torch.Generator().manual_seed(4))
        generic = -est.surrogate / x.shape[0]
        assert torch.allclose(fast, generic, rtol=1e-12, atol=1e-12)
        g1 = torch.autograd.grad(fast, list(model.parameters()))
        g2 = torch.autograd.grad(generic, list(model.parameters()))
        assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(g1, g2))


def test_kl_and_likelihood_shortcuts_equal_torch_distributions():
    # floating-point agreement: the closed forms against torch.distributions' own
    torch.manual_seed(0)
    mu, log_sigma = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    prior = Independent(Normal(torch.zeros(3).double(), torch.ones(3).double()), 1)
    reference = kl_divergence(Independent(Normal(mu, log_sigma.exp()), 1), prior)
    assert torch.allclose(vae.kl_standard_normal(mu, log_sigma), reference, rtol=1e-12, atol=1e-12)
    for likelihood in vae.LIKELIHOODS:
        model = _model(x_dim=6, z_dim=3, hidden=(5,), likelihood=likelihood)
        x = _binary(4, 6) if likelihood == "bernoulli" else torch.randn(4, 6, dtype=torch.float64)
        z = torch.randn(7, 4, 3, dtype=torch.float64)
        for zz in (z, z[0]):  # with and without a sample dimension
            assert torch.allclose(model.log_likelihood(zz, x), model.decode(zz).log_prob(x),
                                  rtol=1e-12, atol=1e-12)


def test_one_draw_without_a_sample_dimension_is_the_same_draw():
    mu, sigma = torch.randn(4, 3), torch.rand(4, 3) + 0.5
    one = vae.reparameterize(mu, sigma, None, generator=torch.Generator().manual_seed(6))
    first = vae.reparameterize(mu, sigma, 1, generator=torch.Generator().manual_seed(6))
    assert one.shape == (4, 3) and torch.equal(one, first[0])


@pytest.mark.parametrize("estimator", vae.ESTIMATORS)
def test_generator_makes_estimates_repeat(estimator):
    model, x = _model(x_dim=6, z_dim=3, hidden=(5,)), _binary(4, 6)

    def run():
        return vae.elbo_estimate(model, x, estimator=estimator, num_samples=3,
                                 generator=torch.Generator().manual_seed(5)).value

    assert torch.equal(run(), run())


@pytest.mark.parametrize("estimator", vae.ESTIMATORS)
def test_encoder_gradient_draws_are_one_backward_pass_per_draw(estimator):
    # the vectorized draws against a loop of ordinary backward passes on the same noise
    model, x = _model(x_dim=6, z_dim=3, hidden=(5,)), _binary(4, 6)
    eps = torch.randn(5, 2, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def objective(m, x, e):
        return vae.elbo_estimate(m, x, estimator=estimator, num_samples=2, eps=e).surrogate

    draws = vae.encoder_gradient_draws(objective, model, x, eps)
    params = list(model.encoder.parameters())
    for r in range(5):
        grads = torch.autograd.grad(objective(model, x, eps[r]), params)
        assert torch.allclose(draws[r], torch.cat([g.reshape(-1) for g in grads]), rtol=1e-10, atol=1e-12)


def test_eps_gives_both_estimators_the_same_draws():
    # the same eps: the same z, so the same ELBO value, that of elbo_analytic_kl (float64 rounding)
    model, x = _model(x_dim=6, z_dim=3, hidden=(5,)), _binary(4, 6)
    eps = torch.randn(3, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    reference = vae.elbo_analytic_kl(model, x, num_samples=3, eps=eps).detach()
    for estimator in vae.ESTIMATORS:
        est = vae.elbo_estimate(model, x, estimator=estimator, num_samples=3, eps=eps)
        assert torch.allclose(est.value, reference, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="not both"):
        vae.elbo_estimate(model, x, num_samples=3, eps=eps, generator=torch.Generator())


def test_score_function_keeps_the_decoder_gradient():
    # the decoder's gradient is E_q[grad_theta log p(x | z)] under both estimators: with the
    # same generator both draw the same z, so the decoder gradients are identical
    model, x = _model(x_dim=6, z_dim=3, hidden=(5,)), _binary(4, 6)
    grads = {}
    for estimator in vae.ESTIMATORS:
        est = vae.elbo_estimate(model, x, estimator=estimator, num_samples=3,
                                generator=torch.Generator().manual_seed(2))
        grads[estimator] = torch.autograd.grad(est.surrogate, list(model.decoder.parameters()))
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(*grads.values()))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"z_dim": 0}, "z_dim"),
        ({"x_dim": 2.5}, "x_dim"),
        ({"hidden": [8]}, "hidden"),
        ({"hidden": (8, 0)}, "hidden"),
        ({"likelihood": "poisson"}, "likelihood"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VAEConfig(**kwargs)


def test_bad_arguments_raise():
    model, x = _model(x_dim=6, z_dim=3, hidden=(5,)), _binary(4, 6)
    with pytest.raises(ValueError, match="config"):
        VAE({"z_dim": 2})
    with pytest.raises(ValueError, match="x must have shape"):
        vae.elbo_analytic_kl(model, x[:, :5])
    with pytest.raises(ValueError, match="x must have shape"):
        vae.elbo_estimate(model, x[0])
    with pytest.raises(ValueError, match="z must have"):
        model.decode(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="num_samples"):
        vae.elbo_monte_carlo_kl(model, x, num_samples=0)
    with pytest.raises(ValueError, match="eps must have shape"):
        vae.elbo_analytic_kl(model, x, num_samples=2, eps=torch.zeros(3, 4, 3))
    with pytest.raises(ValueError, match="estimator"):
        vae.elbo_estimate(model, x, estimator="reinforce")
    with pytest.raises(ValueError, match="num_samples >= 2"):
        vae.elbo_estimate(model, x, estimator="score_function", num_samples=1)
    with pytest.raises(ValueError, match="model must be a VAE"):
        vae.elbo_analytic_kl(nn.Linear(6, 6), x)
    with pytest.raises(ValueError, match="batch_size"):
        vae.evaluate_elbo(model, x, batch_size=0)
    objective = lambda m, x, e: vae.elbo_analytic_kl(m, x, eps=e).sum()  # noqa: E731
    with pytest.raises(ValueError, match="eps must have shape"):  # one draw only
        vae.encoder_gradient_draws(objective, model, x, torch.zeros(1, 1, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="eps must have shape"):
        vae.encoder_gradient_draws(objective, model, x, torch.zeros(5, 1, 4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="objective must be callable"):
        vae.encoder_gradient_draws("elbo", model, x, torch.zeros(5, 1, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError):  # Bernoulli's own support check: pixels must be 0 or 1
        vae.elbo_analytic_kl(model, x * 0.5)


# --------------------------------------------------------------------------- exact references


def _linear_gaussian(w=1.5, b=0.3, s=0.7, a=0.2, c=-0.1, d=0.0, e=-0.4):
    """A 1-D VAE with linear networks: z ~ N(0, 1), x | z ~ N(w z + b, s^2),
    q(z | x) = N(a x + c, exp(d x + e)^2). Its log p(x) = log N(x; b, w^2 + s^2) is exact."""
    model = VAE(VAEConfig(x_dim=1, z_dim=1, hidden=(), likelihood="gaussian")).double()
    with torch.no_grad():
        model.decoder[0].weight.fill_(w), model.decoder[0].bias.fill_(b), model.log_scale.fill_(math.log(s))
        f64 = torch.float64
        model.encoder[0].weight.copy_(torch.tensor([[a], [d]], dtype=f64))
        model.encoder[0].bias.copy_(torch.tensor([c, e], dtype=f64))
    return model


def _exact_posterior_encoder(w, b, s):
    # p(z | x) = N(w (x - b) / (w^2 + s^2), s^2 / (w^2 + s^2)): linear in x, so the encoder holds it
    v = w**2 + s**2
    return dict(w=w, b=b, s=s, a=w / v, c=-w * b / v, d=0.0, e=0.5 * math.log(s**2 / v))


X_1D = torch.tensor([[-1.2], [0.0], [0.4], [2.5]], dtype=torch.float64)


def test_linear_gaussian_elbo_is_below_log_evidence_by_the_posterior_kl():
    w, b, s = 1.5, 0.3, 0.7
    model = _linear_gaussian(w, b, s)
    q = model.encode(X_1D).base_dist
    mu, sigma = q.loc[:, 0], q.scale[:, 0]
    x = X_1D[:, 0]
    # closed form: E_q log N(x; w z + b, s^2) = log N(x; w mu + b, s^2) - w^2 sigma^2 / (2 s^2)
    exact_elbo = Normal(w * mu + b, s).log_prob(x) - w**2 * sigma**2 / (2 * s**2) - kl_divergence(q, Normal(0.0, 1.0))[:, 0]
    log_px = torch.as_tensor(stats.norm.logpdf(x.numpy(), b, math.sqrt(w**2 + s**2)))  # scipy, independent
    v = w**2 + s**2
    posterior = Normal(w * (x - b) / v, math.sqrt(s**2 / v))
    # ELBO = log p(x) - KL(q || p(z | x)), to rounding (float64)
    assert torch.allclose(exact_elbo, log_px - kl_divergence(Normal(mu, sigma), posterior), atol=1e-12)
    assert torch.all(exact_elbo < log_px)
    # both Monte Carlo ELBOs are unbiased for it: R repeats of each point, one sample each, the
    # mean within Z standard errors (assert_mc_close)
    reps = 20_000
    xs = X_1D.repeat(reps, 1)
    for fn in (vae.elbo_analytic_kl, vae.elbo_monte_carlo_kl):
        values = fn(model, xs, generator=torch.Generator().manual_seed(0)).detach().reshape(reps, 4)
        assert_mc_close(values, exact_elbo.detach())


def test_linear_gaussian_elbo_equals_log_evidence_at_the_exact_posterior():
    params = _exact_posterior_encoder(1.5, 0.3, 0.7)
    model = _linear_gaussian(**params)
    log_px = torch.as_tensor(stats.norm.logpdf(X_1D[:, 0].numpy(), 0.3, math.sqrt(1.5**2 + 0.7**2)))
    # log p(x, z) - log q(z | x) = log p(x) at every z when q is the posterior: no variance at all
    reps = 20_000
    single = vae.elbo_monte_carlo_kl(model, X_1D.repeat(reps, 1), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(single.detach().reshape(reps, 4), log_px, rtol=0, atol=1e-10)  # float64 rounding
    values = vae.elbo_analytic_kl(model, X_1D.repeat(reps, 1), generator=torch.Generator().manual_seed(1))
    assert_mc_close(values.detach().reshape(reps, 4), log_px)


def _quadrature_elbo_and_evidence(model, x):
    """Exact ELBO(x) and log p(x) of a VAE with a 1-D latent, by Gauss-Hermite quadrature.

    log p(x) = log E_{N(0,1)}[p(x | z)];  ELBO = E_q[log p(x | z)] - KL(q || p), the expectation
    under q = N(mu(x), sigma(x)^2) by quadrature, differentiable in the encoder's parameters."""
    q = model.encode(x).base_dist
    elbos, evidences = [], []
    for i in range(x.shape[0]):
        def log_lik(z, i=i):  # (K,) -> (K,)
            return model.decode(z.unsqueeze(-1)).log_prob(x[i])

        recon = gaussian_expectation(log_lik, q.loc[i, 0], q.scale[i, 0], num_nodes=120)
        elbos.append(recon - kl_divergence(q, Normal(0.0, 1.0))[i, 0])
        zero, one = torch.zeros((), dtype=x.dtype), torch.ones((), dtype=x.dtype)
        evidences.append(gaussian_expectation(lambda z: log_lik(z).exp(), zero, one, num_nodes=120).log())
    return torch.stack(elbos), torch.stack(evidences)


def test_bernoulli_elbo_is_below_log_evidence_by_quadrature():
    model = _smooth_model()
    x = _binary(3, 5, seed=4)
    exact_elbo, log_px = _quadrature_elbo_and_evidence(model, x)
    assert torch.all(exact_elbo < log_px)
    reps = 20_000
    values = vae.elbo_analytic_kl(model, x.repeat(reps, 1), generator=torch.Generator().manual_seed(2))
    assert_mc_close(values.detach().reshape(reps, 3), exact_elbo.detach())


def test_analytic_kl_is_the_expectation_of_the_monte_carlo_kl():
    # with the same generator both draw the same z, so their difference is
    # KL(q || p) - [log q(z | x) - log p(z)], which has mean zero: checked to Z standard errors
    model, reps = _model(1, x_dim=6, z_dim=3, hidden=(5,)), 20_000
    xs = _binary(4, 6).repeat(reps, 1)
    analytic = vae.elbo_analytic_kl(model, xs, generator=torch.Generator().manual_seed(3))
    monte_carlo = vae.elbo_monte_carlo_kl(model, xs, generator=torch.Generator().manual_seed(3))
    diff = (monte_carlo - analytic).detach().reshape(reps, 4)
    assert_mc_close(diff, torch.zeros(4))
    assert torch.all(diff.var(0) > 0.01)  # but the Monte Carlo KL has variance of its own


def _encoder_output_gradient(model, objective):
    """Gradient of ``objective()`` w.r.t. the encoder's output ``h = (mu, log sigma)``: ``(B, 2 z_dim)``.

    The ELBO is a sum over data points and row ``b`` of ``h`` enters only data point ``b``'s
    term, so row ``b`` of this gradient is that data point's own estimate. With the data
    repeated ``R`` times, one backward pass gives ``R`` independent draws per data point. The
    gradient w.r.t. the encoder's weights is this times the encoder's Jacobian, a linear map,
    so agreement here is agreement there."""
    captured = []
    handle = model.encoder.register_forward_hook(lambda module, inputs, out: captured.append(out))
    try:
        value = objective()
    finally:
        handle.remove()
    return torch.autograd.grad(value, captured[0])[0]


def _gradient_draws(model, x, estimator, reps, seed):
    xs = x.repeat(reps, 1)
    g = torch.Generator().manual_seed(seed)
    grad = _encoder_output_gradient(
        model, lambda: vae.elbo_estimate(model, xs, estimator=estimator, num_samples=4, generator=g).surrogate)
    return grad.reshape(reps, x.shape[0], -1)  # (R, B, 2 z_dim)


@pytest.mark.parametrize("estimator", vae.ESTIMATORS)
def test_encoder_gradients_are_unbiased_against_quadrature(estimator):
    # exact: autograd through the quadrature ELBO. Each estimator's mean over R draws is within
    # Z standard errors of it, for each data point and output (6 comparisons)
    model, x = _smooth_model(), _binary(3, 5, seed=4)
    exact = _encoder_output_gradient(model, lambda: _quadrature_elbo_and_evidence(model, x)[0].sum())
    assert_mc_close(_gradient_draws(model, x, estimator, 40_000, seed=7), exact)


def test_pathwise_and_score_function_encoder_gradients_agree():
    # the two estimators against each other on the same model: the difference of their means
    # is within Z standard errors of the difference (independent draws: variances add)
    model, x = _smooth_model(), _binary(3, 5, seed=4)
    a = mc_summary(_gradient_draws(model, x, "pathwise", 40_000, seed=8))
    b = mc_summary(_gradient_draws(model, x, "score_function", 40_000, seed=9))
    assert torch.all((a.mean - b.mean).abs() <= Z * (a.stderr**2 + b.stderr**2).sqrt())
    # and the pathwise one is the less noisy, by far: per-sample variance summed over outputs
    assert torch.all(b.variance.sum(-1) > 2 * a.variance.sum(-1))


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("estimator", vae.ESTIMATORS)
def test_loss_falls_on_a_tiny_problem(estimator):
    # two prototype patterns with 5% bit flips: a latent code that tells them apart beats the
    # best model without one (independent pixels at their empirical frequencies)
    g = torch.Generator().manual_seed(0)
    prototypes = (torch.rand(2, 12, generator=g) > 0.5).float()
    labels = torch.randint(0, 2, (256,), generator=g)
    flips = (torch.rand(256, 12, generator=g) < 0.05).float()
    data = (prototypes[labels] + flips) % 2
    independent = torch.distributions.Bernoulli(probs=data.mean(0)).log_prob(data).sum(1).mean().item()
    torch.manual_seed(0)
    model = VAE(VAEConfig(x_dim=12, z_dim=2, hidden=(16,)))
    before = vae.evaluate_elbo(model, data, generator=torch.Generator().manual_seed(1))
    hist = train(model, partial(vae.loss, estimator=estimator, num_samples=4), data, steps=150,
                 batch_size=32, lr=1e-2, device="cpu", progress=False)
    after = vae.evaluate_elbo(model, data, generator=torch.Generator().manual_seed(1))
    # measured: the loss falls from about 7.5 to 3.4 nats, the ELBO ends about 2 nats above
    # the independent-pixel model (-5.3); margins of 2 and 1 nats are far beyond the noise of
    # a 20-step mean and of a 256-point, 16-sample ELBO
    assert sum(hist.loss[-20:]) / 20 < sum(hist.loss[:20]) / 20 - 2.0
    assert after > before + 2.0 and after > independent + 1.0
