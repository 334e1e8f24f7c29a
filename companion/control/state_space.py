"""Autoregressive latents and linear-Gaussian state-space models, fitted by pathwise VI.

Chapter *Autoregressive and state-space latents*. The latent path follows a first-order
autoregression and is observed with noise (Durbin and Koopman 2012)::

    z_t = a z_{t-1} + b + s eps_t,      eps_t ~ N(0, 1),
    y_t = z_t + o nu_t,                 nu_t ~ N(0, 1),        t = 1, ..., T.

Written this way, each ``z_t`` is a differentiable function of the parameters and of
``eps_1, ..., eps_t``: :func:`sample_path` keeps that path, so the gradient of any
``sum_t f(z_t)`` with respect to ``a`` is backpropagation through time.

Inference uses a Gaussian variational posterior over the whole path. :class:`MarkovGaussian` is
the model's own prior dynamics times one Gaussian potential per time step: a Gaussian with a
tridiagonal (banded) precision, i.e. a Gauss-Markov chain, with ``2 T`` parameters. It
*contains* the exact posterior of the linear-Gaussian model, so maximizing the ELBO over it and
the model's parameters together is maximum likelihood; the mean-field family does not.

:func:`fit_local_level` fits the local-level model (``a = 1``, ``b = 0``, level variance
``s^2``, observation variance ``o^2``) with a flat (diffuse) prior on the first level, the
model of Durbin and Koopman's Nile example; its reference is the exact-diffuse maximum
likelihood of statsmodels' ``UnobservedComponents(y, "local level", use_exact_diffuse=True)``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.distributions import MultivariateNormal
from tqdm import tqdm

from ..runtime import rng
from .._checks import check_count

__all__ = [
    "sample_path",
    "log_joint",
    "MarkovGaussian",
    "elbo_samples",
    "LocalLevelFit",
    "fit_local_level",
]

_LOG_2PI = math.log(2 * math.pi)


def _param(name: str, value, like: Tensor | None = None, positive: bool = False) -> Tensor:
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise ValueError(f"{name} must be a number or a 0-d tensor, got {type(value).__name__}")
    if isinstance(value, Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        t = value
    else:
        dtype = like.dtype if like is not None else torch.float64
        t = torch.tensor(float(value), dtype=dtype, device=None if like is None else like.device)
    if not torch.isfinite(t):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and not t > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return t


# --------------------------------------------------------------------------- the autoregressive latent


def sample_path(
    a,
    b,
    s,
    *,
    z0=0.0,
    eps: Tensor | None = None,
    num_steps: int | None = None,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Paths of ``z_t = a z_{t-1} + b + s eps_t``, ``t = 1..T``, from ``z_0 = z0``: shape ``(S, T)``.

    The recursion is unrolled in the graph, so ``z_t`` depends on ``a, b, s, z0`` and
    ``eps_1..eps_t`` differentiably: backpropagating ``sum_t f(z_t)`` to ``a`` is
    backpropagation through time, ``dz_t/da = z_{t-1} + a dz_{t-1}/da``.

    eps:
        standard normal noise ``(S, T)`` (common random numbers); otherwise ``num_steps`` and
        ``num_samples`` draws from ``generator``.
    """
    a, b, s, z0 = _param("a", a), _param("b", b), _param("s", s, positive=True), _param("z0", z0)
    if eps is None:
        check_count("num_steps", num_steps)
        check_count("num_samples", num_samples)
        with rng(generator):
            eps = torch.randn(num_samples, num_steps, dtype=a.dtype, device=a.device)
    else:
        if generator is not None or num_steps is not None or num_samples is not None:
            raise ValueError("eps= fixes the noise: pass it without generator, num_steps or num_samples")
        if not isinstance(eps, Tensor) or eps.dim() != 2 or eps.shape[1] < 1:
            raise ValueError(f"eps must be a (S, T) tensor with T >= 1, got {eps!r}")
    z, path = z0.expand(eps.shape[0]), []
    for t in range(eps.shape[1]):
        z = a * z + b + s * eps[:, t]
        path.append(z)
    return torch.stack(path, 1)


