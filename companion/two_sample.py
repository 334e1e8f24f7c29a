"""Two-sample statistics: is a set of model samples distributed like held-out data?

Both statistics here are quadratic forms in one pooled matrix ``G`` over the ``m + n`` points,
so one function evaluates them for the observed split and for any number of relabellings:

* the energy distance (Szekely and Rizzo 2013), with ``G_ij = -||z_i - z_j||``::

      D^2(P, Q) = 2 E|X - Y| - E|X - X'| - E|Y - Y'|  >= 0,  = 0 iff P = Q;

* the squared maximum mean discrepancy (Gretton et al. 2012), with a Gaussian kernel
  ``G_ij = k(z_i, z_j) = exp(-||z_i - z_j||^2 / (2 h^2))``::

      MMD^2(P, Q) = E k(X, X') + E k(Y, Y') - 2 E k(X, Y).

With ``k = -||.||`` the second formula is the first: the energy distance is the MMD of the
distance-induced kernel. ``unbiased=True`` (the default) averages the within-sample terms over
pairs ``i != j`` (a U-statistic, whose expectation is exactly ``D^2`` or ``MMD^2``, so it
fluctuates around 0 when ``P = Q``); ``unbiased=False`` includes ``i = j`` (the V-statistic).

A note on scipy: ``scipy.stats.energy_distance(u, v)`` for 1-D samples is
``sqrt(2) * (integral (F_u - G_v)^2)^(1/2)``, which equals the *square root* of the
V-statistic above: ``scipy_value**2 == energy_distance(x, y, unbiased=False)``.

:func:`permutation_test` gives the statistic's null distribution (its noise floor when both
samples come from one law) and a p-value; :func:`jackknife_stderr` gives its standard error.
Chapter *Diffusion models*.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "STATISTICS",
    "gaussian_kernel",
    "median_bandwidth",
    "energy_distance",
    "mmd2",
    "TwoSampleTest",
    "permutation_test",
    "jackknife_stderr",
]

STATISTICS = ("energy", "mmd")


# --------------------------------------------------------------------------- checks and the pooled matrix


def _check_samples(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    for name, s in (("x", x), ("y", y)):
        if not isinstance(s, Tensor) or not s.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {type(s).__name__}")
        if s.dim() not in (1, 2) or s.shape[0] < 2:
            raise ValueError(f"{name} must have shape (N,) or (N, D) with N >= 2, got {tuple(s.shape)}")
    x = x.unsqueeze(-1) if x.dim() == 1 else x
    y = y.unsqueeze(-1) if y.dim() == 1 else y
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    dtype = torch.promote_types(x.dtype, y.dtype)
    return x.to(dtype), y.to(dtype)


def _check_statistic(statistic: str) -> None:
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")


def _check_bandwidth(bandwidth) -> None:
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float, Tensor)) or not float(bandwidth) > 0:
        raise ValueError(f"bandwidth must be a positive number, got {bandwidth!r}")


def gaussian_kernel(x: Tensor, y: Tensor, bandwidth: float) -> Tensor:
    """``k(x_i, y_j) = exp(-||x_i - y_j||^2 / (2 h^2))`` for ``x (M, D)``, ``y (N, D)``: ``(M, N)``."""
    _check_bandwidth(bandwidth)
    return torch.exp(-torch.cdist(x, y).square() / (2 * float(bandwidth) ** 2))


def median_bandwidth(x: Tensor, y: Tensor) -> float:
    """The median heuristic: ``h`` = median distance between distinct points of the pooled sample."""
    x, y = _check_samples(x, y)
    z = torch.cat([x, y])
    d = torch.pdist(z)
    return float(d.median())


def _pooled_matrix(x: Tensor, y: Tensor, statistic: str, bandwidth) -> Tensor:
    """``G (M+N, M+N)`` over the pooled points: ``-distance`` (energy) or the Gaussian kernel (mmd)."""
    z = torch.cat([x, y])
    if statistic == "energy":
        return -torch.cdist(z, z)
    return gaussian_kernel(z, z, bandwidth)


def _quadratic_statistic(g: Tensor, in_x: Tensor, unbiased: bool) -> Tensor:
    """``mean_xx G + mean_yy G - 2 mean_xy G`` for each row of labels ``in_x (B, M+N)``: ``(B,)``.

    ``in_x[b, i] = 1`` puts point ``i`` in the first sample. Within-sample means run over pairs
    ``i != j`` when ``unbiased`` (U-statistic), over all pairs otherwise (V-statistic).
    ``G`` is symmetric, so ``(1 - a) G = 1^T G - a G``: one matrix product per batch of labels.
    """
    a = in_x.to(g.dtype)  # (B, N)
    b = 1 - a
    m, n = a.sum(1), b.sum(1)
    ag = a @ g  # (B, N)
    bg = g.sum(0) - ag
    s_xx, s_yy, s_xy = (ag * a).sum(1), (bg * b).sum(1), (ag * b).sum(1)
    if unbiased:
        diag = g.diagonal()
        s_xx, s_yy = s_xx - a @ diag, s_yy - b @ diag
        return s_xx / (m * (m - 1)) + s_yy / (n * (n - 1)) - 2 * s_xy / (m * n)
    return s_xx / m**2 + s_yy / n**2 - 2 * s_xy / (m * n)


def _statistic(x, y, statistic, bandwidth, unbiased) -> Tensor:
    x, y = _check_samples(x, y)
    _check_statistic(statistic)
    if statistic == "mmd":
        _check_bandwidth(bandwidth)
    g = _pooled_matrix(x, y, statistic, bandwidth)
    labels = torch.cat([torch.ones(x.shape[0]), torch.zeros(y.shape[0])]).to(g.device)
    return _quadratic_statistic(g, labels.unsqueeze(0), unbiased)[0]


# --------------------------------------------------------------------------- public statistics


def energy_distance(x: Tensor, y: Tensor, *, unbiased: bool = True) -> Tensor:
    """The squared energy distance ``D^2 = 2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (a scalar).

    x: ``(M, D)`` or ``(M,)``; y: ``(N, D)`` or ``(N,)``; ``|.|`` is the Euclidean norm.
    ``unbiased=True``: the U-statistic (within-sample pairs ``i != j``), unbiased for ``D^2``;
    ``unbiased=False``: the V-statistic, whose square root is ``scipy.stats.energy_distance``
    in 1-D. Szekely and Rizzo (2013); chapter *Diffusion models*.
    """
    return _statistic(x, y, "energy", None, unbiased)


def mmd2(x: Tensor, y: Tensor, *, bandwidth: float, unbiased: bool = True) -> Tensor:
    """The squared MMD with a Gaussian kernel: ``E k(X, X') + E k(Y, Y') - 2 E k(X, Y)``.

    ``k(a, b) = exp(-||a - b||^2 / (2 bandwidth^2))``; :func:`median_bandwidth` is the usual
    choice of ``bandwidth``. ``unbiased=True`` is ``MMD^2_u`` of Gretton et al. (2012, eq. 3).
    """
    return _statistic(x, y, "mmd", bandwidth, unbiased)


class TwoSampleTest(NamedTuple):
    """statistic: observed value; p_value: ``(1 + #{null >= statistic}) / (B + 1)``;
    null: ``(B,)`` values of the statistic under random relabellings of the pooled sample."""

    statistic: Tensor
    p_value: float
    null: Tensor


def permutation_test(
    x: Tensor,
    y: Tensor,
    *,
    statistic: str = "energy",
    num_permutations: int = 999,
    bandwidth: float | None = None,
    unbiased: bool = True,
    generator: torch.Generator | None = None,
) -> TwoSampleTest:
    """A permutation test of ``P = Q`` with the energy distance or the Gaussian ``MMD^2``.

    Under ``P = Q`` the pooled ``M + N`` points are exchangeable, so the statistic of a random
    relabelling (``M`` points to one side, ``N`` to the other) has the statistic's null law.
    The p-value ``(1 + #{null >= observed}) / (B + 1)`` is exact (valid at any sample size).
    The null's spread is the statistic's noise floor: the size of values produced by chance
    alone. ``bandwidth=None`` takes :func:`median_bandwidth` for the mmd. The ``B``
    relabellings are evaluated together as matrix products: cost ``O(B (M + N)^2)``.
    """
    x, y = _check_samples(x, y)
    _check_statistic(statistic)
    if isinstance(num_permutations, bool) or not isinstance(num_permutations, int) or num_permutations < 1:
        raise ValueError(f"num_permutations must be a positive int, got {num_permutations!r}")
    if statistic == "mmd":
        bandwidth = median_bandwidth(x, y) if bandwidth is None else bandwidth
        _check_bandwidth(bandwidth)
    g = _pooled_matrix(x, y, statistic, bandwidth)
    m, total = x.shape[0], x.shape[0] + y.shape[0]
    observed = torch.zeros(1, total, device=g.device)
    observed[0, :m] = 1
    stat = _quadratic_statistic(g, observed, unbiased)[0]
    gen_device = generator.device if generator is not None else torch.device("cpu")
    keys = torch.rand(num_permutations, total, generator=generator, device=gen_device)
    first = keys.argsort(1)[:, :m].to(g.device)  # a uniformly random M-subset per row
    labels = torch.zeros(num_permutations, total, device=g.device).scatter_(1, first, 1.0)
    null = torch.cat([_quadratic_statistic(g, chunk, unbiased) for chunk in labels.split(256)])
    p_value = (1 + int((null >= stat).sum())) / (num_permutations + 1)
    return TwoSampleTest(stat, p_value, null)


def jackknife_stderr(
    x: Tensor, y: Tensor, *, statistic: str = "energy", bandwidth: float | None = None
) -> Tensor:
    """The jackknife standard error of the unbiased statistic (energy ``D^2`` or ``MMD^2_u``).

    Delete-one values ``theta_(-i)`` drop one point of ``x`` (or of ``y``); for a two-sample
    U-statistic (Arvesen 1969) the variance estimate is
    ``(M-1)/M sum_i (theta_(-i) - mean)^2 + (N-1)/N sum_j (theta_(-j) - mean)^2``.
    Each ``theta_(-i)`` comes from the row sums of the pooled matrix in ``O((M+N)^2)`` in all.
    Needs ``M, N >= 3``. Use it to compare two statistics that are far from zero; near ``P = Q``
    the statistic is degenerate and :func:`permutation_test` gives the right noise floor.
    """
    x, y = _check_samples(x, y)
    _check_statistic(statistic)
    m, n = x.shape[0], y.shape[0]
    if m < 3 or n < 3:
        raise ValueError(f"jackknife_stderr needs at least 3 points in x and in y, got {m} and {n}")
    if statistic == "mmd":
        bandwidth = median_bandwidth(x, y) if bandwidth is None else bandwidth
        _check_bandwidth(bandwidth)
    g = _pooled_matrix(x, y, statistic, bandwidth)
    g = g - torch.diag_embed(g.diagonal())  # only pairs i != j enter the U-statistic
    gxx, gyy, gxy = g[:m, :m], g[m:, m:], g[:m, m:]
    s_xx, s_yy, s_xy = gxx.sum(), gyy.sum(), gxy.sum()
    # drop x_i: its row and column leave s_xx, its row leaves s_xy
    drop_x = (s_xx - 2 * gxx.sum(1)) / ((m - 1) * (m - 2)) + s_yy / (n * (n - 1)) \
        - 2 * (s_xy - gxy.sum(1)) / ((m - 1) * n)
    drop_y = s_xx / (m * (m - 1)) + (s_yy - 2 * gyy.sum(1)) / ((n - 1) * (n - 2)) \
        - 2 * (s_xy - gxy.sum(0)) / (m * (n - 1))
    var = (m - 1) / m * (drop_x - drop_x.mean()).square().sum() \
        + (n - 1) / n * (drop_y - drop_y.mean()).square().sum()
    return var.sqrt()
