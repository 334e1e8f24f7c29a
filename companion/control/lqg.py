"""Linear-quadratic control with Gaussian policies: exact costs, simulated costs, Riccati.

Chapter *Stochastic optimal control*. The system is linear with Gaussian noise and the cost is
quadratic (Anderson and Moore 1990; Bertsekas 2017)::

    x_{t+1} = a x_t + b u_t + noise_std w_t,        w_t ~ N(0, I),
    J = E[ sum_{t=0}^{T-1} (x_t' q x_t + u_t' r u_t) + x_T' q_final x_T ].

Two policies:

* open loop, :func:`expected_cost` and :func:`rollout_cost` (scalar system):
  ``u_t = mu_t + sigma_t eps_t``, ``eps_t ~ N(0, 1)``, the plan fixed in advance;
* linear feedback, :func:`feedback_cost` and :func:`feedback_rollout_cost` (scalar or
  matrix system): ``u_t = -k x_t + sigma eps_t``.

Because everything is linear and Gaussian, the state's mean and second moment propagate in
closed form, so the *expected* cost is an explicit, differentiable function of the policy:
autograd of it is the exact gradient, the reference for the Monte Carlo pathwise gradient of
the simulated cost (the seed's LQG example: reparameterize ``u_t`` and differentiate the
rollout). :func:`riccati` gives the optimal feedback, the reference for both optimizations.

Scalars are numbers or 0-d tensors; every function computes in the dtype of its first tensor
argument (float64 recommended) and is differentiable in every tensor argument.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..runtime import rng
from .._checks import check_count

__all__ = [
    "expected_cost",
    "rollout_cost",
    "riccati",
    "feedback_cost",
    "feedback_rollout_cost",
]


# --------------------------------------------------------------------------- checks


def _tensor(name: str, value, dtype, device) -> Tensor:
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise ValueError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got {value!r}")
    return t


def _dtype_device(*values):
    for v in values:
        if isinstance(v, Tensor) and v.is_floating_point():
            return v.dtype, v.device
    return torch.float64, None  # plain numbers: compute in double precision


def _nonnegative(name: str, t: Tensor) -> Tensor:
    if (t < 0).any():
        raise ValueError(f"{name} must be non-negative, got {t.tolist()}")
    return t


def _open_loop_args(mu, sigma, a, b, q, r, x0, noise_std, q_final):
    """Checked tensors for the scalar open-loop problem; mu and sigma (..., T), T >= 1."""
    if not isinstance(mu, Tensor) or not isinstance(sigma, Tensor):
        raise ValueError("mu and sigma must be tensors of shape (T,)")
    if mu.dim() < 1 or mu.shape[-1] < 1:
        raise ValueError(f"mu must have shape (T,) with T >= 1, got {tuple(mu.shape)}")
    if sigma.shape != mu.shape:
        raise ValueError(f"sigma must have the shape of mu {tuple(mu.shape)}, got {tuple(sigma.shape)}")
    if not torch.isfinite(mu).all():
        raise ValueError("mu must be finite")
    if not (sigma > 0).all() or not torch.isfinite(sigma).all():
        raise ValueError("sigma must be positive and finite (u_t = mu_t + sigma_t eps_t)")
    dtype, device = mu.dtype, mu.device
    out = {"a": a, "b": b, "q": q, "r": r, "x0": x0, "noise_std": noise_std}
    out["q_final"] = q if q_final is None else q_final
    out = {k: _tensor(k, v, dtype, device) for k, v in out.items()}
    for k, v in out.items():
        if v.dim() != 0:
            raise ValueError(f"{k} must be a scalar for the scalar system, got shape {tuple(v.shape)}")
    for k in ("q", "r", "noise_std", "q_final"):
        _nonnegative(k, out[k])
    return out


# --------------------------------------------------------------------------- open loop


def expected_cost(
    mu: Tensor, sigma: Tensor, *, a, b, q, r, x0, noise_std=0.0, q_final=None
) -> Tensor:
    """Exact expected cost ``J`` of the open-loop policy ``u_t = mu_t + sigma_t eps_t``.

    Scalar system ``x_{t+1} = a x_t + b u_t + noise_std w_t`` from ``x_0 = x0``, cost
    ``J = E[sum_{t<T} (q x_t^2 + r u_t^2) + q_final x_T^2]`` (``q_final=None`` means ``q``).
    The state stays Gaussian; its mean ``m_t`` and variance ``v_t`` propagate as::

        m_{t+1} = a m_t + b mu_t,      v_{t+1} = a^2 v_t + b^2 sigma_t^2 + noise_std^2,
        J = sum_{t<T} [q (m_t^2 + v_t) + r (mu_t^2 + sigma_t^2)] + q_final (m_T^2 + v_T),

    with ``m_0 = x0``, ``v_0 = 0``. So ``J`` splits into a part of ``mu`` alone (the
    deterministic plan), a constant from the process noise, and ``sum_t c_t sigma_t^2`` with
    ``c_t = r + b^2 sum_{s>t} q_s a^{2(s-t-1)} > 0``: noise in the actions only adds cost.

    mu, sigma:
        ``(T,)`` (or ``(..., T)`` for a batch of policies), ``sigma > 0``.
    a, b, q, r, x0, noise_std, q_final:
        scalars; ``q, r, noise_std, q_final >= 0``.

    Returns ``J`` with the batch shape of ``mu`` (a 0-d tensor for ``(T,)``), differentiable in
    every argument, so autograd gives the exact gradient. Chapter *Stochastic optimal control*.
    """
    p = _open_loop_args(mu, sigma, a, b, q, r, x0, noise_std, q_final)
    m = p["x0"].expand(mu.shape[:-1])  # mean of x_t
    v = torch.zeros_like(m)  # variance of x_t
    cost = torch.zeros_like(m)
    for t in range(mu.shape[-1]):
        mu_t, var_u = mu[..., t], sigma[..., t] ** 2
        cost = cost + p["q"] * (m**2 + v) + p["r"] * (mu_t**2 + var_u)
        m = p["a"] * m + p["b"] * mu_t
        v = p["a"] ** 2 * v + p["b"] ** 2 * var_u + p["noise_std"] ** 2
    return cost + p["q_final"] * (m**2 + v)


def _noises(shapes: dict, given: dict, noise_std: Tensor, dtype, device, generator) -> list[Tensor]:
    """The standard normal noises named in ``shapes``: all drawn from ``generator``, or all given.

    ``given`` maps each name to a tensor or ``None``; the process noise ``w`` may be left out
    when ``noise_std`` is zero (it is then unused).
    """
    if all(v is None for v in given.values()):
        with rng(generator):
            return [torch.randn(shape, dtype=dtype, device=device) for shape in shapes.values()]
    if generator is not None:
        raise ValueError("pass the noise (eps=, w=) or generator=, not both: the noise is fixed already")
    out = []
    for name, shape in shapes.items():
        value = given[name]
        if value is None:
            if name == "w" and not (noise_std != 0).any():
                value = torch.zeros(shape, dtype=dtype, device=device)
            else:
                raise ValueError(f"{name}= is missing: pass every noise tensor, or none and a generator")
        if not isinstance(value, Tensor) or tuple(value.shape) != tuple(shape):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a tensor of shape {tuple(shape)} (num_samples first), got {got}")
        out.append(value.to(dtype))
    return out


def rollout_cost(
    mu: Tensor,
    sigma: Tensor,
    *,
    a,
    b,
    q,
    r,
    x0,
    noise_std=0.0,
    q_final=None,
    num_samples: int,
    generator: torch.Generator | None = None,
    eps: Tensor | None = None,
    w: Tensor | None = None,
) -> Tensor:
    """Simulated cost of the open-loop policy, one value per trajectory: shape ``(num_samples,)``.

    The same problem as :func:`expected_cost`, simulated: ``u_t = mu_t + sigma_t eps_t`` and
    ``x_{t+1} = a x_t + b u_t + noise_std w_t``, the cost summed along each trajectory. Every
    ``x_t`` keeps its graph back to ``mu``, ``sigma`` and the system, so the gradient of
    ``rollout_cost(...).mean()`` is the Monte Carlo pathwise gradient of ``J``, backpropagated
    through time (unbiased: its mean is the exact gradient of :func:`expected_cost`).

    mu, sigma:
        ``(T,)``, ``sigma > 0``.
    eps, w:
        the standard normal policy and process noise, each ``(num_samples, T)``, instead of draws
        from ``generator`` (common random numbers); ``w`` may be left out when
        ``noise_std = 0``.
    """
    if isinstance(mu, Tensor) and mu.dim() != 1:
        raise ValueError(f"mu must have shape (T,), got {tuple(mu.shape)}")
    p = _open_loop_args(mu, sigma, a, b, q, r, x0, noise_std, q_final)
    n = check_count("num_samples", num_samples)
    shape = (n, mu.shape[0])
    eps, w = _noises({"eps": shape, "w": shape}, {"eps": eps, "w": w}, p["noise_std"],
                     mu.dtype, mu.device, generator)
    x = p["x0"].expand(n)  # (S,)
    cost = torch.zeros_like(x)
    for t in range(mu.shape[0]):
        u = mu[t] + sigma[t] * eps[:, t]  # (S,), the reparameterized action
        cost = cost + p["q"] * x**2 + p["r"] * u**2
        x = p["a"] * x + p["b"] * u + p["noise_std"] * w[:, t]
    return cost + p["q_final"] * x**2


# --------------------------------------------------------------------------- Riccati


def _as_matrices(a, b, q, r):
    """(a, b, q, r) as (n, n), (n, m), (n, n), (m, m) tensors; scalar=True for 0-d inputs."""
    dtype, device = _dtype_device(a, b, q, r)
    a, b, q, r = (_tensor(k, v, dtype, device) for k, v in zip("abqr", (a, b, q, r)))
    scalar = all(t.dim() == 0 for t in (a, b, q, r))
    if scalar:
        a, b, q, r = (t.reshape(1, 1) for t in (a, b, q, r))
    elif any(t.dim() != 2 for t in (a, b, q, r)):
        raise ValueError("a, b, q, r must all be scalars or all be matrices (2-D tensors)")
    n, m = a.shape[0], b.shape[-1]
    for name, t, shape in (("a", a, (n, n)), ("b", b, (n, m)), ("q", q, (n, n)), ("r", r, (m, m))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (a is (n, n), b is (n, m)), got {tuple(t.shape)}")
    for name, t, strict in (("q", q, False), ("r", r, True)):
        if not torch.allclose(t, t.T):
            raise ValueError(f"{name} must be symmetric")
        low = torch.linalg.eigvalsh(t).min()
        if (low <= 0) if strict else (low < -1e-12 * max(1.0, t.abs().max().item())):
            kind = "positive definite" if strict else "positive semi-definite"
            raise ValueError(f"{name} must be {kind}, its smallest eigenvalue is {low.item():.3g}")
    return a, b, q, r, scalar


def riccati(a, b, q, r, *, tol: float = 1e-12, max_iter: int = 100_000) -> tuple[Tensor, Tensor]:
    """Steady-state solution ``P`` of the discrete algebraic Riccati equation, and the gain ``K``.

    ``P = q + a' P a - a' P b (r + b' P b)^{-1} b' P a`` and ``K = (r + b' P b)^{-1} b' P a``:
    ``u = -K x`` minimizes ``sum_t (x_t' q x_t + u_t' r u_t)`` over an infinite horizon and
    the minimum from ``x_0`` is ``x_0' P x_0`` (Anderson and Moore 1990; Bertsekas 2017). With
    process noise of covariance ``W`` the same ``K`` is optimal and the average cost per step is
    ``tr(P W)``.

    Computed by the Riccati recursion (value iteration) from ``P = q`` until the largest change is
    at most ``tol`` times ``max(1, |P|)`` (``tol`` no smaller than 8 machine epsilons of the
    dtype; plain numbers compute in float64). Scalars (``a = b = q = r = 1`` gives the golden ratio
    ``P = 1.618...``, ``K = 0.618...``) or matrices ``a (n, n), b (n, m), q (n, n), r (m, m)``
    with ``q`` positive semi-definite and ``r`` positive definite; returns 0-d tensors for
    scalars. A ``ValueError`` if the recursion does not converge (``(a, b)`` not stabilizable).
    Reference: ``scipy.linalg.solve_discrete_are``.
    """
    if not isinstance(tol, float) or not tol > 0:
        raise ValueError(f"tol must be a positive float, got {tol!r}")
    check_count("max_iter", max_iter)
    a, b, q, r, scalar = _as_matrices(a, b, q, r)
    tol = max(tol, 8 * torch.finfo(a.dtype).eps)  # rounding sets a floor (float32: ~1e-6)
    p = q.clone()
    for _ in range(max_iter):
        bpa = b.T @ p @ a
        p_next = q + a.T @ p @ a - bpa.T @ torch.linalg.solve(r + b.T @ p @ b, bpa)
        p_next = (p_next + p_next.T) / 2
        if not torch.isfinite(p_next).all():
            break
        done = (p_next - p).abs().max() <= tol * max(1.0, p_next.abs().max().item())
        p = p_next
        if done:
            k = torch.linalg.solve(r + b.T @ p @ b, b.T @ p @ a)
            return (p.reshape(()), k.reshape(())) if scalar else (p, k)
    raise ValueError(
        f"the Riccati recursion did not converge in {max_iter} iterations: is (a, b) stabilizable?"
    )


# --------------------------------------------------------------------------- linear feedback


def _feedback_args(k, a, b, q, r, x0, x0_cov, sigma, noise_std, q_final, horizon):
    dtype, device = _dtype_device(k, a, b, q, r, x0)
    a_, b_, q_, r_, scalar = _as_matrices(a, b, q, r)
    n, m = b_.shape
    if not isinstance(k, Tensor):
        k = _tensor("k", k, dtype, device)
    k = k.to(a_.dtype)
    if scalar:
        k = k.reshape(*k.shape, 1, 1)  # (*batch) -> (*batch, 1, 1)
    if k.dim() < 2 or tuple(k.shape[-2:]) != (m, n):
        raise ValueError(f"k must have shape (..., {m}, {n}) (u = -k x), got {tuple(k.shape)}")
    x0 = _tensor("x0", x0, a_.dtype, a_.device).reshape(-1)
    if x0.shape[0] != n:
        raise ValueError(f"x0 must have {n} entries, got {x0.shape[0]}")
    second = torch.outer(x0, x0)
    if x0_cov is not None:
        x0_cov = _tensor("x0_cov", x0_cov, a_.dtype, a_.device).reshape(n, n)
        if not torch.allclose(x0_cov, x0_cov.T) or torch.linalg.eigvalsh(x0_cov).min() < -1e-12:
            raise ValueError("x0_cov must be a symmetric positive semi-definite (n, n) matrix")
        second = second + x0_cov
    var_u = torch.zeros(m, m, dtype=a_.dtype, device=a_.device)
    if sigma is not None:
        sigma = _tensor("sigma", sigma, a_.dtype, a_.device)
        if not (sigma > 0).all():
            raise ValueError("sigma must be positive (u = -k x + sigma eps); pass None for no noise")
        if scalar or sigma.dim() == 0:
            sigma = sigma.unsqueeze(-1)  # scalar systems: (*batch) -> (*batch, 1)
        if sigma.shape[-1] not in (1, m):
            raise ValueError(f"sigma must be a scalar or have {m} entries in its last dimension")
        sigma = sigma.expand(*sigma.shape[:-1], m)
        var_u = torch.diag_embed(sigma**2)  # (..., m, m)
    noise_std = _nonnegative("noise_std", _tensor("noise_std", noise_std, a_.dtype, a_.device))
    if noise_std.dim() != 0:
        raise ValueError("noise_std must be a scalar (process noise covariance noise_std^2 I)")
    if q_final is None:
        qf = q_
    else:
        qf = _tensor("q_final", q_final, a_.dtype, a_.device).reshape(n, n)
        if not torch.allclose(qf, qf.T) or torch.linalg.eigvalsh(qf).min() < -1e-12 * max(1.0, qf.abs().max().item()):
            raise ValueError("q_final must be symmetric positive semi-definite")
    check_count("horizon", horizon)
    return a_, b_, q_, r_, k, second, var_u, noise_std, qf, scalar


def feedback_cost(
    k, *, a, b, q, r, x0, horizon: int, x0_cov=None, sigma=None, noise_std=0.0, q_final=None
) -> Tensor:
    """Exact expected cost of the linear feedback policy ``u_t = -k x_t + sigma eps_t``.

    The second moment ``S_t = E[x_t x_t']`` propagates exactly: with ``M = a - b k``,
    ``Sigma_u = diag(sigma^2)`` and ``W = noise_std^2 I``::

        S_{t+1} = M S_t M' + b Sigma_u b' + W,       S_0 = x0 x0' + x0_cov,
        J = sum_{t<horizon} [tr((q + k' r k) S_t) + tr(r Sigma_u)] + tr(q_final S_horizon).

    k:
        ``(m, n)``, or ``(..., m, n)`` for a batch of gains (scalar systems: a number or a tensor
        of batch shape); the result has the batch shape.
    x0, x0_cov:
        the initial state ``(n,)`` and an optional initial covariance ``(n, n)``: with
        ``x0 = 0`` and ``x0_cov = I`` the cost is ``tr(P_k)``, the average over initial states,
        minimized by the Riccati gain for long horizons (Fazel et al. 2018).
    sigma:
        exploration noise, ``> 0``: a scalar, or ``(..., m)`` (scalar systems: the batch
        shape of ``k``); ``None`` for a deterministic policy.

    Differentiable in ``k`` and every other argument. With ``q_final = P`` from :func:`riccati`
    and the Riccati gain, ``J = x0' P x0 + tr(P x0_cov) + horizon tr(P W)`` exactly for any
    horizon (the Bellman equation). Chapter *Stochastic optimal control*.
    """
    a_, b_, q_, r_, k, s, var_u, noise_std, qf, scalar = _feedback_args(
        k, a, b, q, r, x0, x0_cov, sigma, noise_std, q_final, horizon
    )
    n = a_.shape[0]
    closed = a_ - b_ @ k  # (..., n, n)
    stage = q_ + k.transpose(-1, -2) @ r_ @ k
    action_noise = (r_ * var_u).sum((-1, -2))  # tr(r Sigma_u)
    drive = b_ @ var_u @ b_.T + noise_std**2 * torch.eye(n, dtype=a_.dtype, device=a_.device)
    cost = torch.zeros(k.shape[:-2], dtype=a_.dtype, device=a_.device)
    for _ in range(horizon):
        cost = cost + (stage * s).sum((-1, -2)) + action_noise  # tr(A S) = sum(A * S'), S symmetric
        s = closed @ s @ closed.transpose(-1, -2) + drive
    return cost + (qf * s).sum((-1, -2))


def feedback_rollout_cost(
    k,
    *,
    a,
    b,
    q,
    r,
    x0,
    horizon: int,
    sigma=None,
    noise_std=0.0,
    q_final=None,
    num_samples: int,
    generator: torch.Generator | None = None,
    eps: Tensor | None = None,
    w: Tensor | None = None,
) -> Tensor:
    """Simulated cost of ``u_t = -k x_t + sigma eps_t``: one value per trajectory, ``(num_samples, ...)``.

    ``x_{t+1} = a x_t + b u_t + noise_std w_t`` from ``x0`` (``(n,)``), the cost of
    :func:`feedback_cost` summed along each trajectory; differentiable pathwise in ``k``.

    eps, w:
        standard normal action and process noise, ``(num_samples, horizon, m)`` and
        ``(num_samples, horizon, n)``, instead of draws from ``generator``.
    """
    a_, b_, q_, r_, k, _, var_u, noise_std, qf, scalar = _feedback_args(
        k, a, b, q, r, x0, None, sigma, noise_std, q_final, horizon
    )
    n, m = b_.shape
    num = check_count("num_samples", num_samples)
    batch = k.shape[:-2]
    eps, w = _noises({"eps": (num, horizon, m), "w": (num, horizon, n)}, {"eps": eps, "w": w},
                     noise_std, a_.dtype, a_.device, generator)
    std_u = var_u.diagonal(dim1=-2, dim2=-1).sqrt()  # (..., m)
    x = _tensor("x0", x0, a_.dtype, a_.device).reshape(n).expand(num, *batch, n)
    cost = torch.zeros(num, *batch, dtype=a_.dtype, device=a_.device)
    view = (num,) + (1,) * len(batch)
    for t in range(horizon):
        u = -(k @ x.unsqueeze(-1)).squeeze(-1) + std_u * eps[:, t].reshape(*view, m)  # (S, ..., m)
        cost = cost + ((x @ q_) * x).sum(-1) + ((u @ r_) * u).sum(-1)
        x = x @ a_.T + u @ b_.T + noise_std * w[:, t].reshape(*view, n)
    return cost + ((x @ qf) * x).sum(-1)
