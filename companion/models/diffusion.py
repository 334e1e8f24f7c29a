"""Denoising diffusion (DDPM) and a learnable monotone noise schedule.

Chapter *Diffusion models*; Sohl-Dickstein et al. (2015), Ho, Jain and Abbeel (2020), Kingma
et al. (2021). Names follow Ho et al.: ``betas``, ``alphas``, ``abar``, ``q_sample``,
``eps_model``. Time runs over ``t = 1, ..., T``; a schedule tensor of length ``T`` holds the
value of step ``t`` at index ``t - 1``.

The forward (noising) process is a reparameterization::

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I),

and the denoiser ``eps_theta(x_t, t)`` is trained to predict ``eps`` from ``x_t`` (given
``eps``, ``x_t`` does not depend on ``theta``). A schedule ``abar(phi)`` with parameters of its
own (:class:`MonotoneSchedule`) gets its gradient through the same line, with ``eps`` fixed. In
continuous time (Kingma et al. 2021) the diffusion loss depends on the schedule only through
its ends (:func:`continuous_loss`), and the interior is learned to minimize the variance of the
loss estimator (:func:`schedule_loss`, :func:`variance_gradient_samples`); for Gaussian data
:func:`gaussian_denoiser` and :func:`gaussian_loss_moments` give the exact reference.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn
from torch.distributions import Normal

from ..estimators import per_sample_gradients
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
    "monotone_log_snr_slope",
    "MonotoneSchedule",
    "reference_time",
    "LogSNRDenoiser",
    "gaussian_denoiser",
    "continuous_loss",
    "sample_time",
    "schedule_loss",
    "gaussian_loss_moments",
    "variance_gradient_samples",
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
    ``T``, so that neighbouring steps and the whole range are both resolved. Integer ``t`` gives
    float32 features; real ``t`` (between steps) keeps its dtype.
    """
    if dim < 2 or dim % 2:
        raise ValueError(f"dim must be an even int >= 2, got {dim}")
    half = dim // 2
    s = t if t.is_floating_point() else t.float()
    freqs = torch.logspace(0, math.log10(num_steps), half, dtype=s.dtype, device=t.device)  # (half,)
    args = (s / num_steps).unsqueeze(-1) * freqs  # (N, half)
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
    if isinstance(num_knots, bool) or not isinstance(num_knots, int) or num_knots < 1:
        raise ValueError(f"num_knots must be an int >= 1, got {num_knots!r}")
    return torch.logspace(0, math.log10(num_steps), num_knots + 1, dtype=torch.float64)


def _check_log_snr_args(phi: Tensor, knots: Tensor, log_snr_max: float, log_snr_min: float) -> None:
    k = phi.shape[-1]
    if knots.shape != (k + 1,):
        raise ValueError(f"knots must have shape (K + 1,) = ({k + 1},) for phi of size K = {k}, got {tuple(knots.shape)}")
    if not log_snr_max > log_snr_min:
        raise ValueError(f"need log_snr_max > log_snr_min, got {log_snr_max} and {log_snr_min}")


def _take(values: Tensor, index: Tensor) -> Tensor:
    """``values[index]`` for a 1-D ``values`` and an index tensor of any shape (vmap-safe)."""
    return values.index_select(0, index.reshape(-1)).reshape(index.shape)


def _segment(t: Tensor, phi: Tensor, knots: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple]:
    """``t`` broadcast, its segment ``j`` (``knots[j] <= t < knots[j + 1]``), the segment's ends, the batch shape.

    Written without Python indexing by tensors, so that it runs under ``torch.func.vmap``.
    """
    k = phi.shape[-1]
    knots = knots.to(phi)
    batch = torch.broadcast_shapes(phi.shape[:-1], t.shape)
    s = t.to(device=phi.device, dtype=phi.dtype).expand(batch)
    j = (torch.searchsorted(knots, s.detach().contiguous(), right=True) - 1).clamp(0, k - 1)
    lo, hi = _take(knots, j), _take(knots, j + 1)
    return s, j, lo, hi, batch


