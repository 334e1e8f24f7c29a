"""Pathwise policy gradients and REINFORCE for Gaussian policies in a differentiable environment.

Chapter *Pathwise policy gradients*. A Gaussian policy draws its action by reparameterization,

    a_t = mu_theta(s_t) + sigma_theta(s_t) eps_t,       eps_t ~ N(0, I),

and the objective is the expected return ``J(theta) = E[sum_t r(s_t, a_t)]``. Two unbiased
estimators of ``grad J`` from the same episodes:

* **pathwise** (reparameterization; Heess et al. 2015, "stochastic value gradients"): keep
  every ``a_t`` and every state ``s_{t+1} = f(s_t, a_t)`` in the graph and backpropagate the
  return through the environment, which must be differentiable (written in torch here);
* **REINFORCE** (score function; Williams 1992): treat actions and states as constants and
  weight the scores by the rewards that follow, ``sum_t (G_t - b_t) grad log pi(a_t | s_t)``,
  ``G_t = sum_{t' >= t} r_t'``, with an optional baseline ``b_t`` that does not depend on
  ``a_t`` (here the leave-one-out mean of the other episodes' ``G_t``).

Both are returned as per-episode *surrogates*: tensors whose values are the episodes' returns
and whose gradients are the per-episode estimates, so ``surrogate.mean().backward()`` is the
estimator and :func:`companion.estimators.per_sample_gradients` gives per-episode gradients.

Shapes: the leading dimension is the episode (sample) dimension ``N``. States are
``(N, *B, n)``, actions ``(N, *B, m)``, the noise ``eps`` ``(N, H, *B, m)`` for a horizon
``H``; ``B`` is an optional batch of independent problems (e.g. one policy per seed, see
:class:`LinearGaussianPolicy`'s ``copies``).

The module also holds the closed-form per-sample variances of the two estimators in the two
one-step problems of the chapter (:func:`quadratic_reward_variances`,
:func:`one_step_lq_variances`), the references its measurements are checked against.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from ..estimators import Estimate, _baseline_values
from ..runtime import rng
from .lqg import feedback_cost

__all__ = [
    "LinearGaussianPolicy",
    "LinearQuadraticEnv",
    "point_mass",
    "Trajectory",
    "rollout",
    "episode_surrogates",
    "policy_gradient",
    "expected_return",
    "BanditVariances",
    "quadratic_reward_variances",
    "one_step_lq_variances",
]

METHODS = ("pathwise", "reinforce")
Policy = Callable[[Tensor], tuple[Tensor, Tensor]]


# --------------------------------------------------------------------------- policy and environment


class LinearGaussianPolicy(nn.Module):
    """``a = -K s + sigma eps``: linear state feedback with a learned, state-independent ``sigma``.

    ``forward(s)`` returns ``(mu, sigma)`` with ``mu = -K s``, the pair every function of this
    module asks a policy for (any module or function with that signature works, e.g. an MLP
    returning a mean and a positive scale). Parameters: ``gain`` ``K`` of shape ``(m, n)`` and
    ``log_sigma`` of shape ``(m,)``.

    copies:
        ``None``, or ``C`` independent policies in one module (``gain`` ``(C, m, n)``,
        ``log_sigma`` ``(C, m)``): states ``(..., C, n)`` give actions ``(..., C, m)``, so ``C``
        seeds train in one vectorized loop (Adam acts element-wise, so they do not interact).
    """

    def __init__(self, state_dim: int, action_dim: int, *, copies: int | None = None, init_sigma: float = 1.0):
        super().__init__()
        for name, value in (("state_dim", state_dim), ("action_dim", action_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if copies is not None and (isinstance(copies, bool) or not isinstance(copies, int) or copies < 1):
            raise ValueError(f"copies must be None or a positive int, got {copies!r}")
        if isinstance(init_sigma, bool) or not isinstance(init_sigma, (int, float)) or not init_sigma > 0:
            raise ValueError(f"init_sigma must be a positive number, got {init_sigma!r}")
        lead = () if copies is None else (copies,)
        self.state_dim, self.action_dim, self.copies = state_dim, action_dim, copies
        self.gain = nn.Parameter(torch.zeros(*lead, action_dim, state_dim))
        self.log_sigma = nn.Parameter(torch.full((*lead, action_dim), math.log(init_sigma)))

    def forward(self, s: Tensor) -> tuple[Tensor, Tensor]:
        if s.shape[-1] != self.state_dim or (self.copies is not None and (s.dim() < 2 or s.shape[-2] != self.copies)):
            want = f"(..., {self.copies}, {self.state_dim})" if self.copies else f"(..., {self.state_dim})"
            raise ValueError(f"states must have shape {want}, got {tuple(s.shape)}")
        mu = -(self.gain @ s.unsqueeze(-1)).squeeze(-1)  # (..., [C,] m)
        return mu, self.log_sigma.exp().expand(mu.shape)


class LinearQuadraticEnv:
    """A differentiable linear system with a quadratic cost, written in torch.

    ``s' = a s + b u``, reward ``-(s'^T q s' + u^T r u)`` (the cost of where the action leads and
    of the action itself). ``step`` is a pure function of its inputs, so a return computed
    through it is differentiable in the actions and, through them, in the policy. Matrices
    ``a (n, n)``, ``b (n, m)``, ``q (n, n)``, ``r (m, m)``, float64. The expected return of a
    linear Gaussian policy is known exactly (:func:`expected_return`).
    """

    def __init__(self, a: Tensor, b: Tensor, q: Tensor, r: Tensor, horizon: int):
        mats = {"a": a, "b": b, "q": q, "r": r}
        for name, value in mats.items():
            if not isinstance(value, Tensor) or value.dim() != 2 or not value.is_floating_point():
                raise ValueError(f"{name} must be a 2-D floating-point tensor, got {value!r}")
        n, m = b.shape
        for name, shape in (("a", (n, n)), ("q", (n, n)), ("r", (m, m))):
            if tuple(mats[name].shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(mats[name].shape)}")
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")
        self.a, self.b, self.q, self.r, self.horizon = a, b, q, r, horizon
        self.state_dim, self.action_dim = n, m

    def step(self, s: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """``(s', reward)`` for states ``(..., n)`` and actions ``(..., m)``; reward ``(...)``."""
        s_next = s @ self.a.T + u @ self.b.T
        reward = -(((s_next @ self.q) * s_next).sum(-1) + ((u @ self.r) * u).sum(-1))
        return s_next, reward


def point_mass(*, dim: int = 1, dt: float = 0.2, horizon: int = 20, action_cost: float = 0.01) -> LinearQuadraticEnv:
    """A unit point mass in ``dim`` dimensions pushed by a force ``u`` towards a target at the origin.

    State ``s = (position, velocity)`` (``2 dim`` entries, positions first), action ``u``
    (``dim``); one step of length ``dt``, exact for a force held constant over the step::

        position' = position + dt velocity + dt^2 / 2 u,     velocity' = velocity + dt u,

    reward ``-(|position'|^2 + action_cost |u|^2)``. Episodes last ``horizon`` steps.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    for name, value in (("dt", dt), ("action_cost", action_cost)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    eye = torch.eye(dim, dtype=torch.float64)
    zero = torch.zeros(dim, dim, dtype=torch.float64)
    a = torch.cat([torch.cat([eye, dt * eye], 1), torch.cat([zero, eye], 1)], 0)
    b = torch.cat([dt**2 / 2 * eye, dt * eye], 0)
    q = torch.block_diag(eye, zero)
    r = action_cost * eye
    return LinearQuadraticEnv(a, b, q, r, horizon)


# --------------------------------------------------------------------------- rollouts and estimators


class Trajectory(NamedTuple):
    """One batch of episodes: ``states (N, H+1, *B, n)``, ``actions (N, H, *B, m)``,
    ``rewards (N, H, *B)``, ``log_probs (N, H, *B)`` (``log pi(a_t | s_t)``, summed over ``m``)."""

    states: Tensor
    actions: Tensor
    rewards: Tensor
    log_probs: Tensor


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def rollout(policy: Policy, env: LinearQuadraticEnv, s0: Tensor, eps: Tensor, *, path: bool = True) -> Trajectory:
    """Run ``N`` episodes of ``env.horizon`` steps with ``a_t = mu(s_t) + sigma(s_t) eps_t``.

    s0:
        initial states, broadcastable to ``(N, *B, n)``.
    eps:
        standard normal noise ``(N, H, *B, m)``, one draw per episode, step and action.
    path:
        ``True`` keeps actions and states in the graph (pathwise); ``False`` detaches them,
        as the score-function estimator requires, while ``log_probs`` keep their graph.
    """
    if not callable(policy):
        raise ValueError(f"policy must be callable, got {type(policy).__name__}")
    if not isinstance(env, LinearQuadraticEnv):
        raise ValueError(f"env must be a LinearQuadraticEnv, got {type(env).__name__}")
    if not isinstance(eps, Tensor) or eps.dim() < 3 or eps.shape[1] != env.horizon or eps.shape[-1] != env.action_dim:
        got = tuple(eps.shape) if isinstance(eps, Tensor) else type(eps).__name__
        raise ValueError(f"eps must have shape (N, {env.horizon}, *B, {env.action_dim}), got {got}")
    if not isinstance(s0, Tensor) or s0.shape[-1] != env.state_dim:
        raise ValueError(f"s0 must be a tensor of states (..., {env.state_dim})")
    shape = (eps.shape[0], *eps.shape[2:-1], env.state_dim)
    try:
        s = s0.to(eps.dtype).expand(shape)
    except RuntimeError:
        raise ValueError(f"s0 of shape {tuple(s0.shape)} does not broadcast to {shape}") from None
    states, actions, rewards, log_probs = [s], [], [], []
    for t in range(env.horizon):
        mu, sigma = policy(s)
        if mu.shape != eps[:, t].shape or sigma.shape != mu.shape:
            raise ValueError(f"policy must return (mu, sigma) of shape {tuple(eps[:, t].shape)}")
        a = mu + sigma * eps[:, t]  # (N, *B, m), the reparameterized action
        if not path:
            a = a.detach()
        # log N(a; mu, sigma^2) summed over the action's coordinates
        log_probs.append((-((a - mu) / sigma) ** 2 / 2 - sigma.log() - math.log(2 * math.pi) / 2).sum(-1))
        s, reward = env.step(s, a)
        if not path:
            s, reward = s.detach(), reward.detach()
        states.append(s)
        actions.append(a)
        rewards.append(reward)
    return Trajectory(*(torch.stack(x, 1) for x in (states, actions, rewards, log_probs)))


def episode_surrogates(
    method: str, policy: Policy, env: LinearQuadraticEnv, s0: Tensor, eps: Tensor, *, baseline=None
) -> Tensor:
    """One surrogate per episode, ``(N, *B)``: value the episode's return, gradient its estimate.

    pathwise:
        the return ``sum_t r_t`` along the differentiable path (the gradient flows through
        the actions and the environment's dynamics).
    reinforce:
        ``sum_t r_t + sum_t (G_t - b_t) (log pi_t - stop_grad(log pi_t))`` on detached actions
        and states, with rewards-to-go ``G_t = sum_{t' >= t} r_t'``. ``baseline``: ``None``
        (``b = 0``), a number or tensor broadcastable to ``(N, H, *B)``, or ``"mean"``, the
        leave-one-out mean of the other episodes' ``G_t`` (needs ``N >= 2``; keeps the estimate
        unbiased because episode ``i``'s baseline does not depend on its own actions).
    """
    _check_method(method)
    if method == "pathwise":
        if baseline is not None:
            raise ValueError("baseline is for method='reinforce'; the pathwise estimator takes none")
        return rollout(policy, env, s0, eps, path=True).rewards.sum(1)
    traj = rollout(policy, env, s0, eps, path=False)
    to_go = traj.rewards.flip(1).cumsum(1).flip(1)  # G_t = sum_{t' >= t} r_t'
    weight = to_go - _baseline_values(baseline, to_go)
    score_terms = (weight * (traj.log_probs - traj.log_probs.detach())).sum(1)
    return traj.rewards.sum(1) + score_terms


def policy_gradient(
    method: str,
    policy: Policy,
    env: LinearQuadraticEnv,
    s0: Tensor,
    num_episodes: int,
    *,
    baseline=None,
    generator: torch.Generator | None = None,
    eps: Tensor | None = None,
) -> Estimate:
    """Estimate ``grad E[return]`` from ``num_episodes`` episodes: an :class:`~companion.estimators.Estimate`.

    ``value`` is the mean return (summed over a batch ``B`` of independent problems, shape
    ``B``); ``surrogate.backward()`` leaves the gradient *of the mean return* in the policy's
    ``.grad`` (negate it, or minimize ``-surrogate``, to ascend). ``eps`` ``(N, H, *B, m)`` fixes
    the noise (common random numbers); otherwise it is drawn from ``generator`` with the batch
    shape of ``s0`` (``s0`` ``(*B, n)``).
    """
    _check_method(method)
    if isinstance(num_episodes, bool) or not isinstance(num_episodes, int) or num_episodes < 1:
        raise ValueError(f"num_episodes must be an int >= 1, got {num_episodes!r}")
    if eps is None:
        if not isinstance(s0, Tensor):
            raise ValueError("s0 must be a tensor of states (*B, n)")
        with rng(generator):
            shape = (num_episodes, env.horizon, *s0.shape[:-1], env.action_dim)
            eps = torch.randn(shape, dtype=s0.dtype, device=s0.device)
    elif generator is not None:
        raise ValueError("pass eps= or generator=, not both: eps fixes the noise already")
    elif not isinstance(eps, Tensor) or eps.shape[0] != num_episodes:
        raise ValueError(f"eps must have num_episodes={num_episodes} rows")
    s = episode_surrogates(method, policy, env, s0, eps, baseline=baseline)
    return Estimate(s.detach().mean(0), s.mean(0).sum())


def expected_return(env: LinearQuadraticEnv, gain: Tensor, sigma: Tensor | None, s0: Tensor) -> Tensor:
    """Exact expected return of the linear Gaussian policy ``a = -gain s + sigma eps`` from ``s0``.

    By :func:`~companion.control.lqg.feedback_cost`:
    ``E[sum_{t<H} r_t] = -(J - s0' q s0)``, where ``J`` is the linear-quadratic cost with
    ``q_final = q`` (it also charges the initial state, which no policy can change). ``gain``
    ``(..., m, n)`` and ``sigma`` ``(..., m)`` may carry a batch (one policy per seed); the result
    has that batch shape; ``sigma=None`` for the deterministic policy ``a = -gain s``.
    Differentiable in ``gain`` and ``sigma``.
    """
    cost = feedback_cost(gain, a=env.a, b=env.b, q=env.q, r=env.r, x0=s0, horizon=env.horizon, sigma=sigma)
    s0 = s0.to(env.q.dtype)
    return -(cost - s0 @ env.q @ s0)


# --------------------------------------------------------------------------- closed forms


class BanditVariances(NamedTuple):
    """Exact per-sample variances of gradient estimators (one draw each)."""

    pathwise: float
    reinforce: float
    reinforce_baseline: float


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def quadratic_reward_variances(mu: float, sigma: float, a_star: float) -> BanditVariances:
    """Per-sample variances of ``d/dmu E[r(a)]`` for ``r(a) = -(a - a*)^2``, ``a = mu + sigma eps``.

    With ``d = mu - a*`` (derived in the chapter from the Gaussian moments
    ``E eps^2 = 1, E eps^4 = 3, E eps^6 = 15``)::

        pathwise   r'(a)                          -> 4 sigma^2
        REINFORCE  r(a) eps / sigma                -> d^4 / sigma^2 + 14 d^2 + 15 sigma^2
        with b = E r = -(d^2 + sigma^2)            -> 8 d^2 + 10 sigma^2

    At ``mu = 0.5, sigma = 1, a* = 2``: 4, 51.5625 and 28.
    """
    mu, a_star, sigma = _finite("mu", mu), _finite("a_star", a_star), _positive("sigma", sigma)
    d = mu - a_star
    return BanditVariances(
        4 * sigma**2,
        d**4 / sigma**2 + 14 * d**2 + 15 * sigma**2,
        8 * d**2 + 10 * sigma**2,
    )


def one_step_lq_variances(theta: float, sigma: float, x0: float) -> BanditVariances:
    """Per-sample variances of ``d/dtheta E[c]`` in the one-step linear-quadratic problem.

    ``u = theta x0 + sigma eps``, ``x1 = x0 + u``, cost ``c = x1^2 + u^2``. Writing
    ``c = A + B eps + C eps^2`` with ``A = x0^2 ((1 + theta)^2 + theta^2)``,
    ``B = 2 sigma x0 (1 + 2 theta)``, ``C = 2 sigma^2``, and the score ``eps x0 / sigma``::

        pathwise   dc/dtheta = 2 x0 (x1 + u)  -> 16 x0^2 sigma^2
        REINFORCE  c eps x0 / sigma           -> x0^2 (A^2 + 2 B^2 + 15 C^2 + 6 A C) / sigma^2
        with b = E c = A + C                  -> x0^2 (2 B^2 + 10 C^2) / sigma^2

    At ``x0 = 1, theta = 0`` REINFORCE's is ``1 / sigma^2 + 20 + 60 sigma^2``; its first two
    terms depend on ``theta`` and ``x0``, the pathwise variance on neither ``theta`` nor the sign
    of ``x0``.
    """
    theta, x0, sigma = _finite("theta", theta), _finite("x0", x0), _positive("sigma", sigma)
    a = x0**2 * ((1 + theta) ** 2 + theta**2)
    b = 2 * sigma * x0 * (1 + 2 * theta)
    c = 2 * sigma**2
    return BanditVariances(
        16 * x0**2 * sigma**2,
        x0**2 * (a**2 + 2 * b**2 + 15 * c**2 + 6 * a * c) / sigma**2,
        x0**2 * (2 * b**2 + 10 * c**2) / sigma**2,
    )
