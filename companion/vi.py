"""Gaussian variational inference on a conjugate model, with pathwise or score-function gradients.

Chapter *The reparameterization trick*. The model is the Normal-Normal model of Bishop (2006,
sec. 2.3.6): an unknown mean ``z`` with a Normal prior, observed through ``N`` noisy readings,

    z ~ N(m0, s0^2),        x_i | z ~ N(z, sigma^2),   i = 1, ..., N.

Its posterior is Normal in closed form (Bishop 2006, eqs. 2.141-2.142),

    1 / s_N^2 = 1 / s0^2 + N / sigma^2,     m_N = s_N^2 (m0 / s0^2 + sum_i x_i / sigma^2),

so a Gaussian variational family ``q(z) = N(mu, s^2)`` contains it, and the evidence lower bound

    ELBO(mu, s) = E_q[log p(x, z) - log q(z)] = log p(x) - KL(q || p(z | x))

is maximized exactly at ``q = p(z | x)``, where it equals ``log p(x)``. :func:`fit_gaussian_vi`
maximizes a Monte Carlo ELBO with Adam, the classic dozen-line program of the chapter
(``z = mu + sigma * eps``, ``loss = -mean(log p(x, z) - log q(z))``), and takes the gradient from
:func:`companion.estimators.pathwise` (Kingma and Welling 2014; Rezende et al. 2014; Titsias and
Lazaro-Gredilla 2014) or :func:`companion.estimators.score_function` (Ranganath et al. 2014), so
that the two can be compared at equal cost.

Shapes: ``x`` is ``(N,)``; ``loc`` and ``scale`` of ``q`` are scalars or ``(R,)`` for ``R``
independent runs, which one optimizer advances together (Adam acts element-wise, so the runs do
not interact).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.distributions import MultivariateNormal, Normal
from tqdm import tqdm

from .estimators import Estimate, _baseline_values, pathwise, per_sample_gradients, score_function
from .runtime import rng
from ._checks import check_count

__all__ = [
    "NormalNormal",
    "sample_data",
    "log_joint",
    "posterior",
    "log_evidence",
    "elbo",
    "elbo_estimate",
    "elbo_gradient_samples",
    "VIFit",
    "fit_gaussian_vi",
    "GaussianFit",
    "fit_full_gaussian",
]

_METHODS = ("pathwise", "score_function")


@dataclass(frozen=True)
class NormalNormal:
    """``z ~ N(prior_loc, prior_scale^2)``, ``x_i | z ~ N(z, noise_scale^2)`` i.i.d."""

    prior_loc: float
    prior_scale: float
    noise_scale: float

    def __post_init__(self) -> None:
        for name in ("prior_loc", "prior_scale", "noise_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("prior_scale", "noise_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


def _check_model(model: NormalNormal) -> NormalNormal:
    if not isinstance(model, NormalNormal):
        raise ValueError(f"model must be a NormalNormal, got {type(model).__name__}")
    return model


def _check_data(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 1 or x.numel() == 0 or not x.is_floating_point():
        raise ValueError(f"x must be a non-empty 1-D floating-point tensor of observations, got {x!r}")
    return x


def sample_data(
    model: NormalNormal,
    num_points: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw ``z ~ N(m0, s0^2)``, then ``x_i ~ N(z, sigma^2)``: returns ``(z, x)``, shapes ``()``, ``(N,)``.

    The other functions of this module compute on ``x``'s dtype and device.
    """
    _check_model(model)
    check_count("num_points", num_points)
    values = (model.prior_loc, model.prior_scale, model.noise_scale)
    m0, s0, sigma = (torch.tensor(v, dtype=dtype, device=device) for v in values)
    with rng(generator):
        z = Normal(m0, s0).sample()
        x = Normal(z, sigma).sample((num_points,))
    return z, x


