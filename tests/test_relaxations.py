"""companion.relaxations: Gumbel-max, Gumbel-Softmax, straight-through, schedules, rejection."""
import math

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch.distributions import Distribution, Normal, RelaxedOneHotCategorical

from companion.relaxations import (
    exponential_annealing,
    gumbel_max,
    gumbel_softmax,
    gumbel_softmax_gradient_limits,
    gumbel_softmax_gradient_samples,
    log_gumbel_softmax,
    relaxed_log_prob,
    sample_gumbel,
    smoothed_rejection_sample,
    straight_through,
)

LOGITS = torch.tensor([1.0, -0.5, 0.2, 2.0, -1.5], dtype=torch.float64)


def test_gumbel_max_samples_the_categorical_exactly():
    # chi-square goodness of fit of 100k Gumbel-max draws against softmax(logits); seeded
    g = torch.Generator().manual_seed(0)
    idx = gumbel_max(LOGITS.expand(100_000, 5), generator=g)
    counts = torch.bincount(idx, minlength=5).double()
    expected = 100_000 * F.softmax(LOGITS, -1)
    assert scipy.stats.chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


def test_gumbel_softmax_equals_torch():
    logits = torch.randn(4, 6)
    for hard in (False, True):
        torch.manual_seed(7)
        ref = F.gumbel_softmax(logits, tau=0.4, hard=hard)
        torch.manual_seed(7)
        assert torch.equal(gumbel_softmax(logits, 0.4, hard=hard), ref)


def test_gumbel_softmax_argmax_is_gumbel_max_and_tends_to_one_hot():
    gumbels = sample_gumbel((1000, 5), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    logits = LOGITS.expand(1000, 5)
    y = gumbel_softmax(logits, 0.05, gumbels=gumbels)
    assert torch.equal(y.argmax(-1), gumbel_max(logits, gumbels=gumbels))
    assert torch.allclose(y.sum(-1), torch.ones(1000, dtype=torch.float64))
    assert y.max(-1).values.mean() > 0.95
    assert gumbel_softmax(logits, 100.0, gumbels=gumbels).max(-1).values.max() < 0.3  # near uniform


def test_gumbel_softmax_has_the_law_of_torch_relaxed_categorical():
    # a coordinate of y: KS test against samples of torch's RelaxedOneHotCategorical
    torch.manual_seed(2)
    ours = gumbel_softmax(LOGITS.expand(20_000, 5), 0.7)[:, 3]
    theirs = RelaxedOneHotCategorical(torch.tensor(0.7, dtype=torch.float64), logits=LOGITS).sample((20_000,))[:, 3]
    assert scipy.stats.ks_2samp(ours.numpy(), theirs.numpy()).pvalue > 1e-3


def test_straight_through_is_one_hot_forward_soft_backward():
    logits = LOGITS.clone().requires_grad_()
    gumbels = sample_gumbel((5,), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = gumbel_softmax(logits, 0.5, hard=True, gumbels=gumbels)
    assert sorted(y.tolist()) == [0.0, 0.0, 0.0, 0.0, 1.0]
    w = torch.arange(5.0, dtype=torch.float64)
    (g_hard,) = torch.autograd.grad((w * y).sum(), logits)
    logits2 = LOGITS.clone().requires_grad_()
    (g_soft,) = torch.autograd.grad((w * gumbel_softmax(logits2, 0.5, gumbels=gumbels)).sum(), logits2)
    assert torch.allclose(g_hard, g_soft)
    assert torch.equal(straight_through(torch.tensor([0.2, 0.5, 0.3])), torch.tensor([0.0, 1.0, 0.0]))


def test_relaxed_log_prob_finite_at_tiny_tau_and_matches_torch_density():
    gumbels = sample_gumbel((200, 5), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    log_y = log_gumbel_softmax(LOGITS.expand(200, 5), 1e-3, gumbels=gumbels)
    assert (log_y.exp() == 0).any()  # y itself underflows ...
    lp = relaxed_log_prob(log_y, LOGITS, 1e-3)
    assert torch.isfinite(lp).all()  # ... its log-space density does not
    # at a moderate tau, density of y = density of log y - sum log y (change of variables)
    y = gumbel_softmax(LOGITS.expand(200, 5), 0.8, gumbels=gumbels)
    ref = RelaxedOneHotCategorical(torch.tensor(0.8, dtype=torch.float64), logits=LOGITS).log_prob(y)
    assert torch.allclose(relaxed_log_prob(y.log(), LOGITS, 0.8) - y.log().sum(-1), ref)


def test_relaxed_log_prob_is_normalized_for_two_categories():
    # for K = 2 the sample is y = (y1, 1 - y1); the density of y1 is p(log y) / (y1 y2), and with
    # y1 = sigmoid(d) its integral over (0, 1) is an integral over d with dy1 = y1 (1 - y1) dd
    tau = 0.5
    logits = torch.tensor([0.3, -0.4], dtype=torch.float64)
    d = torch.linspace(-60, 60, 200_001, dtype=torch.float64)
    log_y = torch.stack([F.logsigmoid(d), F.logsigmoid(-d)], -1)
    y1 = torch.sigmoid(d)
    dens_y1 = (relaxed_log_prob(log_y, logits, tau) - log_y.sum(-1)).exp()
    integral = torch.trapezoid(dens_y1 * y1 * (1 - y1), d)
    assert integral.item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, "1", True, math.nan, math.inf, np.array([0.5]), np.float32(-0.5),
                                 torch.tensor(0.0), torch.tensor([0.5, -0.1]), torch.tensor(True), None])
def test_bad_tau_raises(bad):
    with pytest.raises(ValueError, match="tau"):
        gumbel_softmax(LOGITS, bad)


@pytest.mark.parametrize("tau", [0.5, 2, np.float32(0.5), np.float64(0.5), np.int64(2), np.array(0.5),
                                 torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float32), torch.tensor(2)])
