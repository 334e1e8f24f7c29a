"""companion.models.concrete_dropout: relaxed masks, regularizers, the regressor, MC dropout."""
import math

import pytest
import scipy.integrate
import scipy.stats
import torch
from torch import nn
from torch.distributions import Normal, RelaxedBernoulli

from companion import data
from companion.models.concrete_dropout import (
    TEMPERATURE,
    ConcreteDropout,
    ConcreteDropoutRegressor,
    dropout_regularizer,
    fit_regressor,
    mc_predict,
    region_spread,
    regression_loss,
    regularizer_coefficients,
    relaxed_drop_mask,
    weight_regularizer,
)
from helpers import Z, assert_mc_close

F64 = torch.float64


def _logit(p: float) -> torch.Tensor:
    return torch.tensor(math.log(p) - math.log1p(-p), dtype=F64)


def _exact_mask_mean(p: float, t: float) -> float:
    """E[z] = int_0^1 sigmoid((logit p + logit u) / t) du, by adaptive quadrature (scipy)."""
    a = math.log(p) - math.log1p(-p)
    value, _ = scipy.integrate.quad(
        lambda u: 1 / (1 + math.exp(-(a + math.log(u) - math.log1p(-u)) / t)), 0, 1,
        points=[1 / (1 + math.exp(a))], limit=200, epsabs=1e-13, epsrel=1e-12)
    return value


def _exact_mask_mean_derivative(p: float, t: float) -> float:
    """d/dlogit_p E[z] = E[z (1 - z) / t], by quadrature."""
    a = math.log(p) - math.log1p(-p)

    def dz(u):
        z = 1 / (1 + math.exp(-(a + math.log(u) - math.log1p(-u)) / t))
        return z * (1 - z) / t

    value, _ = scipy.integrate.quad(dz, 0, 1, points=[1 / (1 + math.exp(a))], limit=200,
                                    epsabs=1e-13, epsrel=1e-12)
    return value


# --------------------------------------------------------------------------- the relaxed mask


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.8])
def test_mask_is_torch_relaxed_bernoulli_for_the_same_noise(p):
    # torch's RelaxedBernoulli.rsample draws u = torch.rand(shape) and returns
    # sigmoid((logit p + log u - log(1 - u)) / t): the same formula, so the same sample up to
    # float64 rounding (torch clamps u and p away from 0 and 1 by eps ~ 1e-15)
    logit_p = _logit(p)
    torch.manual_seed(3)
    theirs = RelaxedBernoulli(torch.tensor(TEMPERATURE, dtype=F64), logits=logit_p).rsample((4000,))
    torch.manual_seed(3)
    u = torch.rand(4000, dtype=F64)
    ours = relaxed_drop_mask(logit_p, (4000,), u=u)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
def test_keep_mask_mean_is_one_minus_p_up_to_order_t_squared(p):
    g = torch.Generator().manual_seed(0)
    n = 400_000
    # the keep mask 1 - z has mean 1 - E[z]; E[z] by quadrature (scipy), checked within
    # Z standard errors of the Monte Carlo mean
    keep = 1 - relaxed_drop_mask(_logit(p), (n,), generator=g)
    assert_mc_close(keep, 1 - _exact_mask_mean(p, TEMPERATURE))
    # E[z] - p = -(pi^2 / 6) t^2 f'(-logit p) + O(t^4), f the logistic density, f' = f (1 - 2 sigmoid):
    # the Taylor expansion of the density around the threshold; at t = 0.1 the bias is < 0.002
    a = math.log(p) - math.log1p(-p)
    s = 1 / (1 + math.exp(a))  # sigmoid(-a)
    f_prime = s * (1 - s) * (1 - 2 * s)
    relative = []
    for t in (0.1, 0.05):
        bias = _exact_mask_mean(p, t) - p
        leading = -(math.pi**2 / 6) * t**2 * f_prime
        relative.append(abs(bias - leading) / abs(leading))
        assert abs(bias) < 0.002
    # the neglected terms are O(t^4), a relative O(t^2): below 5% at t = 0.1, and halving t
    # divides the mismatch by about four (1/4 + O(t^2))
    assert relative[0] < 0.05 and 0.2 < relative[1] / relative[0] < 0.3, relative
    # at a small temperature the bias is far below the standard error: the mean is 1 - p
    keep_cold = 1 - relaxed_drop_mask(_logit(p), (n,), temperature=0.01, generator=g)
    assert_mc_close(keep_cold, 1 - p)


