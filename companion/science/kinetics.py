"""Rate constants of a chain of first-order reactions, inferred through an ODE solver.

Chapter *ODE models in physics and chemistry*. First-order reactions in a chain::

    A_1 --k_1--> A_2 --k_2--> ... --k_P--> A_{P+1}

change the concentrations ``y = (y_1, ..., y_{P+1})`` by mass action::

    dy_1/dt = -k_1 y_1,    dy_i/dt = k_{i-1} y_{i-1} - k_i y_i,    dy_{P+1}/dt = k_P y_P,

from ``y(0) = (1, 0, ..., 0)``. With ``P = 2`` this is the consecutive reaction A -> B -> C,
whose solution is closed-form (Bateman 1910)::

    A(t) = exp(-k_1 t),    B(t) = k_1 / (k_2 - k_1) (exp(-k_1 t) - exp(-k_2 t)),    C = 1 - A - B.

The parameters are ``theta = log k`` (positive rates, and a scale-free prior). Every species is
observed at times ``t_j`` with Gaussian noise of standard deviation ``sigma``, and
``log k ~ N(m0, s0^2)`` independently. The gradient of the log-likelihood with respect to
``theta`` runs through the ODE solve and is computed three ways (:func:`log_likelihood_gradient`):

* ``"autodiff"``: backpropagation through the solver's operations (``torchdiffeq.odeint``);
* ``"forward"``: the forward sensitivity equations, the ODE of ``S = dy/dtheta`` (``n x P``)
  solved beside ``y`` (:func:`solve_sensitivities`)::

      dS/dt = (df/dy) S + df/dtheta,    S(0) = 0;

* ``"adjoint"``: the adjoint method, one backward-in-time ODE for ``a = dL/dy``
  (``torchdiffeq.odeint_adjoint``; Chen et al. 2018);

and ``"exact"`` differentiates the closed form (``P = 2`` only). Shapes: ``log_k`` is
``(*batch, P)`` (a batch of independent parameter vectors solved together), ``times`` ``(T,)``,
``data`` ``(T, P + 1)``; solutions are ``(T, *batch, P + 1)``.
"""
from __future__ import annotations

import math
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Normal
from torchdiffeq import odeint, odeint_adjoint

from ..vi import GaussianFit, fit_full_gaussian
from ..runtime import rng
from .._checks import check_count

__all__ = [
    "METHODS",
    "reaction_rates",
    "initial_state",
    "solve",
    "Sensitivities",
    "solve_sensitivities",
    "consecutive_reactions",
    "consecutive_sensitivities",
    "simulate_data",
    "log_likelihood",
    "log_likelihood_gradient",
    "log_prior",
    "GridPosterior",
    "grid_posterior",
    "fit_vi",
    "GradientCost",
    "gradient_cost",
]

METHODS = ("autodiff", "forward", "adjoint", "exact")


# --------------------------------------------------------------------------- checks


def _check_log_k(log_k: Tensor) -> Tensor:
    if not isinstance(log_k, Tensor) or not log_k.is_floating_point() or log_k.dim() < 1:
        raise ValueError(f"log_k must be a floating-point tensor of shape (*batch, P), got {log_k!r}")
    if log_k.shape[-1] < 1 or not torch.isfinite(log_k).all():
        raise ValueError(f"log_k must hold P >= 1 finite log rate constants, got shape {tuple(log_k.shape)}")
    return log_k


def _check_times(times: Tensor) -> Tensor:
    if not isinstance(times, Tensor) or not times.is_floating_point() or times.dim() != 1 or times.numel() == 0:
        raise ValueError(f"times must be a non-empty 1-D floating-point tensor, got {times!r}")
    if not torch.isfinite(times).all() or (times < 0).any() or (times.diff() <= 0).any():
        raise ValueError(f"times must be finite, non-negative and strictly increasing, got {times.tolist()}")
    return times


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _check_data(data: Tensor, times: Tensor, num_species: int) -> Tensor:
    if not isinstance(data, Tensor) or data.shape != (times.numel(), num_species):
        shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
        raise ValueError(f"data must be a tensor of shape (T, P + 1) = {(times.numel(), num_species)}, got {shape}")
    return data