def test_tau_may_be_a_numpy_scalar_or_a_0d_tensor(tau):
    gumbels = sample_gumbel(LOGITS.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = torch.softmax((LOGITS + gumbels) / float(tau), -1)
    assert torch.allclose(gumbel_softmax(LOGITS, tau, gumbels=gumbels), ref, rtol=1e-6)  # float32 tau: 1e-7
    assert torch.isfinite(log_gumbel_softmax(LOGITS, tau, gumbels=gumbels)).all()
    assert torch.isfinite(relaxed_log_prob(ref.log(), LOGITS, tau))


@pytest.mark.parametrize("logits", [torch.empty(0), torch.empty(3, 0), torch.tensor(1.0)])
def test_empty_class_dimension_is_a_value_error(logits):
    for call in [lambda: gumbel_max(logits), lambda: gumbel_softmax(logits, 0.5),
                 lambda: gumbel_softmax(logits, 0.5, hard=True), lambda: log_gumbel_softmax(logits, 0.5),
                 lambda: straight_through(logits),
                 lambda: gumbel_softmax_gradient_samples(lambda y: y.sum(-1), logits, 0.5, 3)]:
        with pytest.raises(ValueError, match="last dimension"):
            call()


NAN_LOGITS = torch.tensor([[0.1, math.nan, 0.3], [0.2, 0.1, 0.0]], dtype=torch.float64)


def test_nan_logits_raise_while_validation_is_on():
    assert Distribution._validate_args  # torch's default (off only under python -O)
    for call in [lambda: gumbel_max(NAN_LOGITS), lambda: gumbel_softmax(NAN_LOGITS, 0.5),
                 lambda: log_gumbel_softmax(NAN_LOGITS, 0.5),
                 lambda: relaxed_log_prob(torch.zeros(2, 3, dtype=torch.float64), NAN_LOGITS, 0.5),
                 lambda: gumbel_softmax_gradient_samples(lambda y: y.sum((-2, -1)), NAN_LOGITS, 0.5, 3)]:
        with pytest.raises(ValueError, match="NaN"):
            call()


def test_nan_check_costs_nothing_when_validation_is_off(monkeypatch):
    # with validation off there is no check at all on the hot path: torch.isnan is never called,
    # and NaN logits give NaN samples (the user's choice, as for torch's distributions)
    previous = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        def no_isnan(*args, **kwargs):
            raise AssertionError("torch.isnan called with validation off")

        monkeypatch.setattr(torch, "isnan", no_isnan)
        y = gumbel_softmax(NAN_LOGITS, 0.5, generator=torch.Generator().manual_seed(2))
        gumbel_max(NAN_LOGITS, generator=torch.Generator().manual_seed(2))
        monkeypatch.undo()
        assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()
    finally:
        Distribution.set_default_validate_args(previous)


def test_gumbels_shape_is_checked():
    with pytest.raises(ValueError, match="gumbels"):
        gumbel_max(LOGITS, gumbels=torch.zeros(3))


def test_exponential_annealing():
    assert exponential_annealing(0, 1e-3) == 1.0
    assert exponential_annealing(1000, 1e-3, tau_min=0.1) == pytest.approx(math.exp(-1))
    assert exponential_annealing(10**6, 1e-3) == 0.5
    assert exponential_annealing(10**6, 1e-3, tau0=2.0, tau_min=0.1) == 0.1
    with pytest.raises(ValueError, match="rate"):
        exponential_annealing(10, -1.0)


# --------------------------------------------------------------------------- rejection sampling


def _target(theta):
    return lambda x: Normal(theta, 1.0).log_prob(x)


PROPOSAL = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64))
# sup_x N(x; theta, 1) / N(x; 0, 9) = 3 exp(theta^2 / 16) for |theta| small; add a margin
LOG_M = math.log(3.0) + 0.1