def test_mask_tends_to_a_hard_bernoulli_mask_as_t_goes_to_zero():
    g = torch.Generator().manual_seed(1)
    p, n = 0.3, 200_000
    u = torch.rand(n, generator=g, dtype=F64)
    hard = (_logit(p) + u.log() - (-u).log1p() > 0).to(F64)
    # the hard indicator is Bernoulli(p) exactly: a binomial test
    assert scipy.stats.binomtest(int(hard.sum()), n, p).pvalue > 1e-3
    gaps = []
    for t in (1.0, 0.1, 0.01, 0.001):
        z = relaxed_drop_mask(_logit(p), (n,), temperature=t, u=u)
        gaps.append((z - hard).abs().mean().item())
        # E|z - hard| = t * 2 log 2 * f(logit p) + O(t^2) <= t * log(2) / 2
        assert gaps[-1] <= t * math.log(2) / 2 + 5 * math.sqrt(t / n)
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-3


def test_pathwise_gradient_of_the_mask_mean_is_unbiased():
    # d/dlogit_p E[z]: per-sample pathwise gradients z (1 - z) / t, their mean against quadrature
    g = torch.Generator().manual_seed(2)
    p, n = 0.2, 400_000
    logit_p = _logit(p).expand(n).clone().requires_grad_(True)  # one copy per sample
    z = relaxed_drop_mask(logit_p, (n,), generator=g)
    (grads,) = torch.autograd.grad(z.sum(), logit_p)
    assert_mc_close(grads, _exact_mask_mean_derivative(p, TEMPERATURE))
    # and that derivative is close to d p / d logit_p = p (1 - p), the hard mask's
    assert abs(_exact_mask_mean_derivative(p, TEMPERATURE) - p * (1 - p)) < 0.01


def test_gradient_reaches_logit_p_and_matches_finite_differences():
    torch.manual_seed(0)
    layer = ConcreteDropout(nn.Linear(5, 3).double(), weight_coefficient=1e-3, dropout_coefficient=1e-2,
                            p_init=0.3)
    x = torch.randn(64, 5, dtype=F64)
    u = torch.rand(64, 5, dtype=F64)  # common random numbers for every evaluation

    def objective(logit_p):
        with torch.no_grad():
            layer.logit_p.copy_(logit_p)
        return (layer(x, u=u) ** 2).mean() + layer.regularization()

    base = layer.logit_p.detach().clone()
    loss = objective(base)
    loss.backward()
    grad = layer.logit_p.grad.item()
    h = 1e-5
    fd = (objective(base + h).item() - objective(base - h).item()) / (2 * h)
    # central difference: truncation error O(h^2 f''') ~ 1e-10, rounding ~ 1e-16 / h ~ 1e-11
    assert grad != 0 and abs(grad - fd) <= 1e-7 * max(1.0, abs(fd))
    assert all(q.grad is not None for q in layer.layer.parameters())


# --------------------------------------------------------------------------- regularizers


