"""Structural causal models with reparameterized noise: estimation, interventions, counterfactuals.

Chapter *Causal inference*. A structural causal model (SCM; Pearl 2009) writes every variable as
a function of its causes and of an exogenous noise. Written with the noise reparameterized,
``z = mu + sigma eps``, the model is a differentiable program of its parameters and of ``eps``:

* the confounded treatment model :class:`ConfoundedSCM`,
  ``X ~ N(0, 1)``, ``t | X ~ Bernoulli(sigmoid(a X))``, ``Y(t) = w X + tau t + z``,
  ``z = mu + sigma eps``; :func:`fit_outcome_model` learns ``(w, tau, mu, sigma)`` by gradients of
  the likelihood, which runs through the inverted path ``eps = (Y - w X - tau t - mu) / sigma``
  (the noise is abducted from the data, as in the deep SCMs of Pawlowski et al. 2020);
  :func:`naive_difference` is the confounded difference in means;
* the linear-Gaussian SCM :class:`LinearGaussianSCM`, ``v = B v + diag(s) u`` with ``u ~ N(0, I)``
  and ``B`` strictly lower triangular (the variables in causal order): observational
  (:func:`conditional_mean`), interventional (:func:`moments` with ``do``) and counterfactual
  (:func:`counterfactual`, :func:`counterfactual_samples`, :func:`counterfactual_moments`)
  quantities, the last by Pearl's three steps: abduction, action, prediction;
* :func:`counterfactual_loss_gradients`: per-sample values and pathwise gradients of an expected
  counterfactual loss with respect to a decision.

Shapes: data ``(N,)``, or ``(R, N)`` for ``R`` independent data sets fitted together; samples of
the linear SCM ``(S, D)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple

import torch
from torch import Tensor

from .._checks import check_count

__all__ = [
    "ConfoundedSCM",
    "simulate",
    "outcome_log_likelihood",
    "OutcomeFit",
    "fit_outcome_model",
    "naive_difference",
    "LinearGaussianSCM",
    "structural_map",
    "sample",
    "moments",
    "conditional_mean",
    "abduct",
    "counterfactual",
    "noise_posterior_samples",
    "counterfactual_samples",
    "counterfactual_moments",
    "counterfactual_loss_gradients",
]


def _check_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- confounded treatment


@dataclass(frozen=True)
class ConfoundedSCM:
    """``X ~ N(0, 1)``, ``t | X ~ Bernoulli(sigmoid(propensity X))``, ``Y = w X + tau t + mu + sigma eps``.

    ``X`` causes both the treatment and the outcome: it confounds the effect ``tau`` of ``t``.
    """

    w: float
    tau: float
    mu: float
    sigma: float
    propensity: float

    def __post_init__(self) -> None:
        for name in ("w", "tau", "mu", "sigma", "propensity"):
            _check_finite(name, getattr(self, name))
        if self.sigma <= 0:
            raise ValueError(f"sigma must be positive, got {self.sigma!r}")


def simulate(model: ConfoundedSCM, n: int, *, num_datasets: int | None = None,
             generator: torch.Generator | None = None,
             dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """Observational data ``(x, t, y)`` from :class:`ConfoundedSCM`, each ``(n,)`` or ``(R, n)``.

    ``t`` is a float tensor of 0s and 1s. ``num_datasets = R`` draws ``R`` independent data sets.
    """
    if not isinstance(model, ConfoundedSCM):
        raise ValueError(f"model must be a ConfoundedSCM, got {type(model).__name__}")
    check_count("n", n, 2)
    shape = (n,) if num_datasets is None else (check_count("num_datasets", num_datasets), n)
    device = generator.device if generator is not None else None
    x = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    t = torch.bernoulli(torch.sigmoid(model.propensity * x), generator=generator)
    eps = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    z = model.mu + model.sigma * eps  # the reparameterized latent of the outcome
    y = model.w * x + model.tau * t + z
    return x, t, y


def _check_data(x: Tensor, t: Tensor, y: Tensor) -> None:
    for name, value in [("x", x), ("t", t), ("y", y)]:
        if not isinstance(value, Tensor) or value.dim() not in (1, 2) or not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor of shape (N,) or (R, N)")
    if not x.shape == t.shape == y.shape:
        shapes = [tuple(v.shape) for v in (x, t, y)]
        raise ValueError(f"x, t and y must have one shape, got {shapes}")
    if not torch.all((t == 0) | (t == 1)):
        raise ValueError("t must contain only 0s and 1s")


def outcome_log_likelihood(x: Tensor, t: Tensor, y: Tensor, w: Tensor, tau: Tensor, mu: Tensor,
                           log_sigma: Tensor) -> Tensor:
    """The outcome's log-likelihood through its abducted noise::

        log p(y | x, t) = sum_n [log N(eps_n; 0, 1) - log sigma],
        eps_n = (y_n - w x_n - tau t_n - mu) / sigma.

    The change of variables from the noise to the outcome: the structural equation
    ``y = w x + tau t + mu + sigma eps`` is inverted for ``eps`` (abduction), and ``1 / sigma`` is
    its Jacobian. Parameters are scalars, or ``(R,)`` for data ``(R, N)``; the result has the
    parameters' shape and is differentiable in them.
    """
    _check_data(x, t, y)
    return _log_likelihood(x, t, y, w, tau, mu, log_sigma)


def _log_likelihood(x, t, y, w, tau, mu, log_sigma) -> Tensor:
    w, tau, mu, log_sigma = (torch.as_tensor(p, dtype=x.dtype, device=x.device).unsqueeze(-1)
                             for p in (w, tau, mu, log_sigma))
    eps = (y - w * x - tau * t - mu) / log_sigma.exp()  # (..., N): the abducted noise
    log_density = -0.5 * eps**2 - 0.5 * math.log(2 * math.pi) - log_sigma
    return log_density.sum(-1)


class OutcomeFit(NamedTuple):
    """Maximum-likelihood estimates and their standard errors, each ``()`` or ``(R,)``.

    The standard errors of ``w``, ``tau``, ``mu`` are the square roots of the diagonal of the
    inverse observed information (the Hessian of ``-log p`` in ``(w, tau, mu, log sigma)``).
    """

    w: Tensor
    tau: Tensor
    mu: Tensor
    sigma: Tensor
    se_w: Tensor
    se_tau: Tensor
    se_mu: Tensor
    log_likelihood: Tensor


def fit_outcome_model(x: Tensor, t: Tensor, y: Tensor, *, max_iter: int = 500,
                      gradient_tolerance: float = 1e-7) -> OutcomeFit:
    """Fit ``Y = w X + tau t + mu + sigma eps`` by maximum likelihood, with gradients through the path.

    L-BFGS (strong Wolfe line search) on ``-log p / N`` in ``theta = (w, tau, mu, log sigma)``,
    with the gradient by autograd through :func:`outcome_log_likelihood`. For data ``(R, N)``
    the ``R`` data sets are fitted together (their objectives add up, the problems stay separate).
    Raises ``RuntimeError`` if the largest gradient entry at the end exceeds
    ``gradient_tolerance``. Standard errors from the exact Hessian (``torch.func.hessian``).
    """
    _check_data(x, t, y)
    check_count("max_iter", max_iter)
    n = x.shape[-1]
    start = torch.zeros(*x.shape[:-1], 4, dtype=x.dtype, device=x.device)
    start[..., 3] = y.std(-1).log()
    theta = start.requires_grad_()
    optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, tolerance_grad=gradient_tolerance,
                                  tolerance_change=0.0, history_size=20,
                                  line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        optimizer.zero_grad()
        loss = -_log_likelihood(x, t, y, *theta.unbind(-1)).sum() / n
        loss.backward()
        return loss

    optimizer.step(objective)
    objective()
    largest = theta.grad.abs().max().item()
    if not largest <= gradient_tolerance:
        raise RuntimeError(f"fit_outcome_model did not converge: largest gradient {largest:.2e}")
    theta = theta.detach()

    def negative_log_likelihood(th: Tensor, xr: Tensor, tr: Tensor, yr: Tensor) -> Tensor:
        return -_log_likelihood(xr, tr, yr, *th.unbind(-1))

    hessian = torch.func.hessian(negative_log_likelihood)
    if x.dim() == 2:
        hessian = torch.func.vmap(hessian)
    information = hessian(theta, x, t, y)  # (..., 4, 4)
    se = torch.linalg.inv(information).diagonal(dim1=-2, dim2=-1).sqrt()
    w, tau, mu, log_sigma = theta.unbind(-1)
    log_lik = _log_likelihood(x, t, y, w, tau, mu, log_sigma)
    return OutcomeFit(w, tau, mu, log_sigma.exp(), se[..., 0], se[..., 1], se[..., 2], log_lik)


def naive_difference(t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The difference in means ``mean(y | t = 1) - mean(y | t = 0)`` and its (Welch) standard error.

    ``se = sqrt(s1^2 / n1 + s0^2 / n0)`` with the groups' unbiased variances. Under confounding
    it estimates ``tau + w (E[X | t = 1] - E[X | t = 0])``, not ``tau``. Shapes ``()`` or ``(R,)``.
    """
    _check_data(y, t, y)
    treated = t
    n1, n0 = treated.sum(-1), (1 - treated).sum(-1)
    if torch.any(n1 < 2) or torch.any(n0 < 2):
        raise ValueError("each group (t = 0 and t = 1) needs at least 2 units")
    m1 = (treated * y).sum(-1) / n1
    m0 = ((1 - treated) * y).sum(-1) / n0
    v1 = (treated * (y - m1.unsqueeze(-1)) ** 2).sum(-1) / (n1 - 1)
    v0 = ((1 - treated) * (y - m0.unsqueeze(-1)) ** 2).sum(-1) / (n0 - 1)
    return m1 - m0, (v1 / n1 + v0 / n0).sqrt()


