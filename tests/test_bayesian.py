"""Bayesian layers: the four sampling modes, their moments, the KL, and the chapter's evaluation."""
import math

import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from companion.estimators import mc_summary, per_sample_gradients, variance_stderr
from companion.models.bayesian import (
    MODES,
    BayesConv2d,
    BayesLinear,
    BayesMLP,
    ConvClassifier,
    bootstrap_interval,
    expected_calibration_error,
    minibatch_gradients,
    negative_elbo,
    predictive_entropy,
    predictive_probs,
    reliability_curve,
    variance_terms,
)

from helpers import Z, assert_mc_close

F64 = torch.float64


def _linear(mode, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = BayesLinear(4, 3, mode=mode, **kwargs).double()
    with torch.no_grad():  # scales of order one, so that the noise terms matter
        layer.weight_rho.uniform_(-0.5, 1.0)
    return layer


def _conv(mode, seed=0):
    torch.manual_seed(seed)
    layer = BayesConv2d(2, 3, 3, padding=1, mode=mode).double()
    with torch.no_grad():
        layer.weight_rho.uniform_(-0.5, 1.0)
    return layer


def _draws(layer, x, num_calls, seed=0):
    """Outputs of ``num_calls`` independent calls on the same ``x``: ``(S, *out)`` (vmap over the noise)."""
    g = torch.Generator().manual_seed(seed)
    shapes = layer.noise_shapes(x.shape[0] if isinstance(layer, BayesLinear) else x.shape)
    noise = [torch.randn(num_calls, *shapes[0], generator=g, dtype=x.dtype)]
    noise += [torch.randint(0, 2, (num_calls, *s), generator=g).to(x.dtype) * 2 - 1 for s in shapes[1:]]
    with torch.no_grad():
        return torch.func.vmap(lambda *n: layer(x, noise=n))(*noise)


# --------------------------------------------------------------------------- interface


@pytest.mark.parametrize("mode", MODES)
def test_shapes_graph_and_eval_mean(mode):
    x = torch.randn(5, 4, dtype=F64)
    layer = _linear(mode)
    out = layer(x)
    assert out.shape == (5, 3)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    layer.eval()
    assert torch.equal(layer(x), F.linear(x, layer.weight_loc, layer.bias))
    xi = torch.randn(5, 2, 8, 7, dtype=F64)
    conv = _conv(mode)
    out = conv(xi)
    assert out.shape == (5, 3, 8, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in conv.parameters())
    conv.eval()
    assert torch.equal(conv(xi), F.conv2d(xi, conv.weight_loc, conv.bias, padding=1))
    strided = BayesConv2d(2, 3, (3, 2), stride=2, mode=mode).double()
    assert strided(xi).shape == (5, 3, *strided.output_size(8, 7)) == (5, 3, 3, 3)


def test_scale_is_the_softplus_of_rho_and_noise_is_reproducible():
    layer = _linear("local")
    assert torch.equal(layer.weight_scale, F.softplus(layer.weight_rho)) and bool((layer.weight_scale > 0).all())
    assert BayesLinear(4, 3, init_scale=0.2).weight_scale.detach().allclose(torch.full((3, 4), 0.2))
    x = torch.randn(5, 4, dtype=F64)
    for mode in MODES:
        layer.mode = mode
        a = layer(x, generator=torch.Generator().manual_seed(3))
        b = layer(x, generator=torch.Generator().manual_seed(3))
        noise = layer.sample_noise(5, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b) and torch.equal(a, layer(x, noise=noise))
        assert [tuple(e.shape) for e in noise] == list(layer.noise_shapes(5))


def test_kl_equals_torch_distributions():
    for prior in (0.5, 1.0, 3.0):
        layer = _linear("local", prior_scale=prior)
        conv = _conv("flipout")
        conv.prior_scale = prior
        for lay in (layer, conv):
            expected = kl_divergence(Normal(lay.weight_loc, lay.weight_scale),
                                     Normal(torch.zeros_like(lay.weight_loc), prior)).sum()
            assert lay.kl().item() == pytest.approx(expected.item(), rel=1e-12)
    net = BayesMLP([4, 6, 3])
    assert net.kl().item() == pytest.approx(sum(layer.kl().item() for layer in net.layers), rel=1e-12)
    assert ConvClassifier(8, 10, bayesian=False).kl().item() == 0.0


def test_networks_and_negative_elbo():
    torch.manual_seed(0)
    x, y = torch.rand(6, 64), torch.randint(10, (6,))
    for bayesian in (True, False):
        net = ConvClassifier(8, 10, bayesian=bayesian)
        assert net(x).shape == (6, 10)
        torch.manual_seed(1)
        loss = negative_elbo(net, (x, y), num_data=100)
        torch.manual_seed(1)
        assert torch.allclose(loss, F.cross_entropy(net(x), y) + net.kl() / 100)
    net = ConvClassifier(8, 10, mode="shared")
    net.mode = "flipout"
    assert net.mode == "flipout" and all(m.mode == "flipout" for m in (net.conv1, net.conv2, net.head))
    mlp = BayesMLP([64, 8, 10], mode="per_example")
    mlp.mode = "local"
    assert [layer.mode for layer in mlp.layers] == ["local", "local"] and mlp(x).shape == (6, 10)


# --------------------------------------------------------------------------- the modes are what they say


def test_per_example_and_flipout_equal_their_definitions():
    # W_n = mu + s * E_n (per example) and W_n = mu + s * E * (r_n s_n^T) (flipout), row by row
    x = torch.randn(5, 4, dtype=F64)
    layer = _linear("per_example")
    (e,) = layer.sample_noise(5, generator=torch.Generator().manual_seed(0))
    out = layer(x, noise=(e,))
    mu, s, b = layer.weight_loc, layer.weight_scale, layer.bias
    rows = torch.stack([(mu + s * e[n]) @ x[n] + b for n in range(5)])
    assert torch.allclose(out, rows, atol=1e-12)
    layer.mode = "flipout"
    eps, r_in, r_out = layer.sample_noise(5, generator=torch.Generator().manual_seed(1))
    out = layer(x, noise=(eps, r_in, r_out))
    rows = torch.stack([(mu + s * eps * torch.outer(r_out[n], r_in[n])) @ x[n] + b for n in range(5)])
    assert torch.allclose(out, rows, atol=1e-12)
    assert set(r_in.unique().tolist()) == {-1.0, 1.0}
    layer.mode = "shared"
    (e,) = layer.sample_noise(5, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(layer(x, noise=(e,)), x @ (mu + s * e).T + b, atol=1e-12)
    # the convolution: per example is one conv per row with that row's kernel
    xi = torch.randn(3, 2, 6, 6, dtype=F64)
    conv = _conv("per_example")
    (e,) = conv.sample_noise(xi.shape, generator=torch.Generator().manual_seed(3))
    rows = torch.cat([F.conv2d(xi[n : n + 1], conv.weight_loc + conv.weight_scale * e[n], conv.bias, padding=1)
                      for n in range(3)])
    assert torch.allclose(conv(xi, noise=(e,)), rows, atol=1e-12)
    conv.mode = "flipout"
    eps, r_in, r_out = conv.sample_noise(xi.shape, generator=torch.Generator().manual_seed(4))
    rows = torch.cat([F.conv2d(xi[n : n + 1], conv.weight_loc + conv.weight_scale * eps
                               * (r_out[n][:, None] * r_in[n][None, :])[:, :, None, None], conv.bias, padding=1)
                      for n in range(3)])
    assert torch.allclose(conv(xi, noise=(eps, r_in, r_out)), rows, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_pre_activation_moments_match_the_closed_form(mode):
    # every mode gives each row's pre-activation mean x mu^T + b and variance x^2 (s^2)^T;
    # Z standard errors of a mean (sqrt(var / S)) and of a variance (fourth moment); 18 units x 2
    # moments x 4 modes at Z = 5: family-wise false alarm < 1e-4
    x = torch.randn(3, 4, dtype=F64)
    layer = _linear(mode)
    draws = _draws(layer, x, 20_000)  # (S, 3, 3)
    mean = (x @ layer.weight_loc.T + layer.bias).detach()
    var = (x**2 @ layer.weight_scale.T**2).detach()
    assert_mc_close(draws, mean)
    assert torch.all((draws.var(0) - var).abs() <= Z * variance_stderr(draws))
    # convolution, closed form conv(x, mu) + b and conv(x^2, s^2), on a 4x4 image with zero padding
    xi = torch.randn(2, 2, 4, 4, dtype=F64)
    conv = _conv(mode)
    draws = _draws(conv, xi, 10_000)
    mean = F.conv2d(xi, conv.weight_loc, conv.bias, padding=1).detach()
    var = F.conv2d(xi**2, conv.weight_scale**2, padding=1).detach()
    assert_mc_close(draws, mean)
    assert torch.all((draws.var(0) - var).abs() <= Z * variance_stderr(draws))


@pytest.mark.parametrize("mode", MODES)
def test_rows_covary_only_under_a_shared_sample(mode):
    # Cov(b_1j, b_2j) = sum_i x_1i x_2i s_ji^2 with one shared weight sample, 0 otherwise (flipout:
    # the random signs make E[r_1 r_2] = 0); standard error of a mean of products
    x = torch.tensor([[1.0, 0.5, -1.0, 2.0], [0.5, 1.0, 1.0, 1.0]], dtype=F64)
    layer = _linear(mode)
    draws = _draws(layer, x, 40_000, seed=1)
    c = draws - draws.mean(0)
    products = c[:, 0] * c[:, 1]  # (S, out)
    exact = (x[0] * x[1] * layer.weight_scale**2).sum(1).detach() if mode == "shared" else torch.zeros(3)
    assert_mc_close(products, exact)


def test_local_conv_gradient_is_finite_on_zero_patches_and_matches_finite_differences():
    conv = _conv("local")
    xi = torch.zeros(2, 2, 6, 6, dtype=F64)
    xi[:, :, :2, :2] = torch.randn(2, 2, 2, 2, dtype=F64)  # most receptive fields all zero
    noise = conv.sample_noise(xi.shape, generator=torch.Generator().manual_seed(0))
    conv(xi, noise=noise).pow(2).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())
    # fixed noise: a smooth function of the parameters; gradcheck's central differences in float64
    x = torch.randn(3, 4, dtype=F64)
    layer = _linear("local")
    noise = layer.sample_noise(3, generator=torch.Generator().manual_seed(1))

    def f(loc, rho):
        return torch.func.functional_call(layer, {"weight_loc": loc, "weight_rho": rho, "bias": layer.bias},
                                          (x,), {"noise": noise})

    assert torch.autograd.gradcheck(f, (layer.weight_loc.detach().requires_grad_(),
                                        layer.weight_rho.detach().requires_grad_()))


# --------------------------------------------------------------------------- gradient variance


def _one_unit_gradients(mode, num_draws):
    """Per-draw gradients of ``(b - y)^2 / 2`` for one unit, x = (1, 1), s = (1, 1), r = x . mu - y = -1."""
    layer = BayesLinear(2, 1, mode=mode).double()
    with torch.no_grad():
        layer.weight_loc.zero_()
        layer.bias.zero_()
        layer.weight_rho.fill_(math.log(math.e - 1))  # softplus = 1
    x, y = torch.ones(1, 2, dtype=F64), 1.0
    (shape,) = layer.noise_shapes(1)
    noise = torch.randn(num_draws, *shape, generator=torch.Generator().manual_seed(0), dtype=F64)

    def program(params, eps):
        b = torch.func.functional_call(layer, params, (x,), {"noise": (eps,)})
        return 0.5 * (b - y).pow(2).sum()

    grads = per_sample_gradients(program, dict(layer.named_parameters()), noise)
    ds_drho = torch.sigmoid(layer.weight_rho.detach())  # d softplus(rho) / d rho
    return grads["weight_loc"][:, 0, 0], grads["weight_rho"][:, 0, 0] / ds_drho[0, 0]


def test_one_unit_gradient_variances_match_the_closed_forms():
    # d/ds1 of (b - y)^2 / 2: separate weight samples x1^2 (r^2 + S^2) + x1^4 s1^2 = 4;
    # local (x1^4 s1^2 / S^2)(r^2 + 2 S^2) = 2.5; d/dmu1: x1^2 S^2 = 2 for both; means x1^2 s1 = 1, x1 r = -1
    for mode, var_s in (("per_example", 4.0), ("local", 2.5)):
        g_mu, g_s = _one_unit_gradients(mode, 100_000)
        assert_mc_close(g_s, 1.0)
        assert_mc_close(g_mu, -1.0)
        assert abs(g_s.var() - var_s) <= Z * variance_stderr(g_s)
        assert abs(g_mu.var() - 2.0) <= Z * variance_stderr(g_mu)


def test_minibatch_gradients_equal_autograd_and_agree_across_modes():
    torch.manual_seed(0)
    x, y = torch.rand(40, 6, dtype=F64), torch.randint(3, (40,))
    net = BayesMLP([6, 5, 3]).double()
    with torch.no_grad():
        for layer in net.layers:
            layer.weight_rho.fill_(-0.5)
    means = {}
    for mode in MODES:
        net.mode = mode
        grads = minibatch_gradients(net, x, y, batch_size=8, num_batches=1000,
                                    generator=torch.Generator().manual_seed(1))
        assert set(grads) == {name for name, _ in net.named_parameters()}
        assert grads["layers.0.weight_loc"].shape == (1000, 5, 6)
        means[mode] = grads["layers.1.weight_rho"]
        # the first draw by hand: same rows and noise, ordinary autograd
        g = torch.Generator().manual_seed(1)
        rows = torch.randperm(40, generator=g)[:8]
        _ = [torch.randperm(40, generator=g) for _ in range(999)]
        noise = net.sample_noise(8, generator=g)
        net.zero_grad()
        F.cross_entropy(net(x[rows], noise=noise), y[rows]).backward()
        assert torch.allclose(grads["layers.1.weight_rho"][0], net.layers[1].weight_rho.grad, atol=1e-12)
    # chunks of draws: the same draws when one chunk holds them all, fresh noise per chunk otherwise
    net.mode = "flipout"
    whole = minibatch_gradients(net, x, y, batch_size=8, num_batches=1000, generator=torch.Generator().manual_seed(1),
                                chunk_size=1000)
    assert torch.equal(whole["layers.1.weight_rho"], means["flipout"])
    chunked = minibatch_gradients(net, x, y, batch_size=8, num_batches=1000,
                                  generator=torch.Generator().manual_seed(2), chunk_size=300)
    assert chunked["layers.0.weight_loc"].shape == (1000, 5, 6)
    means["flipout, chunked"] = chunked["layers.1.weight_rho"]
    # all are unbiased for the same gradient: means agree within Z standard errors of the difference
    ref = means["per_example"]
    for mode in ("local", "shared", "flipout", "flipout, chunked"):
        a, b = mc_summary(means[mode]), mc_summary(ref)
        assert torch.all((a.mean - b.mean).abs() <= Z * torch.hypot(a.stderr, b.stderr))


def test_variance_terms_estimate_the_mean_variance():
    g = torch.Generator().manual_seed(0)
    sd = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    samples = torch.randn(4000, 3, generator=g, dtype=F64) * sd
    q = variance_terms(samples)
    assert q.mean().item() == pytest.approx(samples.var(0).mean().item(), rel=1e-12)
    # the mean of q estimates mean(sd^2) = 1.75 within Z standard errors
    assert_mc_close(q, (sd**2).mean())


# --------------------------------------------------------------------------- evaluation


def test_calibration_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.35, 0.65], [0.55, 0.45]], dtype=F64)
    labels = torch.tensor([0, 1, 1, 0])
    curve = reliability_curve(probs, labels, num_bins=5)  # bins of width 0.2
    assert curve.count.tolist() == [0, 0, 1, 1, 2]  # confidences 0.55, 0.65, 0.8 and 0.9
    assert curve.confidence[2:].tolist() == pytest.approx([0.55, 0.65, 0.85])
    assert curve.accuracy[2:].tolist() == pytest.approx([1.0, 1.0, 0.5])
    # ECE = 1/4 |1 - 0.55| + 1/4 |1 - 0.65| + 2/4 |0.5 - 0.85| = 0.1125 + 0.0875 + 0.175
    assert expected_calibration_error(probs, labels, num_bins=5).item() == pytest.approx(0.375)
    assert predictive_entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]])).tolist() == pytest.approx([math.log(2), 0.0])