def test_regularizer_values_by_hand():
    layer = nn.Linear(3, 2).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]))
        layer.bias.copy_(torch.tensor([0.5, -0.5]))
    p = torch.tensor(0.2, dtype=F64)
    # ||W||^2 = 1 + 4 + 0.25 + 9 + 1 = 15.25; 0.01 * 15.25 / 0.8 = 0.190625
    assert weight_regularizer(layer.weight, p, 0.01).item() == pytest.approx(0.190625, abs=1e-15)
    # 0.2 ln 0.2 + 0.8 ln 0.8 = -0.3218875825 - 0.1785148410 = -0.5004024235; times 0.5 * 3
    assert dropout_regularizer(p, 3, 0.5).item() == pytest.approx(-0.7506036353, abs=1e-10)
    cd = ConcreteDropout(layer, weight_coefficient=0.01, dropout_coefficient=0.5, p_init=0.2)
    # plus the bias term 0.01 * (0.25 + 0.25) = 0.005
    assert cd.regularization().item() == pytest.approx(0.190625 + 0.005 - 0.7506036353, abs=1e-7)
    # the paper's coefficients: l^2 / (tau N) and 2 / (tau N)
    assert regularizer_coefficients(100, 1e-2) == pytest.approx((1e-6, 0.02), rel=1e-12)
    assert regularizer_coefficients(100, 1e-2, precision=4.0) == pytest.approx((2.5e-7, 0.005), rel=1e-12)


def test_the_dropout_term_pushes_p_towards_one_half_with_a_force_falling_like_one_over_n():
    grads = {}
    for n in (50, 500):
        model = ConcreteDropoutRegressor(n, hidden=(8, 8))
        layer = model.dropped[0]
        (g,) = torch.autograd.grad(dropout_regularizer(layer.p, 8, layer.dropout_coefficient), layer.logit_p)
        grads[n] = g.item()
    # d/dlogit p [p log p + (1-p) log(1-p)] = p (1 - p) logit p < 0 at p = 0.1: descent raises p
    assert grads[50] < 0
    assert grads[50] / grads[500] == pytest.approx(10.0, rel=1e-5)


# --------------------------------------------------------------------------- the regressor


def test_shapes_and_determinism():
    model = ConcreteDropoutRegressor(20, hidden=(16, 8))
    x = torch.linspace(-1, 1, 7).unsqueeze(1)
    assert model(x).shape == (7, 1)
    assert len(model.drop_rates()) == 2 and model.drop_rates()[0] == pytest.approx(0.1)
    a = mc_predict(model, x, 50, generator=torch.Generator().manual_seed(0))
    b = mc_predict(model, x, 50, generator=torch.Generator().manual_seed(0))
    assert a.samples.shape == (50, 7) and a.mean.shape == a.std.shape == a.total_std.shape == (7,)
    assert torch.equal(a.samples, b.samples)
    assert torch.allclose(a.mean, a.samples.mean(0)) and torch.allclose(a.std, a.samples.std(0))
    assert torch.allclose(a.total_std**2, a.std**2 + model.sigma.detach() ** 2)
    assert not a.samples.requires_grad


def test_regression_loss_is_twice_the_mean_nll_plus_the_regularizers():
    model = ConcreteDropoutRegressor(10, hidden=(4,))
    x, y = torch.randn(10, 1), torch.randn(10, 1)
    torch.manual_seed(5)
    loss = regression_loss(model, (x, y))
    torch.manual_seed(5)
    f = model(x)
    expected = 2 * -Normal(f, model.sigma).log_prob(y).mean() + model.regularization()
    assert torch.allclose(loss, expected)


def test_loss_falls_on_a_tiny_problem():
    x, y = data.gapped_sine(32, noise=0.1, generator=torch.Generator().manual_seed(0))
    model, history = fit_regressor(x, y, hidden=(16, 16), steps=300, seed=0, record_every=100,
                                   progress=False)
    first, last = sum(history.loss[:20]) / 20, sum(history.loss[-20:]) / 20
    # over seeds 0-4 the mean loss of the last 20 steps is 1.6 to 2.4 below that of the first 20
    assert last < first - 1.0, (first, last)
    assert [e["step"] for e in history.evals] == [100, 200, 300]
    assert set(history.evals[0]) == {"step", "p0", "p1", "sigma"}
    # a pure function of the data and the seed
    again, history_again = fit_regressor(x, y, hidden=(16, 16), steps=300, seed=0, progress=False)
    assert history_again.loss == history.loss and again.drop_rates() == model.drop_rates()


