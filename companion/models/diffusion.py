"""Denoising diffusion (DDPM) and a learnable monotone noise schedule.

Chapter *Diffusion models*; Sohl-Dickstein et al. (2015), Ho, Jain and Abbeel (2020), Kingma
et al. (2021). Names follow Ho et al.: ``betas``, ``alphas``, ``abar``, ``q_sample``,
``eps_model``. Time runs over ``t = 1, ..., T``; a schedule tensor of length ``T`` holds the
value of step ``t`` at index ``t - 1``.

The forward (noising) process is a reparameterization::

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I),

and the denoiser ``eps_theta(x_t, t)`` is trained to predict ``eps`` from ``x_t``. A schedule
``abar(phi)`` with parameters of its own gets its gradient through the same path:
:class:`MonotoneSchedule` and :func:`schedule_gradient_samples`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn
from torch.distributions import Independent, Normal

from ..estimators import pathwise, score_function
from .layers import mlp

__all__ = [
    "T",
    "linear_betas",
    "alphas",
    "abar",
    "betas_from_abar",
    "q_sample",
    "ddpm_loss",
    "timestep_embedding",
    "EpsMLP",
    "p_sample",
    "sample",
    "geometric_knots",
    "monotone_log_snr",
    "MonotoneSchedule",
    "schedule_gradient_samples",
]

T = 1000  # diffusion steps in Ho et al. (2020)
EpsModel = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- the fixed schedule


def linear_betas(num_steps: int = T, beta_1: float = 1e-4, beta_T: float = 0.02) -> Tensor:
    """``beta_t`` rising linearly from ``beta_1`` to ``beta_T`` (Ho et al. 2020, sec. 4): ``(T,)``, float64.

    float64 because ``abar_t = prod_s (1 - beta_s)`` multiplies a thousand numbers close to 1.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2, got {num_steps!r}")
    if not 0 < beta_1 <= beta_T < 1:
        raise ValueError(f"need 0 < beta_1 <= beta_T < 1, got beta_1={beta_1}, beta_T={beta_T}")
    return torch.linspace(beta_1, beta_T, num_steps, dtype=torch.float64)


def alphas(betas: Tensor) -> Tensor:
    """``alpha_t = 1 - beta_t``: ``(T,)``."""
    return 1 - betas


def abar(betas: Tensor) -> Tensor:
    """``abar_t = prod_{s <= t} alpha_s``, the signal kept after ``t`` steps: ``(T,)``, decreasing."""
    if not torch.all((betas > 0) & (betas < 1)):
        raise ValueError("betas must lie in (0, 1)")
    return torch.cumprod(alphas(betas), 0)


def betas_from_abar(abar_t: Tensor) -> Tensor:
    """Invert :func:`abar`: ``beta_t = 1 - abar_t / abar_{t-1}`` with ``abar_0 = 1``: ``(T,)``."""
    prev = torch.cat([abar_t.new_ones(1), abar_t[:-1]])
    return 1 - abar_t / prev


def _check_abar(abar_t: Tensor) -> Tensor:
    if not isinstance(abar_t, Tensor) or abar_t.dim() != 1 or abar_t.shape[0] < 2:
        raise ValueError(f"abar must be a 1-D tensor of length T >= 2, got {getattr(abar_t, 'shape', abar_t)}")
    if not torch.all((abar_t > 0) & (abar_t < 1)):
        raise ValueError("abar must lie in (0, 1)")
    return abar_t


def _check_t(t: Tensor, num_steps: int, n: int) -> Tensor:
    if not isinstance(t, Tensor) or t.dtype not in (torch.int32, torch.int64) or t.shape != (n,):
        raise ValueError(f"t must be an integer tensor of shape ({n},), got {getattr(t, 'shape', t)}")
    if n and (t.min() < 1 or t.max() > num_steps):
        raise ValueError(f"t must lie in [1, T] = [1, {num_steps}], got values in [{t.min()}, {t.max()}]")
    return t


# --------------------------------------------------------------------------- forward process and loss


