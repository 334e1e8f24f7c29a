"""The log-normal survival model: right-censored likelihood, its analytic gradient, and fits.

Chapter *Survival analysis*. The log-normal model writes a survival time as a reparameterization
of standard normal noise::

    T = exp(mu + sigma eps),    eps ~ N(0, 1),    so that    log T ~ N(mu, sigma^2).

A subject followed until time ``t`` either had the event then (``event = 1``) or was still
event-free when follow-up stopped (``event = 0``, right-censored: ``T > t``). With
``z = (log t - mu) / sigma`` the two contributions to the log-likelihood are (Kalbfleisch and
Prentice 2002, sec. 3.2; Klein and Moeschberger 2003, sec. 3.5)::

    log f(t) = log phi(z) - log sigma - log t      (the density: an event at t)
    log S(t) = log P(T > t) = log Phi(-z)          (the survival function: censored at t)

and ``log L = sum_i [event_i log f(t_i) + (1 - event_i) log S(t_i)]``. ``log Phi`` comes from
``torch.special.log_ndtr``, which stays accurate far in the tail, where ``log(1 - Phi(z))``
rounds to ``log 0``. Differentiating, with ``h(z) = phi(z) / Phi(-z)`` (the hazard of the
standard normal, the inverse Mills ratio)::

    d log f / d mu = z / sigma,       d log f / d sigma = (z^2 - 1) / sigma,
    d log S / d mu = h(z) / sigma,    d log S / d sigma = z h(z) / sigma.

Shapes: the subjects are the last dimension. ``t`` and ``event`` have one shape ``(..., N)``;
``mu`` and ``sigma`` broadcast against it (floats; ``(N,)`` for one ``mu`` per subject, as in
the accelerated-failure-time regression; ``(S, 1)`` for ``S`` parameter draws).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from scipy import optimize
from torch import Tensor
from torch.distributions import Normal

from ..vi import GaussianFit, fit_full_gaussian

__all__ = [
    "lognormal_log_likelihood",
    "LogNormalGradient",
    "lognormal_gradient",
    "LogNormalMLE",
    "fit_lognormal",
    "LogNormalAFT",
    "fit_lognormal_aft",
    "lognormal_survival",
    "lognormal_restricted_mean",
    "fit_lognormal_vi",
]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# --------------------------------------------------------------------------- checks


def _check_times_events(t: Tensor, event: Tensor) -> tuple[Tensor, Tensor]:
    """``t`` positive and finite; ``event`` of ``t``'s shape, all 0 or 1 (bool, int or float)."""
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() < 1 or t.numel() == 0:
        raise ValueError(f"t must be a non-empty floating-point tensor of times, got {t!r}")
    if not torch.isfinite(t).all() or (t <= 0).any():
        raise ValueError("t must hold positive, finite times (the log-normal model has T > 0)")
    if not isinstance(event, Tensor):
        raise ValueError(f"event must be a tensor of 0/1 indicators, got {type(event).__name__}")
    if event.shape != t.shape:
        raise ValueError(f"event must have the shape of t, {tuple(t.shape)}, got {tuple(event.shape)}")
    if event.is_complex() or not ((event == 0) | (event == 1)).all():
        raise ValueError("event must hold only 0 (censored) and 1 (event observed)")
    return t, event.to(t.dtype)


def _as_parameter(name: str, value, like: Tensor) -> Tensor:
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise ValueError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device) if not isinstance(value, Tensor) else value
    if not value.is_floating_point() or not torch.isfinite(value).all():
        raise ValueError(f"{name} must be finite floating-point, got {value!r}")
    return value


def _check_parameters(t: Tensor, mu, sigma) -> tuple[Tensor, Tensor]:
    mu, sigma = _as_parameter("mu", mu, t), _as_parameter("sigma", sigma, t)
    if (sigma <= 0).any():
        raise ValueError("sigma must be positive")
    try:
        torch.broadcast_shapes(t.shape, mu.shape, sigma.shape)
    except RuntimeError:
        raise ValueError(
            f"mu of shape {tuple(mu.shape)} and sigma of shape {tuple(sigma.shape)} must broadcast against "
            f"t of shape {tuple(t.shape)} (subjects in the last dimension)"
        ) from None
    return mu, sigma


# --------------------------------------------------------------------------- likelihood