def monotone_log_snr(t: Tensor, phi: Tensor, knots: Tensor, log_snr_max: float,
                     log_snr_min: float) -> Tensor:
    """A log-SNR ``lambda(t) = log(abar_t / (1 - abar_t))`` that decreases in ``t`` for every ``phi``.

    At the knots ``tau_0 = 1 < ... < tau_K = T``::

        lambda(tau_k) = lambda_max - (lambda_max - lambda_min) c_k,   c_k = sum_{j < k} softmax(phi)_j,

    and linear in ``t`` between them. The increments ``softmax(phi)_j`` are positive, so
    ``lambda`` is strictly decreasing with fixed ends ``lambda(1) = lambda_max`` and
    ``lambda(T) = lambda_min``; ``phi`` only moves where along ``t`` the noise is added (a simpler
    cousin of the monotone network of Kingma et al. 2021). ``abar_t = sigmoid(lambda(t))``.

    t: ``(...)`` real times in ``[1, T]``; phi: ``(..., K)`` (broadcast against ``t``); knots:
    ``(K + 1,)``. Returns ``lambda`` of the broadcast shape, in phi's dtype. Differentiable in
    ``phi`` and ``t``, and usable inside ``torch.func.vmap``.
    """
    _check_log_snr_args(phi, knots, log_snr_max, log_snr_min)
    s, j, lo, hi, batch = _segment(t, phi, knots)
    k = phi.shape[-1]
    c = torch.cumsum(torch.softmax(phi, -1), -1)
    c = torch.cat([torch.zeros_like(c[..., :1]), c], -1).expand(*batch, k + 1)  # from 0 to 1
    w = (s - lo) / (hi - lo)  # position inside the segment, in [0, 1]
    c_t = torch.gather(c, -1, j.unsqueeze(-1)).squeeze(-1) * (1 - w) \
        + torch.gather(c, -1, (j + 1).unsqueeze(-1)).squeeze(-1) * w
    return log_snr_max - (log_snr_max - log_snr_min) * c_t


def monotone_log_snr_slope(t: Tensor, phi: Tensor, knots: Tensor, log_snr_max: float,
                           log_snr_min: float) -> Tensor:
    """``d lambda / d t`` of :func:`monotone_log_snr`: constant on each segment, negative.

    On the segment ``tau_j <= t < tau_{j+1}``::

        d lambda / d t = -(lambda_max - lambda_min) softmax(phi)_j / (tau_{j+1} - tau_j).

    The weight of the continuous-time loss (:func:`continuous_loss`). Shapes as in
    :func:`monotone_log_snr`.
    """
    _check_log_snr_args(phi, knots, log_snr_max, log_snr_min)
    _, j, lo, hi, batch = _segment(t, phi, knots)
    w = torch.softmax(phi, -1).expand(*batch, phi.shape[-1])
    w_j = torch.gather(w, -1, j.unsqueeze(-1)).squeeze(-1)
    return -(log_snr_max - log_snr_min) * w_j / (hi - lo)