# --------------------------------------------------------------------------- linear-Gaussian SCM


@dataclass(frozen=True, eq=False)
class LinearGaussianSCM:
    """``v_i = sum_{j < i} B_ij v_j + s_i u_i``, ``u ~ N(0, I)``: the variables in causal order.

    names
        The variables' names, in causal (topological) order.
    weights
        ``B``, ``(D, D)``, strictly lower triangular: ``B[i, j]`` is the effect of ``v_j`` on ``v_i``.
    noise_scale
        ``s``, ``(D,)``, positive: the scale of each variable's own noise.
    """

    names: tuple[str, ...]
    weights: Tensor
    noise_scale: Tensor

    def __post_init__(self) -> None:
        names, b, s = self.names, self.weights, self.noise_scale
        if not isinstance(names, tuple) or not names or len(set(names)) != len(names):
            raise ValueError(f"names must be a non-empty tuple of distinct names, got {names!r}")
        d = len(names)
        if not isinstance(b, Tensor) or b.shape != (d, d) or not b.is_floating_point():
            raise ValueError(f"weights must be a floating-point tensor of shape ({d}, {d})")
        if torch.any(torch.triu(b) != 0):
            raise ValueError("weights must be strictly lower triangular (variables in causal order)")
        if not isinstance(s, Tensor) or s.shape != (d,) or not torch.all(s > 0):
            raise ValueError(f"noise_scale must be a tensor of shape ({d},) with positive entries")

    def index(self, name: str) -> int:
        if name not in self.names:
            raise ValueError(f"unknown variable {name!r}; the model has {self.names}")
        return self.names.index(name)