def test_hard_rejection_sampler_is_exact():
    theta = torch.tensor(0.7, dtype=torch.float64)
    draw = smoothed_rejection_sample(_target(theta), PROPOSAL, LOG_M, 64, 0.0, (20_000,),
                                     generator=torch.Generator().manual_seed(5))
    assert torch.allclose(draw.weights.sum(-1), torch.ones(20_000, dtype=torch.float64))
    assert set(draw.weights.unique().tolist()) <= {0.0, 1.0}
    assert scipy.stats.kstest(draw.sample.numpy(), scipy.stats.norm(0.7, 1.0).cdf).pvalue > 1e-3


def test_smoothed_sampler_gradient_matches_finite_differences():
    # common random numbers: the same generator seed for theta +- h
    def mean_sample(theta, tau):
        d = smoothed_rejection_sample(_target(theta), PROPOSAL, LOG_M, 32, tau, (4000,),
                                      generator=torch.Generator().manual_seed(6))
        return d.sample.mean()

    theta = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(mean_sample(theta, 0.1), theta)
    h = 1e-5
    with torch.no_grad():
        fd = (mean_sample(theta + h, 0.1) - mean_sample(theta - h, 0.1)) / (2 * h)
    assert grad.item() == pytest.approx(fd.item(), rel=1e-5)


def test_rejection_sampler_arguments():
    with pytest.raises(ValueError, match="num_proposals"):
        smoothed_rejection_sample(_target(0.0), PROPOSAL, LOG_M, 0, 0.1)
    with pytest.raises(ValueError, match="tau"):
        smoothed_rejection_sample(_target(0.0), PROPOSAL, LOG_M, 8, -0.1)


# --------------------------------------------------------------------------- gradient diagnostics

K3_LOGITS = torch.tensor([0.4, -0.2, 0.1], dtype=torch.float64)
TARGET = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)


def _cubic(y):
    return ((y - TARGET) ** 2).sum(-1) ** 1.5


def _quadratic(y):
    return ((y - TARGET) ** 2).sum(-1)


def _exact_gradient(f, logits):
    from torch.distributions import OneHotCategorical

    from companion.estimators import enumerate_expectation

    theta = logits.clone().requires_grad_()
    return torch.autograd.grad(enumerate_expectation(f, OneHotCategorical(logits=theta)), theta)[0]


def test_gradient_samples_interface():
    g = torch.Generator().manual_seed(10)
    grads = gumbel_softmax_gradient_samples(_cubic, K3_LOGITS, 0.5, 7, generator=g)
    assert grads.shape == (7, 3) and not grads.requires_grad
    again = gumbel_softmax_gradient_samples(_cubic, K3_LOGITS, 0.5, 7, generator=torch.Generator().manual_seed(10))
    assert torch.equal(grads, again)
    assert torch.allclose(grads.sum(-1), torch.zeros(7, dtype=torch.float64), atol=1e-12)  # softmax: shift-invariant
    with pytest.raises(ValueError, match="num_samples"):
        gumbel_softmax_gradient_samples(_cubic, K3_LOGITS, 0.5, 0)
    with pytest.raises(ValueError, match="f must map"):
        gumbel_softmax_gradient_samples(lambda y: y.sum(), K3_LOGITS, 0.5, 4)
    with pytest.raises(ValueError, match="tau"):
        gumbel_softmax_gradient_samples(_cubic, K3_LOGITS, -1.0, 4)


