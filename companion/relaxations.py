"""Discrete choices made differentiable: Gumbel-max, Gumbel-Softmax, straight-through,
temperature schedules, and a rejection sampler with a smoothed accept step.

Chapter *Discrete choices*; Jang, Gu and Poole (2017); Maddison, Mnih and Teh (2017).
Every sampling function takes ``gumbels=`` (or ``eps``-like noise) or ``generator=``.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Distribution
from torch.distributions.relaxed_categorical import ExpRelaxedCategorical

from .runtime import rng

__all__ = [
    "sample_gumbel",
    "gumbel_max",
    "log_gumbel_softmax",
    "gumbel_softmax",
    "straight_through",
    "relaxed_log_prob",
    "exponential_annealing",
    "RejectionDraw",
    "smoothed_rejection_sample",
    "gumbel_softmax_gradient_samples",
    "GradientLimits",
    "gumbel_softmax_gradient_limits",
]


def _check_tau(tau) -> None:
    if isinstance(tau, Tensor):
        if not torch.all(tau > 0):
            raise ValueError(f"tau must be positive, got {tau}")
    elif not (isinstance(tau, (int, float)) and tau > 0):
        raise ValueError(f"tau must be a positive number, got {tau!r}")


def sample_gumbel(shape, *, generator=None, dtype=None, device=None) -> Tensor:
    """Standard Gumbel noise ``G = -log E``, ``E ~ Exponential(1)``, as in ``F.gumbel_softmax``."""
    e = torch.empty(shape, dtype=dtype, device=device).exponential_(generator=generator)
    return -e.log()


def _gumbels(logits: Tensor, gumbels: Tensor | None, generator) -> Tensor:
    if gumbels is None:
        return sample_gumbel(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
    if gumbels.shape != logits.shape:
        raise ValueError(f"gumbels must have the shape of logits {tuple(logits.shape)}, got {tuple(gumbels.shape)}")
    return gumbels


def gumbel_max(logits: Tensor, *, gumbels: Tensor | None = None, generator=None) -> Tensor:
    """An exact categorical sample: ``argmax_k (logits_k + G_k)`` with ``G_k`` i.i.d. Gumbel.

    ``P(argmax = k) = softmax(logits)_k`` (Gumbel 1954; Maddison et al. 2014). Returns indices of
    shape ``logits.shape[:-1]``; not differentiable.
    """
    return (logits + _gumbels(logits, gumbels, generator)).argmax(-1)


def log_gumbel_softmax(logits: Tensor, tau, *, gumbels: Tensor | None = None, generator=None) -> Tensor:
    """``log y`` of a Gumbel-Softmax sample: ``log_softmax((logits + G) / tau)``.

    Finite for every ``tau > 0`` even where ``y`` itself underflows to 0 (``tau = 1e-3``); the
    natural input of :func:`relaxed_log_prob`.
    """
    _check_tau(tau)
    return F.log_softmax((logits + _gumbels(logits, gumbels, generator)) / tau, dim=-1)


def straight_through(y_soft: Tensor) -> Tensor:
    """The one-hot ``argmax`` of ``y_soft`` in the forward pass, ``y_soft``'s gradient backward:
    ``one_hot(argmax y) - stop_grad(y) + y`` (Bengio et al. 2013; Jang et al. 2017)."""
    index = y_soft.argmax(-1, keepdim=True)
    y_hard = torch.zeros_like(y_soft).scatter(-1, index, 1.0)  # out of place: vmap has a rule for it
    return y_hard - y_soft.detach() + y_soft


def gumbel_softmax(
    logits: Tensor, tau, *, hard: bool = False, gumbels: Tensor | None = None, generator=None
) -> Tensor:
    """A Gumbel-Softmax (Concrete) sample ``y = softmax((logits + G) / tau)`` on the simplex.

    As ``tau -> 0`` it tends to the one-hot Gumbel-max sample (low bias, gradient variance growing
    like ``1 / tau``); for large ``tau`` it tends to the uniform vector. ``hard=True`` returns the
    :func:`straight_through` one-hot. With the global generator it draws the same noise as
    ``torch.nn.functional.gumbel_softmax``, and so returns the same sample.
    """
    _check_tau(tau)
    y = F.softmax((logits + _gumbels(logits, gumbels, generator)) / tau, dim=-1)
    return straight_through(y) if hard else y


def relaxed_log_prob(log_y: Tensor, logits: Tensor, tau) -> Tensor:
    """Log density of ``log y`` for a Gumbel-Softmax sample ``y`` (Maddison et al. 2017, eq. 6):

        log p(log y) = log (K-1)! + (K-1) log tau + sum_k (logits_k - tau log y_k)
                       - K logsumexp_k(logits_k - tau log y_k),

    torch's ``ExpRelaxedCategorical``. Unlike the density of ``y``, which subtracts
    ``sum_k log y_k`` and overflows when a coordinate of ``y`` underflows, it stays finite at small
    ``tau``; a KL between two relaxed variables is the same in either coordinate system.
    """
    _check_tau(tau)
    tau = torch.as_tensor(tau, dtype=logits.dtype, device=logits.device)
    return ExpRelaxedCategorical(tau, logits=logits, validate_args=False).log_prob(log_y)


def exponential_annealing(step: int, rate: float, *, tau0: float = 1.0, tau_min: float = 0.5) -> float:
    """Temperature ``max(tau_min, tau0 exp(-rate step))``, the schedule of Jang et al. (2017)."""
    if step < 0 or rate < 0 or tau_min <= 0 or tau0 <= 0:
        raise ValueError(
            f"exponential_annealing needs step >= 0, rate >= 0, tau0 > 0, tau_min > 0; "
            f"got step={step}, rate={rate}, tau0={tau0}, tau_min={tau_min}"
        )
    return max(tau_min, tau0 * math.exp(-rate * step))


class RejectionDraw(NamedTuple):
    """sample: the (softly) first accepted proposal, shape ``(*sample_shape, *event)``.
    weights: the mass ``pi_i`` on each proposal, shape ``(*sample_shape, N)``, summing to 1."""

    sample: Tensor
    weights: Tensor


def smoothed_rejection_sample(
    log_target: Callable[[Tensor], Tensor],
    proposal: Distribution,
    log_bound: float | Tensor,
    num_proposals: int,
    tau: float,
    sample_shape=torch.Size(),
    *,
    generator=None,
) -> RejectionDraw:
    """Rejection sampling with a differentiable accept step.

    Proposals ``x_i ~ g`` (``proposal.rsample``) are accepted when ``log u_i < log a_i`` with
    ``a_i = p(x_i) / (M g(x_i))``, ``log M = log_bound``. The hard indicator is smoothed to
    ``s_i = sigmoid((log a_i - log u_i) / tau)`` and the first acceptance to the weights

        pi_i = s_i prod_{j < i} (1 - s_j),   pi_N = prod_{j < N} (1 - s_j),

    so the returned ``sum_i pi_i x_i`` is differentiable in the parameters of ``p`` and ``g``.
    ``tau = 0`` is the exact algorithm; the last proposal is taken if none before it was
    accepted, a bias of at most ``(1 - 1/M)^(N - 1)``. ``log_target`` may be unnormalized if
    ``log_bound`` is adjusted to match.
    """
    if not isinstance(num_proposals, int) or num_proposals < 1:
        raise ValueError(f"num_proposals must be a positive int, got {num_proposals!r}")
    if not tau >= 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    shape = torch.Size(sample_shape) + (num_proposals,)
    with rng(generator):
        x = proposal.rsample(shape)  # (*S, N, *event)
        log_u = torch.rand(shape, dtype=x.dtype, device=x.device).clamp(min=torch.finfo(x.dtype).tiny).log()
    event_dims = len(proposal.event_shape)
    log_a = log_target(x) - log_bound - proposal.log_prob(x)  # (*S, N)
    margin = log_a - log_u
    s = (margin > 0).to(x.dtype) if tau == 0 else torch.sigmoid(margin / tau)
    s = torch.cat([s[..., :-1], torch.ones_like(s[..., -1:])], dim=-1)  # force the last one
    # pi_i = s_i prod_{j<i} (1 - s_j): an exclusive cumulative product
    survive = torch.cumprod(torch.cat([torch.ones_like(s[..., :1]), 1 - s[..., :-1]], dim=-1), dim=-1)
    weights = s * survive
    w = weights.reshape(*weights.shape, *([1] * event_dims))
    return RejectionDraw((w * x).sum(len(sample_shape)), weights)


# --------------------------------------------------------------------------- gradient diagnostics


def gumbel_softmax_gradient_samples(
    f: Callable[[Tensor], Tensor],
    logits: Tensor,
    tau,
    num_samples: int,
    *,
    hard: bool = False,
    gumbels: Tensor | None = None,
    generator=None,
) -> Tensor:
    """Per-sample pathwise gradients ``grad_logits f(y_s)``, ``y_s`` Gumbel-Softmax samples.

    ``y_s = softmax((logits + G_s) / tau)`` (or its :func:`straight_through` one-hot with
    ``hard=True``). The logits are copied once per sample, so one backward pass gives all
    ``num_samples`` gradients, shape ``(S, *logits.shape)``; their mean estimates
    ``grad E[f(y)]`` of the relaxed objective, a biased estimate of the discrete gradient
    ``grad E_{k ~ Cat(softmax(logits))}[f(onehot(k))]`` (chapter *Discrete choices*).
    ``f`` maps ``(S, *logits.shape)`` to ``(S,)``. ``gumbels`` (shape ``(S, *logits.shape)``)
    fixes the noise, e.g. to share it between temperatures.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    shape = (num_samples, *logits.shape)
    copies = logits.detach().expand(shape).clone().requires_grad_(True)
    y = gumbel_softmax(copies, tau, hard=hard, gumbels=gumbels, generator=generator)
    fy = f(y)
    if not isinstance(fy, Tensor) or tuple(fy.shape) != (num_samples,):
        raise ValueError(f"f must map samples of shape {shape} to shape ({num_samples},), got "
                         f"{tuple(fy.shape) if isinstance(fy, Tensor) else type(fy).__name__}")
    (grad,) = torch.autograd.grad(fy.sum(), copies)
    return grad