def _check_scm(scm) -> LinearGaussianSCM:
    if not isinstance(scm, LinearGaussianSCM):
        raise ValueError(f"scm must be a LinearGaussianSCM, got {type(scm).__name__}")
    return scm


def structural_map(scm: LinearGaussianSCM, do: Mapping[str, float | Tensor] | None = None
                   ) -> tuple[Tensor, Tensor]:
    """``(M, m)`` with ``v = M u + m``, for the model mutilated by ``do``.

    ``do = {name: value}`` replaces each named variable's equation by the constant ``value`` (the
    action step): its row of ``B`` and its noise scale become zero. Then
    ``v = (I - B')^{-1} (diag(s') u + c)``: ``M = (I - B')^{-1} diag(s')`` is ``(D, D)`` and
    ``m = (I - B')^{-1} c`` is ``(D,)``, differentiable in the ``do`` values.
    """
    _check_scm(scm)
    do = {} if do is None else dict(do)
    b, s = scm.weights.clone(), scm.noise_scale.clone()
    c = torch.zeros_like(s)
    for name, value in do.items():
        i = scm.index(name)
        b[i], s[i] = 0.0, 0.0
        c = c + torch.nn.functional.one_hot(torch.tensor(i), len(s)).to(s) * value
    eye = torch.eye(len(s), dtype=s.dtype, device=s.device)
    lower = eye - b
    m_mat = torch.linalg.solve_triangular(lower, torch.diag(s), upper=False)
    m_vec = torch.linalg.solve_triangular(lower, c.unsqueeze(-1), upper=False).squeeze(-1)
    return m_mat, m_vec