def test_region_spread_and_its_standard_error():
    # passes f_t(x) ~ N(0, s_x^2), independent: rms_std estimates sqrt(mean s_x^2)
    g = torch.Generator().manual_seed(0)
    s_x = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=F64)
    region = torch.tensor([True, True, True, False])
    estimates, stderrs = [], []
    for _ in range(400):
        samples = torch.randn(200, 4, generator=g, dtype=F64) * s_x
        r = region_spread(samples, region)
        estimates.append(r.rms_std)
        stderrs.append(r.stderr)
    estimates, stderrs = torch.tensor(estimates), torch.tensor(stderrs)
    exact = s_x[:3].pow(2).mean().sqrt()
    # the mean of 400 estimates within Z standard errors (bias of sqrt is O(1/T), far smaller)
    assert_mc_close(estimates, exact)
    # the reported standard error matches the spread of the estimates: the sample sd of 400
    # values has relative standard error 1/sqrt(2 * 399) = 0.035; Z of them is 0.18
    assert abs(estimates.std() / stderrs.mean() - 1) < Z / math.sqrt(2 * 399)


def test_spread_grows_outside_the_data():
    # trained on x in [-4, -1.5] u [1.5, 4]: the MC-dropout spread for 4.5 < |x| < 5.5 exceeds that
    # for 1.75 < |x| < 3.75 by more than Z standard errors of the difference (T passes)
    x, y = data.gapped_sine(40, noise=0.3, generator=torch.Generator().manual_seed(1))
    model, _ = fit_regressor(x, y, steps=500, seed=1, progress=False)
    grid = torch.linspace(-6, 6, 121).unsqueeze(1)
    a = grid[:, 0].abs()
    pred = mc_predict(model, grid, 1000, generator=torch.Generator().manual_seed(2))
    inside = region_spread(pred.samples, (a > 1.75) & (a < 3.75))
    outside = region_spread(pred.samples, (a > 4.5) & (a < 5.5))
    assert outside.rms_std - inside.rms_std > Z * math.hypot(outside.stderr, inside.stderr)


# --------------------------------------------------------------------------- bad arguments


def test_bad_arguments_raise():
    logit_p = _logit(0.1)
    with pytest.raises(ValueError, match="temperature"):
        relaxed_drop_mask(logit_p, (3,), temperature=0.0)
    with pytest.raises(ValueError, match="u must have shape"):
        relaxed_drop_mask(logit_p, (3,), u=torch.rand(4))
    with pytest.raises(ValueError, match="p_init"):
        ConcreteDropout(nn.Linear(2, 2), weight_coefficient=0.0, dropout_coefficient=0.0, p_init=1.0)
    with pytest.raises(ValueError, match="layer"):
        ConcreteDropout(nn.ReLU(), weight_coefficient=0.0, dropout_coefficient=0.0)
    with pytest.raises(ValueError, match="weight_coefficient"):
        ConcreteDropout(nn.Linear(2, 2), weight_coefficient=-1.0, dropout_coefficient=0.0)
    with pytest.raises(ValueError, match="x must have shape"):
        ConcreteDropout(nn.Linear(2, 2), weight_coefficient=0.0, dropout_coefficient=0.0)(torch.ones(3, 5))
    with pytest.raises(ValueError, match="n_data"):
        regularizer_coefficients(0, 1e-2)
    with pytest.raises(ValueError, match="length_scale"):
        regularizer_coefficients(10, -1.0)
    with pytest.raises(ValueError, match="hidden"):
        ConcreteDropoutRegressor(10, hidden=())
    model = ConcreteDropoutRegressor(10, hidden=(4,))
    with pytest.raises(ValueError, match="num_passes"):
        mc_predict(model, torch.zeros(3, 1), 1)
    with pytest.raises(ValueError, match="x must have shape"):
        mc_predict(model, torch.zeros(3), 10)
    with pytest.raises(ValueError, match="y must have shape"):
        regression_loss(model, (torch.zeros(3, 1), torch.zeros(3)))
    with pytest.raises(ValueError, match="region"):
        region_spread(torch.zeros(10, 3), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="region"):
        region_spread(torch.zeros(10, 3), torch.zeros(3, dtype=torch.bool))
