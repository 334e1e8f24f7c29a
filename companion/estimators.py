"""Monte Carlo gradients of expectations: pathwise, score function, measure-valued.

All three estimate ``grad_theta E_{x ~ p_theta}[f(x)]`` (chapter *Gradients of expectations*,
Mohamed et al. 2020):

* pathwise (reparameterization): ``x = g(eps, theta)``, gradient ``E_eps[grad_theta f(g(eps, theta))]``;
* score function (REINFORCE): ``E_x[(f(x) - b) grad_theta log p_theta(x)]``;
* measure-valued: ``grad_theta E_p[f] = c_theta (E_{p+}[f] - E_{p-}[f])`` for a decomposition of
  ``grad_theta p`` into two probability densities (here: the Gaussian's loc and scale).

Each estimator returns one type, :class:`Estimate`: ``value`` is the Monte Carlo mean of
``f`` and ``surrogate`` is a scalar that *evaluates* to the same mean but whose gradient is the
estimator, so ``est.surrogate.backward()`` leaves the gradient estimate in ``.grad``.
:func:`gradient_samples` gives the per-sample estimates themselves, so that variances are
measured, not guessed; :func:`per_sample_gradients` does the same for any program written as a
function of its parameters and of its own noise (one ``torch.func.vmap`` over ``grad``).

Common random numbers: ``pathwise``, ``score_function`` and ``gradient_samples`` take the
standard noise ``eps`` explicitly (``x = g(eps, theta)``, the path kept for the pathwise
estimator and cut for the score function), so two estimators or two parameter values can be
compared on the same draws.

Shapes: ``f`` takes samples of shape ``(S, *batch_shape, *event_shape)`` and returns ``(S,)``,
one objective per sample; the leading dimension is always the sample dimension. For a batch of
independent problems (one per data point, say), the pathwise and score-function estimators also
accept ``f`` returning ``(S, *batch_shape)``: ``value`` then has shape ``batch_shape``, baselines
act per batch element, and ``surrogate`` is the sum over the batch of each element's surrogate.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.distributions import (
    Distribution,
    Independent,
    MultivariateNormal,
    Normal,
    TransformedDistribution,
    Uniform,
)

from .runtime import rng

__all__ = [
    "Estimate",
    "pathwise",
    "score_function",
    "measure_valued",
    "gradient_samples",
    "per_sample_gradients",
    "reparameterize",
    "METHODS",
    "MCSummary",
    "mc_summary",
    "variance_stderr",
    "gaussian_expectation",
    "enumerate_expectation",
]

Objective = Callable[[Tensor], Tensor]
Baseline = None | float | Tensor | str | Callable[[Tensor], Tensor]


class Estimate(NamedTuple):
    """What every estimator returns.

    value:     the Monte Carlo mean of ``f`` (detached), the number to report.
    surrogate: a scalar equal to ``value`` whose ``.backward()`` yields the gradient estimate.
    """

    value: Tensor
    surrogate: Tensor


# --------------------------------------------------------------------------- checks


def _check_num_samples(num_samples: int, minimum: int = 1) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < minimum:
        raise ValueError(f"num_samples must be an int >= {minimum}, got {num_samples!r}")
    return num_samples


def _check_dist(dist: Distribution) -> Distribution:
    if not isinstance(dist, Distribution):
        raise ValueError(f"dist must be a torch.distributions.Distribution, got {type(dist).__name__}")
    return dist


def _f_values(f: Objective, x: Tensor, num_samples: int, batch_shape: tuple = ()) -> Tensor:
    """f(x), checked to be (S,) or, when ``batch_shape`` is given, (S, *batch_shape)."""
    if not callable(f):
        raise ValueError(f"f must be callable, got {type(f).__name__}")
    fx = f(x)
    allowed = {(num_samples,), (num_samples, *batch_shape)}
    if not isinstance(fx, Tensor) or tuple(fx.shape) not in allowed:
        shape = tuple(fx.shape) if isinstance(fx, Tensor) else type(fx).__name__
        raise ValueError(
            f"f must map samples of shape {tuple(x.shape)} to one value per sample, of shape "
            f"{' or '.join(str(a) for a in sorted(allowed))}, got {shape}"
        )
    return fx


def _log_prob_like(dist: Distribution, x: Tensor, fx: Tensor) -> Tensor:
    """log p(x) in the shape of f(x): summed over all but the sample dimension when fx is (S,)."""
    log_p = dist.log_prob(x)
    if fx.dim() == 1 and log_p.dim() > 1:
        return log_p.reshape(fx.shape[0], -1).sum(1)
    return log_p


def _batch_shape(dist: Distribution, sample_shape) -> tuple:
    # the dimensions of f(x) beyond the sample one: the batch, for a distribution sampled S times
    return tuple(dist.batch_shape) if len(sample_shape) else tuple(dist.batch_shape[1:])


# --------------------------------------------------------------------------- explicit noise


def reparameterize(dist: Distribution, eps: Tensor) -> Tensor:
    """``x = g(eps, theta)``: the sample of ``dist`` that the standard noise ``eps`` determines.

    The same map ``rsample`` applies to the noise it draws itself, written out so that the noise
    can be chosen (common random numbers, quadrature nodes, a fixed ``eps`` for finite
    differences):

    * ``Normal(loc, scale)``: ``x = loc + scale * eps``, ``eps ~ N(0, 1)``;
    * ``MultivariateNormal``: ``x = loc + L eps`` with ``L = scale_tril``, ``eps ~ N(0, I)``;
    * ``Uniform(low, high)``: ``x = low + (high - low) * eps``, ``eps ~ U(0, 1)``;
    * ``Independent(base)``: the base's map; ``TransformedDistribution`` (``LogNormal``,
      ``LogisticNormal``, ``Gumbel``, ``Kumaraswamy``, ...): the base's map, then the transforms.

    ``eps`` has shape ``sample_shape + batch_shape + event_shape`` of the base distribution.
    Other families raise a ``ValueError``: draw them with ``generator=`` instead.
    """
    if not isinstance(eps, Tensor):
        raise ValueError(f"eps must be a tensor, got {type(eps).__name__}")
    if isinstance(dist, Independent):
        return reparameterize(dist.base_dist, eps)
    if isinstance(dist, TransformedDistribution):
        x = reparameterize(dist.base_dist, eps)
        for transform in dist.transforms:
            x = transform(x)
        return x
    if not isinstance(dist, (Normal, MultivariateNormal, Uniform)):
        raise ValueError(
            f"eps= is supported for Normal, MultivariateNormal, Uniform and Independent or "
            f"TransformedDistribution built on them, got {type(dist).__name__}: use generator="
        )
    shape = dist.batch_shape + dist.event_shape
    if eps.shape[eps.dim() - len(shape):] != shape:
        raise ValueError(
            f"eps of shape {tuple(eps.shape)} does not end in the distribution's batch and event "
            f"shape {tuple(shape)}"
        )
    if isinstance(dist, Normal):
        return dist.loc + dist.scale * eps
    if isinstance(dist, MultivariateNormal):
        return dist.loc + (dist.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
    return dist.low + (dist.high - dist.low) * eps


def _draw(dist: Distribution, sample_shape, eps: Tensor | None, generator, path: bool) -> Tensor:
    """S draws of dist: from ``eps`` when given (its leading shape must be ``sample_shape``).

    Without a path, a reparameterizable distribution is drawn as ``rsample`` under ``no_grad``:
    the same numbers as ``sample`` (``Normal.sample`` is ``torch.normal``, which draws the
    standard normals in the same order), and for ``Normal`` half the time at small ``S``.
    """
    if eps is None:
        if generator is not None:
            with rng(generator):
                return _draw(dist, sample_shape, None, None, path)
        if path:
            return dist.rsample(sample_shape)
        if dist.has_rsample:
            with torch.no_grad():
                return dist.rsample(sample_shape)
        return dist.sample(sample_shape)
    if generator is not None:
        raise ValueError("pass eps= or generator=, not both: eps fixes the noise already")
    x = reparameterize(dist, eps)
    if x.shape != dist._extended_shape(sample_shape):
        raise ValueError(
            f"eps must give samples of shape {tuple(dist._extended_shape(sample_shape))}, got "
            f"{tuple(x.shape)} from eps of shape {tuple(eps.shape)}"
        )
    return x if path else x.detach()


# --------------------------------------------------------------------------- per-sample terms
# Each ``_terms`` function draws S samples and returns (f(x), s), both of shape (S,), where
# s_i evaluates to f(x_i) and grad s_i is the i-th per-sample gradient estimate.
# ``sample_shape`` is (S,) for a distribution without a sample dimension, and () when the
# distribution's batch already starts with it (gradient_samples).


def _pathwise_terms(f, dist, sample_shape, num_samples, generator, eps=None):
    if not dist.has_rsample:
        raise ValueError(
            f"pathwise needs a reparameterizable distribution (has_rsample=True); "
            f"{type(dist).__name__} has none: use score_function"
        )
    x = _draw(dist, sample_shape, eps, generator, path=True)
    fx = _f_values(f, x, num_samples, _batch_shape(dist, sample_shape))
    return fx, fx


def _check_baseline(baseline: Baseline, num_samples: int) -> None:
    """The baseline's kind (its values are checked by :func:`_baseline_values`)."""
    if baseline is None or callable(baseline):
        return
    if isinstance(baseline, (int, float, Tensor)) and not isinstance(baseline, bool):
        return
    if not isinstance(baseline, str) or baseline != "mean":
        raise ValueError(f"baseline must be None, a number, a tensor, 'mean' or a callable, got {baseline!r}")
    if num_samples < 2:
        raise ValueError("baseline='mean' needs num_samples >= 2 (it averages the other samples)")