def test_predictive_probs_average_the_draws():
    torch.manual_seed(0)
    net = ConvClassifier(8, 10).eval()
    x = torch.rand(4, 64)
    p = predictive_probs(net, x, 20, generator=torch.Generator().manual_seed(0))
    assert p.shape == (4, 10) and torch.allclose(p.sum(-1), torch.ones(4)) and not net.training
    g = torch.Generator().manual_seed(0)
    net.train()
    by_hand = sum(torch.softmax(net(x, generator=g), -1) for _ in range(20)) / 20
    assert torch.allclose(p, by_hand.detach())
    det = ConvClassifier(8, 10, bayesian=False).eval()
    assert torch.allclose(predictive_probs(det, x, 3), torch.softmax(det(x), -1).detach())


def test_bootstrap_interval_agrees_with_scipy():
    # percentile intervals for a mean; each endpoint is a Monte Carlo quantile with standard error
    # ~ 2.7 / sqrt(R) sd/sqrt(n) at the 2.5% level: Z of them for the difference of two
    data = torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=F64)
    ours = bootstrap_interval(lambda idx: data[idx].mean(), 200, num_resamples=4000,
                              generator=torch.Generator().manual_seed(1))
    theirs = scipy.stats.bootstrap((data.numpy(),), lambda a: a.mean(), n_resamples=4000, method="percentile",
                                   random_state=0).confidence_interval
    se = 2.7 / math.sqrt(4000) * data.std().item() / math.sqrt(200)
    assert abs(ours[0].item() - theirs.low) <= Z * math.sqrt(2) * se
    assert abs(ours[1].item() - theirs.high) <= Z * math.sqrt(2) * se