def log_joint(model: NormalNormal, x: Tensor, z: Tensor) -> Tensor:
    """``log p(x, z) = log N(z; m0, s0^2) + sum_i log N(x_i; z, sigma^2)``, for ``z`` of any shape.

    ``x`` is ``(N,)``; the result has the shape of ``z`` (e.g. ``(S, R)``: samples by runs) and
    is differentiable in ``z``. The likelihood uses the sufficient statistics,
    ``sum_i (x_i - z)^2 = sum_i (x_i - xbar)^2 + N (z - xbar)^2``, so the cost does not grow with N.
    """
    _check_model(model)
    _check_data(x)
    n, sigma, xbar = x.numel(), model.noise_scale, x.mean()
    m0, s0 = model.prior_loc, model.prior_scale
    prior = -0.5 * math.log(2 * math.pi * s0**2) - (z - m0) ** 2 / (2 * s0**2)  # log N(z; m0, s0^2)
    squares = ((x - xbar) ** 2).sum() + n * (z - xbar) ** 2  # sum_i (x_i - z)^2, shape of z
    likelihood = -0.5 * n * math.log(2 * math.pi * sigma**2) - squares / (2 * sigma**2)
    return prior + likelihood


def posterior(model: NormalNormal, x: Tensor) -> Normal:
    """The exact posterior ``p(z | x) = N(m_N, s_N^2)`` (Bishop 2006, eqs. 2.141-2.142).

    ``1 / s_N^2 = 1 / s0^2 + N / sigma^2`` and ``m_N = s_N^2 (m0 / s0^2 + sum_i x_i / sigma^2)``.
    """
    _check_model(model)
    _check_data(x)
    precision = 1 / model.prior_scale**2 + x.numel() / model.noise_scale**2
    var = 1 / precision
    loc = var * (model.prior_loc / model.prior_scale**2 + x.sum() / model.noise_scale**2)
    return Normal(loc, torch.as_tensor(var, dtype=x.dtype, device=x.device).sqrt())


def log_evidence(model: NormalNormal, x: Tensor) -> Tensor:
    """``log p(x) = log p(x, z) - log p(z | x)``, which holds at every ``z``; evaluated at ``z = m_N``."""
    post = posterior(model, x)
    return log_joint(model, x, post.loc) - post.log_prob(post.loc)