def _noise(scm: LinearGaussianSCM, num_samples: int, eps: Tensor | None,
           generator: torch.Generator | None) -> Tensor:
    d = len(scm.names)
    if eps is not None:
        if not isinstance(eps, Tensor) or eps.dim() != 2 or eps.shape[1] != d:
            raise ValueError(f"eps must be a tensor of shape (S, {d})")
        return eps
    check_count("num_samples", num_samples)
    s = scm.noise_scale
    return torch.randn(num_samples, d, generator=generator, dtype=s.dtype, device=s.device)


def sample(scm: LinearGaussianSCM, num_samples: int, *, do: Mapping[str, float | Tensor] | None = None,
           eps: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Run the structural equations in causal order: ``(S, D)`` samples of ``v``.

    ``v_i = value`` if ``i`` is intervened on, else ``sum_{j < i} B_ij v_j + s_i eps_i``;
    ``eps`` ``(S, D)`` or ``num_samples`` fresh standard normals from ``generator``.
    """
    _check_scm(scm)
    eps = _noise(scm, num_samples, eps, generator)
    do = {} if do is None else {scm.index(k): v for k, v in dict(do).items()}
    columns: list[Tensor] = []
    for i in range(len(scm.names)):
        if i in do:
            columns.append(torch.zeros_like(eps[:, i]) + do[i])
            continue
        parents = sum((scm.weights[i, j] * columns[j] for j in range(i)), torch.zeros_like(eps[:, i]))
        columns.append(parents + scm.noise_scale[i] * eps[:, i])
    return torch.stack(columns, -1)


def moments(scm: LinearGaussianSCM, do: Mapping[str, float | Tensor] | None = None
            ) -> tuple[Tensor, Tensor]:
    """Mean ``m`` ``(D,)`` and covariance ``M M^T`` ``(D, D)`` of ``v`` (under ``do``, if given)."""
    m_mat, m_vec = structural_map(scm, do)
    return m_vec, m_mat @ m_mat.T


def _evidence(scm: LinearGaussianSCM, evidence: Mapping[str, float | Tensor]) -> tuple[list[int], Tensor]:
    if not isinstance(evidence, Mapping):
        raise ValueError(f"evidence must be a mapping from names to values, got {type(evidence).__name__}")
    index = [scm.index(k) for k in evidence]
    s = scm.noise_scale
    values = torch.stack([torch.as_tensor(v, dtype=s.dtype, device=s.device) for v in evidence.values()]) \
        if index else s.new_zeros(0)
    return index, values


def conditional_mean(scm: LinearGaussianSCM, target: str, evidence: Mapping[str, float | Tensor]) -> Tensor:
    """The observational mean by Gaussian conditioning::

        E[v_target | v_E = e] = m_t + S_tE S_EE^{-1} (e - m_E).

    ``S`` is the covariance from :func:`moments`; seeing ``v_E`` is informative about its causes
    and its effects alike. A scalar.
    """
    _check_scm(scm)
    t = scm.index(target)
    index, values = _evidence(scm, evidence)
    mean, cov = moments(scm)
    if not index:
        return mean[t]
    gain = torch.linalg.solve(cov[index][:, index], cov[index, t])  # S_EE^{-1} S_Et
    return mean[t] + gain @ (values - mean[index])


def abduct(scm: LinearGaussianSCM, v: Tensor) -> Tensor:
    """Abduction from a full observation: the noise ``u = (v - B v) / s`` that produced ``v``, ``(..., D)``."""
    _check_scm(scm)
    if not isinstance(v, Tensor) or v.shape[-1] != len(scm.names):
        raise ValueError(f"v must be a tensor with last dimension {len(scm.names)}")
    return (v - v @ scm.weights.T) / scm.noise_scale


def counterfactual(scm: LinearGaussianSCM, v: Tensor, do: Mapping[str, float | Tensor]) -> Tensor:
    """``v`` had ``do`` held: abduction (:func:`abduct`), action and prediction (:func:`sample`).

    For a fully observed unit the counterfactual is deterministic: ``(..., D) -> (..., D)``.
    """
    u = abduct(scm, v)
    return sample(scm, 0, do=do, eps=u.reshape(-1, len(scm.names))).reshape(u.shape)


def _noise_posterior(scm: LinearGaussianSCM, evidence: Mapping[str, float | Tensor]
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """``(M_E, K, e)``: the evidence's rows of ``M``, the gain ``K = M_E^T (M_E M_E^T)^{-1}``, the values."""
    _check_scm(scm)
    index, values = _evidence(scm, evidence)
    m_mat, _ = structural_map(scm)
    m_obs = m_mat[index]  # (E, D)
    gain = torch.linalg.solve(m_obs @ m_obs.T, m_obs).T if index else m_obs.T  # (D, E)
    return m_obs, gain, values


def noise_posterior_samples(scm: LinearGaussianSCM, evidence: Mapping[str, float | Tensor],
                            num_samples: int, *, eps: Tensor | None = None,
                            generator: torch.Generator | None = None) -> Tensor:
    """Abduction from partial evidence: draws of ``u | v_E = e``, ``(S, D)``, by Matheron's rule.

    With ``v = M u`` (no intervention) and ``u ~ N(0, I)``, a prior draw ``eps`` is moved onto the
    evidence: ``u = eps + M_E^T (M_E M_E^T)^{-1} (e - M_E eps)``. That is an exact draw from the
    Gaussian posterior (Wilson et al. 2020), affine in ``eps``: a reparameterization, valid even
    when the posterior is degenerate (full evidence gives ``u`` exactly).
    """
    m_obs, gain, values = _noise_posterior(scm, evidence)
    eps = _noise(scm, num_samples, eps, generator)
    return eps + (values - eps @ m_obs.T) @ gain.T


def counterfactual_samples(scm: LinearGaussianSCM, evidence: Mapping[str, float | Tensor],
                           do: Mapping[str, float | Tensor], num_samples: int, *,
                           eps: Tensor | None = None,
                           generator: torch.Generator | None = None) -> Tensor:
    """Draws of the counterfactual world ``v_{do} | v_E = e``: ``(S, D)``, differentiable in ``do``.

    Abduction (:func:`noise_posterior_samples`), action (the ``do`` of :func:`structural_map`),
    prediction (``v' = M' u + m'``). Empty evidence gives the interventional distribution.
    """
    u = noise_posterior_samples(scm, evidence, num_samples, eps=eps, generator=generator)
    m_mat, m_vec = structural_map(scm, do)
    return u @ m_mat.T + m_vec


def counterfactual_moments(scm: LinearGaussianSCM, evidence: Mapping[str, float | Tensor],
                           do: Mapping[str, float | Tensor]) -> tuple[Tensor, Tensor]:
    """Exact mean ``(D,)`` and covariance ``(D, D)`` of :func:`counterfactual_samples`.

    ``u | e ~ N(K e, I - K M_E)`` with ``K = M_E^T (M_E M_E^T)^{-1}``; then ``v' = M' u + m'``.
    """
    m_obs, gain, values = _noise_posterior(scm, evidence)
    d = len(scm.names)
    eye = torch.eye(d, dtype=scm.noise_scale.dtype, device=scm.noise_scale.device)
    u_mean, u_cov = gain @ values, eye - gain @ m_obs
    m_mat, m_vec = structural_map(scm, do)
    return m_mat @ u_mean + m_vec, m_mat @ u_cov @ m_mat.T


def counterfactual_loss_gradients(
    loss: Callable[[Tensor, Tensor], Tensor],
    scm: LinearGaussianSCM,
    evidence: Mapping[str, float | Tensor],
    decision: str,
    value: float | Tensor,
    num_samples: int,
    *,
    eps: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sample losses ``l(v'_s, d)`` and pathwise gradients ``d l(v'_s, d) / d d``: two ``(S,)`` tensors.

    ``v'_s`` are :func:`counterfactual_samples` under ``do = {decision: d}``; ``loss(v, d)`` maps
    one world ``(D,)`` and the decision to a scalar. Their means estimate the expected
    counterfactual loss ``E[l(V_d, d) | v_E = e]`` and its derivative in ``d``; their variances
    give the standard errors. Built on :func:`companion.estimators.per_sample_gradients`.
    """
    from ..estimators import per_sample_gradients

    if not callable(loss):
        raise ValueError(f"loss must be callable, got {type(loss).__name__}")
    _check_scm(scm).index(decision)
    s = scm.noise_scale
    d = torch.as_tensor(value, dtype=s.dtype, device=s.device).detach()
    if d.dim() != 0:
        raise ValueError("value must be a scalar")
    eps = _noise(scm, num_samples, eps, generator)

    def program(dd: Tensor, eps_one: Tensor) -> Tensor:
        world = counterfactual_samples(scm, evidence, {decision: dd}, 1, eps=eps_one.unsqueeze(0))
        return loss(world[0], dd)

    grads = per_sample_gradients(program, d, eps)
    with torch.no_grad():
        worlds = counterfactual_samples(scm, evidence, {decision: d}, 0, eps=eps)
        values = torch.vmap(lambda world: loss(world, d))(worlds)
    return values, grads