def log_joint(z: Tensor, y: Tensor, *, a, b, s, o, init_loc=None, init_scale=None) -> Tensor:
    """``log p(y, z)`` of the state-space model for each path: ``z (S, T)``, ``y (T,)`` -> ``(S,)``.

    ::

        log p(y, z) = log p(z_1) + sum_{t>=2} log N(z_t; a z_{t-1} + b, s^2) + sum_t log N(y_t; z_t, o^2)

    ``p(z_1) = N(init_loc, init_scale^2)``, or, with ``init_scale=None`` (the default), the flat
    improper prior ``p(z_1) = 1`` of a diffuse initialization: ``int p(y, z) dz`` is then the
    exact diffuse likelihood of Durbin and Koopman (2012) up to ``-log(2 pi) / 2``.
    """
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] < 1:
        raise ValueError(f"y must be a 1-D tensor of T >= 1 observations, got {y!r}")
    if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != y.shape[0]:
        raise ValueError(f"z must have shape (S, {y.shape[0]}), got {tuple(z.shape) if isinstance(z, Tensor) else z!r}")
    a, b = _param("a", a, z), _param("b", b, z)
    s, o = _param("s", s, z, positive=True), _param("o", o, z, positive=True)
    resid = (z[:, 1:] - a * z[:, :-1] - b) / s
    out = (-resid**2 / 2 - s.log() - _LOG_2PI / 2).sum(1)
    out = out + (-(((y - z) / o) ** 2) / 2 - o.log() - _LOG_2PI / 2).sum(1)
    if init_scale is not None:
        if init_loc is None:
            raise ValueError("init_scale needs init_loc (the prior mean of z_1)")
        m1, s1 = _param("init_loc", init_loc, z), _param("init_scale", init_scale, z, positive=True)
        out = out - (((z[:, 0] - m1) / s1) ** 2) / 2 - s1.log() - _LOG_2PI / 2
    elif init_loc is not None:
        raise ValueError("init_loc without init_scale: pass both, or neither for a flat prior")
    return out


# --------------------------------------------------------------------------- the variational family