def _baseline_values(baseline: Baseline, fx: Tensor) -> Tensor | float:
    """b_i for each sample; fx is detached. b_i must not depend on f(x_i) to stay unbiased."""
    _check_baseline(baseline, fx.shape[0])
    if baseline is None:
        return 0.0
    if isinstance(baseline, str):
        # leave-one-out: b_i = (sum_j f_j - f_i) / (S - 1), independent of x_i
        return (fx.sum(0, keepdim=True) - fx) / (fx.shape[0] - 1)
    if callable(baseline):
        b = torch.as_tensor(baseline(fx), dtype=fx.dtype, device=fx.device).detach()
    else:
        b = torch.as_tensor(baseline, dtype=fx.dtype, device=fx.device).detach()
    try:
        fits = torch.broadcast_shapes(b.shape, fx.shape) == fx.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"baseline must broadcast to the f-values' shape {tuple(fx.shape)}, got shape {tuple(b.shape)}")
    return b


def _score_terms(f, dist, sample_shape, num_samples, generator, baseline=None, eps=None):
    x = _draw(dist, sample_shape, eps, generator, path=False)
    fx = _f_values(f, x, num_samples, _batch_shape(dist, sample_shape))  # keeps f's own parameters
    if not torch.is_grad_enabled():  # no gradient wanted: the surrogate is f itself
        _check_baseline(baseline, fx.shape[0])
        return fx, fx
    b = _baseline_values(baseline, fx.detach())
    if eps is None:  # x was drawn from dist here: checking it against dist's support is moot
        with _validation(False):
            log_p = _log_prob_like(dist, x, fx)
    else:  # x = g(eps, theta) from the caller's eps: torch's checks apply
        log_p = _log_prob_like(dist, x, fx)
    weight = fx.detach() if baseline is None else fx.detach() - b
    # s = f + (f - b) * (log p - stop_grad(log p)):  value f, gradient grad f + (f - b) grad log p
    return fx, fx + weight * (log_p - log_p.detach())