def elbo(model: NormalNormal, x: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    """The exact ELBO of ``q = N(loc, scale^2)``, differentiable, broadcast over ``loc`` and ``scale``.

    ``E_q[log p(z)] = -log(2 pi s0^2) / 2 - ((loc - m0)^2 + scale^2) / (2 s0^2)``,
    ``E_q[log p(x | z)] = -N log(2 pi sigma^2) / 2 - (sum_i (x_i - loc)^2 + N scale^2) / (2 sigma^2)``,
    ``H[q] = log(2 pi e scale^2) / 2``; the ELBO is their sum, ``log p(x) - KL(q || p(z | x))``.
    """
    _check_model(model)
    _check_data(x)
    loc = torch.as_tensor(loc, dtype=x.dtype, device=x.device)
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    m0, s0, sigma, n = model.prior_loc, model.prior_scale, model.noise_scale, x.numel()
    prior = -0.5 * math.log(2 * math.pi * s0**2) - ((loc - m0) ** 2 + scale**2) / (2 * s0**2)
    squares = ((x - x.mean()) ** 2).sum() + n * (loc - x.mean()) ** 2  # sum_i (x_i - loc)^2
    likelihood = -0.5 * n * math.log(2 * math.pi * sigma**2) - (squares + n * scale**2) / (2 * sigma**2)
    entropy = 0.5 * torch.log(2 * math.pi * math.e * scale**2)
    return prior + likelihood + entropy


def elbo_estimate(
    method: str,
    model: NormalNormal,
    x: Tensor,
    loc: Tensor,
    scale: Tensor,
    num_samples: int,
    *,
    baseline=None,
    generator: torch.Generator | None = None,
) -> Estimate:
    """Monte Carlo ELBO ``(1/S) sum_s [log p(x, z_s) - log q(z_s)]`` with ``z_s ~ q = N(loc, scale^2)``.

    ``method="pathwise"``: ``z_s = loc + scale eps_s`` keeps its graph, so the surrogate's gradient
    is ``(1/S) sum_s grad_phi [log p(x, z_s) - log q_phi(z_s)]`` (Kingma and Welling 2014).
    ``method="score_function"``: ``z_s`` is drawn without a graph and the gradient is
    ``(1/S) sum_s [(f_s - b_s) grad_phi log q_phi(z_s) - grad_phi log q_phi(z_s)]`` with
    ``f_s = log p(x, z_s) - log q(z_s)`` (Ranganath et al. 2014); ``baseline`` as in
    :func:`companion.estimators.score_function`. Both are unbiased for ``grad ELBO``.
    ``value`` has the shape of ``loc``; ``surrogate`` sums the runs.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if method == "pathwise" and baseline is not None:
        raise ValueError("baseline applies to method='score_function' only")
    _check_data(x)
    q = Normal(loc, scale)

    def f(z: Tensor) -> Tensor:  # (S, *loc.shape) -> (S, *loc.shape)
        return log_joint(model, x, z) - q.log_prob(z)

    if method == "pathwise":
        return pathwise(f, q, num_samples, generator=generator)
    return score_function(f, q, num_samples, baseline=baseline, generator=generator)


def elbo_gradient_samples(
    method: str,
    model: NormalNormal,
    x: Tensor,
    loc: float,
    scale: float,
    num_samples: int,
    *,
    baseline=None,
    generator: torch.Generator | None = None,
    eps: Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sample estimates of ``(d/dmu, d/ds) ELBO`` at ``q = N(loc, scale^2)``: two ``(S,)`` tensors.

    The estimators of :func:`elbo_estimate`, one sample each, as programs of ``phi = (mu, s)`` and
    of one standard normal ``eps_i``, handed to :func:`companion.estimators.per_sample_gradients`:

    * pathwise: ``f(phi, eps_i) = log p(x, z_i) - log q_phi(z_i)`` with ``z_i = mu + s eps_i``;
    * score function: ``z_i`` fixed (no path) and the surrogate
      ``f_i + stop_grad(f_i - b_i) (log q_i - stop_grad(log q_i))``, ``log q_i = log q_phi(z_i)``,
      whose gradient is ``(f_i - b_i) grad log q_i + grad f_i``.

    Their mean is the estimate with ``S`` samples and their variance the per-sample variance.
    ``baseline`` as in :func:`companion.estimators.score_function`; with ``baseline="mean"``
    sample ``i``'s baseline is the mean of the other ``S - 1`` f-values (one shared leave-one-out
    baseline, computed before the per-sample pass). ``eps`` (shape ``(S,)``) fixes the noise
    instead of ``generator``, so the two methods can share their draws; ``chunk_size`` bounds the
    memory of the vectorized pass.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if method == "pathwise" and baseline is not None:
        raise ValueError("baseline applies to method='score_function' only")
    _check_model(model)
    _check_data(x)
    if not (isinstance(scale, (int, float, Tensor)) and float(scale) > 0):
        raise ValueError(f"scale must be positive, got {scale!r}")
    check_count("num_samples", num_samples, 2 if baseline == "mean" else 1)
    phi = tuple(torch.as_tensor(p, dtype=x.dtype, device=x.device).detach() for p in (loc, scale))
    if eps is None:
        with rng(generator):
            eps = torch.empty(num_samples, dtype=x.dtype, device=x.device).normal_()
    elif generator is not None:
        raise ValueError("pass eps= or generator=, not both: eps fixes the noise already")
    elif not isinstance(eps, Tensor) or eps.shape != (num_samples,):
        got = tuple(eps.shape) if isinstance(eps, Tensor) else type(eps).__name__
        raise ValueError(f"eps must have shape (num_samples,) = ({num_samples},), got {got}")

    def f(m: Tensor, s: Tensor, z: Tensor) -> Tensor:  # log p(x, z) - log q_phi(z), one draw
        return log_joint(model, x, z) - Normal(m, s).log_prob(z)

    if method == "pathwise":
        def program(phi, e):  # z = mu + s eps keeps its path to phi
            return f(*phi, phi[0] + phi[1] * e)

        return per_sample_gradients(program, phi, eps, chunk_size=chunk_size)

    z = phi[0] + phi[1] * eps  # the draws, without a path (phi is detached)
    b = _baseline_values(baseline, f(*phi, z))  # f-values at phi: b_i never depends on f_i
    b = torch.as_tensor(b, dtype=x.dtype, device=x.device).expand(num_samples)

    def score_program(phi, draw):
        z_i, b_i = draw
        log_q = Normal(*phi).log_prob(z_i)
        f_i = log_joint(model, x, z_i) - log_q
        return f_i + (f_i - b_i).detach() * (log_q - log_q.detach())

    return per_sample_gradients(score_program, phi, (z, b), chunk_size=chunk_size)


class VIFit(NamedTuple):
    """The iterates of :func:`fit_gaussian_vi`, one column per run.

    loc, scale: ``(T + 1, R)``, the parameters of ``q`` before each step and after the last.
    elbo:       ``(T, R)``, the Monte Carlo ELBO estimate that step ``t`` used, at ``loc[t], scale[t]``.
    """

    loc: Tensor
    scale: Tensor
    elbo: Tensor


def fit_gaussian_vi(
    method: str,
    model: NormalNormal,
    x: Tensor,
    *,
    num_steps: int,
    num_samples: int,
    lr: float = 0.01,
    init_loc: float = 0.0,
    init_scale: float = 1.0,
    num_runs: int = 1,
    baseline=None,
    generator: torch.Generator | None = None,
) -> VIFit:
    """Fit ``q = N(mu, s^2)`` to ``p(z | x)`` by maximizing the Monte Carlo ELBO with Adam.

    Each step draws ``num_samples`` samples per run, forms ``loss = -ELBO estimate`` with
    :func:`elbo_estimate` and takes one Adam step (defaults: the classic program's ``lr = 0.01``
    and start ``mu = 0``, ``s = 1``). Adam updates ``(mu, log s)``: that program updates ``s`` itself,
    which a noisy step may push below zero. ``num_runs`` independent runs share one optimizer;
    Adam's update is element-wise, so run ``r`` is the run it would be alone, with its own noise.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    _check_model(model)
    _check_data(x)
    check_count("num_steps", num_steps)
    check_count("num_samples", num_samples, 2 if baseline == "mean" else 1)
    check_count("num_runs", num_runs)
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not (isinstance(init_scale, (int, float)) and init_scale > 0):
        raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
    if isinstance(init_loc, bool) or not isinstance(init_loc, (int, float)) or not math.isfinite(init_loc):
        raise ValueError(f"init_loc must be a finite number, got {init_loc!r}")
    like = {"dtype": x.dtype, "device": x.device, "requires_grad": True}
    loc = torch.full((num_runs,), float(init_loc), **like)
    log_scale = torch.full((num_runs,), math.log(init_scale), **like)
    optimizer = torch.optim.Adam([loc, log_scale], lr=lr)
    locs, scales, elbos = [], [], []
    with rng(generator):  # one stream for the whole run: each step draws the next S x R normals
        for _ in range(num_steps):
            scale = log_scale.exp()
            est = elbo_estimate(method, model, x, loc, scale, num_samples, baseline=baseline)
            locs.append(loc.detach().clone())
            scales.append(scale.detach().clone())
            elbos.append(est.value)
            optimizer.zero_grad()
            (-est.surrogate).backward()  # loss = -ELBO, summed over the independent runs
            optimizer.step()
    locs.append(loc.detach().clone())
    scales.append(log_scale.detach().exp())
    return VIFit(torch.stack(locs), torch.stack(scales), torch.stack(elbos))


# --------------------------------------------------------------------------- full-covariance Gaussian VI


class GaussianFit(NamedTuple):
    """Gaussians ``q(theta) = N(loc, L L^T)`` fitted by :func:`fit_full_gaussian`, one per run.

    loc
        ``(R, P)``.
    scale_tril
        ``(R, P, P)``, lower-triangular ``L``.
    elbo
        ``(num_steps, R)``, the Monte Carlo ELBO of every step.
    """

    loc: Tensor
    scale_tril: Tensor
    elbo: Tensor


def fit_full_gaussian(
    log_joint: Callable[[Tensor], Tensor],
    init_loc: Tensor,
    *,
    init_scale: float,
    num_steps: int,
    num_samples: int,
    lr: float,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
) -> GaussianFit:
    """Maximize the ELBO of a full-covariance Gaussian ``q = N(m, L L^T)`` by pathwise gradients.

    ``theta_s = m + L eps_s`` (``eps_s ~ N(0, I)``); each Adam step follows the pathwise gradient
    (:func:`companion.estimators.pathwise`) of::

        ELBO(m, L) ~ (1/S) sum_s log p(data, theta_s) + H[q],

    with the entropy ``H[q]`` in closed form. ``L``'s diagonal is ``exp`` of a free parameter and
    its strict lower triangle is free; the learning rate decays as a cosine to zero, so that the
    last iterates settle instead of jittering at the noise level of a constant step.

    log_joint
        ``(S, R, P) -> (S, R)``: ``log p(data, theta)`` for ``S`` draws of ``R`` runs.
    init_loc
        ``(R, P)``: each run's starting mean (``L`` starts at ``init_scale I``). The ``R`` runs
        are independent and share one optimizer, which acts element-wise.

    Chapters *ODE models in physics and chemistry* and *Survival analysis*; Kingma and Welling
    (2014), Titsias and Lazaro-Gredilla (2014).
    """
    if not isinstance(init_loc, Tensor) or init_loc.dim() != 2 or not init_loc.is_floating_point():
        raise ValueError(f"init_loc must be a floating-point (runs, params) tensor, got {init_loc!r}")
    for name, value in (("num_steps", num_steps), ("num_samples", num_samples)):
        check_count(name, value)
    for name, value in (("init_scale", init_scale), ("lr", lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    runs, params = init_loc.shape
    like = {"dtype": init_loc.dtype, "device": init_loc.device}
    loc = init_loc.detach().clone().requires_grad_(True)
    log_diag = torch.full((runs, params), math.log(init_scale), **like, requires_grad=True)
    off_diag = torch.zeros(runs, params, params, **like, requires_grad=True)
    optimizer = torch.optim.Adam([loc, log_diag, off_diag], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, num_steps)

    def scale_tril() -> Tensor:  # (R, P, P)
        return torch.diag_embed(log_diag.exp()) + off_diag.tril(-1)

    show = sys.stderr.isatty() if progress is None else progress
    elbos = []
    for _ in tqdm(range(num_steps), disable=not show, leave=False):
        q = MultivariateNormal(loc, scale_tril=scale_tril())
        est = pathwise(log_joint, q, num_samples, generator=generator)
        entropy = q.entropy()  # (R,)
        optimizer.zero_grad()
        (-(est.surrogate + entropy.sum())).backward()  # the runs' ELBOs, summed
        optimizer.step()
        schedule.step()
        elbos.append(est.value + entropy.detach())
    with torch.no_grad():
        return GaussianFit(loc.detach().clone(), scale_tril().detach(), torch.stack(elbos))
