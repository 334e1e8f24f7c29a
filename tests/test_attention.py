"""Logistic-normal attention: shapes, the structured factor against dense references, the KL
against torch.distributions, the mean correction, and finite differences at fixed noise."""
import functools
import math

import pytest
import torch
from torch.distributions import LowRankMultivariateNormal, MultivariateNormal, kl_divergence

from companion.estimators import gaussian_expectation
from companion.models.attention import (
    NOISE,
    PRIORS,
    LogisticNormalAttention,
    RetrievalModel,
    logistic_normal_weights,
    retrieval_loss,
    retrieval_task,
    score_factor,
    score_noise,
    score_variance,
)
from companion.train import train

from helpers import assert_mc_close

F64 = torch.float64


def _layer(noise="diagonal", seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = LogisticNormalAttention(8, num_heads=2, noise=noise, **kwargs).double()
    with torch.no_grad():  # move away from the initial values, so every term matters
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def _inputs(b=3, q=2, k=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, n, 8, generator=g, dtype=F64) for n in (q, k, k))


def _law(layer, query, keys):
    return layer.score_law(query, keys)


# --------------------------------------------------------------------------- interface


@pytest.mark.parametrize("noise", NOISE)
def test_shapes_eval_mode_and_gradients(noise):
    layer = _layer(noise)
    query, keys, values = _inputs()
    out, w = layer(query, keys, values)
    assert out.shape == (3, 2, 8) and w.shape == (3, 2, 2, 5)
    assert torch.allclose(w.sum(-1), torch.ones(3, 2, 2, dtype=F64))
    (out.sum() + layer.kl()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    # eval mode and noise_scale = 0: deterministic softmax(mu)
    law = _law(layer, query, keys)
    layer.eval()
    _, w_eval = layer(query, keys, values)
    assert torch.allclose(w_eval, torch.softmax(law.loc, -1)) and layer.kl().item() == 0.0
    layer.train()
    layer.noise_scale = 0.0
    _, w_off = layer(query, keys, values)
    assert torch.allclose(w_off, w_eval) and layer.kl().item() == 0.0


@pytest.mark.parametrize("noise", NOISE)
@pytest.mark.parametrize("mean_correction", (False, True))
def test_structured_noise_equals_the_dense_factor(noise, mean_correction):
    layer = _layer(noise, mean_correction=mean_correction)
    query, keys, values = _inputs()
    law = _law(layer, query, keys)
    size = 5 + layer.rank if noise == "lowrank" else 5
    eps = torch.randn(3, 2, 2, size, generator=torch.Generator().manual_seed(2), dtype=F64)
    _, w = layer(query, keys, values, eps=eps)
    dense = score_factor(law)  # (B, H, Q, K, M)
    assert torch.allclose(score_noise(law, eps), (dense @ eps.unsqueeze(-1)).squeeze(-1), atol=1e-12)
    assert torch.allclose(score_variance(law), dense.pow(2).sum(-1), atol=1e-12)
    expected = logistic_normal_weights(law.loc, dense, eps, mean_correction=mean_correction)
    assert torch.allclose(w, expected, atol=1e-12)
    # reproducible from a generator
    a = layer(query, keys, values, generator=torch.Generator().manual_seed(5))[1]
    b = layer(query, keys, values, generator=torch.Generator().manual_seed(5))[1]
    assert torch.equal(a, b)
    if noise == "cholesky":  # lower triangular with the positive scales on the diagonal
        assert torch.equal(dense, dense.tril()) and torch.allclose(dense.diagonal(dim1=-2, dim2=-1), law.scale)


def test_cholesky_samples_are_torch_multivariate_normal_samples():
    # MultivariateNormal(loc, scale_tril=L).rsample() is loc + L eps with eps = randn(shape)
    layer = _layer("cholesky")
    query, keys, values = _inputs()
    law = _law(layer, query, keys)
    torch.manual_seed(7)
    z = MultivariateNormal(law.loc, scale_tril=score_factor(law)).rsample()
    torch.manual_seed(7)
    eps = torch.randn(law.loc.shape, dtype=F64)
    _, w = layer(query, keys, values, eps=eps)
    assert torch.allclose(w, torch.softmax(z, -1), atol=1e-12)
    # and the low-rank law is LowRankMultivariateNormal's
    lowrank = _layer("lowrank")
    law = _law(lowrank, query, keys)
    q = law.loc.shape[2]
    ref = LowRankMultivariateNormal(law.loc, law.factor.unsqueeze(2).expand(-1, -1, q, -1, -1), law.scale**2)
    dense = score_factor(law)
    assert torch.allclose(ref.covariance_matrix, dense @ dense.transpose(-1, -2), atol=1e-12)


def test_mask_removes_keys():
    layer = _layer("lowrank")
    query, keys, values = _inputs()
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[:, 3:] = False
    _, w = layer(query, keys, values, mask=mask)
    assert torch.all(w[..., 3:] == 0) and torch.allclose(w.sum(-1), torch.ones(3, 2, 2, dtype=F64))
    per_query = torch.ones(3, 2, 5, dtype=torch.bool)
    per_query[:, 0, 1] = False
    _, w = layer(query, keys, values, mask=per_query)
    assert torch.all(w[:, :, 0, 1] == 0) and torch.all(w[:, :, 1, 1] > 0)


# --------------------------------------------------------------------------- KL


@pytest.mark.parametrize("noise", NOISE)
@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("mean_correction", (False, True))
def test_kl_equals_torch_distributions(noise, prior, mean_correction):
    layer = _layer(noise, prior=prior, prior_scale=0.7, mean_correction=mean_correction)
    query, keys, values = _inputs()
    mask = torch.rand(3, 2, 5, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[..., 0] = True
    for m in (None, mask):
        layer(query, keys, values, mask=m)
        law = _law(layer, query, keys)
        dense = score_factor(law)
        cov = dense @ dense.transpose(-1, -2)
        var = cov.diagonal(dim1=-2, dim2=-1)
        loc = law.loc - var / 2 if mean_correction else law.loc
        if prior == "standard":
            prior_loc = law.loc
        else:
            k = layer._heads(layer.k_proj(keys))
            prior_loc = torch.einsum("bhkd,hd->bhk", k, layer.prior_key).unsqueeze(2).expand_as(law.loc)
        if mean_correction:
            prior_loc = prior_loc - 0.49 / 2
        total = 0.0
        for b in range(3):
            for h in range(2):
                for q in range(2):
                    a = torch.ones(5, dtype=torch.bool) if m is None else m[b, q]
                    n = int(a.sum())
                    post = MultivariateNormal(loc[b, h, q][a], covariance_matrix=cov[b, h, q][a][:, a])
                    ref = MultivariateNormal(prior_loc[b, h, q][a], covariance_matrix=0.49 * torch.eye(n, dtype=F64))
                    total = total + kl_divergence(post, ref)
        # float64 rounding in Cholesky factors of 5 x 5 matrices
        assert layer.kl().item() == pytest.approx(total.item(), rel=1e-10)


# --------------------------------------------------------------------------- correctness


def test_expected_weight_is_not_the_softmax_of_the_mean():
    # scores (1, 0) with unit noise: E[w_1] = E[sigmoid(z_1 - z_2)], z_1 - z_2 ~ N(1, 2)
    exact = gaussian_expectation(torch.sigmoid, torch.tensor(1.0, dtype=F64), torch.tensor(2.0, dtype=F64).sqrt())
    assert exact.item() == pytest.approx(0.67506, abs=5e-6)
    assert abs(exact.item() - torch.sigmoid(torch.tensor(1.0)).item()) > 0.05
    mu = torch.tensor([1.0, 0.0], dtype=F64)
    eps = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    for correction in (False, True):  # the same shift for both scores: E[w] unchanged
        w = logistic_normal_weights(mu.expand(len(eps), 2), torch.eye(2, dtype=F64).expand(len(eps), 2, 2), eps,
                                    mean_correction=correction)
        assert_mc_close(w[:, 0], exact)


def test_mean_correction_makes_exp_scores_unbiased():
    # E[exp(z_k)] = exp(mu_k) with the shift -diag(L L^T) / 2; log-normal tails: moderate scales
    layer = _layer("lowrank", mean_correction=True)
    with torch.no_grad():
        layer.scale_bias.fill_(-1.0)
    query, keys, values = _inputs(b=1, q=1, k=4)
    law = _law(layer, query, keys)
    eps = torch.randn(400_000, *law.loc.shape[:-1], 4 + layer.rank, generator=torch.Generator().manual_seed(1),
                      dtype=F64)
    z = law.loc - score_variance(law) / 2 + torch.func.vmap(functools.partial(score_noise, law))(eps)
    assert_mc_close(z.exp().detach().reshape(len(eps), -1), law.loc.exp().detach().reshape(-1))


def test_gradients_match_finite_differences_at_fixed_noise():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 4, generator=g, dtype=F64)
    factor = torch.randn(3, 4, 6, generator=g, dtype=F64) * 0.5
    eps = torch.randn(3, 6, generator=g, dtype=F64)
    c = torch.randn(3, 4, generator=g, dtype=F64)
    for correction in (False, True):
        def f(m, factor_matrix):
            return (c * logistic_normal_weights(m, factor_matrix, eps, mean_correction=correction)).sum()

        assert torch.autograd.gradcheck(f, (mu.clone().requires_grad_(), factor.clone().requires_grad_()))
    # and through the layer's own parameters
    layer = _layer("cholesky")
    query, keys, values = _inputs()
    eps = torch.randn(3, 2, 2, 5, generator=g, dtype=F64)
    params = {k: v.detach().clone().requires_grad_() for k, v in layer.named_parameters()
              if k in ("scale_bias", "factor_weight", "scale_key")}

    def g_layer(scale_bias, factor_weight, scale_key):
        p = dict(layer.named_parameters(), scale_bias=scale_bias, factor_weight=factor_weight, scale_key=scale_key)
        out, _ = torch.func.functional_call(layer, p, (query, keys, values), {"eps": eps})
        return out.sum()

    assert torch.autograd.gradcheck(g_layer, tuple(params[k] for k in ("scale_bias", "factor_weight", "scale_key")))


# --------------------------------------------------------------------------- the retrieval task


def test_retrieval_task_and_a_model_that_learns_it():
    task = retrieval_task(64, num_keys=6, num_labels=10, dim=8, key_noise=0.0,
                          generator=torch.Generator().manual_seed(0))
    assert task.query.shape == (64, 1, 8) and task.keys.shape == task.values.shape == (64, 6, 8)
    rows = torch.arange(64)
    assert torch.equal(task.keys[rows, task.position], task.query[:, 0])  # noiseless: the key is the query
    again = retrieval_task(64, num_keys=6, num_labels=10, dim=8, key_noise=0.0,
                           generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(task, again))
    data = retrieval_task(512, num_keys=4, num_labels=8, dim=8, key_noise=0.3,
                          generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = RetrievalModel(8, 4, noise="diagonal")
    history = train(model, functools.partial(retrieval_loss, num_data=512), tuple(data[:4]), steps=100,
                    batch_size=128, lr=1e-2, progress=False)
    # chance is log 4 = 1.39 nats; with model and minibatch seeds 0-4 the mean loss of the last 10
    # of 100 steps was 0.014 to 0.029
    assert sum(history.loss[-10:]) / 10 < 0.2 < math.log(4)


# --------------------------------------------------------------------------- bad input


def test_bad_input_raises():
    with pytest.raises(ValueError, match="noise"):
        LogisticNormalAttention(8, noise="full")
    with pytest.raises(ValueError, match="prior"):
        LogisticNormalAttention(8, prior="flat")
    with pytest.raises(ValueError, match="prior_scale"):
        LogisticNormalAttention(8, prior_scale=0.0)
    with pytest.raises(ValueError, match="init_scale"):
        LogisticNormalAttention(8, init_scale=-1.0)
    with pytest.raises(ValueError, match="divisible"):
        LogisticNormalAttention(8, num_heads=3)
    with pytest.raises(ValueError, match="dim"):
        LogisticNormalAttention(0)
    with pytest.raises(ValueError, match="noise_scale"):
        LogisticNormalAttention(8, noise_scale=-0.5)
    layer = LogisticNormalAttention(8)
    q, k, v = torch.zeros(2, 1, 8), torch.zeros(2, 3, 8), torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match="query"):
        layer(torch.zeros(2, 8), k, v)
    with pytest.raises(ValueError, match="keys"):
        layer(q, torch.zeros(2, 3, 4), v)
    with pytest.raises(ValueError, match="dtype"):
        layer(q.double(), k, v)
    with pytest.raises(ValueError, match="share"):
        layer(q, k, torch.zeros(2, 4, 8))
    with pytest.raises(ValueError, match="mask"):
        layer(q, k, v, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask"):
        layer(q, k, v, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        layer(q, k, v, mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="eps"):
        layer(q, k, v, eps=torch.zeros(2, 1, 1, 4))
    with pytest.raises(ValueError, match="factor"):
        logistic_normal_weights(torch.zeros(3), torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="num_labels"):
        retrieval_task(10, num_keys=8, num_labels=4)
    with pytest.raises(ValueError, match="key_noise"):
        retrieval_task(10, key_noise=-1.0)
    with pytest.raises(ValueError, match="num_data"):
        retrieval_loss(RetrievalModel(8, 2), retrieval_task(4, dim=8, num_classes=2)[:4], 0)