@contextlib.contextmanager
def _validation(enabled: bool) -> Iterator[None]:
    """torch.distributions' default argument validation set to ``enabled`` inside the block.

    A distribution built without an explicit ``validate_args`` reads the default when it checks
    a value, so this reaches ``log_prob``'s support check of the samples an estimator drew
    itself (Pyro's ``validation_enabled`` toggles the same default); an explicit
    ``validate_args=True`` still checks.
    """
    previous = Distribution._validate_args
    Distribution.set_default_validate_args(enabled)
    try:
        yield
    finally:
        Distribution.set_default_validate_args(previous)


_SQRT_2PI = math.sqrt(2 * math.pi)


def _replace_each_coordinate(x: Tensor, values: Tensor) -> Tensor:
    """(S, *B) and (S, *B) -> (D, S, *B): copy d of x with coordinate d set to values[:, d]."""
    n, rest = x.shape[0], x.shape[1:]
    d = max(1, math.prod(rest))
    if d == 1:  # one coordinate: the copy is the new values themselves
        return values.reshape(1, n, *rest)
    out = x.reshape(n, d).unsqueeze(0).repeat(d, 1, 1)  # (D, S, D)
    idx = torch.arange(d, device=x.device)
    out[idx, :, idx] = values.reshape(n, d).T
    return out.reshape(d, n, *rest)


