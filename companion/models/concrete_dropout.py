"""Concrete dropout: dropout rates learned by pathwise gradients through relaxed Bernoulli masks.

Chapter *Bayesian dropout*. Dropout with rate ``p`` before each weight layer is variational
inference with a Bernoulli-masked weight posterior (Gal and Ghahramani 2016); Gal, Hron and
Kendall (2017) relax the Bernoulli mask to a Concrete (relaxed Bernoulli) variable, so that ``p``
itself gets a pathwise gradient and is fitted by the same optimizer as the weights.

* :func:`relaxed_drop_mask`: the relaxed drop indicator ``z = sigmoid((logit p + logit u) / t)``;
* :func:`weight_regularizer`, :func:`dropout_regularizer`, :func:`regularizer_coefficients`: the
  KL term of the objective, split as in the paper;
* :class:`ConcreteDropout`: a layer wrapper with a learnable ``p = sigmoid(logit_p)``;
* :class:`ConcreteDropoutRegressor`, :func:`regression_loss`: a 1-D regression network with a
  Gaussian likelihood of learned (homoscedastic) noise;
* :func:`mc_predict`: the MC-dropout predictive mean and spread from ``T`` stochastic passes.

Shapes: inputs ``(B, D)``; one mask entry per input entry, drawn afresh for every row.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Normal

from .. import runtime
from ..train import History, train

__all__ = [
    "TEMPERATURE",
    "relaxed_drop_mask",
    "weight_regularizer",
    "dropout_regularizer",
    "regularizer_coefficients",
    "ConcreteDropout",
    "ConcreteDropoutRegressor",
    "regression_loss",
    "fit_regressor",
    "MCPrediction",
    "mc_predict",
    "RegionSpread",
    "region_spread",
]

TEMPERATURE = 0.1  # the temperature of the relaxed mask in Gal et al. (2017)


def _check_probability(name: str, p) -> None:
    values = torch.as_tensor(p)
    if not torch.all((values > 0) & (values < 1)):
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {p}")


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def relaxed_drop_mask(
    logit_p: Tensor,
    shape: Sequence[int],
    *,
    temperature: float = TEMPERATURE,
    u: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The relaxed drop indicator of Concrete dropout (Gal et al. 2017):

        z = sigmoid((log p - log(1 - p) + log u - log(1 - u)) / t),   u ~ Uniform(0, 1),

    a ``RelaxedBernoulli(t, probs=p)`` sample written as a function of the noise ``u``, so
    ``dz/dlogit_p`` exists (pathwise). ``z`` near 1 drops the unit; the mask is ``1 - z``. As
    ``t -> 0``, ``z`` tends to the hard indicator ``1[logit p + logit u > 0]``, which is
    Bernoulli(p) exactly; for ``t > 0`` its mean is pulled slightly towards 1/2.

    logit_p: ``log p - log(1 - p)``, broadcastable to ``shape``; u: noise of ``shape`` in (0, 1)
    (drawn from ``generator`` if ``None``). Returns ``z`` of ``shape``.
    """
    _check_positive("temperature", temperature)
    shape = torch.Size(shape)
    if u is None:
        u = torch.rand(shape, generator=generator, dtype=logit_p.dtype, device=logit_p.device)
    elif u.shape != shape:
        raise ValueError(f"u must have shape {tuple(shape)}, got {tuple(u.shape)}")
    tiny = torch.finfo(u.dtype).tiny
    u = u.clamp(tiny, 1 - torch.finfo(u.dtype).eps)  # log u and log(1 - u) stay finite
    logit_u = u.log() - (-u).log1p()
    return torch.sigmoid((logit_p + logit_u) / temperature)


def weight_regularizer(weight: Tensor, p: Tensor, coefficient: float) -> Tensor:
    """The weight term of one layer: ``coefficient * ||W||^2 / (1 - p)``.

    The layer sees its input divided by ``1 - p``, so its weight ``W`` is the paper's mean
    weight ``M`` times ``1 - p``, and the prior term ``l^2 (1 - p) ||M||^2 / 2`` of the KL
    (Gal et al. 2017) becomes ``l^2 ||W||^2 / (2 (1 - p))``. With the objective scaled by
    ``2 / (tau N)`` (see :func:`regularizer_coefficients`), ``coefficient = l^2 / (tau N)``.
    """
    return coefficient * weight.pow(2).sum() / (1 - p)


