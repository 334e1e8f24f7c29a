"""companion.relaxations: Gumbel-max, Gumbel-Softmax, straight-through, schedules, rejection."""
import math

import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch.distributions import Normal, RelaxedOneHotCategorical

from companion.relaxations import (
    exponential_annealing,
    gumbel_max,
    gumbel_softmax,
    log_gumbel_softmax,
    relaxed_log_prob,
    sample_gumbel,
    smoothed_rejection_sample,
    straight_through,
)
from helpers import assert_mc_close

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


@pytest.mark.parametrize("bad", [0.0, -1.0, "1"])
def test_bad_tau_raises(bad):
    with pytest.raises(ValueError, match="tau"):
        gumbel_softmax(LOGITS, bad)


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