def _f_each(f: Objective, xs: Tensor) -> Tensor:
    d, n = xs.shape[:2]
    return _f_values(f, xs.reshape(d * n, *xs.shape[2:]), d * n).reshape(d, n).T  # (S, D)


def _measure_valued_terms(f, dist, sample_shape, num_samples, generator, coupling=True):
    normal = dist.base_dist if isinstance(dist, Independent) else dist
    if not isinstance(normal, Normal):
        raise ValueError(
            f"measure_valued is implemented for Normal (or Independent(Normal)) distributions, "
            f"got {type(dist).__name__}"
        )
    shape = torch.Size(sample_shape) + normal.batch_shape
    loc, scale = normal.loc.expand(shape), normal.scale.expand(shape)
    kw = {"dtype": loc.dtype, "device": loc.device}
    with rng(generator), torch.no_grad():
        # Weak derivatives of N(mu, sigma^2) (Mohamed et al. 2020, sec. 6.2, Table 1):
        #   d/dmu:    c = 1/(sigma sqrt(2 pi)),  p+ = mu + sigma R,  p- = mu - sigma R,  R ~ Rayleigh(1)
        #   d/dsigma: c = 1/sigma,               p+ = mu + sigma M,  p- = N(mu, sigma^2),  M ~ dsMaxwell
        # Rayleigh(1) by inversion, R = sqrt(-2 log(1 - U)): exact, and 5x faster than Weibull's
        r_plus = torch.sqrt(-2 * torch.log1p(-torch.rand(shape, **kw)))
        r_minus = r_plus if coupling else torch.sqrt(-2 * torch.log1p(-torch.rand(shape, **kw)))
        # double-sided Maxwell: |M| = chi_3, the norm of three standard normals; random sign
        m = torch.randn((3, *shape), **kw).square().sum(0).sqrt()
        m = m * (2 * torch.randint(0, 2, shape, device=loc.device) - 1)
        # coupling: if U ~ U(0,1), then M U ~ N(0, 1), so the Gaussian part shares M
        eps = m * torch.rand(shape, **kw) if coupling else torch.randn(shape, **kw)
        mu, sigma = loc.detach(), scale.detach()
        x = mu + sigma * eps  # (S, *B), the draw from p itself
    fx = _f_values(f, x, num_samples)  # x is a constant: only a direct dependence of f has a gradient
    if not torch.is_grad_enabled():  # no gradient wanted: the surrogate is f itself
        return fx, fx
    with torch.no_grad():
        f_mu_plus = _f_each(f, _replace_each_coordinate(x, mu + sigma * r_plus))
        f_mu_minus = _f_each(f, _replace_each_coordinate(x, mu - sigma * r_minus))
        f_sigma_plus = _f_each(f, _replace_each_coordinate(x, mu + sigma * m))
        flat_sigma = sigma.reshape(num_samples, -1)  # (S, D)
        g_mu = (f_mu_plus - f_mu_minus) / (flat_sigma * _SQRT_2PI)
        g_sigma = (f_sigma_plus - fx.detach().unsqueeze(1)) / flat_sigma
    flat_loc, flat_scale = loc.reshape(num_samples, -1), scale.reshape(num_samples, -1)
    weak = (g_mu * (flat_loc - flat_loc.detach()) + g_sigma * (flat_scale - flat_scale.detach())).sum(1)
    return fx, fx + weak