class GradientLimits(NamedTuple):
    """Small-temperature limits of the Gumbel-Softmax pathwise gradient ``g_tau``, both ``(K, ...)``.

    mean
        ``lim_{tau -> 0} E[g_tau]``, shape ``(K,)``.
    scaled_second_moment
        ``lim_{tau -> 0} tau E[g_tau g_tau^T]``, shape ``(K, K)``; also the limit of
        ``tau Cov[g_tau]``, since the mean stays bounded.
    """

    mean: Tensor
    scaled_second_moment: Tensor


def gumbel_softmax_gradient_limits(
    f: Callable[[Tensor], Tensor], logits: Tensor, *, hard: bool = False, num_nodes: int = 64
) -> GradientLimits:
    """The ``tau -> 0`` limits of the mean and of ``tau`` times the second moment of the
    Gumbel-Softmax gradient of ``f``, for one categorical with ``K`` classes.

    With ``x_k = logits_k + G_k``, a sample is within ``O(tau)`` of a vertex unless the two largest
    ``x_i, x_j`` are within ``O(tau)`` of each other. The top two are ``(i, j)`` with
    ``x_i - x_j`` in ``tau du`` with probability ``p_i p_j tau du + o(tau)`` (``p = softmax``;
    integrate the Gumbel densities), and there ``y = s e_i + (1 - s) e_j`` with
    ``s = sigmoid(u)``. The gradient is then ``(1/tau) s (1 - s) h_ij(s) (e_i - e_j)``, with
    ``h_ij(s) = d/ds f(s e_i + (1 - s) e_j)``, and substituting ``ds = s (1 - s) du``::

        E[g]             -> sum_{i<j} p_i p_j (e_i - e_j) int_0^1 h_ij(s) ds
                          = sum_{i<j} p_i p_j (f(e_i) - f(e_j)) (e_i - e_j),  the exact gradient;
        tau E[g g^T]     -> sum_{i<j} p_i p_j (e_i - e_j)(e_i - e_j)^T int_0^1 s (1 - s) h_ij(s)^2 ds.

    So the relaxed gradient is asymptotically unbiased and its variance grows like ``C / tau``.
    With ``hard=True`` (straight-through) ``h_ij`` is evaluated at the sample's vertex, ``h_ij(1)``
    for ``s > 1/2`` and ``h_ij(0)`` below: the mean tends to the trapezoid rule
    ``(h_ij(0) + h_ij(1)) / 2`` instead of ``f(e_i) - f(e_j)`` (a bias unless ``f`` is at most
    quadratic along the edges), and the integral becomes ``(h_ij(0)^2 + h_ij(1)^2) / 12``.
    Integrals by Gauss-Legendre with ``num_nodes`` nodes; ``f`` maps ``(n, K)`` to ``(n,)`` and
    must be differentiable on the simplex's edges. Chapter *Discrete choices*.
    """
    if logits.dim() != 1 or logits.shape[0] < 2:
        raise ValueError(f"logits must have shape (K,) with K >= 2, got {tuple(logits.shape)}")
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 2:
        raise ValueError(f"num_nodes must be an int >= 2, got {num_nodes!r}")
    k, dtype, device = logits.shape[0], logits.dtype, logits.device
    p = F.softmax(logits.detach(), -1)
    nodes, weights = (torch.as_tensor(a, dtype=dtype, device=device)
                      for a in np.polynomial.legendre.leggauss(num_nodes))
    s = (nodes + 1) / 2  # nodes on (0, 1)
    w = weights / 2
    if hard:
        s = torch.tensor([0.0, 1.0], dtype=dtype, device=device)  # the two vertices e_j, e_i
    eye = torch.eye(k, dtype=dtype, device=device)
    mean = torch.zeros(k, dtype=dtype, device=device)
    second = torch.zeros(k, k, dtype=dtype, device=device)
    for i in range(k):
        for j in range(i + 1, k):
            d = eye[i] - eye[j]
            y = (s[:, None] * eye[i] + (1 - s[:, None]) * eye[j]).requires_grad_(True)  # (n, K)
            (grad_f,) = torch.autograd.grad(f(y).sum(), y)
            h = grad_f @ d  # h_ij at the nodes
            if hard:
                first, square = h.sum() / 2, (h**2).sum() / 12
            else:
                first, square = (w * h).sum(), (w * s * (1 - s) * h**2).sum()
            mean = mean + p[i] * p[j] * first * d
            second = second + p[i] * p[j] * square * torch.outer(d, d)
    return GradientLimits(mean, second)
