"""companion.science.texture: interface, closed forms against Monte Carlo, estimators that agree."""
import math

import pytest
import torch
from torch.distributions import Independent, Normal

from companion.estimators import gradient_samples, mc_summary
from companion.science import texture as tx
from helpers import Z, assert_mc_close

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- interface


def test_shapes_1d_and_2d():
    x = tx.pixel_grid(32)
    assert x.shape == (32,)
    t = tx.texture(x, 0.5, 0.1, 0.3, 7, generator=_gen())
    assert t.shape == (7, 32)
    x2 = tx.pixel_grid(8, 10)
    assert x2.shape == (8, 10, 2)
    t2 = tx.texture(x2, torch.tensor([0.3, 0.2], dtype=F64), 0.0, 0.5, 3, generator=_gen())
    assert t2.shape == (3, 8, 10)
    assert tx.autocorrelation(t, 4).shape == (7, 4)
    assert tx.autocorrelation(t2, 2, 2).shape == (3, 2 + 2 * 5)
    assert tx.expected_texture(x2, torch.tensor([0.3, 0.2], dtype=F64), 0.0, 0.5).shape == (8, 10)


def test_texture_keeps_its_graph_and_eps_is_common_random_numbers():
    x = tx.pixel_grid(16)
    w = torch.tensor(0.7, dtype=F64, requires_grad=True)
    sigma = torch.tensor(0.4, dtype=F64, requires_grad=True)
    eps = torch.randn(5, 16, generator=_gen(), dtype=F64)
    t = tx.texture(x, w, 0.2, sigma, eps=eps)
    assert t.requires_grad
    gw, gs = torch.autograd.grad(t.sum(), (w, sigma))
    # d/dw sin(w u + phi) = u cos(.), d/dsigma = w eps cos(.)
    u = x + sigma.detach() * eps
    c = torch.cos(w.detach() * u + 0.2)
    assert torch.allclose(gw, (u * c).sum()) and torch.allclose(gs, (w.detach() * eps * c).sum())
    assert torch.equal(tx.texture(x, 0.7, 0.2, 0.4, eps=eps), tx.texture(x, 0.7, 0.2, 0.4, eps=eps))


def test_fft_autocorrelation_equals_the_direct_sum():
    t = torch.randn(3, 40, generator=_gen(1), dtype=F64)
    direct = torch.stack([(t[:, :-k] * t[:, k:]).mean(-1) for k in range(1, 6)], -1)
    assert torch.allclose(tx.autocorrelation(t, 5), direct, atol=1e-12)
    t2 = torch.randn(2, 9, 11, generator=_gen(2), dtype=F64)
    lags = [(0, j) for j in (1, 2)] + [(i, j) for i in (1, 2) for j in range(-2, 3)]

    def shifted(i, j):
        h, w = t2.shape[-2:]
        a = t2[..., : h - i, max(0, -j): w - max(0, j)]
        b = t2[..., i:, max(0, j): w - max(0, -j)]
        return (a * b).flatten(-2).mean(-1)

    direct2 = torch.stack([shifted(i, j) for i, j in lags], -1)
    assert torch.allclose(tx.autocorrelation(t2, 2, 2), direct2, atol=1e-12)


def test_bad_inputs_raise():
    x = tx.pixel_grid(16)
    with pytest.raises(ValueError, match="sigma"):
        tx.texture(x, 0.5, 0.0, -0.1, 2)
    with pytest.raises(ValueError, match="num_samples"):
        tx.texture(x, 0.5, 0.0, 0.1)
    with pytest.raises(ValueError, match="eps"):
        tx.texture(x, 0.5, 0.0, 0.1, eps=torch.zeros(2, 15, dtype=F64))
    with pytest.raises(ValueError, match="w must"):
        tx.texture(x, torch.zeros(2, 2, dtype=F64), 0.0, 0.1, 2)
    with pytest.raises(ValueError, match="x must"):
        tx.texture(x, torch.tensor([0.1, 0.2], dtype=F64), 0.0, 0.1, 2)
    with pytest.raises(ValueError, match="max_lag"):
        tx.autocorrelation(torch.zeros(3, 8, dtype=F64), 0)
    with pytest.raises(ValueError, match="exceed max_lag"):
        tx.autocorrelation(torch.zeros(3, 8, dtype=F64), 8)
    with pytest.raises(ValueError, match="dims"):
        tx.autocorrelation(torch.zeros(3, 8, dtype=F64), 2, dims=3)
    with pytest.raises(ValueError, match="target_stats"):
        tx.texture_loss(torch.zeros(3, 8, dtype=F64), torch.zeros(5, dtype=F64), 2)
    with pytest.raises(ValueError, match="shape"):
        tx.pixel_grid(1)
    with pytest.raises(ValueError, match="sigma"):
        tx.TextureModel(0.5, 0.0, 0.0)


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("w,sigma", [(0.9, 0.6), (2.0, 0.3), (0.4, 1.5)])
def test_mean_texture_is_the_closed_form(w, sigma):
    x = tx.pixel_grid(20)
    t = tx.texture(x, w, 0.7, sigma, 40_000, generator=_gen(3))
    assert_mc_close(t, tx.expected_texture(x, w, 0.7, sigma))


def test_mean_texture_2d():
    x = tx.pixel_grid(5, 6)
    w = torch.tensor([0.5, -0.8], dtype=F64)
    t = tx.texture(x, w, 0.3, 0.7, 40_000, generator=_gen(4))
    assert_mc_close(t.flatten(1), tx.expected_texture(x, w, 0.3, 0.7).flatten())


def test_expected_autocorrelation_is_exact_and_close_to_the_cosine():
    x = tx.pixel_grid(64)
    t = tx.texture(x, 0.9, 0.7, 0.6, 20_000, generator=_gen(5))
    exact = tx.expected_autocorrelation(x, 0.9, 0.7, 0.6, 6)
    assert_mc_close(tx.autocorrelation(t, 6), exact)
    lags = torch.arange(1, 7, dtype=F64)
    cosine = 0.5 * math.exp(-(0.9 * 0.6) ** 2) * torch.cos(0.9 * lags)
    # the phase term is an edge effect of order 1 / (N w)
    assert (exact - cosine).abs().max() < 1 / (64 * 0.9)


# --------------------------------------------------------------------------- agreement


def test_pathwise_and_score_function_gradients_agree():
    x = tx.pixel_grid(32)
    target = tx.autocorrelation(tx.texture(x, 0.9, 0.7, 0.6, 1, generator=_gen(6))[0], 4)

    def f(theta):
        return tx.texture_loss(torch.sin(theta), target, 4)

    def dist(w, sigma):
        return Independent(Normal(w.unsqueeze(-1) * x + 0.7, (w * sigma).unsqueeze(-1)), 1)

    point = (torch.tensor(0.8, dtype=F64), torch.tensor(0.5, dtype=F64))
    pw = gradient_samples("pathwise", f, dist, point, 20_000, generator=_gen(7))
    sf = gradient_samples("score_function", f, dist, point, 20_000, generator=_gen(8), baseline="mean")
    for a, b in zip(pw, sf):
        sa, sb = mc_summary(a), mc_summary(b)
        assert abs(sa.mean - sb.mean) <= Z * math.hypot(sa.stderr, sb.stderr)
        assert sb.variance > 3 * sa.variance  # the score sums one noisy term per pixel