# --------------------------------------------------------------------------- bad input


def test_bad_input_raises():
    with pytest.raises(ValueError, match="mode"):
        BayesLinear(3, 2, mode="dense")
    layer = BayesLinear(3, 2)
    with pytest.raises(ValueError, match="mode"):
        layer.mode = "exact"
    with pytest.raises(ValueError, match="prior_scale"):
        BayesLinear(3, 2, prior_scale=0.0)
    with pytest.raises(ValueError, match="prior_scale"):
        BayesConv2d(1, 2, 3, prior_scale=-1.0)
    with pytest.raises(ValueError, match="init_scale"):
        BayesLinear(3, 2, init_scale=0)
    with pytest.raises(ValueError, match="in_features"):
        BayesLinear(0, 2)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.zeros(3))
    with pytest.raises(ValueError, match="dtype"):
        layer(torch.zeros(4, 3, dtype=F64))
    with pytest.raises(ValueError, match="noise"):
        layer(torch.zeros(4, 3), noise=(torch.zeros(5, 2),))
    with pytest.raises(ValueError, match="kernel_size"):
        BayesConv2d(1, 2, (3, 3, 3))
    with pytest.raises(ValueError, match="kernel_size"):
        BayesConv2d(1, 2, 0)
    conv = BayesConv2d(1, 2, 3)
    with pytest.raises(ValueError, match="x must have shape"):
        conv(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="input_shape"):
        conv.sample_noise((2, 8, 8))
    with pytest.raises(ValueError, match="sizes"):
        BayesMLP([4])
    with pytest.raises(ValueError, match="noise"):
        BayesMLP([4, 3, 2])(torch.zeros(2, 4), noise=((torch.zeros(2, 3),),))
    with pytest.raises(ValueError, match="num_data"):
        negative_elbo(BayesMLP([4, 2]), (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)), 0)
    with pytest.raises(ValueError, match="batch_size"):
        minibatch_gradients(BayesMLP([4, 2]), torch.zeros(5, 4), torch.zeros(5, dtype=torch.long),
                            batch_size=6, num_batches=3)
    with pytest.raises(ValueError, match="num_batches"):
        minibatch_gradients(BayesMLP([4, 2]), torch.zeros(5, 4), torch.zeros(5, dtype=torch.long),
                            batch_size=2, num_batches=1)
    with pytest.raises(ValueError, match="probs"):
        expected_calibration_error(torch.rand(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="num_bins"):
        reliability_curve(torch.rand(4, 3), torch.zeros(4, dtype=torch.long), num_bins=0)
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval(lambda idx: idx.float().mean(), 10, level=1.5)
    with pytest.raises(ValueError, match="samples"):
        variance_terms(torch.zeros(1, 3))