def dropout_regularizer(p: Tensor, input_dim: int, coefficient: float) -> Tensor:
    """The dropout term of one layer: ``coefficient * K * (p log p + (1 - p) log(1 - p))``.

    It is ``-K H(p)``, minus the entropy of the ``K`` input units' Bernoulli(p) masks, from the
    KL (Gal et al. 2017): it rewards a high rate, up to ``p = 1/2``. With the objective
    scaled by ``2 / (tau N)``, ``coefficient = 2 / (tau N)``.
    """
    return coefficient * input_dim * (p * p.log() + (1 - p) * (-p).log1p())


def regularizer_coefficients(n_data: int, length_scale: float,
                             precision: float = 1.0) -> tuple[float, float]:
    """``(l^2 / (tau N), 2 / (tau N))``: the weight and dropout coefficients of Gal et al. (2017).

    The negative ELBO ``sum_i -log p(y_i | x_i) + KL`` is multiplied by ``2 / (tau N)`` (Gal et
    al. 2017 and their reference code): the data term becomes a mean over the data, and both
    regularizers shrink like ``1 / N``, so more data leaves less room for dropout. ``l`` is the
    prior length scale (the prior on weights is N(0, 1 / l^2)); ``tau`` the model precision, 1
    when the noise is learned as part of the likelihood, as here.
    """
    if isinstance(n_data, bool) or not isinstance(n_data, int) or n_data < 1:
        raise ValueError(f"n_data must be a positive int, got {n_data!r}")
    _check_positive("length_scale", length_scale)
    _check_positive("precision", precision)
    return length_scale**2 / (precision * n_data), 2.0 / (precision * n_data)