def _standardize(t: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    return (t.log() - mu) / sigma  # z = (log t - mu) / sigma


def lognormal_log_likelihood(t: Tensor, event: Tensor, mu, sigma) -> Tensor:
    """``sum_i [event_i log f(t_i) + (1 - event_i) log S(t_i)]`` of the log-normal model.

    ``log f(t) = log phi(z) - log sigma - log t`` and ``log S(t) = log Phi(-z)`` with
    ``z = (log t - mu) / sigma``; ``log Phi`` by ``torch.special.log_ndtr`` (no ``log(1 - Phi)``).
    Summed over the last dimension (the subjects): the result has the broadcast shape of ``t``,
    ``mu`` and ``sigma`` without its last dimension, and is differentiable in ``mu`` and
    ``sigma``.

    t
        Positive times, ``(..., N)``.
    event
        ``1`` where the event was observed at ``t``, ``0`` where ``t`` is a censoring time;
        bool, int or float, of ``t``'s shape.
    mu, sigma
        Floats or tensors that broadcast against ``t``; ``sigma > 0``.
    """
    t, d = _check_times_events(t, event)
    mu, sigma = _check_parameters(t, mu, sigma)
    z = _standardize(t, mu, sigma)
    log_f = -0.5 * z**2 - _HALF_LOG_2PI - sigma.log() - t.log()
    log_s = torch.special.log_ndtr(-z)
    return (d * log_f + (1 - d) * log_s).sum(-1)


class LogNormalGradient(NamedTuple):
    """``d log L / d mu`` and ``d log L / d sigma``, each of the shape of ``mu`` and ``sigma``."""

    mu: Tensor
    sigma: Tensor


def lognormal_gradient(t: Tensor, event: Tensor, mu, sigma) -> LogNormalGradient:
    """The analytic gradient of :func:`lognormal_log_likelihood` with respect to ``mu`` and ``sigma``.

    Per subject, with ``z = (log t - mu) / sigma`` and ``h(z) = phi(z) / Phi(-z)``::

        events:    d/dmu = z / sigma,       d/dsigma = (z^2 - 1) / sigma
        censored:  d/dmu = h(z) / sigma,    d/dsigma = z h(z) / sigma

    ``h`` is computed as ``exp(log phi(z) - log_ndtr(-z))``, finite far in the tail (where
    ``h(z) ~ z``). The per-subject terms are summed over every dimension that ``mu`` (or
    ``sigma``) was broadcast along, so each gradient has the shape of its parameter: a float
    ``mu`` gets a 0-d tensor, an ``(N,)`` ``mu`` one derivative per subject. No autograd.
    """
    t, d = _check_times_events(t, event)
    mu, sigma = _check_parameters(t, mu, sigma)
    with torch.no_grad():
        z = _standardize(t, mu.detach(), sigma.detach())
        sig = sigma.detach()
        hazard = torch.exp(-0.5 * z**2 - _HALF_LOG_2PI - torch.special.log_ndtr(-z))  # h(z)
        d_mu = (d * z + (1 - d) * hazard) / sig
        d_sigma = (d * (z**2 - 1) + (1 - d) * z * hazard) / sig
        return LogNormalGradient(d_mu.sum_to_size(mu.shape), d_sigma.sum_to_size(sigma.shape))


# --------------------------------------------------------------------------- maximum likelihood


class LogNormalMLE(NamedTuple):
    """The maximum-likelihood estimate of :func:`fit_lognormal`."""

    mu: float
    sigma: float


def _maximize(neg_log_lik_and_grad, x0: np.ndarray, num_subjects: int, what: str) -> np.ndarray:
    """BFGS on a smooth negative log-likelihood; raises if it does not reach a stationary point.

    BFGS minimizes the *mean* over subjects, of order 1 whatever the number of subjects, so
    that its tolerances mean the same for every data set; the result must have
    ``max |gradient of the mean| <= 1e-7``.
    """

    def mean_objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = neg_log_lik_and_grad(x)
        return value / num_subjects, grad / num_subjects

    result = optimize.minimize(mean_objective, x0, jac=True, method="BFGS", options={"gtol": 1e-10})
    _, grad = mean_objective(result.x)
    if not np.all(np.isfinite(result.x)) or np.max(np.abs(grad)) > 1e-7:
        raise RuntimeError(f"{what}: the optimizer stopped away from a maximum ({result.message})")
    return result.x


def _check_fit_data(t: Tensor, event: Tensor) -> tuple[Tensor, Tensor]:
    t, d = _check_times_events(t, event)
    if t.dim() != 1:
        raise ValueError(f"t must be 1-D (one time per subject) for a fit, got shape {tuple(t.shape)}")
    if d.sum() < 1:
        raise ValueError("event must contain at least one observed event: with every subject censored the "
                         "likelihood grows without bound as mu increases")
    return t.double(), d.double()


def fit_lognormal(t: Tensor, event: Tensor) -> LogNormalMLE:
    """The maximum-likelihood ``(mu, sigma)`` of the log-normal model for right-censored times.

    Maximizes :func:`lognormal_log_likelihood` over ``(mu, log sigma)`` with scipy's BFGS and the
    analytic gradient of :func:`lognormal_gradient` (chain rule: ``d/dlog sigma = sigma d/dsigma``),
    from the mean and standard deviation of ``log t``, in float64. Needs at least one event.
    lifelines' ``LogNormalFitter`` maximizes the same likelihood (chapter *Survival analysis*).
    """
    t, d = _check_fit_data(t, event)

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        mu, sigma = torch.tensor(x[0], dtype=torch.float64), torch.tensor(math.exp(x[1]), dtype=torch.float64)
        grad = lognormal_gradient(t, d, mu, sigma)
        value = lognormal_log_likelihood(t, d, mu, sigma).item()
        return -value, -np.array([grad.mu.item(), (sigma * grad.sigma).item()])

    log_t = t.log()
    x0 = np.array([log_t.mean().item(), math.log(max(log_t.std().item(), 1e-3))])
    mu, log_sigma = _maximize(objective, x0, t.numel(), "fit_lognormal")
    return LogNormalMLE(float(mu), float(math.exp(log_sigma)))


class LogNormalAFT(NamedTuple):
    """The maximum-likelihood log-normal accelerated-failure-time model of :func:`fit_lognormal_aft`.

    ``log T_i = intercept + x_i . coef + sigma eps_i``: ``coef`` is ``(D,)`` (float64).
    """

    intercept: float
    coef: Tensor
    sigma: float


def fit_lognormal_aft(t: Tensor, event: Tensor, x: Tensor) -> LogNormalAFT:
    """Log-normal accelerated failure time regression by maximum likelihood.

    Each subject has its own location ``mu_i = intercept + x_i . coef`` and all share ``sigma``;
    a covariate multiplies the time scale by ``exp(coef_j)`` per unit (Kalbfleisch and Prentice
    2002, sec. 2.3). The gradient is :func:`lognormal_gradient` with an ``(N,)`` ``mu``, then the
    chain rule: ``d/dcoef = x^T d/dmu``, ``d/dintercept = sum_i d/dmu_i``. BFGS in float64 on
    ``(intercept, coef, log sigma)``, with the covariates standardized inside the optimization
    (the estimates are mapped back). ``x`` is ``(N, D)``.
    """
    t, d = _check_fit_data(t, event)
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] != t.shape[0] or not torch.isfinite(x).all():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a finite (N, D) tensor with N = {t.shape[0]} rows, got {shape}")
    x = x.double()
    centre, spread = x.mean(0), x.std(0)
    if (spread == 0).any():
        raise ValueError("x has a constant column: the intercept already carries it")
    u = (x - centre) / spread  # standardized covariates

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        beta = torch.from_numpy(theta[1:-1])
        mu = theta[0] + u @ beta  # (N,)
        sigma = torch.tensor(math.exp(theta[-1]), dtype=torch.float64)
        grad = lognormal_gradient(t, d, mu, sigma)
        value = lognormal_log_likelihood(t, d, mu, sigma).item()
        g = torch.cat([grad.mu.sum().reshape(1), u.T @ grad.mu, (sigma * grad.sigma).reshape(1)])
        return -value, -g.numpy()

    log_t = t.log()
    theta0 = np.zeros(x.shape[1] + 2)
    theta0[0], theta0[-1] = log_t.mean().item(), math.log(max(log_t.std().item(), 1e-3))
    theta = torch.from_numpy(_maximize(objective, theta0, t.numel(), "fit_lognormal_aft"))
    coef = theta[1:-1] / spread  # back to the original units of x
    intercept = theta[0] - (centre * coef).sum()
    return LogNormalAFT(float(intercept), coef, float(math.exp(theta[-1])))