_TERMS = {
    "pathwise": _pathwise_terms,
    "score_function": _score_terms,
    "measure_valued": _measure_valued_terms,
}
METHODS = tuple(_TERMS)


def _estimate(method, f, dist, num_samples, generator, **options) -> Estimate:
    _check_dist(dist)
    n = _check_num_samples(num_samples)
    _, s = _TERMS[method](f, dist, (n,), n, generator, **options)
    # each s_i evaluates to f(x_i) (its correction terms are x - stop_grad(x) = 0), so the mean
    # of s is also the value: one reduction instead of two
    mean = s.mean(0)
    return Estimate(mean.detach(), mean if mean.dim() == 0 else mean.sum())


# --------------------------------------------------------------------------- public estimators


def pathwise(
    f: Objective, dist: Distribution, num_samples: int, *, generator=None, eps: Tensor | None = None
) -> Estimate:
    """Pathwise (reparameterization) estimate of ``grad E_dist[f(x)]``.

    ``x_i = dist.rsample()`` keeps its graph back to the parameters, so the gradient of
    ``(1/S) sum_i f(x_i)`` is ``(1/S) sum_i grad f(g(eps_i, theta))``, unbiased for
    ``grad_theta E[f(x)]`` when ``f`` is differentiable. Chapter *The reparameterization trick*;
    Kingma and Welling 2014, Rezende et al. 2014.

    eps: the standard noise, shape ``(num_samples, *batch_shape, *event_shape)``, instead of a
    draw from ``generator`` (``x_i = g(eps_i, theta)``, see :func:`reparameterize`).
    """
    return _estimate("pathwise", f, dist, num_samples, generator, eps=eps)


def score_function(
    f: Objective,
    dist: Distribution,
    num_samples: int,
    *,
    baseline: Baseline = None,
    generator=None,
    eps: Tensor | None = None,
) -> Estimate:
    """Score-function (REINFORCE, likelihood-ratio) estimate of ``grad E_dist[f(x)]``.

    ``grad_theta E[f(x)] = E[(f(x) - b) grad_theta log p_theta(x)]`` for any ``b`` that does not
    depend on ``x``. The surrogate is ``f + (f - b).detach() * (log p - log p.detach())``: only
    f-values are detached, never ``log p`` (Williams 1992; chapter *Gradients of expectations*).

    baseline: ``None`` (b = 0); a number or tensor; ``"mean"``, the leave-one-out mean
    ``b_i = (sum_j f_j - f_i) / (S - 1)``, which keeps the estimate unbiased; or a callable
    that maps the detached f-values ``(S,)`` to ``b`` (scalar or ``(S,)``). A callable whose
    ``b_i`` depends on ``f_i`` biases the estimate.

    Batches: for a batch of data points, ``log p`` must be one log-probability per data point.
    A batched *discrete* distribution needs ``Independent``: ``Bernoulli(logits)`` with logits
    ``(B, D)`` has batch shape ``(B, D)`` and ``f`` returning ``(S, B)`` is then refused; wrap it
    as ``Independent(Bernoulli(logits=logits), 1)`` (batch ``(B,)``, event ``(D,)``) so that
    ``log_prob`` sums the ``D`` coordinates of each data point::

        q = Independent(Bernoulli(logits=logits), 1)              # (B, D) -> batch (B,)
        est = score_function(lambda z: f(z), q, 100, baseline="mean")   # f: (S, B, D) -> (S, B)

    eps: the standard noise (see :func:`pathwise`); the samples ``g(eps, theta)`` are then
    detached, so the two estimators can share their draws.
    """
    return _estimate("score_function", f, dist, num_samples, generator, baseline=baseline, eps=eps)


