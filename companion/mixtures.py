"""A Gaussian mixture with a reparameterized sample, and four gradient routes through a mixture.

Sampling a mixture ``p(x) = sum_k pi_k N(x; mu_k, sigma_k^2)`` draws an index
``k ~ Cat(pi)`` and then ``x ~ N(mu_k, sigma_k^2)``; the index has no differentiable path, so
torch's ``MixtureSameFamily`` has no ``rsample`` (pytorch issue 39178). This module gives it one
by *implicit reparameterization* (Graves 2016; Figurnov, Mohamed and Mnih 2018): the sample is
exact, and its derivative is that of the point that keeps its CDF value fixed::

    F(x; theta) = u   =>   dx/dtheta = -(dF(x; theta)/dtheta) / p(x; theta).

For a 1-D mixture, with ``z_k = (x - mu_k) / sigma_k``, ``r_k(x) = pi_k N(x; mu_k, sigma_k^2) / p(x)``
(the responsibilities) and ``pi = softmax(logits)``, this gives::

    dx/dmu_k = r_k(x),    dx/dsigma_k = r_k(x) z_k,
    dx/dlogit_j = -pi_j (Phi(z_j) - F(x)) / p(x).

For ``D``-dimensional components ``Independent(Normal)`` (diagonal covariances) the CDF is
replaced by the distributional transform: ``u_d = F_d(x_d | x_1..x_{d-1})``, each conditional
being a 1-D mixture whose weights are the responsibilities of ``x_1..x_{d-1}``. Its Jacobian in
``x`` is lower triangular, and the implicit gradient solves that triangular system.

The chapters *Mixture distributions* and *Hybrid continuous-discrete systems* compare the
routes of :func:`estimate`: exact marginalization of the index, the hybrid pathwise/score
estimator, the Gumbel-Softmax relaxation (Jang et al. 2017; Maddison et al. 2017) and the
implicit gradient of :class:`ReparameterizedMixture`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.distributions import Categorical, Distribution, Independent, MixtureSameFamily, Normal

from .estimators import Estimate, _check_num_samples, _f_values, pathwise, score_function
from .relaxations import gumbel_softmax
from .runtime import rng

__all__ = ["ReparameterizedMixture", "implicit_rsample", "implicit_reparameterize", "estimate"]

_ROUTES = ("exact", "hybrid", "relaxed", "implicit")


# --------------------------------------------------------------------------- checks


def _normal_components(component_distribution: Distribution) -> Normal:
    """The ``Normal`` inside a supported component distribution, or a ``ValueError``."""
    comp = component_distribution
    if isinstance(comp, Normal):
        return comp
    if isinstance(comp, Independent) and isinstance(comp.base_dist, Normal) and comp.reinterpreted_batch_ndims == 1:
        return comp.base_dist
    raise ValueError(
        "component_distribution must be Normal (1-D components) or Independent(Normal, 1) "
        f"(diagonal D-dimensional components), got {comp!r}"
    )


def _check_mixture(mixture) -> MixtureSameFamily:
    if not isinstance(mixture, MixtureSameFamily):
        raise ValueError(f"mixture must be a torch.distributions.MixtureSameFamily, got {type(mixture).__name__}")
    _normal_components(mixture.component_distribution)
    return mixture


# --------------------------------------------------------------------------- implicit gradient


def _log1mexp(a: Tensor) -> Tensor:
    """``log(1 - exp(a))`` for ``a <= 0``, accurate on both sides of ``-log 2`` (Maechler 2012)."""
    return torch.where(a > -0.6931471805599453, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def _newton_step(x: Tensor, log_w: Tensor, loc: Tensor, scale: Tensor, log_u: Tensor, left: Tensor) -> Tensor:
    """One Newton step for ``F(x) = u`` of a 1-D mixture, evaluated in log space.

    x: ``(...)``; log_w, loc, scale: ``(..., K)`` (log weights, normalized or not); ``log_u`` is
    ``log F(x0)`` where ``left`` (``F(x0) <= 1/2``) and ``log(1 - F(x0))`` elsewhere, so that::

        x - (F(x) - u) / p(x) = x - s exp(G_u - log p(x)) expm1(G(x) - G_u),

    with ``G = log F, s = 1`` in the left half and ``G = log(1 - F), s = -1`` in the right half.
    Neither ``p(x)`` nor ``F(x) - u`` is formed, so the step stays finite where both underflow.
    """
    log_w = torch.log_softmax(log_w, -1)
    z = (x.unsqueeze(-1) - loc) / scale  # (..., K)
    log_cdf = torch.logsumexp(log_w + torch.special.log_ndtr(z), -1)
    log_sf = torch.logsumexp(log_w + torch.special.log_ndtr(-z), -1)
    log_pdf = torch.logsumexp(log_w + Normal(loc, scale, validate_args=False).log_prob(x.unsqueeze(-1)), -1)
    g, sign = torch.where(left, log_cdf, log_sf), torch.where(left, 1.0, -1.0).to(x.dtype)
    return x - sign * torch.exp(log_u - log_pdf) * torch.expm1(g - log_u)


def _side(log_w: Tensor, loc: Tensor, scale: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(left, G_u)`` at the exact sample: which tail to work in, and the target ``log u``.

    Both are constants: the inputs are detached (``no_grad`` alone would not stop forward-mode
    AD, e.g. ``torch.func.jacfwd`` inside ``torch.func.hessian``).
    """
    log_w, loc, scale, x = (t.detach() for t in (log_w, loc, scale, x))
    log_w = torch.log_softmax(log_w, -1)
    z = (x.unsqueeze(-1) - loc) / scale
    log_cdf = torch.logsumexp(log_w + torch.special.log_ndtr(z), -1)
    log_sf = torch.logsumexp(log_w + torch.special.log_ndtr(-z), -1)
    left = log_cdf <= log_sf
    return left, torch.where(left, log_cdf, log_sf)


