"""Population viability: stage-structured stochastic matrix models and quasi-extinction risk.

Chapter *Conservation ecology*. The pieces:

* :func:`stage_matrix` builds a stage-classified projection matrix from stage survivals,
  stage durations and fecundities, as Crouse, Crowder and Caswell (1987) did for the loggerhead
  sea turtle (their numbers are :data:`LOGGERHEAD_SURVIVAL`, :data:`LOGGERHEAD_DURATION`,
  :data:`LOGGERHEAD_FECUNDITY`; their published matrix is :data:`LOGGERHEAD_MATRIX`);
* :class:`StageModel` is the stochastic model ``n_{t+1} = A_t n_t`` whose yearly matrix
  ``A_t`` is the mean matrix times mean-one lognormal factors driven by ``F`` standard normal
  environmental variables per year: reparameterized, so every simulated quantity is a
  differentiable function of the mean vital rates and of the noise;
* :func:`estimate_growth` gives the diffusion parameters ``(mu, sigma2)`` of the log census;
* :func:`quasi_extinction_probability` is the diffusion approximation of Dennis, Munholland and
  Scott (1991) for the probability of falling to a threshold within a horizon, computed in log
  space so that it is finite for any parameters;
* :func:`simulate_diffusion` and :func:`bridge_crossing_probability` check it by Monte Carlo:
  the Brownian-bridge correction makes a discretely simulated path an unbiased estimate of the
  continuously monitored crossing probability.

Shapes: paths first. Stage vectors ``(num_paths, K)``, log census ``(num_paths, years + 1)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_count

__all__ = [
    "LOGGERHEAD_STAGES",
    "LOGGERHEAD_SURVIVAL",
    "LOGGERHEAD_DURATION",
    "LOGGERHEAD_FECUNDITY",
    "LOGGERHEAD_MATRIX",
    "stage_matrix",
    "dominant_eigenvalue",
    "stable_stage_distribution",
    "StageModel",
    "simulate_log_census",
    "GrowthEstimate",
    "estimate_growth",
    "quasi_extinction_probability",
    "soft_quasi_extinction",
    "simulate_diffusion",
    "bridge_crossing_probability",
    "BGK_BETA",
]

F64 = torch.float64

#: The seven stages of the loggerhead sea turtle model of Crouse, Crowder and Caswell (1987).
LOGGERHEAD_STAGES = ("eggs and hatchlings", "small juveniles", "large juveniles", "subadults",
                     "novice breeders", "first-year remigrants", "mature breeders")
#: Annual survival of each stage (Crouse et al. 1987, Table 3, after Frazer 1983).
LOGGERHEAD_SURVIVAL = (0.6747, 0.7857, 0.6758, 0.7425, 0.8091, 0.8091, 0.8089)
#: Years spent in each stage but the last (Crouse et al. 1987, Table 3); the last is absorbing.
LOGGERHEAD_DURATION = (1.0, 7.0, 8.0, 6.0, 1.0, 1.0)
#: Eggs produced per individual per year by each stage (Crouse et al. 1987, Table 3).
LOGGERHEAD_FECUNDITY = (0.0, 0.0, 0.0, 0.0, 127.0, 4.0, 80.0)
#: The published projection matrix (Crouse et al. 1987, Table 4), dominant eigenvalue 0.9450.
LOGGERHEAD_MATRIX = (
    (0.0, 0.0, 0.0, 0.0, 127.0, 4.0, 80.0),
    (0.6747, 0.7370, 0.0, 0.0, 0.0, 0.0, 0.0),
    (0.0, 0.0486, 0.6610, 0.0, 0.0, 0.0, 0.0),
    (0.0, 0.0, 0.0147, 0.6907, 0.0, 0.0, 0.0),
    (0.0, 0.0, 0.0, 0.0518, 0.0, 0.0, 0.0),
    (0.0, 0.0, 0.0, 0.0, 0.8091, 0.0, 0.0),
    (0.0, 0.0, 0.0, 0.0, 0.0, 0.8091, 0.8089),
)
#: ``-zeta(1/2) / sqrt(2 pi)``: the continuity correction of Broadie, Glasserman and Kou (1997).
BGK_BETA = 1.4603545088095868 / math.sqrt(2 * math.pi)


def _tensor(value, name: str) -> Tensor:
    out = value if isinstance(value, Tensor) else torch.as_tensor(value, dtype=F64)
    if not out.is_floating_point():
        out = out.to(F64)
    if not bool(torch.all(torch.isfinite(out))):
        raise ValueError(f"{name} must be finite")
    return out


# --------------------------------------------------------------------------- the stage matrix


def stage_matrix(survival, duration, fecundity) -> Tensor:
    """A stage-classified projection matrix ``(K, K)`` from vital rates (Crouse et al. 1987).

    An individual of stage ``i < K`` survives the year with probability ``s_i`` and spends
    ``d_i`` years in the stage; with ``q_i = s_i^{d_i}``, the probability of staying and of
    moving on are (the geometric stage-duration model of Caswell 2001, sec. 6.4)::

        P_i = s_i (1 - s_i^{d_i - 1}) / (1 - q_i),     G_i = q_i (1 - s_i) / (1 - q_i),

    on the diagonal and the subdiagonal; the last stage stays with ``P_K = s_K``; fecundities
    ``f`` fill the first row. Differentiable in ``survival`` ``(K,)`` (values in ``(0, 1)``) and
    ``fecundity`` ``(K,)`` (``>= 0``); ``duration`` ``(K - 1,)`` holds years ``>= 1``.
    """
    s, d, f = _tensor(survival, "survival"), _tensor(duration, "duration"), _tensor(fecundity, "fecundity")
    if s.dim() != 1 or f.shape != s.shape or d.shape != (s.shape[0] - 1,):
        raise ValueError("survival and fecundity must be (K,), duration (K - 1,)")
    if bool(torch.any((s <= 0) | (s >= 1))):
        raise ValueError("survival must lie in (0, 1)")
    if bool(torch.any(d < 1)):
        raise ValueError("duration must be >= 1 year")
    if bool(torch.any(f < 0)):
        raise ValueError("fecundity must be >= 0")
    k = s.shape[0]
    st, q = s[:-1], s[:-1] ** d
    stay = st * (1 - st ** (d - 1)) / (1 - q)  # (K - 1,)
    grow = q * (1 - st) / (1 - q)  # (K - 1,)
    diagonal = torch.cat([stay, s[-1:]])
    matrix = torch.diag(diagonal) + torch.diag(grow, -1)
    first_row = torch.cat([f.unsqueeze(0), torch.zeros(k - 1, k, dtype=f.dtype)])
    return matrix + first_row


def dominant_eigenvalue(matrix: Tensor) -> Tensor:
    """``lambda_1``: the dominant (Perron) eigenvalue of a non-negative matrix, differentiable.

    The deterministic growth rate of the population per year (Caswell 2001, ch. 4).
    """
    if not isinstance(matrix, Tensor) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError("matrix must be a square tensor")
    values = torch.linalg.eigvals(matrix)
    return values[values.real.argmax()].real


def stable_stage_distribution(matrix: Tensor) -> Tensor:
    """``w``: the right eigenvector of ``lambda_1``, normalized to sum to 1, ``(K,)``.

    The stage structure a deterministic population converges to (Caswell 2001, ch. 4).
    """
    if not isinstance(matrix, Tensor) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError("matrix must be a square tensor")
    values, vectors = torch.linalg.eig(matrix)
    w = vectors[:, values.real.argmax()].real
    return w / w.sum()


# --------------------------------------------------------------------------- the stochastic model


@dataclass(frozen=True, eq=False)
class StageModel:
    """``n_{t+1} = A_t n_t`` with a random yearly matrix around ``matrix_mean``.

    matrix_mean
        ``Abar``, ``(K, K)``, non-negative: the mean projection matrix (may require grad).
    matrix_noise
        ``L``, ``(K, K)`` or ``(F, K, K)``, non-negative: the log-scale loadings of ``F``
        environmental factors on each entry. Each year draws ``eps_t ~ N(0, I_F)`` and::

            A_t = Abar * exp(sum_f L_f eps_tf - v / 2),     v = sum_f L_f^2,

        entrywise, so ``E[A_t] = Abar``: good and bad years move the entries loaded on the same
        factor together. Entries with zero loading are fixed.
    """

    matrix_mean: Tensor
    matrix_noise: Tensor

    def __post_init__(self) -> None:
        mean, noise = self.matrix_mean, self.matrix_noise
        if not isinstance(mean, Tensor) or mean.dim() != 2 or mean.shape[0] != mean.shape[1]:
            raise ValueError("matrix_mean must be a square tensor (K, K)")
        if not isinstance(noise, Tensor) or noise.shape[-2:] != mean.shape or noise.dim() not in (2, 3):
            raise ValueError(f"matrix_noise must have shape {tuple(mean.shape)} or (F, *{tuple(mean.shape)})")
        if bool(torch.any(mean < 0)) or not bool(torch.all(torch.isfinite(mean))):
            raise ValueError("matrix_mean must be finite and >= 0")
        if bool(torch.any(noise < 0)) or not bool(torch.all(torch.isfinite(noise))):
            raise ValueError("matrix_noise must be finite and >= 0")

    @property
    def num_stages(self) -> int:
        return self.matrix_mean.shape[0]

    @property
    def loadings(self) -> Tensor:
        """``(F, K, K)``."""
        return self.matrix_noise if self.matrix_noise.dim() == 3 else self.matrix_noise.unsqueeze(0)

    @property
    def num_factors(self) -> int:
        return self.loadings.shape[0]

    def yearly_matrices(self, eps: Tensor) -> Tensor:
        """``A_t`` for factors ``eps`` ``(..., F)``: ``(..., K, K)``, differentiable in both."""
        loadings = self.loadings
        log_factor = torch.einsum("...f,fij->...ij", eps, loadings) - 0.5 * (loadings**2).sum(0)
        return self.matrix_mean * torch.exp(log_factor)


def _check_model(model) -> StageModel:
    if not isinstance(model, StageModel):
        raise ValueError(f"model must be a StageModel, got {type(model).__name__}")
    return model


def _noise(model: StageModel, num_paths: int, years: int, eps: Tensor | None,
           generator: torch.Generator | None) -> Tensor:
    shape = (num_paths, years, model.num_factors)
    if eps is not None:
        if not isinstance(eps, Tensor) or eps.shape != shape:
            raise ValueError(f"eps must be a tensor of shape (num_paths, years, F) = {shape}")
        return eps
    return torch.randn(shape, generator=generator, dtype=model.matrix_mean.dtype)


def _census(model: StageModel, census) -> Tensor:
    k = model.num_stages
    if census is None:
        return torch.ones(k, dtype=model.matrix_mean.dtype)
    c = _tensor(census, "census")
    if c.shape != (k,) or bool(torch.any(c < 0)) or not bool(torch.any(c > 0)):
        raise ValueError(f"census must be (K,) = ({k},) weights >= 0, not all zero")
    return c.to(model.matrix_mean.dtype)


def simulate_log_census(model: StageModel, n0, years: int, num_paths: int, *, census=None,
                        eps: Tensor | None = None, generator: torch.Generator | None = None
                        ) -> tuple[Tensor, Tensor]:
    """Simulate ``years`` years: the log census ``X_t = log(c . n_t)``, ``(num_paths, years + 1)``.

    ``n0`` ``(K,)`` or ``(num_paths, K)``, positive total; ``census`` ``c`` ``(K,)`` weights the
    stages that are counted (all ones by default: the total population). The stage vector is
    renormalized every year and its log scale carried separately, so that no count under- or
    overflows over long horizons. Returns ``(X, n_T / sum(n_T))``: the log census and the final
    stage structure. Differentiable in ``model.matrix_mean`` and ``eps`` ``(num_paths, years, F)``.
    """
    _check_model(model)
    check_count("years", years)
    check_count("num_paths", num_paths)
    k = model.num_stages
    n = _tensor(n0, "n0").to(model.matrix_mean.dtype)
    if n.shape not in ((k,), (num_paths, k)) or bool(torch.any(n < 0)) or not bool(torch.all(n.sum(-1) > 0)):
        raise ValueError(f"n0 must be ({k},) or ({num_paths}, {k}), >= 0, with a positive total")
    c = _census(model, census)
    eps = _noise(model, num_paths, years, eps, generator)
    n = n.expand(num_paths, k)
    scale = n.sum(-1).log()  # (P,)
    n = n / n.sum(-1, keepdim=True)
    logs = [scale + torch.log(n @ c)]
    for t in range(years):
        a = model.yearly_matrices(eps[:, t])  # (P, K, K)
        n = (a @ n.unsqueeze(-1)).squeeze(-1)
        total = n.sum(-1)
        scale = scale + total.log()
        n = n / total.unsqueeze(-1)
        logs.append(scale + torch.log(n @ c))
    return torch.stack(logs, 1), n


class GrowthEstimate(NamedTuple):
    """``mu``, ``sigma2``: the drift and the variance per year of the log census (scalars);
    ``structure``: the stage structure ``(num_paths, K)`` the simulation ended in."""

    mu: Tensor
    sigma2: Tensor
    structure: Tensor


def estimate_growth(model: StageModel, years: int, num_paths: int, *, burn_in: int = 50,
                    census=None, eps: Tensor | None = None,
                    generator: torch.Generator | None = None) -> GrowthEstimate:
    """The diffusion parameters of the log census, ``X_T - X_0 ~ N(mu T, sigma2 T)`` for large T.

    Simulates ``num_paths`` independent paths for ``burn_in + years`` years from a uniform stage
    vector, discards the burn-in (the stage structure settles on its stochastic stable
    distribution), and with ``D = X_{burn_in + years} - X_{burn_in}``::

        mu = mean(D) / years,          sigma2 = var(D) / years,

    the long-run growth rate ``log lambda_s`` and the long-run variance of Tuljapurkar and Orzack (1980)
    and Lande and Orzack (1988): the parameters that the diffusion approximation of Dennis et al.
    (1991) needs. Using the variance across paths of the whole increment (rather than of
    one-year increments) accounts for the autocorrelation that the stage structure induces.
    Differentiable in ``model.matrix_mean`` (the pathwise gradient, with ``eps`` fixed);
    ``eps`` has shape ``(num_paths, burn_in + years, F)``.
    """
    _check_model(model)
    check_count("years", years)
    check_count("num_paths", num_paths, 2)
    check_count("burn_in", burn_in, 0)
    k = model.num_stages
    eps = _noise(model, num_paths, burn_in + years, eps, generator)
    n0 = torch.full((k,), 1.0 / k, dtype=model.matrix_mean.dtype)
    logs, structure = simulate_log_census(model, n0, burn_in + years, num_paths, census=census, eps=eps)
    increment = logs[:, -1] - logs[:, burn_in]  # (P,)
    return GrowthEstimate(increment.mean() / years, increment.var() / years, structure)


# --------------------------------------------------------------------------- the diffusion approximation


def quasi_extinction_probability(x_d, mu, sigma2, horizon) -> Tensor:
    """``G(T)``: probability that ``log N`` falls ``x_d`` below its start within ``T`` years.

    For ``log N(t) = log N_0 + mu t + sigma W(t)`` and ``x_d = log(N_0 / N_q)``, the first
    passage to the threshold ``N_q`` has the (possibly defective) inverse Gaussian law, and
    (Dennis, Munholland and Scott 1991, eq. 16)::

        G(T) = Phi((-x_d - mu T) / sqrt(sigma2 T))
               + exp(-2 mu x_d / sigma2) Phi((-x_d + mu T) / sqrt(sigma2 T)).

    The exponential overflows when ``-mu x_d / sigma2`` is large, while its partner ``Phi``
    underflows; the product is computed in log space. With ``a`` and ``b`` the two arguments,
    ``-2 mu x_d / sigma2 - b^2 / 2 = -a^2 / 2``, so for ``b < 0`` the second term is
    ``exp(-a^2 / 2) erfcx(-b / sqrt 2) / 2`` (``erfcx`` the scaled complementary error function),
    and ``log Phi`` (``torch.special.log_ndtr``) covers the rest. Arguments are floats or tensors
    that broadcast, with ``x_d >= 0``, ``sigma2 > 0`` and ``horizon > 0``; the result is a tensor
    in ``[0, 1]``, differentiable in every argument (its gradient is finite except for extreme
    ``sigma2`` such as ``1e-300``, whose reciprocal overflows).
    """
    x_d, mu, sigma2, horizon = (_tensor(v, n) for v, n in
                                [(x_d, "x_d"), (mu, "mu"), (sigma2, "sigma2"), (horizon, "horizon")])
    if bool(torch.any(x_d < 0)):
        raise ValueError("x_d = log(N_0 / N_q) must be >= 0 (the population starts above the threshold)")
    if bool(torch.any(sigma2 <= 0)):
        raise ValueError("sigma2 must be > 0")
    if bool(torch.any(horizon <= 0)):
        raise ValueError("horizon must be > 0")
    x_d, mu, sigma2, horizon = torch.broadcast_tensors(x_d, mu, sigma2, horizon)
    spread = torch.sqrt(sigma2 * horizon)
    a = (-x_d - mu * horizon) / spread
    b = (-x_d + mu * horizon) / spread
    log_first = _log_ndtr(a)
    negative = b < 0
    # b < 0: exp(-2 mu x_d / sigma2) Phi(b) = exp(-a^2 / 2) erfcx(-b / sqrt 2) / 2, no overflow
    b_neg = torch.where(negative, b, -torch.ones_like(b))
    log_second_neg = -0.5 * a**2 + torch.log(torch.special.erfcx(-b_neg / math.sqrt(2)) / 2)
    # b >= 0 means mu T >= x_d >= 0, so the exponent -2 mu x_d / sigma2 is <= 0
    exponent = torch.where(negative, torch.zeros_like(b), -2 * mu * x_d / sigma2)
    b_pos = torch.where(negative, torch.zeros_like(b), b)
    log_second_pos = exponent + torch.special.log_ndtr(b_pos)
    log_second = torch.where(negative, log_second_neg, log_second_pos)
    # a floor far below log(smallest double) keeps the sum finite (and its gradient free of
    # inf - inf) when both terms underflow; it changes no value
    floor = -1e300
    total = torch.logaddexp(log_first.clamp(min=floor), log_second.clamp(min=floor))
    return torch.exp(total).clamp(max=1.0)


def _log_ndtr(x: Tensor) -> Tensor:
    """``log Phi(x)`` with a finite gradient far in the left tail.

    ``log Phi(x) = -x^2 / 2 + log(erfcx(-x / sqrt 2) / 2)`` for ``x < 0`` (torch's ``log_ndtr``
    gradient is ``nan`` there for ``|x|`` of order ``1e10``); ``log_ndtr`` for ``x >= 0``.
    """
    left = x < 0
    x_left = torch.where(left, x, -torch.ones_like(x))
    x_right = torch.where(left, torch.zeros_like(x), x)
    tail = -0.5 * x_left**2 + torch.log(torch.special.erfcx(-x_left / math.sqrt(2)) / 2)
    return torch.where(left, tail, torch.special.log_ndtr(x_right))


def soft_quasi_extinction(log_census: Tensor, log_threshold, temperature: float) -> Tensor:
    """A smoothed indicator of quasi-extinction for each path: ``(num_paths,)``.

    ``sigmoid((log N_q - min_t X_t) / temperature)``: 1 when the log census ``X``
    ``(num_paths, years + 1)`` went well below ``log N_q``, 0 when it stayed well above. Its mean
    over paths tends to the quasi-extinction probability (monitored yearly) as the temperature
    falls, and it has a pathwise gradient, which the indicator (``temperature = 0``, returned
    exactly) does not: a bias traded for a gradient (chapter *Conservation ecology* measures it).
    ``log_threshold`` is ``log N_q`` on the scale of ``log_census``.
    """
    if not isinstance(log_census, Tensor) or log_census.dim() != 2:
        raise ValueError("log_census must be a tensor (num_paths, years + 1)")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0 \
            or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    distance = log_threshold - log_census.amin(1)  # > 0: the threshold was crossed
    if temperature == 0:
        return (distance >= 0).to(log_census.dtype)
    return torch.sigmoid(distance / temperature)


def simulate_diffusion(x_d, mu, sigma2, horizon: float, steps: int, num_paths: int, *,
                       eps: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Paths of ``Y(t) = x_d + mu t + sigma W(t)`` (the log distance to the threshold) on a grid.

    ``steps`` equal steps of ``dt = horizon / steps``; returns ``(num_paths, steps + 1)``,
    differentiable in the (scalar) parameters through ``Y = x_d + cumsum(mu dt + sqrt(sigma2 dt) eps)``.
    """
    check_count("steps", steps)
    check_count("num_paths", num_paths)
    x_d, mu, sigma2 = _tensor(x_d, "x_d"), _tensor(mu, "mu"), _tensor(sigma2, "sigma2")
    if isinstance(horizon, bool) or not isinstance(horizon, (int, float)) or not horizon > 0:
        raise ValueError(f"horizon must be a number > 0, got {horizon!r}")
    if bool(sigma2 <= 0):
        raise ValueError("sigma2 must be > 0")
    dt = horizon / steps
    if eps is None:
        eps = torch.randn(num_paths, steps, generator=generator, dtype=F64)
    elif not isinstance(eps, Tensor) or eps.shape != (num_paths, steps):
        raise ValueError(f"eps must be a tensor of shape (num_paths, steps) = ({num_paths}, {steps})")
    increments = mu * dt + torch.sqrt(sigma2 * dt) * eps
    start = x_d * torch.ones(num_paths, 1, dtype=increments.dtype)
    return torch.cat([start, x_d + increments.cumsum(1)], 1)


