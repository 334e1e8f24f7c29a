"""companion.models.discrete_vae: shapes, the exact ELBO by enumeration, the three estimators.

Monte Carlo tolerances are ``Z = 5`` standard errors of the mean (``helpers.assert_mc_close``);
a squared bias is estimated without its noise floor by :func:`_squared_bias` and compared with
``Z`` standard errors computed across independent groups of samples.
"""
import math

import pytest
import torch
from torch.distributions import OneHotCategorical

from companion.estimators import enumerate_expectation
from companion.models.discrete_vae import (
    ESTIMATORS,
    DiscreteVAE,
    bias_variance,
    elbo_estimate,
    enumerate_elbo,
    kl_to_uniform,
    logit_gradient_samples,
    make_loss,
    one_hot_configurations,
)
from companion.relaxations import sample_gumbel
from companion.train import train
from helpers import Z, assert_mc_close


N, K, D = 2, 3, 6  # a tiny model: K^N = 9 latent values, enumerated exactly


def _tiny(seed: int = 0) -> tuple[DiscreteVAE, torch.Tensor]:
    torch.manual_seed(seed)
    model = DiscreteVAE(D, N, K, hidden=(8,)).double()
    x = (torch.rand(4, D, dtype=torch.float64) > 0.5).double()
    with torch.no_grad():  # sharper encoder logits than the default init, so biases show
        model.encoder[-1].weight.mul_(4.0)
    return model, x


def _log_lik(model, x):
    return lambda z: model.log_likelihood(x, z)


def _exact_logit_gradient(model, x):
    logits = model.encode(x).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(enumerate_elbo(_log_lik(model, x), logits).sum(), logits)
    return logits.detach(), grad


def _squared_bias(samples: torch.Tensor, exact: torch.Tensor):
    bv = bias_variance(samples, exact)
    return bv.squared_bias, bv.squared_bias_stderr


# --------------------------------------------------------------------------- interface


def test_shapes():
    model, x = _tiny()
    g = torch.Generator().manual_seed(0)
    assert model.encode(x).shape == (4, N, K)
    z = one_hot_configurations(N, K, dtype=torch.float64)
    assert z.shape == (K**N, N, K) and torch.all(z.sum(-1) == 1)
    assert len({tuple(r.flatten().tolist()) for r in z}) == K**N  # all distinct
    assert model.decode(z).shape == (K**N, D)
    assert model.log_likelihood(x, z[:4].unsqueeze(0).expand(3, 4, N, K)).shape == (3, 4)
    for estimator in ESTIMATORS:
        est = model.elbo_estimate(x, 3, estimator=estimator, tau=0.5, generator=g)
        assert est.value.shape == (4,) and est.surrogate.dim() == 0
        assert not est.value.requires_grad and est.surrogate.requires_grad
    assert model.discrete_elbo(x, 7, generator=g).shape == (7, 4)
    assert model.enumerate_elbo(x).shape == (4,)
    logits = model.encode(x)
    assert logit_gradient_samples(_log_lik(model, x), logits, 5, 2, estimator="score_function",
                                  generator=g).shape == (5, 4, N, K)
    assert model.reconstruct(x, generator=g).shape == (4, D)
    assert model.sample(6, generator=g).shape == (6, D)


def test_deterministic_under_a_generator():
    model, x = _tiny()
    for estimator in ESTIMATORS:
        a = model.elbo_estimate(x, 3, estimator=estimator, generator=torch.Generator().manual_seed(3))
        b = model.elbo_estimate(x, 3, estimator=estimator, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a.value, b.value)