# --------------------------------------------------------------------------- the model


def reaction_rates(y: Tensor, k: Tensor) -> Tensor:
    """Mass-action rates of the chain, ``dy/dt = f(y, k)``: ``(*batch, P + 1)``.

    The flux of reaction ``i`` is ``r_i = k_i y_i``; species ``i`` gains ``r_{i-1}`` and loses
    ``r_i``::

        dy_i/dt = r_{i-1} - r_i,    r_0 = r_{P+1} = 0.

    ``y`` is ``(*batch, P + 1)`` and ``k`` ``(*batch, P)`` (positive rates, not their logs).
    """
    if y.shape[-1] != k.shape[-1] + 1:
        raise ValueError(f"y must have P + 1 = {k.shape[-1] + 1} species in its last dimension, got {y.shape[-1]}")
    flux = k * y[..., :-1]  # r_i = k_i y_i, (*batch, P)
    return F.pad(flux, (1, 0)) - F.pad(flux, (0, 1))  # gain r_{i-1}, loss r_i


def initial_state(log_k: Tensor) -> Tensor:
    """``y(0) = (1, 0, ..., 0)``: all material starts as ``A_1``; ``(*batch, P + 1)``."""
    _check_log_k(log_k)
    y0 = log_k.new_zeros(*log_k.shape[:-1], log_k.shape[-1] + 1)
    y0[..., 0] = 1.0
    return y0


def _grid(times: Tensor) -> tuple[Tensor, int]:
    """The solver's time grid starts at 0: prepend it when the first observation is later."""
    if times[0] == 0:
        return times, 0
    return torch.cat([times.new_zeros(1), times]), 1


def _field(log_k: Tensor, calls: list[int] | None = None):
    """``f(t, y) = reaction_rates(y, exp(log_k))`` in torchdiffeq's signature, counting calls."""

    def field(t: Tensor, y: Tensor) -> Tensor:
        if calls is not None:
            calls[0] += 1
        return reaction_rates(y, log_k.exp())

    return field


def _solve(log_k, times, adjoint, rtol, atol, method, calls=None) -> Tensor:
    grid, skip = _grid(times)
    y0, field = initial_state(log_k), _field(log_k, calls)
    if adjoint:
        # the adjoint integrates a = dL/dy backward, with d/dtheta of f computed by autograd
        ys = odeint_adjoint(field, y0, grid, rtol=rtol, atol=atol, method=method, adjoint_params=(log_k,))
    else:
        ys = odeint(field, y0, grid, rtol=rtol, atol=atol, method=method)
    return ys[skip:]


def solve(
    log_k: Tensor,
    times: Tensor,
    *,
    adjoint: bool = False,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    method: str = "dopri5",
) -> Tensor:
    """Concentrations at ``times`` from ``torchdiffeq``: ``(T, *batch, P + 1)``, differentiable in ``log_k``.

    ``adjoint=False`` calls ``torchdiffeq.odeint``, so that backpropagation runs through every
    step of the solver; ``adjoint=True`` calls ``torchdiffeq.odeint_adjoint``, which keeps no graph
    of the forward solve and gets the gradient from a second ODE solved backward in time (Chen
    et al. 2018). ``rtol`` and ``atol`` are the adaptive solver's tolerances (also those of the
    adjoint solve). A batch of parameter vectors is solved as one system with one step size.
    """
    _check_log_k(log_k)
    _check_times(times)
    rtol, atol = _check_positive("rtol", rtol), _check_positive("atol", atol)
    return _solve(log_k, times, adjoint, rtol, atol, method)


class Sensitivities(NamedTuple):
    """The solution and its sensitivities at the observation times.

    y
        ``(T, *batch, P + 1)``, the concentrations.
    s
        ``(T, *batch, P + 1, P)``, ``s[..., i, j] = d y_i / d log k_j``.
    """

    y: Tensor
    s: Tensor