def bridge_crossing_probability(paths: Tensor, sigma2, dt: float) -> Tensor:
    """Per path, the probability that the continuous path crossed zero: ``(num_paths,)``.

    Given a Brownian path's values ``y_i`` on a grid, the bridge between two positive values
    ``y_i``, ``y_{i+1}`` dips below zero with probability ``exp(-2 y_i y_{i+1} / (sigma2 dt))``;
    a path with a value ``<= 0`` has crossed. So::

        p = 1 - prod_i (1 - exp(-2 y_i^+ y_{i+1}^+ / (sigma2 dt))),

    whose mean over paths from :func:`simulate_diffusion` is *exactly* the continuously
    monitored crossing probability (the Brownian-bridge correction, e.g. Glasserman 2004,
    sec. 6.4), while the indicator ``min_i y_i <= 0`` measures crossings seen only on the grid.
    """
    if not isinstance(paths, Tensor) or paths.dim() != 2 or paths.shape[1] < 2:
        raise ValueError("paths must be a tensor (num_paths, steps + 1)")
    if not dt > 0:
        raise ValueError("dt must be > 0")
    y = paths.clamp(min=0)
    miss = -torch.expm1(-2 * y[:, :-1] * y[:, 1:] / (sigma2 * dt))  # 1 - p_i, 0 once crossed
    return 1 - miss.prod(1)  # continuous in the path: its pathwise gradient is unbiased