def measure_valued(
    f: Objective,
    dist: Distribution,
    num_samples: int,
    *,
    coupling: bool = True,
    generator=None,
) -> Estimate:
    """Measure-valued estimate of ``grad E[f(x)]`` for a Gaussian's ``loc`` and ``scale``.

    ``d/dtheta N(x; mu, sigma^2) = c_theta (p+_theta(x) - p-_theta(x))`` with (Mohamed et al. 2020,
    sec. 6, Table 1)

    * ``mu``:    ``c = 1/(sigma sqrt(2 pi))``, ``p+- = mu +- sigma R``, ``R ~ Rayleigh(1)``;
    * ``sigma``: ``c = 1/sigma``, ``p+ = mu + sigma M`` with ``M`` double-sided Maxwell, ``p- = N(mu, sigma^2)``.

    With ``coupling=True`` the two parts share their randomness (the same ``R``; and the Gaussian
    draw is ``M U`` with ``U ~ U(0, 1)``), which lowers the variance. For a batch of ``D``
    independent coordinates, ``f`` is evaluated ``3 D + 1`` times per sample.
    """
    return _estimate("measure_valued", f, dist, num_samples, generator, coupling=coupling)


def gradient_samples(
    method: str,
    f: Objective,
    dist_fn: Callable[..., Distribution],
    params: Sequence[Tensor],
    num_samples: int,
    *,
    generator=None,
    eps: Tensor | None = None,
    **options,
) -> tuple[Tensor, ...]:
    """Per-sample gradient estimates: one tensor of shape ``(num_samples, *p.shape)`` per ``p``.

    Each parameter is copied ``num_samples`` times along a new leading dimension and
    ``dist_fn(*copies)`` must build a distribution whose batch shape starts with that
    dimension (e.g. ``lambda mu, sigma: Normal(mu, sigma)``); sample ``i`` then depends only on
    copy ``i``, so one backward pass gives all per-sample gradients. ``method`` is one of
    :data:`METHODS`; ``options`` pass on (``baseline="mean"``, ``coupling=False``). Their mean
    is the estimator with ``num_samples`` samples; their variance is the per-sample variance.

    With ``baseline="mean"`` the per-sample estimates share one leave-one-out baseline: sample
    ``i`` uses the mean of the other ``S - 1`` f-values, so the rows are not independent (each
    is unbiased, and their mean is the leave-one-out estimator with ``S`` samples); their
    variance is that of the leave-one-out estimator's terms, close to the variance with the
    exact mean as baseline for large ``S``.

    eps: the standard noise, shape ``(num_samples, *batch_shape, *event_shape)`` of the
    distribution ``dist_fn`` builds (pathwise and score function), for common random numbers;
    see :func:`reparameterize`.
    """
    if method not in _TERMS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n = _check_num_samples(num_samples)
    if isinstance(params, Tensor):
        params = (params,)
    params = tuple(params)
    if not params or not all(isinstance(p, Tensor) for p in params):
        raise ValueError("params must be a non-empty sequence of tensors")
    copies = tuple(p.detach().unsqueeze(0).expand(n, *p.shape).clone().requires_grad_(True) for p in params)
    dist = _check_dist(dist_fn(*copies))
    if dist.batch_shape[:1] != (n,):
        raise ValueError(
            f"dist_fn must build a distribution with batch shape ({n}, ...) from parameters with a "
            f"leading sample dimension, got batch shape {tuple(dist.batch_shape)}"
        )
    if eps is not None:
        if method == "measure_valued":
            raise ValueError("eps= is for the pathwise and score-function estimators")
        options["eps"] = eps
    _, s = _TERMS[method](f, dist, (), n, generator, **options)
    grads = torch.autograd.grad(s.sum(), copies, allow_unused=True)
    return tuple(torch.zeros_like(c) if g is None else g for g, c in zip(grads, copies))