class ConcreteDropout(nn.Module):
    """Concrete dropout on the input of ``layer``, with a learnable rate ``p = sigmoid(logit_p)``.

    forward:  ``layer(x * (1 - z) / (1 - p))``, ``z`` from :func:`relaxed_drop_mask` per entry of
              ``x`` (shape ``(B, K)``), so the expected input is (nearly) unchanged.
    regularization: ``weight_regularizer(W) + dropout_regularizer(p, K)``, the layer's share of
              the scaled KL; the bias is regularized by ``weight_coefficient * ||b||^2`` (it does
              not multiply a dropped input, so has no ``1 / (1 - p)``).
    """

    def __init__(self, layer: nn.Linear, *, weight_coefficient: float, dropout_coefficient: float,
                 p_init: float = 0.1, temperature: float = TEMPERATURE) -> None:
        super().__init__()
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"layer must be an nn.Linear, got {type(layer).__name__}")
        for name, value in [("weight_coefficient", weight_coefficient),
                            ("dropout_coefficient", dropout_coefficient)]:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        _check_probability("p_init", p_init)
        _check_positive("temperature", temperature)
        self.layer = layer
        self.weight_coefficient = float(weight_coefficient)
        self.dropout_coefficient = float(dropout_coefficient)
        self.temperature = float(temperature)
        logit = math.log(p_init) - math.log1p(-p_init)
        self.logit_p = nn.Parameter(torch.tensor(logit, dtype=layer.weight.dtype,
                                                 device=layer.weight.device))

    @property
    def p(self) -> Tensor:
        """The drop probability ``sigmoid(logit_p)``."""
        return torch.sigmoid(self.logit_p)

    def forward(self, x: Tensor, *, u: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.layer.in_features:
            raise ValueError(f"x must have shape (B, {self.layer.in_features}), got {tuple(x.shape)}")
        z = relaxed_drop_mask(self.logit_p, x.shape, temperature=self.temperature, u=u,
                              generator=generator)
        return self.layer(x * (1 - z) / (1 - self.p))  # (B, K) -> (B, out)

    def regularization(self) -> Tensor:
        p, c_w = self.p, self.weight_coefficient
        bias = 0.0 if self.layer.bias is None else c_w * self.layer.bias.pow(2).sum()
        return (weight_regularizer(self.layer.weight, p, c_w) + bias
                + dropout_regularizer(p, self.layer.in_features, self.dropout_coefficient))


class ConcreteDropoutRegressor(nn.Module):
    """``y = f(x) + sigma * eps``: an MLP with Concrete dropout before every layer but the first.

    ``Linear(in, h1) -> ReLU -> CD Linear(h1, h2) -> ReLU -> ... -> CD Linear(hL, 1)``; the input
    layer is not dropped (dropping a 1-D input would erase it). ``log_sigma`` is a learned,
    homoscedastic noise level. Coefficients from :func:`regularizer_coefficients` with
    ``n_data`` and ``length_scale`` (``precision = 1``, since the noise is learned).
    """

    def __init__(self, n_data: int, *, hidden: Sequence[int] = (64, 64), in_features: int = 1,
                 length_scale: float = 1e-2, p_init: float = 0.1, temperature: float = TEMPERATURE,
                 sigma_init: float = 0.5) -> None:
        super().__init__()
        hidden = list(hidden)
        if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden must be a non-empty sequence of positive ints, got {hidden}")
        _check_positive("sigma_init", sigma_init)
        c_w, c_d = regularizer_coefficients(n_data, length_scale)
        self.n_data, self.length_scale = n_data, length_scale
        self.input = nn.Linear(in_features, hidden[0])
        sizes = hidden + [1]
        self.dropped = nn.ModuleList(
            ConcreteDropout(nn.Linear(a, b), weight_coefficient=c_w, dropout_coefficient=c_d,
                            p_init=p_init, temperature=temperature)
            for a, b in zip(sizes[:-1], sizes[1:])
        )
        self.log_sigma = nn.Parameter(torch.tensor(math.log(sigma_init)))

    def forward(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """One stochastic pass: the mean ``f(x)`` of shape ``(B, 1)`` under fresh masks."""
        h = torch.relu(self.input(x))
        for i, layer in enumerate(self.dropped):
            h = layer(h, generator=generator)
            if i < len(self.dropped) - 1:
                h = torch.relu(h)
        return h

    @property
    def sigma(self) -> Tensor:
        return self.log_sigma.exp()

    def drop_rates(self) -> list[float]:
        """The current ``p`` of each Concrete dropout layer, input side first."""
        return [layer.p.item() for layer in self.dropped]

    def regularization(self) -> Tensor:
        c_w = self.dropped[0].weight_coefficient
        first = c_w * sum(w.pow(2).sum() for w in self.input.parameters())  # not dropped: no 1/(1-p)
        return first + sum(layer.regularization() for layer in self.dropped)


def regression_loss(model: ConcreteDropoutRegressor, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The objective of Gal et al. (2017), ``2 / N`` times the negative ELBO (up to a constant):

        L = (2 / B) sum_i -log N(y_i | f(x_i; z_i), sigma^2) + sum_layers regularization,

    one mask draw per row, the minibatch mean standing for the mean over the ``N`` data.
    batch: ``(x, y)`` of shapes ``(B, D)`` and ``(B, 1)``. A scalar.
    """
    x, y = batch
    if y.dim() != 2 or y.shape != (x.shape[0], 1):
        raise ValueError(f"y must have shape ({x.shape[0]}, 1), got {tuple(y.shape)}")
    nll = -Normal(model(x), model.sigma).log_prob(y).mean()
    return 2 * nll + model.regularization()


def fit_regressor(x: Tensor, y: Tensor, *, hidden: Sequence[int] = (32, 32), steps: int = 1000,
                  lr: float = 1e-2, seed: int = 0, length_scale: float = 1e-2, p_init: float = 0.1,
                  record_every: int = 25, progress: bool | None = None
                  ) -> tuple[ConcreteDropoutRegressor, History]:
    """Fit a :class:`ConcreteDropoutRegressor` to all ``N`` points ``(x, y)`` (full batches, Adam).

    The model is initialized after :func:`companion.runtime.seed` ``(seed)``, so the run is a pure
    function of the data and the seed. Weights, noise level and drop rates are trained together
    by :func:`companion.train.train`; every ``record_every`` steps ``history.evals`` records the
    drop rates (``"p0"``, ``"p1"``, ...) and the noise level ``"sigma"``. Returns the model (on
    the device) and the history.
    """
    runtime.seed(seed)  # the initial weights too are a function of the seed
    model = ConcreteDropoutRegressor(x.shape[0], hidden=hidden, in_features=x.shape[1],
                                     length_scale=length_scale, p_init=p_init)

    def record(step: int, m: ConcreteDropoutRegressor) -> dict:
        return {**{f"p{i}": p for i, p in enumerate(m.drop_rates())}, "sigma": m.sigma.item()}

    history = train(model, regression_loss, (x, y), steps=steps, lr=lr, seed=seed,
                    callback=record, callback_every=record_every, progress=progress)
    return model, history


class MCPrediction(NamedTuple):
    """MC dropout at inputs ``x`` of shape ``(B, D)``.

    samples: the ``T`` stochastic passes ``f_t(x)``, ``(T, B)``;
    mean:    the predictive mean ``(1/T) sum_t f_t(x)``, ``(B,)``;
    std:     the spread of the passes (model, or epistemic, uncertainty), ``(B,)``;
    total_std: ``sqrt(std^2 + sigma^2)``, adding the learned noise, ``(B,)``.
    """

    samples: Tensor
    mean: Tensor
    std: Tensor
    total_std: Tensor


@torch.no_grad()
def mc_predict(model: ConcreteDropoutRegressor, x: Tensor, num_passes: int, *,
               generator: torch.Generator | None = None) -> MCPrediction:
    """MC-dropout prediction (Gal and Ghahramani 2016): keep dropout on at test time and average
    ``T = num_passes`` stochastic forward passes; their spread is the model's uncertainty.
    ``x`` is moved to the model's device, where the results stay.

        mean(x) = (1/T) sum_t f_t(x),   std(x)^2 = 1/(T-1) sum_t (f_t(x) - mean(x))^2.
    """
    if isinstance(num_passes, bool) or not isinstance(num_passes, int) or num_passes < 2:
        raise ValueError(f"num_passes must be an int >= 2, got {num_passes!r}")
    if x.dim() != 2:
        raise ValueError(f"x must have shape (B, D), got {tuple(x.shape)}")
    b = x.shape[0]
    xs = x.to(model.log_sigma.device).repeat(num_passes, 1)  # (T B, D): each row its own masks
    samples = model(xs, generator=generator).reshape(num_passes, b)  # (T, B)
    std = samples.std(0)
    return MCPrediction(samples, samples.mean(0), std, (std**2 + model.sigma**2).sqrt())


class RegionSpread(NamedTuple):
    """rms_std: ``sqrt(v_R)``, the root-mean-square MC-dropout spread over the points of a region;
    stderr: its Monte Carlo standard error from the ``T`` passes."""

    rms_std: float
    stderr: float


def region_spread(samples: Tensor, region: Tensor) -> RegionSpread:
    """The spread of MC-dropout passes over a region ``R`` of inputs, with its standard error.

        v_R = mean_{x in R} std(x)^2 = (1/T) sum_t d_t,
        d_t = T/(T-1) mean_{x in R} (f_t(x) - mean(x))^2.

    Each pass draws fresh masks, so the ``d_t`` are (nearly) independent across passes:
    ``se(v_R) = sd(d_t) / sqrt(T)``; by the delta method ``se(sqrt v_R) = se(v_R) / (2 sqrt v_R)``.
    samples: ``(T, B)`` from :func:`mc_predict`; region: a boolean mask ``(B,)``.
    """
    if samples.dim() != 2 or region.shape != samples.shape[1:] or region.dtype != torch.bool:
        raise ValueError(f"region must be a boolean mask of shape ({samples.shape[-1]},), got "
                         f"{tuple(region.shape)} {region.dtype}")
    if not region.any():
        raise ValueError("region must select at least one input")
    t = samples.shape[0]
    f = samples[:, region.to(samples.device)].double()  # (T, |R|)
    d = (f - f.mean(0)).pow(2).mean(1) * t / (t - 1)  # (T,)
    v = d.mean()
    se_v = d.std() / math.sqrt(t)
    return RegionSpread(v.sqrt().item(), (se_v / (2 * v.sqrt())).item())