def test_gradient_samples_gumbels_shape_and_chunks():
    gumbels = sample_gumbel((6, 3), generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    whole = gumbel_softmax_gradient_samples(_cubic, K3_LOGITS, 0.3, 6, gumbels=gumbels)
    chunked = gumbel_softmax_gradient_samples(_cubic, K3_LOGITS, 0.3, 6, gumbels=gumbels, chunk_size=4)
    assert torch.allclose(whole, chunked, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="gumbels must have shape"):
        gumbel_softmax_gradient_samples(_cubic, K3_LOGITS, 0.3, 5, gumbels=gumbels)
    with pytest.raises(ValueError, match="f must be callable"):
        gumbel_softmax_gradient_samples("f", K3_LOGITS, 0.3, 5)


def test_gradient_samples_match_one_autograd_pass_through_gumbel_softmax():
    # the per-sample gradients are those of f(gumbel_softmax(logits, tau, gumbels=G_s)) one at a time
    gumbels = sample_gumbel((5, 3), generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    for hard in (False, True):
        grads = gumbel_softmax_gradient_samples(_cubic, K3_LOGITS, 0.3, 5, hard=hard, gumbels=gumbels)
        for s in range(5):
            theta = K3_LOGITS.clone().requires_grad_()
            y = gumbel_softmax(theta, 0.3, hard=hard, gumbels=gumbels[s])
            (ref,) = torch.autograd.grad(_cubic(y[None]).sum(), theta)
            assert torch.allclose(grads[s], ref, rtol=1e-12, atol=1e-15)


def test_gradient_samples_agree_with_torch_relaxed_categorical_pathwise():
    # agreement: our mean vs companion.estimators' pathwise gradient through torch's
    # RelaxedOneHotCategorical (different noise), within Z standard errors of the difference
    from companion.estimators import gradient_samples

    n, tau = 100_000, 0.5
    ours = gumbel_softmax_gradient_samples(_cubic, K3_LOGITS, tau, n, generator=torch.Generator().manual_seed(12))
    t = torch.tensor(tau, dtype=torch.float64)
    theirs = gradient_samples("pathwise", _cubic, lambda l: RelaxedOneHotCategorical(t, logits=l), (K3_LOGITS,), n,
                              generator=torch.Generator().manual_seed(13))[0]
    se = ((ours.var(0) + theirs.var(0)) / n).sqrt()
    assert torch.all((ours.mean(0) - theirs.mean(0)).abs() <= 5 * se)


def test_limits_mean_is_the_exact_gradient_and_straight_through_the_trapezoid_rule():
    exact = _exact_gradient(_cubic, K3_LOGITS)
    soft = gumbel_softmax_gradient_limits(_cubic, K3_LOGITS)
    assert torch.allclose(soft.mean, exact, rtol=1e-10, atol=1e-14)  # Gauss-Legendre, smooth integrand
    hard = gumbel_softmax_gradient_limits(_cubic, K3_LOGITS, hard=True)
    assert (hard.mean - exact).abs().max() > 1e-2  # cubic f: the trapezoid rule is off
    hard_q = gumbel_softmax_gradient_limits(_quadratic, K3_LOGITS, hard=True)
    assert torch.allclose(hard_q.mean, _exact_gradient(_quadratic, K3_LOGITS), rtol=1e-12)  # exact for quadratics
    for lim in (soft, hard, hard_q):
        m = lim.scaled_second_moment
        assert torch.allclose(m, m.T) and torch.linalg.eigvalsh(m).min() > -1e-12
        assert torch.allclose(m.sum(-1), torch.zeros(3, dtype=torch.float64), atol=1e-12)


def test_linear_f_gives_the_closed_form_constant():
    # f(y) = c . y: h_ij = c_i - c_j is constant and int_0^1 s (1 - s) ds = 1/6
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    lim = gumbel_softmax_gradient_limits(lambda y: y @ c, K3_LOGITS)
    p = F.softmax(K3_LOGITS, -1)
    ref = sum(p[i] * p[j] * (c[i] - c[j]) ** 2 / 6 * 2 for i in range(3) for j in range(i + 1, 3))
    assert lim.scaled_second_moment.trace().item() == pytest.approx(ref.item(), rel=1e-12)


@pytest.mark.parametrize("hard", [False, True])
def test_small_tau_variance_matches_the_limit(hard):
    # tau Var[g_tau] -> the limit; at tau = 0.002 the O(tau) correction is far below the Monte Carlo
    # error, whose standard error comes from the 4th moment of the per-sample squared norm
    n, tau = 200_000, 0.002
    grads = gumbel_softmax_gradient_samples(_quadratic, K3_LOGITS, tau, n, hard=hard,
                                            generator=torch.Generator().manual_seed(14))
    centred = grads - grads.mean(0)
    sq = tau * (centred**2).sum(-1)  # per-sample contribution to tau trace Cov
    limit = gumbel_softmax_gradient_limits(_quadratic, K3_LOGITS, hard=hard).scaled_second_moment.trace()
    assert abs(sq.mean().item() - limit.item()) <= 5 * sq.std().item() / math.sqrt(n)


def test_limits_arguments():
    with pytest.raises(ValueError, match="logits"):
        gumbel_softmax_gradient_limits(_cubic, K3_LOGITS[None])
    with pytest.raises(ValueError, match="num_nodes"):
        gumbel_softmax_gradient_limits(_cubic, K3_LOGITS, num_nodes=1)


def test_nan_check_works_inside_vmap():
    # the check uses torch._is_any_true, like torch.distributions' validation, so that a program
    # vectorized with torch.func.vmap keeps it
    def program(logits, gumbels):
        return gumbel_softmax(logits, 0.5, gumbels=gumbels).sum()

    gumbels = sample_gumbel((4, 3), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.func.vmap(program)(NAN_LOGITS[1].expand(4, 3).clone(), gumbels).shape == (4,)
    bad = NAN_LOGITS[1].expand(4, 3).clone()
    bad[2, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        torch.func.vmap(program)(bad, gumbels)