def per_sample_gradients(
    program: Callable[[Any, Any], Tensor],
    params: Any,
    noise: Any,
    *,
    chunk_size: int | None = None,
) -> Any:
    """One gradient per noise draw: ``g_i = grad_theta program(theta, noise_i)``, ``i = 1..S``.

    A pathwise estimator is a deterministic program of the parameters and of its own noise,
    ``f(g(eps, theta))``; its per-sample gradients are those of the program at each ``eps_i``::

        g_i = d/dtheta f(g(eps_i, theta)),     mean_i g_i = the estimate,  var_i g_i = its variance.

    A score-function term is a program too, with the sample itself as its noise (drawn without a
    path) and ``f(x) + stop_grad(f(x) - b) (log p_theta(x) - stop_grad(log p_theta(x)))`` as its
    value; a baseline ``b_i`` computed from the other draws enters as part of ``noise_i``.

    program
        ``program(params, noise_i) -> scalar``, written for *one* draw (no sample dimension).
    params
        a tensor, or a tuple / list / dict of tensors (e.g. ``dict(module.named_parameters())``
        used with ``torch.func.functional_call``): the point theta at which to differentiate.
    noise
        a tensor, or a tuple / dict of tensors, each with the sample dimension ``S`` first.
    chunk_size
        draws per vectorized call (memory), ``None`` for all at once.

    Returns the gradients in the structure of ``params``, each with a leading ``S``.
    Built on ``torch.func.vmap(torch.func.grad(program))``: one vectorized pass, no copies of the
    parameters, and the noise is explicit, so two programs can share it (common random numbers).
    The program must be functional (no in-place updates of ``params``, no ``.item()``) and draw
    no randomness of its own. Chapter *Gradients of expectations*.
    """
    if not callable(program):
        raise ValueError(f"program must be callable, got {type(program).__name__}")
    leaves = list(params.values()) if isinstance(params, dict) else (
        list(params) if isinstance(params, (tuple, list)) else [params])
    if not leaves or not all(isinstance(p, Tensor) and p.is_floating_point() for p in leaves):
        raise ValueError("params must be a floating-point tensor or a non-empty tuple, list or dict of them")
    noise_leaves = list(noise.values()) if isinstance(noise, dict) else (
        list(noise) if isinstance(noise, (tuple, list)) else [noise])
    if not noise_leaves or not all(isinstance(e, Tensor) and e.dim() >= 1 for e in noise_leaves):
        raise ValueError("noise must be a tensor, or a tuple, list or dict of tensors, each with a leading sample dimension")
    sizes = {e.shape[0] for e in noise_leaves}
    if len(sizes) != 1:
        raise ValueError(f"every noise tensor must have the same leading sample dimension, got sizes {sorted(sizes)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    params = type(params)(p.detach() for p in params) if isinstance(params, (tuple, list)) else (
        {k: p.detach() for k, p in params.items()} if isinstance(params, dict) else params.detach())
    return torch.func.vmap(torch.func.grad(program), in_dims=(None, 0), chunk_size=chunk_size)(params, noise)


# --------------------------------------------------------------------------- diagnostics


class MCSummary(NamedTuple):
    """Mean, variance and standard error of the mean of Monte Carlo samples, over dim 0."""

    mean: Tensor
    variance: Tensor
    stderr: Tensor


def mc_summary(samples: Tensor) -> MCSummary:
    """Mean, unbiased variance and standard error ``sqrt(var / S)`` along the sample dimension."""
    if samples.dim() == 0 or samples.shape[0] < 2:
        raise ValueError("samples must have a leading sample dimension of size >= 2")
    var = samples.var(0)
    return MCSummary(samples.mean(0), var, (var / samples.shape[0]).sqrt())