def _prior_precision(num_steps: int, a: Tensor, b: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Precision ``Lambda_p = D' D / s^2`` and linear term ``h_p = D' b 1 / s^2`` of the prior.

    ``D`` ``(T - 1, T)`` maps a path to its residuals ``z_t - a z_{t-1}`` (``t >= 2``); with a flat
    prior on ``z_1``, ``log p(z) = -|D z - b|^2 / (2 s^2) + const = -z' Lambda_p z / 2 + h_p' z + const``.
    """
    eye = torch.eye(num_steps, dtype=s.dtype, device=s.device)
    d = eye[1:] - a * eye[:-1]  # (T - 1, T)
    return d.T @ d / s**2, d.T @ (b * torch.ones(num_steps - 1, dtype=s.dtype, device=s.device)) / s**2


class MarkovGaussian(nn.Module):
    """Structured Gaussian posterior over a path: the prior dynamics times Gaussian site potentials.

    ::

        q(z) ∝ p(z | a, b, s) prod_t N(pseudo_t; z_t, 1 / site_prec_t),
        Lambda = D' D / s^2 + diag(site_prec),     Lambda m = D' b 1 / s^2 + site_prec * pseudo,

    a Gaussian ``N(m, Lambda^{-1})`` whose precision is tridiagonal: a Gauss-Markov chain
    (Archer et al. 2015 use this banded structure; Johnson et al. 2016 the same prior-times-
    potentials form). The exact posterior of the linear-Gaussian model is the member with
    ``pseudo = y`` and ``site_prec = 1 / o^2``, so the family contains it; because the family is
    built on the prior, it follows the model's ``(a, b, s)`` as they are learned. A proper
    Gaussian prior on ``z_1`` (``init_scale`` in :func:`log_joint`) only adds to the first
    site, so the family contains that posterior too. Parameters: ``pseudo`` and
    ``log_site_prec``, both ``(T,)``.

    ``mean_field=True`` gives the independent family ``N(loc, diag(scale^2))`` instead
    (parameters ``pseudo`` as ``loc`` and ``log_site_prec`` as ``-2 log scale``), which ignores the
    dynamics and does not contain the exact posterior.

    Every method takes the model's current ``(a, b, s)``. :meth:`rsample` and :meth:`entropy`
    work from one Cholesky factor of the precision (``O(T^2)`` here, dense);
    :meth:`distribution` gives the same law as a ``torch.distributions.MultivariateNormal``.
    """

    def __init__(self, num_steps: int, *, init_pseudo: Tensor | None = None, init_site_prec: float = 1.0,
                 mean_field: bool = False, dtype: torch.dtype = torch.float64):
        super().__init__()
        check_count("num_steps", num_steps, minimum=2)
        if isinstance(init_site_prec, bool) or not isinstance(init_site_prec, (int, float)) or not init_site_prec > 0:
            raise ValueError(f"init_site_prec must be a positive number, got {init_site_prec!r}")
        if init_pseudo is None:
            init_pseudo = torch.zeros(num_steps, dtype=dtype)
        elif not isinstance(init_pseudo, Tensor) or tuple(init_pseudo.shape) != (num_steps,):
            raise ValueError(f"init_pseudo must be a tensor of shape ({num_steps},)")
        self.num_steps, self.mean_field = num_steps, mean_field
        self.pseudo = nn.Parameter(init_pseudo.detach().clone().to(dtype))
        self.log_site_prec = nn.Parameter(torch.full((num_steps,), math.log(init_site_prec), dtype=dtype))

    def _factors(self, a, b, s) -> tuple[Tensor, Tensor | None, Tensor]:
        """``(loc, C, d)``: mean, lower Cholesky factor of the precision (``None`` for mean-field)
        and, for mean-field, the standard deviations (else ``None``)."""
        like = self.pseudo
        a, b, s = _param("a", a, like), _param("b", b, like), _param("s", s, like, positive=True)
        site_prec = self.log_site_prec.exp()
        if self.mean_field:
            return self.pseudo, None, site_prec.rsqrt()
        prior_prec, prior_lin = _prior_precision(self.num_steps, a, b, s)
        chol = torch.linalg.cholesky(prior_prec + torch.diag(site_prec))  # Lambda = C C'
        loc = torch.cholesky_solve((prior_lin + site_prec * self.pseudo).unsqueeze(-1), chol).squeeze(-1)
        return loc, chol, None

    def rsample(self, num_samples: int | None = None, *, a, b, s, eps: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """Paths ``z = m + C'^{-1} eps`` (``Cov = Lambda^{-1} = C'^{-1} C^{-1}``): ``(S, T)``.

        Differentiable in the family's parameters and in ``(a, b, s)``. ``eps`` ``(S, T)`` fixes
        the noise; otherwise ``num_samples`` draws from ``generator``.
        """
        return self._rsample(self._factors(a, b, s), num_samples, eps, generator)

    def _rsample(self, factors, num_samples, eps, generator) -> Tensor:
        loc, chol, std = factors
        if eps is None:
            check_count("num_samples", num_samples)
            with rng(generator):
                eps = torch.randn(num_samples, self.num_steps, dtype=loc.dtype, device=loc.device)
        elif generator is not None or num_samples is not None:
            raise ValueError("eps= fixes the noise: pass it without num_samples or generator")
        elif not isinstance(eps, Tensor) or eps.dim() != 2 or eps.shape[1] != self.num_steps:
            raise ValueError(f"eps must have shape (S, {self.num_steps})")
        if chol is None:
            return loc + std * eps
        return loc + torch.linalg.solve_triangular(chol.T, eps.T, upper=True).T

    def entropy(self, *, a, b, s) -> Tensor:
        """``H[q] = -sum_t log C_tt + T (1 + log 2 pi) / 2`` (mean-field: ``sum_t log std_t + ...``)."""
        return self._entropy(self._factors(a, b, s))

    def _entropy(self, factors) -> Tensor:
        _, chol, std = factors
        log_det_cov = 2 * std.log().sum() if chol is None else -2 * chol.diagonal().log().sum()
        return log_det_cov / 2 + self.num_steps * (1 + _LOG_2PI) / 2

    def marginal_std(self, *, a, b, s) -> Tensor:
        """``sqrt(Var_q z_t)``, ``(T,)``: the square root of the diagonal of ``Lambda^{-1}``."""
        _, chol, std = self._factors(a, b, s)
        return std if chol is None else torch.cholesky_inverse(chol).diagonal().sqrt()

    def distribution(self, *, a, b, s) -> MultivariateNormal:
        """``q`` as a ``torch.distributions.MultivariateNormal`` (the library's reference)."""
        loc, chol, std = self._factors(a, b, s)
        if chol is None:
            return MultivariateNormal(loc, scale_tril=torch.diag(std))
        return MultivariateNormal(loc, precision_matrix=chol @ chol.T)


def elbo_samples(q: MarkovGaussian, y: Tensor, num_samples: int | None = None, *, a, b, s, o,
                 init_loc=None, init_scale=None, eps: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """Per-sample ELBO terms ``log p(y, z_i) + H[q]``, ``z_i ~ q`` by reparameterization: ``(S,)``.

    Their mean is an unbiased estimate of ``ELBO = E_q[log p(y, z)] + H[q] <= log p(y)``; its
    gradient with respect to ``q``'s parameters and the model's ``(a, b, s, o)`` is the pathwise
    gradient (the entropy is exact). ``eps`` ``(S, T)`` fixes the noise. Arguments as in
    :func:`log_joint`; ``q`` is built on the same ``(a, b, s)``.
    """
    if not isinstance(q, MarkovGaussian):
        raise ValueError(f"q must be a MarkovGaussian, got {type(q).__name__}")
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != q.num_steps:
        raise ValueError(f"y must be a 1-D tensor of the {q.num_steps} observations q covers")
    factors = q._factors(a, b, s)  # one Cholesky factorization for the samples and the entropy
    z = q._rsample(factors, num_samples, eps, generator)
    joint = log_joint(z, y, a=a, b=b, s=s, o=o, init_loc=init_loc, init_scale=init_scale)
    return joint + q._entropy(factors)


# --------------------------------------------------------------------------- the local-level model


class LocalLevelFit(NamedTuple):
    """What :func:`fit_local_level` returns, in the units of ``y``.

    obs_var, level_var: the fitted observation and level variances ``o^2`` and ``s^2``;
    level_mean, level_std: ``(T,)`` mean and standard deviation of each level ``z_t`` under ``q``;
    elbo: ``(steps,)`` the ELBO estimate at each step, in the standardized units of the fit.
    """

    obs_var: float
    level_var: float
    level_mean: Tensor
    level_std: Tensor
    elbo: Tensor


def _check_positive(name: str, value, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or (
        upper is not None and value > upper
    ):
        bound = f" and at most {upper}" if upper is not None else ""
        raise ValueError(f"{name} must be a positive number{bound}, got {value!r}")
    return float(value)


def fit_local_level(
    y: Tensor,
    *,
    steps: int,
    generator: torch.Generator | None = None,
    num_samples: int = 64,
    lr: float = 0.05,
    mean_field: bool = False,
    average_last: float = 0.25,
    progress: bool = False,
) -> LocalLevelFit:
    """Fit the local-level model ``z_t = z_{t-1} + s eps_t``, ``y_t = z_t + o nu_t`` by pathwise VI.

    Maximizes the ELBO of :func:`elbo_samples`, with a flat prior on ``z_1`` (the diffuse
    initialization), jointly over the :class:`MarkovGaussian` posterior and ``(log s, log o)``
    with Adam and ``num_samples`` paths per step. The data are standardized first,
    ``x = (y - mean) / sd`` (the flat prior makes the model equivariant, so the variances scale
    back by ``sd^2``); the learning rate decays linearly to zero and the returned parameters are
    the average of the iterates over the last ``average_last`` fraction of the steps (Polyak
    averaging), which removes most of the Monte Carlo jitter.

    Since the family contains the exact posterior, the optimum is the exact-diffuse maximum
    likelihood of Durbin and Koopman (2012), and ``q`` there is the
    smoothing distribution of the Kalman smoother; the reference is statsmodels'
    ``UnobservedComponents(y, "local level", use_exact_diffuse=True)``. ``mean_field=True`` fits
    the independent family instead (for comparison: it does not contain the posterior).
    ``progress`` shows a tqdm bar.
    """
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] < 3 or not torch.isfinite(y).all():
        raise ValueError(f"y must be a 1-D tensor of at least 3 finite observations, got {y!r}")
    check_count("steps", steps)
    check_count("num_samples", num_samples)
    _check_positive("lr", lr)
    _check_positive("average_last", average_last, upper=1.0)
    y = y.to(torch.float64)
    center, sd = y.mean(), y.std()
    if not sd > 0:
        raise ValueError("y must not be constant")
    x = (y - center) / sd
    q = MarkovGaussian(x.shape[0], init_pseudo=x, init_site_prec=1.0, mean_field=mean_field)
    # start at a level variance 0.09 and an observation variance 0.49 of the standardized data
    log_s = nn.Parameter(torch.tensor(math.log(0.3), dtype=torch.float64))
    log_o = nn.Parameter(torch.tensor(math.log(0.7), dtype=torch.float64))
    params = [q.pseudo, q.log_site_prec, log_s, log_o]
    opt = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / steps)
    start = steps - max(1, int(average_last * steps))
    average = [torch.zeros_like(p) for p in params]
    history = torch.empty(steps, dtype=torch.float64)
    for k in tqdm(range(steps), disable=not progress, desc="local level VI"):
        terms = elbo_samples(q, x, num_samples, a=1.0, b=0.0, s=log_s.exp(), o=log_o.exp(), generator=generator)
        loss = -terms.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        history[k] = -loss.detach()
        if k >= start:
            for acc, p in zip(average, params):
                acc += p.detach()
    with torch.no_grad():
        for acc, p in zip(average, params):
            p.copy_(acc / (steps - start))
        level = dict(a=1.0, b=0.0, s=log_s.exp())
        return LocalLevelFit(
            obs_var=float(sd**2 * (2 * log_o).exp()),
            level_var=float(sd**2 * (2 * log_s).exp()),
            level_mean=center + sd * q._factors(**level)[0],
            level_std=sd * q.marginal_std(**level),
            elbo=history,
        )