def solve_sensitivities(
    log_k: Tensor,
    times: Tensor,
    *,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    method: str = "dopri5",
) -> Sensitivities:
    """``y`` and ``S = dy/dlog k`` from the forward sensitivity equations, solved as one ODE.

    Differentiating ``dy/dt = f(y, theta)`` with respect to ``theta`` gives, column by column::

        dS_j/dt = (df/dy) S_j + df/dtheta_j,    S_j(0) = 0    (y(0) does not depend on theta),

    and the right side is one Jacobian-vector product of ``f`` in the direction ``(S_j, e_j)``:
    ``torch.func.jvp``, vectorized over the ``P`` columns by ``torch.func.vmap``. The augmented
    state ``(y, S)`` has ``(P + 1)(P + 1)`` numbers per parameter vector, integrated by
    ``torchdiffeq.odeint`` with error control over all of it. Runs without autograd (the result
    carries no graph). Chapter *ODE models in physics and chemistry*.
    """
    _check_log_k(log_k)
    _check_times(times)
    rtol, atol = _check_positive("rtol", rtol), _check_positive("atol", atol)
    return _solve_sensitivities(log_k.detach(), times, rtol, atol, method)


def _solve_sensitivities(log_k, times, rtol, atol, method, calls=None) -> Sensitivities:
    log_k = log_k.detach().clone()  # own memory: forward AD cannot take an expanded primal
    num_params = log_k.shape[-1]
    directions = torch.eye(num_params, dtype=log_k.dtype, device=log_k.device)
    # column j is e_j, for every batch entry (a copy: forward AD cannot take an expanded tangent)
    directions = directions.expand(*log_k.shape[:-1], num_params, num_params).clone()

    def f(y: Tensor, theta: Tensor) -> Tensor:
        return reaction_rates(y, theta.exp())

    def column(s_j: Tensor, e_j: Tensor, y: Tensor) -> Tensor:  # (df/dy) s_j + (df/dtheta) e_j
        return torch.func.jvp(f, (y, log_k), (s_j, e_j))[1]

    def augmented(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        if calls is not None:
            calls[0] += 1
        y, s = state  # (*batch, n), (*batch, n, P)
        ds = torch.func.vmap(column, in_dims=(-1, -1, None), out_dims=-1)(s, directions, y)
        return f(y, log_k), ds

    grid, skip = _grid(times)
    y0 = initial_state(log_k)
    s0 = y0.new_zeros(*y0.shape, num_params)
    with torch.no_grad():
        ys, ss = odeint(augmented, (y0, s0), grid, rtol=rtol, atol=atol, method=method)
    return Sensitivities(ys[skip:], ss[skip:])


def consecutive_reactions(log_k: Tensor, times: Tensor) -> Tensor:
    """The closed-form solution of A -> B -> C (``P = 2``): ``(T, *batch, 3)``, differentiable.

    ``A = exp(-k_1 t)``, ``C = 1 - A - B`` and, written so that it stays accurate as
    ``k_2 -> k_1`` and finite for any rates::

        B = k_1 / (k_2 - k_1) (exp(-k_1 t) - exp(-k_2 t))
          = k_1 t exp(-min(k_1, k_2) t) phi(|k_2 - k_1| t),

    with ``phi(x) = (1 - exp(-x)) / x = -expm1(-x) / x`` in ``(0, 1]`` for ``x >= 0`` and
    ``phi(0) = 1``. (At exactly ``k_1 = k_2`` autograd differentiates one branch of ``min`` and
    ``|.|``; :func:`consecutive_sensitivities` gives the derivative for ``k_1 != k_2``.)
    """
    _check_log_k(log_k)
    _check_times(times)
    if log_k.shape[-1] != 2:
        raise ValueError(f"consecutive_reactions needs P = 2 rate constants, got log_k of shape {tuple(log_k.shape)}")
    k1, k2 = log_k.exp().unbind(-1)
    t = times.reshape(-1, *([1] * k1.dim()))  # (T, 1, ..., 1) against (*batch,)
    a = torch.exp(-k1 * t)
    x = (k2 - k1).abs() * t
    safe = torch.where(x == 0, torch.ones_like(x), x)
    phi = torch.where(x == 0, torch.ones_like(x), -torch.expm1(-safe) / safe)
    b = k1 * t * torch.exp(-torch.minimum(k1, k2) * t) * phi
    return torch.stack([a, b, 1 - a - b], -1)


def consecutive_sensitivities(log_k: Tensor, times: Tensor) -> Tensor:
    """``d(A, B, C) / d(log k_1, log k_2)`` of A -> B -> C in closed form: ``(T, *batch, 3, 2)``.

    With ``e_i = exp(-k_i t)`` and ``D = k_2 - k_1`` (``k_1 != k_2``)::

        dA/dk_1 = -t e_1,                              dA/dk_2 = 0,
        dB/dk_1 = k_2 (e_1 - e_2) / D^2 - k_1 t e_1 / D,
        dB/dk_2 = k_1 t e_2 / D - k_1 (e_1 - e_2) / D^2,
        dC = -dA - dB,

    and ``d/dlog k_i = k_i d/dk_i``. The reference for the three solver-based gradients.
    """
    _check_log_k(log_k)
    _check_times(times)
    if log_k.shape[-1] != 2:
        raise ValueError(f"consecutive_sensitivities needs P = 2 rate constants, got shape {tuple(log_k.shape)}")
    k1, k2 = log_k.exp().unbind(-1)
    if torch.any((k2 - k1).abs() <= 1e-6 * (k1 + k2)):
        raise ValueError("consecutive_sensitivities needs k_1 != k_2 (the formula divides by k_2 - k_1)")
    t = times.reshape(-1, *([1] * k1.dim()))
    e1, e2, d = torch.exp(-k1 * t), torch.exp(-k2 * t), k2 - k1
    da = torch.stack([-t * e1 * k1, torch.zeros_like(e1)], -1)  # d/dlog k = k d/dk
    db = torch.stack(
        [k1 * (k2 * (e1 - e2) / d**2 - k1 * t * e1 / d), k2 * (k1 * t * e2 / d - k1 * (e1 - e2) / d**2)], -1
    )
    return torch.stack([da, db, -da - db], -2)


def simulate_data(
    log_k: Tensor, times: Tensor, noise_scale: float, *, generator: torch.Generator | None = None
) -> Tensor:
    """Noisy concentrations of every species, ``y(t_j) + sigma eps``: ``(T, P + 1)``.

    ``log_k`` is ``(P,)``, the true parameters; ``y`` comes from a tight ODE solve (``rtol=1e-10``).
    """
    _check_log_k(log_k)
    if log_k.dim() != 1:
        raise ValueError(f"simulate_data takes one parameter vector, log_k of shape (P,), got {tuple(log_k.shape)}")
    sigma = _check_positive("noise_scale", noise_scale)
    with torch.no_grad():
        y = solve(log_k, times, rtol=1e-10, atol=1e-12)
    with rng(generator):
        eps = torch.randn(y.shape, dtype=y.dtype, device=y.device)
    return y + sigma * eps


def log_likelihood(y: Tensor, data: Tensor, noise_scale: float) -> Tensor:
    """``sum_{j, i} log N(data_{j,i}; y_{j,i}, sigma^2)``: ``(*batch,)``.

    ``y`` is ``(T, *batch, n)`` (a solution), ``data`` ``(T, n)``.
    """
    sigma = _check_positive("noise_scale", noise_scale)
    if not isinstance(y, Tensor) or not isinstance(data, Tensor) or data.dim() != 2 or y.dim() < 2:
        raise ValueError("y must be (T, *batch, n) and data (T, n) tensors")
    if y.shape[0] != data.shape[0] or y.shape[-1] != data.shape[-1]:
        raise ValueError(f"y of shape {tuple(y.shape)} and data of shape {tuple(data.shape)} disagree")
    obs = data.reshape(data.shape[0], *([1] * (y.dim() - 2)), data.shape[1])
    log_p = Normal(y, sigma).log_prob(obs)  # (T, *batch, n)
    return log_p.sum(-1).sum(0)


def log_prior(log_k: Tensor, prior_loc, prior_scale: float) -> Tensor:
    """``sum_i log N(log k_i; m0_i, s0^2)``: ``(*batch,)``; ``prior_loc`` a float or ``(P,)``."""
    _check_log_k(log_k)
    s0 = _check_positive("prior_scale", prior_scale)
    return Normal(torch.as_tensor(prior_loc, dtype=log_k.dtype), s0).log_prob(log_k).sum(-1)


def _gaussian_score(y: Tensor, data: Tensor, sigma: float) -> Tensor:
    """``dL/dy = (data - y) / sigma^2`` at every observation: ``(T, *batch, n)``."""
    obs = data.reshape(data.shape[0], *([1] * (y.dim() - 2)), data.shape[1])
    return (obs - y) / sigma**2


def _gradient(method, log_k, times, data, sigma, rtol, atol, solver, calls=None) -> Tensor:
    if method in ("autodiff", "adjoint"):
        theta = log_k.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            y = _solve(theta, times, method == "adjoint", rtol, atol, solver, calls)
            (grad,) = torch.autograd.grad(log_likelihood(y, data, sigma).sum(), theta)
        return grad
    if method == "forward":
        y, s = _solve_sensitivities(log_k.detach(), times, rtol, atol, solver, calls)
    else:  # exact
        y, s = consecutive_reactions(log_k.detach(), times), consecutive_sensitivities(log_k.detach(), times)
    # chain rule over every observation: dL/dtheta_p = sum_{j,i} dL/dy_{j,i} S_{j,i,p}
    return torch.einsum("t...i,t...ip->...p", _gaussian_score(y, data, sigma), s)


def log_likelihood_gradient(
    method: str,
    log_k: Tensor,
    times: Tensor,
    data: Tensor,
    noise_scale: float,
    *,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    solver: str = "dopri5",
) -> Tensor:
    """``d/dlog k`` of :func:`log_likelihood` of the ODE solution: ``(*batch, P)``, no graph.

    method
        ``"autodiff"`` (backpropagation through ``torchdiffeq.odeint``), ``"forward"``
        (:func:`solve_sensitivities`, then ``sum_j (data_j - y_j) / sigma^2 . S_j``),
        ``"adjoint"`` (``torchdiffeq.odeint_adjoint``) or ``"exact"`` (the closed form, ``P = 2``).
    rtol, atol
        The solver's tolerances; each method's error is of their order.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_log_k(log_k)
    _check_times(times)
    _check_data(data, times, log_k.shape[-1] + 1)
    sigma = _check_positive("noise_scale", noise_scale)
    rtol, atol = _check_positive("rtol", rtol), _check_positive("atol", atol)
    return _gradient(method, log_k, times, data, sigma, rtol, atol, solver)


# --------------------------------------------------------------------------- the posterior


class GridPosterior(NamedTuple):
    """The exact posterior of ``(log k_1, log k_2)`` on a grid.

    log_k1, log_k2
        ``(G1,)``, ``(G2,)``, the grid's axes (evenly spaced).
    density
        ``(G1, G2)``, ``p(theta | data)``, normalized so that it sums to 1 / cell area.
    mean, cov
        ``(2,)``, ``(2, 2)``, the posterior mean and covariance by quadrature.
    """

    log_k1: Tensor
    log_k2: Tensor
    density: Tensor
    mean: Tensor
    cov: Tensor


def grid_posterior(
    log_k1: Tensor,
    log_k2: Tensor,
    times: Tensor,
    data: Tensor,
    noise_scale: float,
    prior_loc,
    prior_scale: float,
) -> GridPosterior:
    """``p(log k | data)`` of A -> B -> C on the grid ``log_k1 x log_k2``, from the closed form.

    ``log p(theta | data) = log p(data | theta) + log p(theta) - log Z``, with ``Z`` by the
    midpoint rule over the cells; the mean and covariance by the same rule. No ODE solver is
    involved, so it is a reference for the variational fit, exact up to the grid's resolution
    and extent (the grid must cover the posterior's mass).
    """
    for name, axis in (("log_k1", log_k1), ("log_k2", log_k2)):
        if not isinstance(axis, Tensor) or axis.dim() != 1 or axis.numel() < 2 or (axis.diff() <= 0).any():
            raise ValueError(f"{name} must be an increasing 1-D tensor of at least 2 grid points")
    _check_data(data, _check_times(times), 3)
    theta = torch.stack(torch.meshgrid(log_k1, log_k2, indexing="ij"), -1)  # (G1, G2, 2)
    log_post = log_likelihood(consecutive_reactions(theta, times), data, noise_scale)
    log_post = log_post + log_prior(theta, prior_loc, prior_scale)
    weights = torch.softmax(log_post.flatten(), 0).reshape(log_post.shape)  # cell probabilities
    cell = (log_k1[1] - log_k1[0]) * (log_k2[1] - log_k2[0])
    mean = torch.einsum("ab,abi->i", weights, theta)
    centred = theta - mean
    cov = torch.einsum("ab,abi,abj->ij", weights, centred, centred)
    return GridPosterior(log_k1, log_k2, weights / cell, mean, cov)


def fit_vi(
    times: Tensor,
    data: Tensor,
    noise_scale: float,
    prior_loc,
    prior_scale: float,
    *,
    num_steps: int,
    num_samples: int,
    num_runs: int = 1,
    lr: float = 0.05,
    init_scale: float = 0.1,
    rtol: float = 1e-5,
    atol: float = 1e-7,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
) -> GaussianFit:
    """Maximize the ELBO of a full-covariance Gaussian over ``theta = log k`` by pathwise gradients.

    ``theta_s = m + L eps_s`` (``eps_s ~ N(0, I)``); each step's objective is::

        ELBO(m, L) ~ (1/S) sum_s [log p(data | theta_s) + log p(theta_s)] + H[q],

    with the likelihood from one batched ``torchdiffeq.odeint`` call for all samples (the
    gradient runs back through the solver) and the entropy ``H[q]`` in closed form. Each run
    starts at the prior's mean with ``L = init_scale I``; Adam updates ``(m, L)``, with
    ``L``'s diagonal through ``exp``, and its learning rate decays as a cosine to zero, so that
    the last iterates settle instead of jittering at the noise level of a constant step.
    ``num_runs`` independent runs share the solver calls (one batch of ``S x R`` parameter
    vectors) and one optimizer, which acts element-wise. Chapter *ODE models in physics and
    chemistry*; Kingma and Welling (2014), Titsias and Lazaro-Gredilla (2014).
    """
    if not isinstance(data, Tensor) or data.dim() != 2 or data.shape[-1] < 2:
        raise ValueError("data must be a (T, P + 1) tensor with P >= 1")
    num_params = data.shape[-1] - 1
    _check_data(data, _check_times(times), num_params + 1)
    sigma = _check_positive("noise_scale", noise_scale)
    for name, value in (("num_steps", num_steps), ("num_samples", num_samples), ("num_runs", num_runs)):
        check_count(name, value)
    lr, init_scale = _check_positive("lr", lr), _check_positive("init_scale", init_scale)
    rtol, atol = _check_positive("rtol", rtol), _check_positive("atol", atol)
    like = {"dtype": data.dtype, "device": data.device}
    m0 = torch.as_tensor(prior_loc, **like).expand(num_params)

    def log_joint(theta: Tensor) -> Tensor:  # (S, R, P) -> (S, R)
        y = _solve(theta, times, False, rtol, atol, "dopri5")
        return log_likelihood(y, data, sigma) + log_prior(theta, prior_loc, prior_scale)

    return fit_full_gaussian(log_joint, m0.expand(num_runs, num_params), init_scale=init_scale,
                             num_steps=num_steps, num_samples=num_samples, lr=lr,
                             generator=generator, progress=progress)


# --------------------------------------------------------------------------- cost


class _SavedBytes:
    """Bytes of the tensors autograd keeps for the backward pass: live now, and the peak.

    ``torch.autograd.graph.saved_tensors_hooks`` wraps every tensor an operation saves; the
    wrapper adds its size when the graph saves it and subtracts it when the graph frees it.
    The wrapper holds a detached alias, so that it adds no reference cycle (first-order
    gradients only).
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def pack(self, tensor: Tensor) -> _Saved:
        return _Saved(tensor, self)

    @staticmethod
    def unpack(saved: _Saved) -> Tensor:
        return saved.tensor


class _Saved:
    __slots__ = ("tensor", "meter", "nbytes")

    def __init__(self, tensor: Tensor, meter: _SavedBytes) -> None:
        self.tensor, self.meter = tensor.detach(), meter
        self.nbytes = tensor.numel() * tensor.element_size()
        meter.live += self.nbytes
        meter.peak = max(meter.peak, meter.live)

    def __del__(self) -> None:
        self.meter.live -= self.nbytes


class GradientCost(NamedTuple):
    """What one gradient of :func:`gradient_cost` cost.

    seconds
        Wall-clock time, the fastest of the repeats.
    saved_bytes
        Peak bytes of tensors held for the backward pass (0: no backward pass).
    forward_evaluations
        Calls of the vector field while solving forward in time (for ``"forward"``: of the
        augmented field, each ``P`` Jacobian-vector products).
    backward_evaluations
        Calls of the vector field in the backward pass (the adjoint's backward solve; 0 for
        the other two).
    """

    seconds: float
    saved_bytes: int
    forward_evaluations: int
    backward_evaluations: int


def gradient_cost(
    method: str,
    num_params: int,
    *,
    times: Tensor | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    repeats: int = 3,
) -> GradientCost:
    """Time, memory and function evaluations of one log-likelihood gradient of a ``P``-reaction chain.

    The chain has rates ``k_i`` evenly spaced in log between 0.5 and 2, every species observed
    at ``times`` (default: 8 times up to 10) against data of zeros with ``sigma = 1``.
    ``method`` is ``"autodiff"``, ``"forward"`` or ``"adjoint"``. Memory is the peak number of
    bytes in the tensors that autograd saves for the backward pass, counted with
    ``torch.autograd.graph.saved_tensors_hooks``: the memory that backpropagation through the
    solver needs for every step and the adjoint method does not. The forward sensitivities run
    without autograd and save nothing; their memory is their state of ``(P + 1)^2`` numbers
    per parameter vector instead of ``P + 1``.
    """
    if method not in METHODS[:3]:
        raise ValueError(f"method must be one of {METHODS[:3]}, got {method!r}")
    check_count("num_params", num_params)
    check_count("repeats", repeats)
    times = torch.linspace(1.25, 10.0, 8, dtype=torch.float64) if times is None else _check_times(times)
    rtol, atol = _check_positive("rtol", rtol), _check_positive("atol", atol)
    log_k = torch.linspace(math.log(0.5), math.log(2.0), num_params, dtype=times.dtype, device=times.device)
    data = times.new_zeros(times.numel(), num_params + 1)
    forward, total, meter = [0], [0], _SavedBytes()
    if method == "forward":
        _solve_sensitivities(log_k, times, rtol, atol, "dopri5", forward)
    else:
        with torch.no_grad():
            _solve(log_k, times, False, rtol, atol, "dopri5", forward)
    # one run with the hooks: the memory, and every evaluation (forward and backward)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        _gradient(method, log_k, times, data, 1.0, rtol, atol, "dopri5", total)
    seconds = math.inf
    for _ in range(repeats):  # timed runs, without the hooks' bookkeeping
        start = time.perf_counter()
        _gradient(method, log_k, times, data, 1.0, rtol, atol, "dopri5")
        seconds = min(seconds, time.perf_counter() - start)
    return GradientCost(seconds, meter.peak, forward[0], total[0] - forward[0])