def q_sample(x0: Tensor, t: Tensor, abar_t: Tensor, *, eps: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor:
    """A draw of ``x_t ~ q(x_t | x_0)``: ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``.

    x0: ``(N, D)``; t: ``(N,)`` integers in ``[1, T]``; abar_t: the schedule ``(T,)``;
    eps: ``(N, D)`` standard normal noise, drawn with ``generator`` when not given.
    Returns ``(N, D)`` in ``x0``'s dtype. Differentiable in ``x0``, ``abar_t`` and ``eps``.
    """
    if x0.dim() != 2:
        raise ValueError(f"x0 must have shape (N, D), got {tuple(x0.shape)}")
    _check_abar(abar_t)
    _check_t(t, abar_t.shape[0], x0.shape[0])
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    elif eps.shape != x0.shape:
        raise ValueError(f"eps must have the shape of x0 {tuple(x0.shape)}, got {tuple(eps.shape)}")
    a = abar_t.to(x0.device)[t.to(x0.device) - 1].unsqueeze(-1)  # (N, 1), float64
    return (a.sqrt().to(x0.dtype) * x0 + (1 - a).sqrt().to(x0.dtype) * eps)


def ddpm_loss(eps_model: EpsModel, x0: Tensor, abar_t: Tensor, *, t: Tensor | None = None,
              eps: Tensor | None = None, generator: torch.Generator | None = None,
              reduce: bool = True) -> Tensor:
    """The epsilon-prediction loss ``E_{t, x_0, eps} ||eps - eps_theta(x_t, t)||^2`` (Ho et al., eq. 14).

    ``t ~ U{1, ..., T}`` and ``eps ~ N(0, I)`` are drawn with ``generator`` unless given. Given
    ``eps`` (and ``t``), ``x_t`` is a fixed function of ``x_0`` and the schedule, not of
    ``theta``: for the gradient with respect to the denoiser's parameters it is a constant
    input, and ``grad_theta`` of the loss is ``-2 (eps - eps_theta)^T d eps_theta / d theta``
    evaluated there. If ``abar_t`` carries a graph (a learnable schedule), the same line
    ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` is the pathwise route of the schedule's
    gradient. x0: ``(N, D)``; returns a scalar (the batch mean), or ``(N,)`` if not ``reduce``.
    """
    _check_abar(abar_t)
    n = x0.shape[0]
    if t is None:
        t = torch.randint(1, abar_t.shape[0] + 1, (n,), generator=generator, device=x0.device)
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    x_t = q_sample(x0, t, abar_t, eps=eps)  # (N, D)
    per_example = (eps - eps_model(x_t, t)).square().sum(-1)  # (N,)
    return per_example.mean() if reduce else per_example


# --------------------------------------------------------------------------- the denoiser


def timestep_embedding(t: Tensor, dim: int, num_steps: int = T) -> Tensor:
    """Sinusoidal features of ``t`` (Vaswani et al. 2017, as in Ho et al.): ``(N,) -> (N, dim)``.

    ``[sin(w_k s), cos(w_k s)]`` with ``s = t / T`` and frequencies ``w_k`` geometric from 1 to
    ``T``, so that neighbouring steps and the whole range are both resolved.
    """
    if dim < 2 or dim % 2:
        raise ValueError(f"dim must be an even int >= 2, got {dim}")
    half = dim // 2
    freqs = torch.logspace(0, math.log10(num_steps), half, device=t.device)  # (half,)
    args = (t.float() / num_steps).unsqueeze(-1) * freqs  # (N, half)
    return torch.cat([args.sin(), args.cos()], -1)


class EpsMLP(nn.Module):
    """``eps_theta(x_t, t)``: an MLP on ``[x_t, embedding(t)]`` with SiLU activations.

    dim: data dimension ``D`` (2 for point clouds, 64 for 8x8 digits); hidden and depth: width
    and number of hidden layers; embed_dim: size of the time embedding. ``(N, D), (N,) -> (N, D)``.
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, embed_dim: int = 32,
                 num_steps: int = T):
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.dim, self.embed_dim, self.num_steps = dim, embed_dim, num_steps
        self.net = mlp([dim + embed_dim] + [hidden] * depth + [dim], activation=nn.SiLU)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        if x_t.dim() != 2 or x_t.shape[1] != self.dim:
            raise ValueError(f"x_t must have shape (N, {self.dim}), got {tuple(x_t.shape)}")
        emb = timestep_embedding(t.to(x_t.device), self.embed_dim, self.num_steps).to(x_t.dtype)
        return self.net(torch.cat([x_t, emb], -1))


# --------------------------------------------------------------------------- ancestral sampling


def p_sample(eps_model: EpsModel, x_t: Tensor, t: int, abar_t: Tensor, *, z: Tensor | None = None,
             generator: torch.Generator | None = None, variance: str = "beta") -> Tensor:
    """One reverse step ``x_{t-1} ~ p_theta(x_{t-1} | x_t)`` (Ho et al., Algorithm 2).

    ``x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(alpha_t) + sigma_t z``
    with ``sigma_t^2 = beta_t`` (``variance="beta"``) or the posterior variance
    ``beta_t (1 - abar_{t-1}) / (1 - abar_t)`` (``"beta_tilde"``), and no noise at ``t = 1``.
    x_t: ``(N, D)``; ``z ~ N(0, I)`` is drawn with ``generator`` unless given.
    """
    if variance not in ("beta", "beta_tilde"):
        raise ValueError(f"variance must be 'beta' or 'beta_tilde', got {variance!r}")
    num_steps = abar_t.shape[0]
    if not 1 <= t <= num_steps:
        raise ValueError(f"t must lie in [1, {num_steps}], got {t}")
    a_t = float(abar_t[t - 1])
    a_prev = float(abar_t[t - 2]) if t > 1 else 1.0
    beta_t = 1 - a_t / a_prev
    steps = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
    mean = (x_t - beta_t / math.sqrt(1 - a_t) * eps_model(x_t, steps)) / math.sqrt(1 - beta_t)
    if t == 1:
        return mean
    var = beta_t if variance == "beta" else beta_t * (1 - a_prev) / (1 - a_t)
    if z is None:
        z = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=x_t.device)
    return mean + math.sqrt(var) * z


@torch.no_grad()
def sample(eps_model: EpsModel, abar_t: Tensor, num_samples: int, dim: int, *,
           generator: torch.Generator | None = None, variance: str = "beta",
           device: torch.device | str | None = None) -> Tensor:
    """Ancestral sampling: ``x_T ~ N(0, I)``, then :func:`p_sample` for ``t = T, ..., 1``.

    All ``num_samples`` chains run together, so ``T`` steps cost ``T`` batched forward passes.
    Returns ``x_0``: ``(num_samples, dim)``. Deterministic for a given ``generator``.
    """
    _check_abar(abar_t)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    x = torch.randn(num_samples, dim, generator=generator, device=device)
    for t in range(abar_t.shape[0], 0, -1):
        x = p_sample(eps_model, x, t, abar_t, generator=generator, variance=variance)
    return x


# --------------------------------------------------------------------------- a learnable schedule


def geometric_knots(num_steps: int = T, num_knots: int = 32) -> Tensor:
    """``num_knots + 1`` knot times from 1 to ``T``, evenly spaced in ``log t``: ``(K + 1,)``, float64.

    Dense near ``t = 1``, where the log-SNR of the linear schedule falls fastest.
    """
    if num_knots < 1:
        raise ValueError(f"num_knots must be >= 1, got {num_knots}")
    return torch.logspace(0, math.log10(num_steps), num_knots + 1, dtype=torch.float64)


def monotone_log_snr(t: Tensor, phi: Tensor, knots: Tensor, log_snr_max: float,
                     log_snr_min: float) -> Tensor:
    """A log-SNR ``lambda(t) = log(abar_t / (1 - abar_t))`` that decreases in ``t`` for every ``phi``.

    At the knots ``tau_0 = 1 < ... < tau_K = T``:
    ``lambda(tau_k) = lambda_max - (lambda_max - lambda_min) c_k``, ``c_k = sum_{j < k} softmax(phi)_j``,
    and linear in ``t`` between them. The increments ``softmax(phi)_j`` are positive, so
    ``lambda`` is strictly decreasing with fixed ends ``lambda(1) = lambda_max`` and
    ``lambda(T) = lambda_min``; ``phi`` only moves where along ``t`` the noise is added (a simpler
    cousin of the monotone network of Kingma et al. 2021). ``abar_t = sigmoid(lambda(t))``.

    t: ``(...)`` times in ``[1, T]``; phi: ``(..., K)`` (broadcast against ``t``); knots: ``(K + 1,)``.
    Returns ``lambda`` of the broadcast shape, in phi's dtype.
    """
    k = phi.shape[-1]
    if knots.shape != (k + 1,):
        raise ValueError(f"knots must have shape (K + 1,) = ({k + 1},) for phi of size K = {k}, got {tuple(knots.shape)}")
    if not log_snr_max > log_snr_min:
        raise ValueError(f"need log_snr_max > log_snr_min, got {log_snr_max} and {log_snr_min}")
    knots = knots.to(phi)
    c = torch.cumsum(torch.softmax(phi, -1), -1)
    c = torch.cat([torch.zeros_like(c[..., :1]), c], -1)  # (..., K + 1), from 0 to 1
    batch = torch.broadcast_shapes(phi.shape[:-1], t.shape)
    c = c.expand(*batch, k + 1)
    s = t.to(device=phi.device, dtype=phi.dtype).expand(batch)
    j = (torch.searchsorted(knots, s.detach().contiguous(), right=True) - 1).clamp(0, k - 1)
    lo, hi = knots[j], knots[j + 1]
    w = (s - lo) / (hi - lo)  # position inside the segment, in [0, 1]
    c_t = torch.gather(c, -1, j.unsqueeze(-1)).squeeze(-1) * (1 - w) \
        + torch.gather(c, -1, (j + 1).unsqueeze(-1)).squeeze(-1) * w
    return log_snr_max - (log_snr_max - log_snr_min) * c_t


class MonotoneSchedule(nn.Module):
    """A learnable ``abar_t = sigmoid(lambda_phi(t))`` with :func:`monotone_log_snr`.

    Built from a reference schedule ``abar_init (T,)``: the ends ``lambda(1)``, ``lambda(T)`` are
    taken from it and stay fixed, and ``phi (K,)`` starts at the reference's increments between
    the knots, so that the initial schedule interpolates the reference. ``forward()`` returns
    ``abar`` for ``t = 1..T`` as a ``(T,)`` float64 tensor with a graph to ``phi``.
    """

    def __init__(self, abar_init: Tensor, num_knots: int = 32):
        super().__init__()
        abar_init = _check_abar(abar_init.detach().to(torch.float64).cpu())
        if not torch.all(abar_init[1:] < abar_init[:-1]):
            raise ValueError("abar_init must be strictly decreasing")
        num_steps = abar_init.shape[0]
        knots = geometric_knots(num_steps, num_knots)
        lam = torch.logit(abar_init)  # (T,)
        lam_knots = _interp(knots, torch.arange(1, num_steps + 1, dtype=torch.float64), lam)
        increments = lam_knots[:-1] - lam_knots[1:]  # (K,), positive
        self.num_steps = num_steps
        self.log_snr_max, self.log_snr_min = float(lam[0]), float(lam[-1])
        self.register_buffer("knots", knots)
        self.phi = nn.Parameter(increments.log() - increments.log().mean())

    def log_snr(self, t: Tensor | None = None) -> Tensor:
        """``lambda(t)`` for integer or real ``t`` in ``[1, T]`` (all steps if ``t`` is None)."""
        if t is None:
            t = torch.arange(1, self.num_steps + 1, device=self.phi.device)
        return monotone_log_snr(t, self.phi, self.knots, self.log_snr_max, self.log_snr_min)

    def forward(self, t: Tensor | None = None) -> Tensor:
        return torch.sigmoid(self.log_snr(t))


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of ``(xp, fp)`` at ``x`` (``xp`` increasing), like ``np.interp``."""
    j = (torch.searchsorted(xp, x, right=True) - 1).clamp(0, xp.shape[0] - 2)
    w = (x - xp[j]) / (xp[j + 1] - xp[j])
    return fp[j] * (1 - w) + fp[j + 1] * w


# --------------------------------------------------------------------------- gradient estimators for phi


def schedule_gradient_samples(method: str, eps_model: EpsModel, schedule: MonotoneSchedule,
                              x0: Tensor, t: Tensor, *, num_samples: int = 1, baseline=None,
                              generator: torch.Generator | None = None) -> Tensor:
    """Per-example estimates of ``grad_phi E_eps ||eps - eps_theta(x_t, t)||^2``: ``(N, K)``.

    Row ``i`` estimates the gradient for the pair ``(x0_i, t_i)`` from ``num_samples`` draws of
    ``x_t ~ q_phi(x_t | x0_i) = N(sqrt(abar_t) x0_i, (1 - abar_t) I)``, the schedule evaluated
    with its own copy of ``phi`` (so one backward pass gives every row). The loss, written as a
    function of ``x_t``, is ``f_phi(x_t) = ||(x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) - eps_theta(x_t, t)||^2``.

    * ``"pathwise"``: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with ``eps`` fixed, so
      ``f = ||eps - eps_theta(x_t, t)||^2`` and the gradient runs through ``x_t`` into the
      denoiser (:func:`companion.estimators.pathwise`);
    * ``"score_function"``: ``x_t`` is drawn without a path, and the estimate is
      ``grad_phi f_phi(x_t) + (f - b) grad_phi log q_phi(x_t | x0)``
      (:func:`companion.estimators.score_function`, with ``baseline``, e.g. ``"mean"``).

    Both are unbiased for the same gradient. The rows' mean over random ``(x0, t)`` estimates
    ``grad_phi`` of the loss; their spread is the per-example gradient variance.
    x0: ``(N, D)``; t: ``(N,)`` integers in ``[1, T]``. Computed in ``x0``'s dtype.
    """
    if method not in ("pathwise", "score_function"):
        raise ValueError(f"method must be 'pathwise' or 'score_function', got {method!r}")
    if not isinstance(schedule, MonotoneSchedule):
        raise ValueError(f"schedule must be a MonotoneSchedule, got {type(schedule).__name__}")
    if x0.dim() != 2:
        raise ValueError(f"x0 must have shape (N, D), got {tuple(x0.shape)}")
    n = x0.shape[0]
    t = _check_t(t, schedule.num_steps, n).to(x0.device)
    phi = schedule.phi.detach().to(x0).expand(n, -1).clone().requires_grad_(True)  # (N, K)
    lam = monotone_log_snr(t, phi, schedule.knots, schedule.log_snr_max, schedule.log_snr_min)
    a = torch.sigmoid(lam).unsqueeze(-1)  # (N, 1)
    loc, scale = a.sqrt() * x0, (1 - a).sqrt().expand_as(x0)  # (N, D)

    def f(x_t: Tensor) -> Tensor:  # (S, N, D) -> (S, N)
        s = x_t.shape[0]
        eps = (x_t - loc) / scale  # equals the drawn eps; along the path its phi-derivative is 0
        pred = eps_model(x_t.reshape(s * n, -1), t.repeat(s)).reshape(x_t.shape)
        return (eps - pred).square().sum(-1)

    q = Independent(Normal(loc, scale), 1)  # batch (N,), event (D,)
    if method == "pathwise":
        est = pathwise(f, q, num_samples, generator=generator)
    else:
        est = score_function(f, q, num_samples, baseline=baseline, generator=generator)
    (grad,) = torch.autograd.grad(est.surrogate, phi)
    return grad