def variance_stderr(samples: Tensor) -> Tensor:
    """Standard error of the sample variance along dim 0: ``sqrt((m4 - m2^2) / S)``.

    ``m2``, ``m4`` are the second and fourth central sample moments; the formula is the
    large-``S`` limit, reliable when the fourth moment is itself well estimated (it is not for
    heavy-tailed samples, e.g. score-function gradients of ``exp``: prefer moderate parameters).
    """
    if samples.dim() == 0 or samples.shape[0] < 2:
        raise ValueError("samples must have a leading sample dimension of size >= 2")
    c = samples - samples.mean(0)
    m2, m4 = (c**2).mean(0), (c**4).mean(0)
    return ((m4 - m2**2).clamp(min=0) / samples.shape[0]).sqrt()


# --------------------------------------------------------------------------- exact references


@functools.lru_cache(maxsize=None)
def _hermite_e_nodes(num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Hermite (probabilists') nodes and weights, computed once per ``num_nodes``:
    numpy's ``hermegauss`` costs ~15 ms at 80 nodes and ~0.3 s at 240."""
    return np.polynomial.hermite_e.hermegauss(num_nodes)


def gaussian_expectation(f: Objective, loc: Tensor, scale: Tensor, *, num_nodes: int = 80) -> Tensor:
    """``E_{N(loc, scale^2)}[f(x)]`` by Gauss-Hermite quadrature, differentiable in loc and scale.

    ``E[f(loc + scale Z)] ~= sum_k w_k f(loc + scale t_k) / sqrt(2 pi)`` with the nodes and weights
    of the probabilists' Hermite polynomials; exact for polynomials of degree < 2 num_nodes, and
    accurate to rounding for smooth f of moderate frequency. ``f`` takes ``(K,)`` nodes and returns
    ``(K,)``. Autograd of the result gives the exact gradient used as a reference.
    """
    loc, scale = torch.as_tensor(loc), torch.as_tensor(scale)
    if loc.numel() != 1 or scale.numel() != 1:
        raise ValueError("gaussian_expectation is for a scalar Gaussian: loc and scale must have one element")
    t, w = _hermite_e_nodes(num_nodes)  # cached: copied into new tensors below
    dtype = loc.dtype if loc.is_floating_point() else torch.get_default_dtype()
    t = torch.tensor(t, dtype=dtype, device=loc.device)
    w = torch.tensor(w / math.sqrt(2 * math.pi), dtype=dtype, device=loc.device)
    x = loc.reshape(()) + scale.reshape(()) * t
    return (w * _f_values(f, x, num_nodes)).sum()


def enumerate_expectation(f: Objective, dist: Distribution, *, max_support: int = 1_000_000) -> Tensor:
    """``E_dist[f(x)] = sum_x p(x) f(x)`` summed exactly over a finite support.

    ``dist`` is a discrete distribution with ``enumerate_support`` (Categorical, OneHotCategorical,
    Bernoulli, ...), possibly batched or wrapped in ``Independent``: the batch is treated as
    independent coordinates and all ``K^n`` joint values are enumerated. ``f`` takes
    ``(K^n, *batch_shape, *event_shape)`` and returns ``(K^n,)``. Differentiable in the
    parameters, so autograd gives the exact gradient.
    """
    base = dist.base_dist if isinstance(dist, Independent) else dist
    if not base.has_enumerate_support:
        raise ValueError(f"{type(base).__name__} has no finite support to enumerate")
    support = base.enumerate_support(expand=True)  # (K, *batch, *event)
    k, batch = support.shape[0], base.batch_shape
    n = math.prod(batch)
    if k**n > max_support:
        raise ValueError(f"the support has {k}^{n} values, more than max_support={max_support}")
    per_coord = support.reshape(k, n, *base.event_shape)
    combos = torch.tensor(list(itertools.product(range(k), repeat=n)), device=support.device).reshape(k**n, n)
    x = per_coord[combos, torch.arange(n, device=support.device)]  # (K^n, n, *event)
    x = x.reshape(k**n, *batch, *base.event_shape)
    log_p = base.log_prob(x).reshape(k**n, -1).sum(1)
    return (log_p.exp() * _f_values(f, x, k**n)).sum()