def test_straight_through_is_hard_forward_and_relaxed_is_not():
    # the straight-through value is log p(x | one-hot z) - KL for the Gumbel-max sample of the same noise
    model, x = _tiny()
    st = model.elbo_estimate(x, 1, estimator="straight_through", tau=0.5, generator=torch.Generator().manual_seed(4))
    hard = model.discrete_elbo(x, 1, generator=torch.Generator().manual_seed(4))[0]
    assert torch.allclose(st.value, hard, atol=1e-12)  # same Gumbel noise: identical up to rounding
    gs = model.elbo_estimate(x, 1, estimator="gumbel_softmax", tau=0.5, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(gs.value, hard)


def test_bad_arguments_raise():
    model, x = _tiny()
    logits = model.encode(x)
    ll = _log_lik(model, x)
    with pytest.raises(ValueError, match="estimator"):
        elbo_estimate(ll, logits, 2, estimator="reinforce")
    with pytest.raises(ValueError, match="tau"):
        elbo_estimate(ll, logits, 2, estimator="gumbel_softmax", tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        elbo_estimate(ll, logits, 2, estimator="gumbel_softmax", tau=-1.0)
    with pytest.raises(ValueError, match="num_samples"):
        elbo_estimate(ll, logits, 1, estimator="score_function")  # leave-one-out needs 2
    with pytest.raises(ValueError, match="num_samples"):
        elbo_estimate(ll, logits, 0, estimator="gumbel_softmax")
    with pytest.raises(ValueError, match="logits"):
        kl_to_uniform(torch.zeros(3, 1))  # K = 1
    with pytest.raises(ValueError, match="log_lik"):
        elbo_estimate(lambda z: z.sum(), logits, 2, estimator="gumbel_softmax")
    with pytest.raises(ValueError, match="x"):
        model.encode(torch.zeros(4, D + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="z"):
        model.decode(torch.zeros(4, N, K + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="n_classes"):
        DiscreteVAE(D, N, 1)
    with pytest.raises(ValueError, match="n_latents"):
        DiscreteVAE(D, 0, K)
    with pytest.raises(ValueError, match="hidden"):
        DiscreteVAE(D, N, K, hidden=(0,))
    with pytest.raises(ValueError, match="max_support"):
        enumerate_elbo(ll, logits, max_support=K**N - 1)
    with pytest.raises(ValueError, match="estimator"):
        make_loss("rebar", num_samples=2)
    with pytest.raises(ValueError, match="num_samples"):
        make_loss("score_function", num_samples=1)


# --------------------------------------------------------------------------- exact references


def test_kl_to_uniform_closed_form():
    logits = torch.randn(5, N, K, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    q = logits.softmax(-1)
    direct = (q * (K * q).log()).sum((-2, -1))  # sum_n sum_k q log(K q)
    assert torch.allclose(kl_to_uniform(logits), direct, atol=1e-12)  # float64 rounding
    assert torch.allclose(kl_to_uniform(torch.zeros(2, N, K)), torch.zeros(2), atol=1e-7)


def test_enumerate_elbo_matches_enumerate_expectation():
    # E_q[log p(x|z) + log p(z) - log q(z|x)] summed by companion.estimators.enumerate_expectation
    model, x = _tiny()
    exact = model.enumerate_elbo(x)
    for b in range(x.shape[0]):
        logits = model.encode(x[b])  # (N, K)
        prior = OneHotCategorical(logits=torch.zeros_like(logits))

        def f(z, b=b, logits=logits):
            log_q = OneHotCategorical(logits=logits).log_prob(z).sum(-1)
            return model.log_likelihood(x[b], z) + prior.log_prob(z).sum(-1) - log_q

        reference = enumerate_expectation(f, OneHotCategorical(logits=logits))
        assert torch.allclose(exact[b], reference, atol=1e-10)  # float64 rounding


def test_elbo_equals_log_evidence_at_the_exact_posterior():
    # with one latent (N = 1) q can equal p(z | x); then ELBO = log p(x) = logsumexp_z log p(x, z)
    torch.manual_seed(2)
    model = DiscreteVAE(D, 1, 4, hidden=(8,)).double()
    x = (torch.rand(3, D, dtype=torch.float64) > 0.5).double()
    z = one_hot_configurations(1, 4, dtype=torch.float64).unsqueeze(1).expand(4, 3, 1, 4)
    log_joint = model.log_likelihood(x, z) - math.log(4)  # (4, 3)
    log_evidence = log_joint.logsumexp(0)
    posterior_logits = log_joint.T.unsqueeze(1)  # (3, 1, 4)
    elbo = enumerate_elbo(_log_lik(model, x), posterior_logits)
    assert torch.allclose(elbo, log_evidence, atol=1e-10)  # float64 rounding
    assert torch.all(model.enumerate_elbo(x) < log_evidence)  # any other q: a strict lower bound


def test_discrete_elbo_and_hard_sample_values_are_unbiased():
    model, x = _tiny()
    exact = model.enumerate_elbo(x).detach()
    assert_mc_close(model.discrete_elbo(x, 40_000, generator=torch.Generator().manual_seed(5)), exact)
    logits = model.encode(x).detach().expand(10_000, *x.shape[:1], N, K)  # 10,000 independent copies
    for estimator in ("straight_through", "score_function"):
        est = elbo_estimate(_log_lik(model, x), logits, 2, estimator=estimator,
                            generator=torch.Generator().manual_seed(6))
        assert_mc_close(est.value, exact)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_logit_gradient_samples_are_one_backward_pass_per_copy(estimator):
    # the vectorized copies against a loop of ordinary backward passes on the same Gumbel noise
    model, x = _tiny()
    logits = model.encode(x).detach()
    gumbels = sample_gumbel((6, 3, *logits.shape), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = logit_gradient_samples(_log_lik(model, x), logits, 6, 3, estimator=estimator, tau=0.5, gumbels=gumbels)
    for c in range(6):
        phi = logits.clone().requires_grad_(True)
        est = elbo_estimate(_log_lik(model, x), phi, 3, estimator=estimator, tau=0.5, gumbels=gumbels[c])
        (ref,) = torch.autograd.grad(est.surrogate, phi)
        assert torch.allclose(grads[c], ref, rtol=1e-10, atol=1e-12)


def test_the_same_gumbels_give_every_estimator_the_same_hard_codes():
    # straight-through and the score function see the same one-hot codes: the same ELBO value
    model, x = _tiny()
    logits = model.encode(x).detach()
    gumbels = sample_gumbel((3, *logits.shape), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    st = elbo_estimate(_log_lik(model, x), logits, 3, estimator="straight_through", gumbels=gumbels)
    sf = elbo_estimate(_log_lik(model, x), logits, 3, estimator="score_function", gumbels=gumbels)
    assert torch.allclose(st.value, sf.value, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="gumbels must have shape"):
        elbo_estimate(_log_lik(model, x), logits, 2, estimator="score_function", gumbels=gumbels)
    with pytest.raises(ValueError, match="gumbels must have shape"):
        logit_gradient_samples(_log_lik(model, x), logits, 2, 3, estimator="score_function", gumbels=gumbels)


def test_score_function_gradient_is_unbiased():
    model, x = _tiny()
    logits, exact = _exact_logit_gradient(model, x)
    grads = logit_gradient_samples(_log_lik(model, x), logits, 40_000, 4, estimator="score_function",
                                   generator=torch.Generator().manual_seed(7))
    assert_mc_close(grads, exact)  # every coordinate within 5 standard errors
    b2, se = _squared_bias(grads, exact)
    assert abs(b2) <= Z * se


def test_score_function_decoder_gradient_is_unbiased():
    # the decoder's gradient (here: its output bias) is E_q[grad log p(x | z)], exact by enumeration
    model, x = _tiny()
    bias = model.decoder[-1].bias
    (exact,) = torch.autograd.grad(model.enumerate_elbo(x).sum(), bias)
    g = torch.Generator().manual_seed(8)
    grads = []
    for _ in range(400):
        est = model.elbo_estimate(x, 2, estimator="score_function", generator=g)
        grads.append(torch.autograd.grad(est.surrogate, bias)[0])
    assert_mc_close(torch.stack(grads), exact)


def test_gumbel_softmax_bias_shrinks_and_variance_grows_as_tau_falls():
    model, x = _tiny()
    logits, exact = _exact_logit_gradient(model, x)
    hi, lo = (bias_variance(logit_gradient_samples(_log_lik(model, x), logits, 40_000, 1,
                                                   estimator="gumbel_softmax", tau=tau,
                                                   generator=torch.Generator().manual_seed(9)), exact)
              for tau in (1.0, 0.1))
    assert hi.squared_bias > Z * hi.squared_bias_stderr  # biased at tau = 1
    # ... and much less so at tau = 0.1
    assert hi.squared_bias - lo.squared_bias > Z * math.hypot(hi.squared_bias_stderr, lo.squared_bias_stderr)
    # noisier at small tau
    assert lo.variance - hi.variance > Z * math.hypot(lo.variance_stderr, hi.variance_stderr)


def test_straight_through_gradient_is_biased():
    model, x = _tiny()
    logits, exact = _exact_logit_gradient(model, x)
    grads = logit_gradient_samples(_log_lik(model, x), logits, 40_000, 1, estimator="straight_through",
                                   tau=1.0, generator=torch.Generator().manual_seed(10))
    b2, se = _squared_bias(grads, exact)
    assert b2 > Z * se


def test_bias_variance_against_a_known_law():
    # g ~ N(exact + b, I_P): squared bias ||b||^2, total variance P; checked to Z standard errors
    gen = torch.Generator().manual_seed(12)
    exact, b = torch.zeros(3, 4, dtype=torch.float64), torch.full((3, 4), 0.1, dtype=torch.float64)
    samples = exact + b + torch.randn(20_000, 3, 4, dtype=torch.float64, generator=gen)
    bv = bias_variance(samples, exact)
    assert abs(bv.squared_bias - 12 * 0.01) <= Z * bv.squared_bias_stderr
    assert abs(bv.variance - 12.0) <= Z * bv.variance_stderr
    unbiased = bias_variance(exact + torch.randn(20_000, 3, 4, dtype=torch.float64, generator=gen), exact)
    assert abs(unbiased.squared_bias) <= Z * unbiased.squared_bias_stderr
    with pytest.raises(ValueError, match="groups"):
        bias_variance(samples[:10], exact)
    with pytest.raises(ValueError, match="exact"):
        bias_variance(samples, exact[0])


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_loss_falls_on_a_tiny_problem(estimator):
    # four distinct 6-pixel patterns; the model must learn to encode which one it sees
    patterns = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1], [1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 1]],
                            dtype=torch.float64)
    data = patterns.repeat(16, 1)
    torch.manual_seed(11)
    model = DiscreteVAE(D, N, K, hidden=(16,)).double()
    before = model.enumerate_elbo(patterns).mean().item()
    taus = []

    def tau(step):
        taus.append(step)
        return 1.0

    history = train(model, make_loss(estimator, num_samples=4, tau=tau), data, steps=300, batch_size=16,
                    lr=1e-2, seed=0, progress=False)
    after = model.enumerate_elbo(patterns).mean().item()
    assert taus == list(range(300))  # the schedule sees the step count
    assert sum(history.loss[-20:]) < sum(history.loss[:20])
    # from ~6 log 2 = 4.2 nats (pixels at chance) towards log 4 = 1.4 (the pattern coded exactly):
    # a gain of one nat is far outside what a model that ignores z could reach (the pixel
    # marginals are all 1/2, so ignoring z leaves the ELBO at -6 log 2)
    assert after > -6 * math.log(2) + 1.0, (before, after)