class MonotoneSchedule(nn.Module):
    """A learnable ``abar_t = sigmoid(lambda_phi(t))`` with :func:`monotone_log_snr`.

    Built from a reference schedule ``abar_init (T,)``: the ends ``lambda(1)``, ``lambda(T)`` are
    taken from it and stay fixed, and ``phi (K,)`` starts at the reference's increments between
    the knots, so that the initial schedule interpolates the reference. The knots are
    :func:`geometric_knots` (``num_knots`` segments), or the given ``knots`` (``(K + 1,)``,
    increasing from 1 to ``T``): ``knots=torch.arange(1, T + 1)`` gives a schedule that starts
    *equal* to the reference at every step, linear in between. ``forward(t)`` returns ``abar``
    (all steps ``t = 1..T`` if ``t`` is None) in float64 with a graph to ``phi``.
    """

    def __init__(self, abar_init: Tensor, num_knots: int = 32, *, knots: Tensor | None = None):
        super().__init__()
        abar_init = _check_abar(abar_init.detach().to(torch.float64).cpu())
        if not torch.all(abar_init[1:] < abar_init[:-1]):
            raise ValueError("abar_init must be strictly decreasing")
        num_steps = abar_init.shape[0]
        if knots is None:
            knots = geometric_knots(num_steps, num_knots)
        knots = knots.detach().to(torch.float64).cpu()
        if knots.dim() != 1 or knots.shape[0] < 2 or knots[0] != 1 or knots[-1] != num_steps \
                or not torch.all(knots[1:] > knots[:-1]):
            raise ValueError(f"knots must increase strictly from 1 to T = {num_steps}")
        lam = torch.logit(abar_init)  # (T,)
        lam_knots = _interp(knots, torch.arange(1, num_steps + 1, dtype=torch.float64), lam)
        increments = lam_knots[:-1] - lam_knots[1:]  # (K,), positive
        self.num_steps = num_steps
        self.log_snr_max, self.log_snr_min = float(lam[0]), float(lam[-1])
        self.register_buffer("knots", knots)
        self.phi = nn.Parameter(increments.log() - increments.log().mean())

    def _all_steps(self, t: Tensor | None) -> Tensor:
        return torch.arange(1, self.num_steps + 1, device=self.phi.device) if t is None else t

    def log_snr(self, t: Tensor | None = None) -> Tensor:
        """``lambda(t)`` for integer or real ``t`` in ``[1, T]`` (all steps if ``t`` is None)."""
        return monotone_log_snr(self._all_steps(t), self.phi, self.knots, self.log_snr_max,
                                self.log_snr_min)

    def slope(self, t: Tensor | None = None) -> Tensor:
        """``d lambda / d t`` at ``t`` (:func:`monotone_log_snr_slope`)."""
        return monotone_log_snr_slope(self._all_steps(t), self.phi, self.knots, self.log_snr_max,
                                      self.log_snr_min)

    def forward(self, t: Tensor | None = None) -> Tensor:
        return torch.sigmoid(self.log_snr(t))


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of ``(xp, fp)`` at ``x`` (``xp`` increasing), like ``np.interp``."""
    j = (torch.searchsorted(xp, x, right=True) - 1).clamp(0, xp.shape[0] - 2)
    w = (x - xp[j]) / (xp[j + 1] - xp[j])
    return fp[j] * (1 - w) + fp[j + 1] * w


# --------------------------------------------------------------------------- the continuous-time loss


def reference_time(log_snr: Tensor, log_snr_ref: Tensor) -> Tensor:
    """The real step ``t`` at which a reference schedule has log-SNR ``log_snr``.

    ``log_snr_ref (T,)`` holds ``lambda_ref(t)`` at ``t = 1..T`` (strictly decreasing), linear in
    between; the result inverts that piecewise-linear function::

        t = j + (lambda_ref(j) - lambda) / (lambda_ref(j) - lambda_ref(j + 1))
        for lambda_ref(j + 1) < lambda <= lambda_ref(j).

    It turns a denoiser trained on the steps of the reference into one conditioned on the
    log-SNR (:class:`LogSNRDenoiser`). Values outside ``[lambda_ref(T), lambda_ref(1)]`` are
    extrapolated from the end segments. Shape of ``log_snr``; differentiable in it; vmap-safe.
    """
    if log_snr_ref.dim() != 1 or log_snr_ref.shape[0] < 2:
        raise ValueError(f"log_snr_ref must be a 1-D tensor of length T >= 2, got {tuple(log_snr_ref.shape)}")
    ref = log_snr_ref.to(log_snr)
    j = (torch.searchsorted(-ref, -log_snr.detach().contiguous(), right=True) - 1).clamp(0, ref.shape[0] - 2)
    hi, lo = _take(ref, j), _take(ref, j + 1)
    return (j + 1).to(log_snr.dtype) + (hi - log_snr) / (hi - lo)


class LogSNRDenoiser(nn.Module):
    """``eps_hat(z, lambda)``: a denoiser conditioned on the log-SNR instead of the step.

    ``eps_model(z, t)`` was trained on the steps of a reference schedule ``abar_ref (T,)``; this
    module evaluates it at the (real) step where the reference has log-SNR ``lambda``
    (:func:`reference_time`). A denoiser that sees the noise level only through ``lambda`` is
    what makes the continuous-time loss independent of the schedule's interior (Kingma et al.
    2021, sec. 5.1). ``(N, D), (N,) -> (N, D)``.
    """

    def __init__(self, eps_model: nn.Module, abar_ref: Tensor):
        super().__init__()
        self.eps_model = eps_model
        self.register_buffer("log_snr_ref", torch.logit(_check_abar(abar_ref.detach().to(torch.float64))))

    def forward(self, z: Tensor, log_snr: Tensor) -> Tensor:
        return self.eps_model(z, reference_time(log_snr, self.log_snr_ref))


def gaussian_denoiser(z: Tensor, log_snr: Tensor, data_var: float) -> Tensor:
    """The exact ``E[eps | z]`` for data ``x ~ N(0, s^2 I)``, ``s^2 = data_var``: ``(N, D)``.

    With ``z = alpha x + sigma eps``, ``alpha^2 = sigmoid(lambda)``, ``sigma^2 = sigmoid(-lambda)``::

        E[eps | z] = sigma z / (alpha^2 s^2 + sigma^2),

    and the error ``eps - E[eps | z]`` is Gaussian with variance
    ``a(lambda) = sigmoid(lambda + log s^2)`` per coordinate: the reference of
    :func:`gaussian_loss_moments`. z: ``(N, D)``; log_snr: ``(N,)``.
    """
    if not data_var > 0:
        raise ValueError(f"data_var must be positive, got {data_var}")
    a2, s2 = torch.sigmoid(log_snr).unsqueeze(-1), torch.sigmoid(-log_snr).unsqueeze(-1)
    return s2.sqrt() * z / (a2 * data_var + s2)


def continuous_loss(denoiser: Callable[[Tensor, Tensor], Tensor], x0: Tensor, eps: Tensor,
                    log_snr: Tensor, log_snr_slope: Tensor, *, num_steps: int = T) -> Tensor:
    """One-draw estimates of the continuous-time diffusion loss (Kingma et al. 2021, sec. 5): ``(N,)``.

    With ``t ~ U[1, T]`` (real), ``lambda = lambda(t)`` and its slope ``lambda'(t)``::

        z_t   = sqrt(sigmoid(lambda)) x0 + sqrt(sigmoid(-lambda)) eps
        L_hat = (T - 1) / 2 * (-lambda'(t)) * ||eps - eps_hat(z_t, lambda)||^2,

    whose mean over ``t`` and ``eps`` is the diffusion term of the negative ELBO,
    ``L = 1/2 int_{lambda_min}^{lambda_max} E||eps - eps_hat(z_lambda, lambda)||^2 d lambda``
    (substitute ``lambda = lambda(t)``): it depends on the schedule only through its ends, while
    the variance of ``L_hat`` depends on all of it.

    denoiser: ``eps_hat(z, lambda)``, ``(N, D), (N,) -> (N, D)`` (:class:`LogSNRDenoiser`, or
    :func:`gaussian_denoiser` with ``data_var`` bound by ``functools.partial``); x0, eps: ``(N, D)``; log_snr, log_snr_slope: ``(N,)``, the
    schedule's value and ``d lambda / d t`` at each example's ``t``. Differentiable in all of them:
    with ``eps`` fixed, the gradient with respect to the schedule is pathwise.
    """
    if x0.dim() != 2 or eps.shape != x0.shape:
        raise ValueError(f"x0 and eps must have one shape (N, D), got {tuple(x0.shape)} and {tuple(eps.shape)}")
    if log_snr.shape != x0.shape[:1] or log_snr_slope.shape != x0.shape[:1]:
        raise ValueError(f"log_snr and log_snr_slope must have shape ({x0.shape[0]},), got "
                         f"{tuple(log_snr.shape)} and {tuple(log_snr_slope.shape)}")
    lam = log_snr.unsqueeze(-1)  # (N, 1)
    z = torch.sigmoid(lam).sqrt() * x0 + torch.sigmoid(-lam).sqrt() * eps  # (N, D)
    err = (eps - denoiser(z, log_snr)).square().sum(-1)  # (N,)
    return 0.5 * (num_steps - 1) * (-log_snr_slope) * err


def sample_time(num: int, num_steps: int = T, *, generator: torch.Generator | None = None,
                dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """``t ~ U[1, T]``, real: ``(num,)``, the time of :func:`continuous_loss`."""
    u = torch.rand(num, generator=generator, dtype=dtype, device=device)
    return 1 + (num_steps - 1) * u


def schedule_loss(denoiser: Callable[[Tensor, Tensor], Tensor], schedule: MonotoneSchedule,
                  x0: Tensor, *, t: Tensor | None = None, eps: Tensor | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """:func:`continuous_loss` under a :class:`MonotoneSchedule`: ``(N,)``, with a graph to ``phi``.

    ``t ~ U[1, T]`` and ``eps ~ N(0, I)`` are drawn with ``generator`` unless given. The mean of
    the result estimates the loss; the mean of its square, ``E[L_hat^2]``, is what Kingma et al.
    (2021, sec. 5.3) minimize over the schedule's interior: the loss itself does
    not move, so minimizing the second moment minimizes the variance.
    """
    if not isinstance(schedule, MonotoneSchedule):
        raise ValueError(f"schedule must be a MonotoneSchedule, got {type(schedule).__name__}")
    if x0.dim() != 2:
        raise ValueError(f"x0 must have shape (N, D), got {tuple(x0.shape)}")
    if t is None:
        t = sample_time(x0.shape[0], schedule.num_steps, generator=generator, dtype=x0.dtype,
                        device=x0.device)
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    return continuous_loss(denoiser, x0, eps, schedule.log_snr(t).to(x0.dtype),
                           schedule.slope(t).to(x0.dtype), num_steps=schedule.num_steps)


def gaussian_loss_moments(log_snr_knots: Tensor, knots: Tensor, data_var: float,
                          dim: int) -> tuple[Tensor, Tensor]:
    """Exact ``E[L_hat]`` and ``E[L_hat^2]`` for data ``N(0, s^2 I_D)`` and the exact denoiser.

    For a piecewise-linear schedule with values ``lambda_k`` at knots ``tau_0 = 1 < ... < tau_K = T``
    and ``t ~ U[1, T]``, with ``a(lambda) = sigmoid(lambda + log s^2)`` (:func:`gaussian_denoiser`),
    ``||eps - eps_hat||^2 = a chi^2_D``, and ``int a^2 d lambda = softplus - sigmoid``::

        E[L_hat]   = D/2 log((1 + s^2 e^{lambda_0}) / (1 + s^2 e^{lambda_K}))          (ends only)
        E[L_hat^2] = (T - 1)/4 (D^2 + 2D) sum_k |lambda'_k| [F(lambda_k) - F(lambda_{k+1})],
                     F(l) = softplus(l + log s^2) - sigmoid(l + log s^2),

    with ``|lambda'_k| = (lambda_k - lambda_{k+1}) / (tau_{k+1} - tau_k)``. By Cauchy-Schwarz
    ``E[L_hat^2] >= (1 + 2/D) E[L_hat]^2``, with equality when the schedule spends time in
    proportion to ``a(lambda)``. Differentiable in ``log_snr_knots`` ``(K + 1,)``; knots ``(K + 1,)``.
    """
    if log_snr_knots.dim() != 1 or knots.shape != log_snr_knots.shape or knots.shape[0] < 2:
        raise ValueError(f"log_snr_knots and knots must be 1-D of one length >= 2, got "
                         f"{tuple(log_snr_knots.shape)} and {tuple(knots.shape)}")
    if not data_var > 0:
        raise ValueError(f"data_var must be positive, got {data_var}")
    c = math.log(data_var)
    lam, tau = log_snr_knots, knots.to(log_snr_knots)
    mean = dim / 2 * (torch.nn.functional.softplus(lam[0] + c) - torch.nn.functional.softplus(lam[-1] + c))
    big_f = torch.nn.functional.softplus(lam + c) - torch.sigmoid(lam + c)  # (K + 1,)
    slope = (lam[:-1] - lam[1:]) / (tau[1:] - tau[:-1])  # |lambda'_k|, (K,)
    second = (tau[-1] - tau[0]) / 4 * (dim**2 + 2 * dim) * (slope * (big_f[:-1] - big_f[1:])).sum()
    return mean, second


# --------------------------------------------------------------------------- gradient estimators for phi


def _loss_of_z(phi, schedule, denoiser, x0, t, z):
    """``L_hat`` for one example as a function of ``phi`` and of the noisy point ``z`` (no batch dim)."""
    args = (schedule.knots, schedule.log_snr_max, schedule.log_snr_min)
    lam, slope = monotone_log_snr(t, phi, *args), monotone_log_snr_slope(t, phi, *args)
    eps = (z - torch.sigmoid(lam).sqrt() * x0) / torch.sigmoid(-lam).sqrt()
    err = (eps - denoiser(z[None], lam[None])[0]).square().sum()
    return 0.5 * (schedule.num_steps - 1) * (-slope) * err


def _pathwise_program(schedule, denoiser, power):
    def program(phi, noise):
        x0, t, eps = noise
        args = (schedule.knots, schedule.log_snr_max, schedule.log_snr_min)
        lam, slope = monotone_log_snr(t, phi, *args), monotone_log_snr_slope(t, phi, *args)
        loss = continuous_loss(denoiser, x0[None], eps[None], lam[None], slope[None],
                               num_steps=schedule.num_steps)[0]
        return loss**power
    return program


def _score_program(schedule, denoiser, power):
    def program(phi, noise):
        x0, t, z, b = noise  # z drawn at the current phi, without a path; b: its baseline
        args = (schedule.knots, schedule.log_snr_max, schedule.log_snr_min)
        lam = monotone_log_snr(t, phi, *args)
        q = Normal(torch.sigmoid(lam).sqrt() * x0, torch.sigmoid(-lam).sqrt(), validate_args=False)
        log_q = q.log_prob(z).sum()
        f = _loss_of_z(phi, schedule, denoiser, x0, t, z) ** power
        return f + (f - b).detach() * (log_q - log_q.detach())
    return program


def variance_gradient_samples(method: str, denoiser: Callable[[Tensor, Tensor], Tensor],
                              schedule: MonotoneSchedule, x0: Tensor, t: Tensor, eps: Tensor, *,
                              power: int = 2, baseline: str | None = None,
                              chunk_size: int | None = None) -> Tensor:
    """Per-example estimates of ``grad_phi E[L_hat^power]`` (:func:`continuous_loss`): ``(N, K)``.

    ``power=2`` is the gradient that learns the schedule's interior (Kingma et al. 2021, sec. 5.3):
    ``E[L_hat]`` does not depend on ``phi``, so the gradient of the second moment is
    that of the variance. ``power=1`` is the gradient of the loss itself, zero in expectation.
    Row ``i`` averages ``S`` draws at the pair ``(x0_i, t_i)``, ``eps (S, N, D)``:

    * ``"pathwise"``: ``z = sqrt(abar_phi) x0 + sqrt(1 - abar_phi) eps`` keeps its path, and
      ``grad_phi L_hat(phi, eps)^power`` runs through ``z``, the slope and the denoiser's
      conditioning;
    * ``"score_function"``: ``z`` is drawn with the same ``eps`` but without a path, and the
      estimate is ``grad_phi f_phi(z) + (f_phi(z) - b) grad_phi log q_phi(z | x0)``, with
      ``f_phi(z)`` the same loss written as a function of ``z`` (it depends on ``phi`` directly
      too) and ``b = 0`` or, with ``baseline="mean"``, the mean of the other ``S - 1`` draws'
      ``f`` (leave-one-out, Kool et al. 2019; needs ``S >= 2``).

    Both are unbiased for the same gradient, and the rows are i.i.d. over random ``(x0, t)``.
    Built on :func:`companion.estimators.per_sample_gradients` (one ``vmap`` over ``grad``);
    ``chunk_size`` bounds its memory. x0: ``(N, D)``; t: ``(N,)`` real in ``[1, T]``.
    """
    if method not in ("pathwise", "score_function"):
        raise ValueError(f"method must be 'pathwise' or 'score_function', got {method!r}")
    if not isinstance(schedule, MonotoneSchedule):
        raise ValueError(f"schedule must be a MonotoneSchedule, got {type(schedule).__name__}")
    if power not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {power!r}")
    if baseline not in (None, "mean"):
        raise ValueError(f"baseline must be None or 'mean', got {baseline!r}")
    if x0.dim() != 2 or eps.dim() != 3 or eps.shape[1:] != x0.shape:
        raise ValueError(f"x0 must have shape (N, D) and eps (S, N, D), got {tuple(x0.shape)} and {tuple(eps.shape)}")
    s, n = eps.shape[0], x0.shape[0]
    if t.shape != (n,) or not t.is_floating_point():
        raise ValueError(f"t must be a real tensor of shape ({n},), got {t.dtype} {tuple(t.shape)}")
    if method == "score_function" and baseline == "mean" and s < 2:
        raise ValueError("baseline='mean' needs eps with S >= 2 draws per example")
    phi = schedule.phi.detach().to(x0)
    xs, ts, es = x0.expand(s, n, -1).reshape(s * n, -1), t.to(x0).repeat(s), eps.reshape(s * n, -1)
    if method == "pathwise":
        grads = per_sample_gradients(_pathwise_program(schedule, denoiser, power), phi, (xs, ts, es),
                                     chunk_size=chunk_size)
        return grads.reshape(s, n, -1).mean(0)
    with torch.no_grad():
        lam = schedule.log_snr(ts).to(x0)
        z = torch.sigmoid(lam).sqrt().unsqueeze(-1) * xs + torch.sigmoid(-lam).sqrt().unsqueeze(-1) * es
        f = schedule_loss(denoiser, schedule, xs, t=ts, eps=es).reshape(s, n) ** power
        b = (f.sum(0) - f) / (s - 1) if baseline == "mean" else torch.zeros_like(f)
    grads = per_sample_gradients(_score_program(schedule, denoiser, power), phi,
                                 (xs, ts, z, b.reshape(-1)), chunk_size=chunk_size)
    return grads.reshape(s, n, -1).mean(0)