# --------------------------------------------------------------------------- Bayesian version


def lognormal_survival(t: Tensor, mu, sigma) -> Tensor:
    """``S(t) = P(T > t) = Phi(-(log t - mu) / sigma)``, broadcast over ``t``, ``mu``, ``sigma``."""
    if not isinstance(t, Tensor) or not t.is_floating_point() or (t <= 0).any():
        raise ValueError("t must be a floating-point tensor of positive times")
    mu, sigma = _as_parameter("mu", mu, t), _as_parameter("sigma", sigma, t)
    if (sigma <= 0).any():
        raise ValueError("sigma must be positive")
    return torch.special.ndtr(-_standardize(t, mu, sigma))


def lognormal_restricted_mean(tau: float, mu, sigma) -> Tensor:
    """The restricted mean survival time ``E[min(T, tau)] = int_0^tau S(t) dt`` of the log-normal.

    With ``T = exp(mu + sigma eps)`` split at ``T = tau``, ``E[T; T < tau] + tau P(T >= tau)``::

        E[min(T, tau)] = exp(mu + sigma^2 / 2) Phi((log tau - mu) / sigma - sigma)
                         + tau Phi(-(log tau - mu) / sigma),

    differentiable in ``mu`` and ``sigma`` (floats or tensors, broadcast); ``tau > 0``. The
    reference for the pathwise gradient of ``E[min(exp(mu + sigma eps), tau)]`` in the chapter.
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a positive number, got {tau!r}")
    like = mu if isinstance(mu, Tensor) else (sigma if isinstance(sigma, Tensor) else torch.tensor(0.0, dtype=torch.float64))
    mu, sigma = _as_parameter("mu", mu, like), _as_parameter("sigma", sigma, like)
    if (sigma <= 0).any():
        raise ValueError("sigma must be positive")
    z = (math.log(tau) - mu) / sigma
    below = torch.exp(mu + sigma**2 / 2) * torch.special.ndtr(z - sigma)  # E[T; T < tau]
    return below + tau * torch.special.ndtr(-z)


def fit_lognormal_vi(
    t: Tensor,
    event: Tensor,
    *,
    prior_loc: tuple[float, float] = (0.0, 0.0),
    prior_scale: tuple[float, float] = (10.0, 1.0),
    num_steps: int = 600,
    num_samples: int = 16,
    num_runs: int = 1,
    lr: float = 0.05,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
) -> GaussianFit:
    """Bayesian log-normal model by pathwise variational inference over ``(mu, log sigma)``.

    Prior: ``mu ~ N(prior_loc[0], prior_scale[0]^2)`` and ``log sigma ~ N(prior_loc[1],
    prior_scale[1]^2)``, independent. ``q`` is a full-covariance Gaussian over
    ``theta = (mu, log sigma)``, ``theta_s = m + L eps_s``, and each Adam step follows the
    pathwise gradient of::

        ELBO(m, L) ~ (1/S) sum_s [log L(t, event | mu_s, exp(log sigma_s)) + log p(theta_s)] + H[q]

    with the likelihood of :func:`lognormal_log_likelihood` (all draws at once, ``mu`` of shape
    ``(S, R, 1)`` against the subjects) and the entropy in closed form. Each run starts at
    ``m`` = the mean and log standard deviation of ``log t``, ``L = 0.1 I``; the learning rate
    decays as a cosine to zero. ``num_runs`` independent runs share one optimizer, which acts
    element-wise. Chapter *Survival analysis*; Kingma and Welling (2014), Titsias and
    Lazaro-Gredilla (2014).
    """
    t, d = _check_fit_data(t, event)
    for name, value in (("num_steps", num_steps), ("num_samples", num_samples), ("num_runs", num_runs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if len(prior_loc) != 2 or len(prior_scale) != 2 or min(prior_scale) <= 0:
        raise ValueError("prior_loc and prior_scale must be pairs (mu, log sigma), with positive scales")
    prior = Normal(torch.tensor(prior_loc, dtype=t.dtype), torch.tensor(prior_scale, dtype=t.dtype))
    log_t = t.log()
    start = torch.tensor([log_t.mean().item(), math.log(log_t.std().item())], dtype=t.dtype)

    def log_joint(theta: Tensor) -> Tensor:  # (S, R, 2) -> (S, R)
        mu, log_sigma = theta[..., :1], theta[..., 1:]  # (S, R, 1) against the subjects (N,)
        return lognormal_log_likelihood(t, d, mu, log_sigma.exp()) + prior.log_prob(theta).sum(-1)

    return fit_full_gaussian(log_joint, start.expand(num_runs, 2), init_scale=0.1, num_steps=num_steps,
                             num_samples=num_samples, lr=lr, generator=generator, progress=progress)