def _exact_sample(mixture: MixtureSameFamily, sample_shape) -> Tensor:
    """torch's ``sample``, with the mixing distribution first expanded to the batch shape where
    it is broadcast (torch's ``sample`` fails on a scalar ``Categorical`` with batched components)."""
    if mixture.mixture_distribution.batch_shape != mixture.batch_shape:
        mixture = MixtureSameFamily(mixture.mixture_distribution.expand(mixture.batch_shape),
                                    mixture.component_distribution, validate_args=False)
    return mixture.sample(torch.Size(sample_shape))


def implicit_reparameterize(mixture: MixtureSameFamily, x: Tensor, *, passes: int = 2) -> Tensor:
    """``x`` (an exact sample of ``mixture``, no graph) with the implicit gradient attached.

    Each coordinate takes ``passes`` Newton steps for ``F_d(x_d | x_<d; theta) = u_d``, started at
    ``x`` itself, with ``u`` fixed at the sample's own (detached) CDF values. At the current
    parameters every step returns ``x`` exactly; as functions of theta, one step agrees with the
    implicit function ``x(theta)`` to first order and two steps to third order (Newton's error
    squares), so autograd through two steps gives exact first *and* second derivatives. The
    conditional weights of coordinate ``d`` are computed from the stepped ``x_<d``, so backward
    through the loop is the forward substitution of the lower-triangular system.

    Public so that a chosen point (a quantile, a far-tail value) can be given its implicit
    gradient; :class:`ReparameterizedMixture` calls it on its own exact samples. Chapter
    *Mixture distributions*; Figurnov, Mohamed and Mnih (2018).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {type(x).__name__}")
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes must be an int >= 1, got {passes!r}")
    normal = _normal_components(mixture.component_distribution)
    logits = mixture.mixture_distribution.logits  # (*mB, K)
    x = x.detach()
    if mixture.event_shape == ():
        left, log_u = _side(logits, normal.loc, normal.scale, x)
        y = x
        for _ in range(passes):
            y = _newton_step(y, logits, normal.loc, normal.scale, log_u, left)
        return y
    dims = mixture.event_shape[-1]
    loc, scale = normal.loc, normal.scale  # (*B, K, D)
    targets, y = [], x
    for step in range(passes):
        log_w, coords = logits, []
        for d in range(dims):
            loc_d, scale_d = loc[..., d], scale[..., d]
            if step == 0:
                targets.append(_side(log_w, loc_d, scale_d, x[..., d]))
            left, log_u = targets[d]
            y_d = _newton_step(y[..., d], log_w, loc_d, scale_d, log_u, left)
            coords.append(y_d)
            # the next conditional's weights: pi_k prod_{d' <= d} N(y_d'; mu_kd', sigma_kd')
            log_w = log_w + Normal(loc_d, scale_d, validate_args=False).log_prob(coords[d].unsqueeze(-1))
        y = torch.stack(coords, -1)
    return y


# --------------------------------------------------------------------------- the distribution


class ReparameterizedMixture(MixtureSameFamily):
    """``torch.distributions.MixtureSameFamily`` of Gaussians with an implicit ``rsample``.

    Components are ``Normal`` (1-D) or ``Independent(Normal, 1)`` (diagonal, ``D``-dimensional);
    anything else is a ``ValueError``. ``log_prob``, ``sample``, ``mean``, ``variance``,
    ``cdf``, batch shapes and argument validation are torch's. ``rsample(sample_shape)`` returns
    an exact sample (torch's ``sample``) whose gradient with respect to the mixing logits and the
    component locations and scales is the implicit reparameterization gradient::

        dx/dtheta = -(dF(x; theta)/dtheta) / p(x; theta)                       (1-D),
        dx/dtheta = -J^{-1} dT(x; theta)/dtheta,  J = dT/dx lower triangular   (D-dimensional),

    ``T`` the distributional transform ``T_d(x) = F_d(x_d | x_<d)`` (Figurnov, Mohamed and Mnih
    2018, sec. 3; Graves 2016). It is computed in log space (log CDFs and survival functions,
    :func:`torch.special.log_ndtr`), so it stays finite far in the tails, where ``p(x)`` and
    ``F(x) - u`` underflow: a sample 30 component scales from every mean has finite, correct
    gradients in float32 and float64.

    Derivatives: first and second derivatives are exact (the sample is two Newton steps of
    ``F(x) = u`` started at ``x`` itself; see the chapter), so Hessian-vector products and
    ``torch.func`` transforms work (``vmap`` warns that it loops over ``log_ndtr``, which has
    no batching rule in torch 2.13); third and higher derivatives are not guaranteed. Cost per sample and
    coordinate: two Newton steps, each evaluating the log CDF, log survival function and log
    density of a ``K``-component 1-D mixture.

    Chapter *Mixture distributions*.
    """

    has_rsample = True

    def __init__(
        self,
        mixture_distribution: Categorical,
        component_distribution: Distribution,
        validate_args: bool | None = None,
    ) -> None:
        _normal_components(component_distribution)
        super().__init__(mixture_distribution, component_distribution, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        """torch's ``MixtureSameFamily.expand``, returning a ``ReparameterizedMixture``."""
        new = self._get_checked_instance(ReparameterizedMixture, _instance)
        return super().expand(batch_shape, _instance=new)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        """An exact sample of shape ``sample_shape + batch_shape + event_shape`` whose gradient
        is the implicit reparameterization gradient."""
        return implicit_reparameterize(self, _exact_sample(self, sample_shape))

    def __repr__(self) -> str:
        return "Reparameterized" + super().__repr__()


def implicit_rsample(mixture: MixtureSameFamily, sample_shape=torch.Size(), *, generator=None) -> Tensor:
    """:meth:`ReparameterizedMixture.rsample` for an existing ``MixtureSameFamily``.

    mixture
        A ``MixtureSameFamily`` with ``Normal`` or ``Independent(Normal, 1)`` components.
    sample_shape
        Leading shape of the sample; the result has ``sample_shape + batch_shape + event_shape``.
    generator
        A ``torch.Generator`` for the draw (``None``: torch's global generator).
    """
    _check_mixture(mixture)
    with rng(generator):
        x = _exact_sample(mixture, sample_shape)
    return implicit_reparameterize(mixture, x)


# --------------------------------------------------------------------------- gradient routes


def _pad_event(t: Tensor, event_dims: int) -> Tensor:
    return t.reshape(*t.shape, *([1] * event_dims))


def _exact(f, mixture: MixtureSameFamily, n: int, generator) -> Estimate:
    # sum_k pi_k E_{N_k}[f]: one pathwise draw of every component per sample, weighted by pi_k
    batch, k = tuple(mixture.batch_shape), mixture.mixture_distribution.logits.shape[-1]
    pi = mixture.mixture_distribution.expand(mixture.batch_shape).probs  # (*B, K), with its graph

    def weighted(xk: Tensor) -> Tensor:  # (n, *B, K, *E) -> (n, *B, K)
        xs = xk.movedim(1 + len(batch), 0).reshape(k * n, *batch, *mixture.event_shape)
        fx = _f_values(f, xs, k * n, batch)  # (K n,) or (K n, *B)
        if batch and fx.dim() == 1:
            raise ValueError(
                "the exact route marginalizes each batch element's index on its own: f must return "
                f"one value per sample and batch element, shape (num_samples, *{batch})"
            )
        fx = fx.reshape(k, n, *batch).movedim(0, -1)  # (n, *B, K)
        return pi * fx

    est = pathwise(weighted, mixture.component_distribution, n, generator=generator)
    return Estimate(est.value.sum(-1), est.surrogate)


def _hybrid(f, mixture: MixtureSameFamily, n: int, baseline, generator) -> Estimate:
    # score function for the index k, pathwise for x = mu_k + sigma_k eps given k
    categorical = mixture.mixture_distribution.expand(mixture.batch_shape)
    gather_dim = 1 + len(mixture.batch_shape)
    event_dims = len(mixture.event_shape)

    def f_of_index(k: Tensor) -> Tensor:  # (n, *B) -> f(x_k) with x_k on its path
        with rng(generator):
            xk = mixture.component_distribution.rsample((n,))  # (n, *B, K, *E)
        index = _pad_event(k, event_dims).unsqueeze(gather_dim).expand(*k.shape, 1, *mixture.event_shape)
        return f(xk.gather(gather_dim, index).squeeze(gather_dim))

    return score_function(f_of_index, categorical, n, baseline=baseline, generator=generator)


def _relaxed(f, mixture: MixtureSameFamily, n: int, tau, generator) -> Estimate:
    # x = sum_k y_k x_k with y ~ Gumbel-Softmax(logits, tau): pathwise everywhere, biased for tau > 0
    batch = tuple(mixture.batch_shape)
    logits = mixture.mixture_distribution.expand(mixture.batch_shape).logits  # (*B, K)
    with rng(generator):
        xk = mixture.component_distribution.rsample((n,))  # (n, *B, K, *E)
    y = gumbel_softmax(logits.expand(n, *logits.shape), tau, generator=generator)  # (n, *B, K)
    x = (_pad_event(y, len(mixture.event_shape)) * xk).sum(1 + len(batch))
    fx = _f_values(f, x, n, batch)
    return Estimate(fx.detach().mean(0), fx.mean(0).sum())


def estimate(
    route: str,
    f: Callable[[Tensor], Tensor],
    mixture: MixtureSameFamily,
    num_samples: int,
    *,
    tau: float | None = None,
    baseline="mean",
    generator=None,
) -> Estimate:
    """Estimate ``E_{x ~ mixture}[f(x)]`` and its gradient by one of four routes.

    Returns :class:`companion.estimators.Estimate`: ``value`` the Monte Carlo estimate of the
    expectation (of the relaxed expectation for ``"relaxed"``), ``surrogate`` a scalar whose
    ``.backward()`` leaves the gradient estimate in the parameters' ``.grad``.

    route
        ``"exact"``: marginalize the index, ``sum_k pi_k E_{N_k}[f]``, pathwise within each
        component (``K`` evaluations of ``f`` per sample; unbiased, the lowest variance).
        ``"hybrid"``: ``x = mu_k + sigma_k eps`` with ``k ~ Cat(pi)``; pathwise for the component
        parameters, score function ``(f(x) - b) grad log pi_k`` for the logits (unbiased).
        ``"relaxed"``: ``x = sum_k y_k x_k``, ``y`` a Gumbel-Softmax sample at temperature
        ``tau`` and ``x_k`` a draw of each component; pathwise, biased for every ``tau > 0``.
        ``"implicit"``: ``x`` from :meth:`ReparameterizedMixture.rsample`, pathwise (unbiased).
    f
        Maps samples ``(S, *batch_shape, *event_shape)`` to ``(S,)`` or ``(S, *batch_shape)``
        (one objective per batch element; required by ``"exact"`` when the batch is not empty).
    mixture
        A ``MixtureSameFamily`` with ``Normal`` or ``Independent(Normal, 1)`` components.
    num_samples
        ``S``, the number of samples.
    tau
        The temperature, required by ``"relaxed"`` and refused by the other routes.
    baseline
        The score-function baseline of ``"hybrid"`` (see
        :func:`companion.estimators.score_function`; ``"mean"`` is the leave-one-out mean);
        the other routes have no score term and ignore it.
    generator
        A ``torch.Generator`` for every draw (``None``: torch's global generator).

    Chapters *Mixture distributions* and *Hybrid continuous-discrete systems*.
    """
    if route not in _ROUTES:
        raise ValueError(f"route must be one of {_ROUTES}, got {route!r}")
    if route == "relaxed":
        if tau is None or isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise ValueError(f"the relaxed route needs a temperature tau > 0, got tau={tau!r}")
    elif tau is not None:
        raise ValueError(f"tau is the temperature of the relaxed route; route {route!r} takes no tau")
    _check_mixture(mixture)
    n = _check_num_samples(num_samples)
    if route == "exact":
        return _exact(f, mixture, n, generator)
    if route == "hybrid":
        return _hybrid(f, mixture, n, baseline, generator)
    if route == "relaxed":
        return _relaxed(f, mixture, n, float(tau), generator)
    if not isinstance(mixture, ReparameterizedMixture):
        mixture = ReparameterizedMixture(mixture.mixture_distribution, mixture.component_distribution,
                                         validate_args=False)
    return pathwise(f, mixture, n, generator=generator)
