"""Hierarchical latents: a two-level Gaussian chain and a two-layer hierarchical VAE.

Chapter *Hierarchical latents*.

Part 1, the chain. A top latent ``z2`` and a bottom latent ``z1`` that depends on it::

    z2 = alpha + beta eps2,   z1 = c z2 + d eps1,   eps1, eps2 ~ N(0, 1) independent.

The pathwise gradient of ``E[f(z1)]`` with respect to ``alpha`` runs through the whole chain,
``d f / d alpha = f'(z1) c``, and the noise of the top layer reaches ``z1`` multiplied by ``c``.
The closed forms below give the moments of ``z1`` and, for ``f(z1) = z1^2``, the exact gradient
and the exact per-sample variance of its pathwise estimate, split into the parts that come from
``eps2`` and from ``eps1``.

Part 2, the model. :class:`HierarchicalVAE`: ``p(z2) = N(0, I)``, ``p(z1 | z2)`` Gaussian with a
learned mean and scale, ``p(x | z1)`` Bernoulli. Inference is *top-down*, in the order of the
generative model, as in the ladder VAE (Sonderby et al. 2016) and NVAE (Vahdat and Kautz 2020):
``q(z2 | x) q(z1 | z2, x)``, with ``q(z1 | z2, x)`` the prior ``p(z1 | z2)`` shifted and rescaled
by a network that sees ``x`` (NVAE's residual normal). With ``z2_dim=0`` the same class is the
one-level VAE ``p(z1) = N(0, I)``, ``q(z1 | x)`` Gaussian, used as the comparison.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Bernoulli, Normal, kl_divergence

from ..estimators import per_sample_gradients
from .layers import mlp

__all__ = [
    "Chain",
    "sample_chain",
    "ChainMoments",
    "chain_moments",
    "square_expectation",
    "square_gradient",
    "ChainGradientVariance",
    "square_gradient_variance",
    "ChainGradients",
    "chain_gradient_samples",
    "Posterior",
    "ELBOTerms",
    "HierarchicalVAE",
    "negative_elbo",
    "importance_weighted_bound",
    "independent_pixels_log_likelihood",
    "active_units",
]

Number = float | Tensor


# --------------------------------------------------------------------------- the chain


def _check_scale(name: str, value: Number) -> None:
    v = torch.as_tensor(value)
    if not torch.is_floating_point(v) and v.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a real number or tensor, got {value!r}")
    if torch.any(v < 0) or not torch.all(torch.isfinite(v)):
        raise ValueError(f"{name} must be finite and >= 0 (it is a standard deviation), got {value!r}")


def _check_finite(name: str, value: Number) -> None:
    v = torch.as_tensor(value)
    if v.dtype == torch.bool or not torch.all(torch.isfinite(v.double())):
        raise ValueError(f"{name} must be a finite real number or tensor, got {value!r}")


class Chain(NamedTuple):
    """A draw of the chain: ``z2`` (top) and ``z1`` (bottom), both of the same shape."""

    z2: Tensor
    z1: Tensor


def _chain_noise(params, num_samples, eps2, eps1, generator) -> tuple[Tensor, Tensor]:
    """The noises ``(eps2, eps1)``: those given, the others drawn like them from ``generator``."""
    floats = [p for p in params if torch.is_floating_point(p)]
    dtype = floats[0].dtype if floats else torch.get_default_dtype()
    given = eps2 if eps2 is not None else eps1
    if given is not None:
        shape = given.shape
    elif num_samples is None:
        raise ValueError("sample_chain needs num_samples, or the noises eps2 and eps1")
    elif isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    else:
        shape = (num_samples, *torch.broadcast_shapes(*(p.shape for p in params)))
    dev = generator.device if generator is not None else (given.device if given is not None else None)
    if eps2 is None:
        eps2 = torch.randn(shape, generator=generator, dtype=dtype, device=dev)
    if eps1 is None:
        eps1 = torch.randn(shape, generator=generator, dtype=dtype, device=dev)
    if eps2.shape != eps1.shape:
        raise ValueError(f"eps2 and eps1 must have the same shape, got {tuple(eps2.shape)} and {tuple(eps1.shape)}")
    return eps2, eps1


def sample_chain(
    alpha: Number,
    beta: Number,
    c: Number,
    d: Number,
    num_samples: int | None = None,
    *,
    eps2: Tensor | None = None,
    eps1: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Chain:
    """``z2 = alpha + beta eps2``, ``z1 = c z2 + d eps1``: the two-level chain, reparameterized.

    Shapes: the noises ``eps2``, ``eps1`` are given, or drawn from ``generator`` with shape
    ``(num_samples, *broadcast(alpha, beta, c, d).shape)``; ``z2`` and ``z1`` have that shape and
    keep the graph back to ``alpha, beta, c, d``. Chapter *Hierarchical latents*; the chain is
    the smallest case of the deep latent Gaussian models of Rezende et al. (2014).
    """
    _check_finite("alpha", alpha)
    _check_finite("c", c)
    _check_scale("beta", beta)
    _check_scale("d", d)
    params = [torch.as_tensor(p) for p in (alpha, beta, c, d)]
    eps2, eps1 = _chain_noise(params, num_samples, eps2, eps1, generator)
    z2 = alpha + beta * eps2  # top layer
    z1 = c * z2 + d * eps1  # bottom layer: mean c z2, so eps2 reaches z1 scaled by c beta
    return Chain(z2, z1)


class ChainMoments(NamedTuple):
    """Mean and variance of ``z1``, and its covariance with ``z2``."""

    mean: Number
    variance: Number
    covariance: Number


def chain_moments(alpha: Number, beta: Number, c: Number, d: Number) -> ChainMoments:
    """Moments of the chain, in closed form.

    ``z1 = c alpha + c beta eps2 + d eps1``, so ``z1 ~ N(c alpha, c^2 beta^2 + d^2)`` and
    ``Cov(z1, z2) = c beta^2``: the top layer's noise reaches ``z1`` scaled by ``c``.
    """
    return ChainMoments(c * alpha, c**2 * beta**2 + d**2, c * beta**2)


def square_expectation(alpha: Number, beta: Number, c: Number, d: Number) -> Number:
    """``E[z1^2] = c^2 alpha^2 + c^2 beta^2 + d^2`` (mean squared plus variance)."""
    return c**2 * alpha**2 + c**2 * beta**2 + d**2


def square_gradient(alpha: Number, beta: Number, c: Number, d: Number) -> tuple[Number, Number]:
    """``(d/d alpha, d/d beta) E[z1^2] = (2 c^2 alpha, 2 c^2 beta)``."""
    return 2 * c**2 * alpha, 2 * c**2 * beta


class ChainGradientVariance(NamedTuple):
    """Per-sample variances of the pathwise gradient of ``E[z1^2]``.

    alpha, beta:   the variance of ``d z1^2 / d alpha`` and ``d z1^2 / d beta``;
    alpha_eps2:    the part of ``alpha`` due to ``eps2``, ``Var(E[g | eps2])``;
    alpha_eps1:    the part due to ``eps1``, ``E[Var(g | eps2)]``; the two parts sum to ``alpha``.
    """

    alpha: Number
    beta: Number
    alpha_eps2: Number
    alpha_eps1: Number


def square_gradient_variance(alpha: Number, beta: Number, c: Number, d: Number) -> ChainGradientVariance:
    """Exact per-sample variance of the pathwise gradient of ``E[z1^2]`` through the chain.

    With ``f(z1) = z1^2`` the chain rule gives ``g_alpha = f'(z1) dz1/dz2 dz2/dalpha = 2 z1 c``::

        g_alpha = 2 c^2 alpha + 2 c^2 beta eps2 + 2 c d eps1
        Var g_alpha = 4 c^4 beta^2  +  4 c^2 d^2
                      (from eps2)      (from eps1)

    The backward pass multiplies every path by ``c`` (``c^2`` in variance, for both parts); the
    forward pass has already scaled the top noise by ``c`` on its way into ``z1``, so the eps2
    part carries ``c^2`` once more: eps2 part / eps1 part ``= c^2 beta^2 / d^2``. For beta,
    ``g_beta = 2 z1 c eps2 = 2 c^2 alpha eps2 + 2 c^2 beta eps2^2 + 2 c d eps1 eps2``, three
    uncorrelated terms, so ``Var g_beta = 4 c^4 (alpha^2 + 2 beta^2) + 4 c^2 d^2``.
    """
    eps2_part = 4 * c**4 * beta**2
    eps1_part = 4 * c**2 * d**2
    var_beta = 4 * c**4 * (alpha**2 + 2 * beta**2) + eps1_part
    return ChainGradientVariance(eps2_part + eps1_part, var_beta, eps2_part, eps1_part)


class ChainGradients(NamedTuple):
    """Per-sample pathwise gradients ``d f(z1) / d alpha`` and ``d f(z1) / d beta``, each ``(S,)``."""

    alpha: Tensor
    beta: Tensor


def chain_gradient_samples(
    f: Callable[[Tensor], Tensor],
    alpha: float,
    beta: float,
    c: float,
    d: float,
    num_samples: int | None = None,
    *,
    eps2: Tensor | None = None,
    eps1: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> ChainGradients:
    """One pathwise gradient of ``f(z1)`` w.r.t. ``(alpha, beta)`` per draw of the chain: ``(S,)`` each.

    The program of one draw, ``f(c (alpha + beta eps2) + d eps1)``, is differentiated at each
    ``(eps2_i, eps1_i)`` by :func:`companion.estimators.per_sample_gradients` (``vmap`` over
    ``grad``); the mean of the ``S`` gradients is the pathwise estimate and their variance the
    per-sample variance. ``f`` maps one ``z1`` (a 0-d tensor) to a scalar, e.g. ``lambda z: z**2``.
    Passing the same ``eps2`` with fresh ``eps1`` (or the reverse) separates the two noises.
    """
    if not callable(f):
        raise ValueError(f"f must be callable, got {type(f).__name__}")
    eps2, eps1 = _chain_noise([torch.zeros((), dtype=dtype)], num_samples, eps2, eps1, generator)
    if eps2.dim() != 1:
        raise ValueError(f"eps2 and eps1 must have shape (S,), got {tuple(eps2.shape)}")
    theta = tuple(torch.tensor(float(v), dtype=eps2.dtype, device=eps2.device) for v in (alpha, beta))

    def program(theta: tuple[Tensor, Tensor], noise: tuple[Tensor, Tensor]) -> Tensor:
        fz = f(sample_chain(*theta, c, d, eps2=noise[0], eps1=noise[1]).z1)  # one draw
        if not isinstance(fz, Tensor) or fz.dim() != 0:
            raise ValueError("f must map one z1 (a 0-d tensor) to a scalar")
        return fz

    g_alpha, g_beta = per_sample_gradients(program, theta, (eps2, eps1))
    return ChainGradients(g_alpha, g_beta)


# --------------------------------------------------------------------------- the model


class Posterior(NamedTuple):
    """One reparameterized posterior draw and the laws involved (``None`` parts: one-level model).

    z1, z2: the draws ``(B, z1_dim)``, ``(B, z2_dim)``; q1 = q(z1 | z2, x), p1 = p(z1 | z2),
    q2 = q(z2 | x), p2 = p(z2), as ``torch.distributions.Normal`` with batch shape ``(B, dim)``.
    """

    z1: Tensor
    z2: Tensor | None
    q1: Normal
    p1: Normal
    q2: Normal | None
    p2: Normal | None


class ELBOTerms(NamedTuple):
    """The ELBO of each example and its parts, each of shape ``(B,)``.

    elbo = reconstruction - kl1 - kl2, with ``reconstruction = log p(x | z1)`` at one draw,
    ``kl2 = KL(q(z2 | x) || p(z2))`` and ``kl1 = KL(q(z1 | z2, x) || p(z1 | z2))`` at that draw.
    """

    elbo: Tensor
    reconstruction: Tensor
    kl1: Tensor
    kl2: Tensor


def _scale(raw: Tensor) -> Tensor:
    # a positive standard deviation (or scale factor); the floor keeps log-densities finite
    return F.softplus(raw) + 1e-3


def _check_dim(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class HierarchicalVAE(nn.Module):
    """Two stochastic layers, ``z2 -> z1 -> x``, with top-down (ladder-style) inference.

    Generative model (Rezende et al. 2014; Sonderby et al. 2016)::

        p(z2) = N(0, I),   p(z1 | z2) = N(mu_p(z2), sigma_p(z2)^2),   p(x | z1) = Bernoulli(logits(z1))

    Inference runs top-down, in the order of the generative model (ladder VAE, Sonderby et al.
    2016), with the residual normal distributions of NVAE (Vahdat and Kautz 2020)::

        h = up(x)                                            bottom-up features of x
        q(z2 | x)     = N(mu_2(h), sigma_2(h)^2)
        q(z1 | z2, x) = N(mu_p(z2) + dmu(h, z2), sigma_p(z2)^2 dsigma(h, z2)^2)

    so the posterior of ``z1`` is the prior ``p(z1 | z2)`` shifted and rescaled by what ``x``
    says, and ``KL(q(z1 | z2, x) || p(z1 | z2)) = sum (dmu^2 / sigma_p^2 + dsigma^2 - 1) / 2 -
    log dsigma``. A draw of ``z2`` moves ``z1`` through ``mu_p(z2)``: this is the chain
    ``z2 -> z1`` of the chapter, and the ELBO's gradient for the top layer runs through ``z1``.
    With ``z2_dim=0`` the same class is the one-level VAE (Kingma and Welling 2014):
    ``p(z1) = N(0, I)`` and ``q(z1 | x) = N(dmu(h), dsigma(h)^2)``.

    Shapes: ``x`` is ``(B, x_dim)`` with entries in {0, 1}; latents are ``(B, z1_dim)`` and
    ``(B, z2_dim)``.
    """

    def __init__(self, x_dim: int, z1_dim: int, z2_dim: int, hidden: int = 128) -> None:
        super().__init__()
        _check_dim("x_dim", x_dim, 1)
        _check_dim("z1_dim", z1_dim, 1)
        _check_dim("z2_dim", z2_dim, 0)
        _check_dim("hidden", hidden, 1)
        self.x_dim, self.z1_dim, self.z2_dim = x_dim, z1_dim, z2_dim
        self.up = nn.Sequential(mlp([x_dim, hidden, hidden]), nn.ReLU())  # h = up(x)
        self.q1_head = mlp([hidden + z2_dim, hidden, 2 * z1_dim])  # (dmu, dsigma) from (h, z2)
        self.decoder = mlp([z1_dim, hidden, hidden, x_dim])  # logits of p(x | z1)
        if z2_dim > 0:
            self.q2_head = mlp([hidden, hidden, 2 * z2_dim])  # (mu_2, sigma_2) from h
            self.prior1 = mlp([z2_dim, hidden, 2 * z1_dim])  # (mu_p, sigma_p) from z2

    @property
    def hierarchical(self) -> bool:
        """True when the model has a top layer (``z2_dim > 0``)."""
        return self.z2_dim > 0

    # --- the pieces, as torch distributions with batch shape (B, dim)

    def features(self, x: Tensor) -> Tensor:
        """Bottom-up features ``h = up(x)``: ``(B, x_dim) -> (B, hidden)``."""
        if x.dim() != 2 or x.shape[-1] != self.x_dim:
            raise ValueError(f"x must have shape (B, {self.x_dim}), got {tuple(x.shape)}")
        return self.up(x)

    def q_z2(self, h: Tensor) -> Normal:
        """``q(z2 | x) = N(mu_2(h), sigma_2(h)^2)``."""
        mu, raw = self.q2_head(h).chunk(2, dim=-1)
        return Normal(mu, _scale(raw))

    def p_z2(self, like: Tensor) -> Normal:
        """``p(z2) = N(0, I)``, one row per row of ``like``."""
        zeros = like.new_zeros(like.shape[0], self.z2_dim)
        return Normal(zeros, torch.ones_like(zeros))

    def p_z1(self, z2: Tensor | None, like: Tensor) -> Normal:
        """``p(z1 | z2) = N(mu_p(z2), sigma_p(z2)^2)``, or ``N(0, I)`` for the one-level model."""
        if not self.hierarchical:
            zeros = like.new_zeros(like.shape[0], self.z1_dim)
            return Normal(zeros, torch.ones_like(zeros))
        mu, raw = self.prior1(z2).chunk(2, dim=-1)
        return Normal(mu, _scale(raw))

    def q_z1(self, h: Tensor, z2: Tensor | None, prior: Normal) -> Normal:
        """``q(z1 | z2, x) = N(mu_p + dmu, (sigma_p dsigma)^2)``: the prior, corrected by ``x``."""
        inputs = h if z2 is None else torch.cat([h, z2], dim=-1)
        dmu, raw = self.q1_head(inputs).chunk(2, dim=-1)
        return Normal(prior.loc + dmu, prior.scale * _scale(raw))

    def p_x(self, z1: Tensor) -> Bernoulli:
        """``p(x | z1) = Bernoulli(logits = decoder(z1))``: ``(..., z1_dim) -> (..., x_dim)``."""
        return Bernoulli(logits=self.decoder(z1))

    # --- sampling the posterior, then the bound

    def _noise(self, shape, eps, generator, like: Tensor, name: str) -> Tensor:
        if eps is None:
            return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)
        if tuple(eps.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(eps.shape)}")
        return eps

    def posterior(self, x: Tensor, *, eps1=None, eps2=None, generator=None) -> Posterior:
        """One reparameterized draw ``z2 ~ q(z2 | x)``, ``z1 ~ q(z1 | z2, x)``, and the four laws.

        ``z2 = mu_2 + sigma_2 eps2`` and ``z1 = mu_q(z2) + sigma_q(z2) eps1``, with ``eps1`` of
        shape ``(B, z1_dim)`` and ``eps2`` of shape ``(B, z2_dim)`` given or drawn from ``generator``.
        """
        h = self.features(x)
        z2 = q2 = p2 = None
        if self.hierarchical:
            q2, p2 = self.q_z2(h), self.p_z2(x)
            z2 = q2.loc + q2.scale * self._noise(q2.loc.shape, eps2, generator, x, "eps2")
        p1 = self.p_z1(z2, x)
        q1 = self.q_z1(h, z2, p1)
        z1 = q1.loc + q1.scale * self._noise(q1.loc.shape, eps1, generator, x, "eps1")
        return Posterior(z1, z2, q1, p1, q2, p2)

    def elbo(self, x: Tensor, *, eps1=None, eps2=None, generator=None) -> ELBOTerms:
        """The ELBO of each example, one posterior draw, KL terms in closed form given ``z2``::

            log p(x) >= E_q[log p(x | z1)] - KL(q(z2|x) || p(z2)) - E_q(z2|x)[KL(q(z1|z2,x) || p(z1|z2))]

        ``(B, x_dim) -> ELBOTerms`` of ``(B,)`` tensors, differentiable in every parameter through
        the reparameterized ``z2`` and ``z1`` (Kingma and Welling 2014; Sonderby et al. 2016).
        """
        z1, z2, q1, p1, q2, p2 = self.posterior(x, eps1=eps1, eps2=eps2, generator=generator)
        rec = self.p_x(z1).log_prob(x).sum(-1)
        kl1 = kl_divergence(q1, p1).sum(-1)
        kl2 = kl_divergence(q2, p2).sum(-1) if self.hierarchical else torch.zeros_like(kl1)
        return ELBOTerms(rec - kl1 - kl2, rec, kl1, kl2)

    def log_weights(self, x: Tensor, num_samples: int, *, generator=None) -> Tensor:
        """``log p(x, z1, z2) - log q(z1, z2 | x)`` for ``num_samples`` posterior draws: ``(K, B)``.

        Their mean is a Monte Carlo ELBO; ``logsumexp - log K`` is the importance-weighted bound
        of Burda et al. (2016), which tends to ``log p(x)`` as ``K`` grows.
        """
        _check_dim("num_samples", num_samples, 1)
        xs = x.unsqueeze(0).expand(num_samples, *x.shape).reshape(-1, x.shape[-1])
        z1, z2, q1, p1, q2, p2 = self.posterior(xs, generator=generator)
        log_w = self.p_x(z1).log_prob(xs).sum(-1) + p1.log_prob(z1).sum(-1) - q1.log_prob(z1).sum(-1)
        if self.hierarchical:
            log_w = log_w + p2.log_prob(z2).sum(-1) - q2.log_prob(z2).sum(-1)
        return log_w.reshape(num_samples, x.shape[0])

    def sample(self, num_samples: int, *, z2: Tensor | None = None, generator=None) -> Tensor:
        """Ancestral samples: ``z2 ~ p(z2)``, ``z1 ~ p(z1 | z2)``, then the pixel probabilities.

        Returns the Bernoulli means of ``p(x | z1)``, ``(num_samples, x_dim)`` (what figures
        show). Pass ``z2`` of shape ``(num_samples, z2_dim)`` to hold the top layer fixed and
        see what the bottom layer alone varies.
        """
        _check_dim("num_samples", num_samples, 1)
        ref = next(self.parameters())
        if z2 is not None and (not self.hierarchical or tuple(z2.shape) != (num_samples, self.z2_dim)):
            raise ValueError(f"z2 must have shape ({num_samples}, {self.z2_dim}) in a hierarchical model")
        if z2 is None and self.hierarchical:
            z2 = torch.randn(num_samples, self.z2_dim, generator=generator, dtype=ref.dtype, device=ref.device)
        p1 = self.p_z1(z2, ref.new_zeros(num_samples, 1))
        eps1 = torch.randn(p1.loc.shape, generator=generator, dtype=ref.dtype, device=ref.device)
        return self.p_x(p1.loc + p1.scale * eps1).probs


def negative_elbo(model: HierarchicalVAE, x: Tensor, *, free_bits: float = 0.0) -> Tensor:
    """The training loss for :func:`companion.train.train`: minus the minibatch-mean ELBO.

    ``free_bits = lambda > 0`` replaces each layer's mean KL by ``max(lambda, mean_b KL_l)``
    (Kingma et al. 2016, "free bits"): a layer may use ``lambda`` nats without penalty, which
    keeps the optimizer from switching the top layer off early, the inactive-unit problem of
    hierarchical VAEs (Sonderby et al. 2016). With ``lambda = 0`` the loss is exactly ``-ELBO``;
    report the ELBO itself, not this loss. Use ``functools.partial(negative_elbo, free_bits=1.0)``.
    """
    if not free_bits >= 0:
        raise ValueError(f"free_bits must be >= 0, got {free_bits!r}")
    terms = model.elbo(x)
    if free_bits == 0:
        return -terms.elbo.mean()
    kl = terms.kl1.mean().clamp(min=free_bits)
    if model.hierarchical:
        kl = kl + terms.kl2.mean().clamp(min=free_bits)
    return -terms.reconstruction.mean() + kl


def importance_weighted_bound(
    model: HierarchicalVAE,
    x: Tensor,
    num_samples: int,
    *,
    generator: torch.Generator | None = None,
    chunk_size: int = 256,
) -> Tensor:
    """The importance-weighted bound ``log (1/K) sum_k p(x, z_k) / q(z_k | x)`` of each example.

    Burda et al. (2016): ``ELBO <= L_K <= log p(x)``, with ``L_K -> log p(x)`` as ``K`` grows.
    ``x`` is ``(B, x_dim)``; returns ``(B,)``, computed ``chunk_size`` examples at a time and
    without a graph (an evaluation, not a training loss).
    """
    _check_dim("num_samples", num_samples, 1)
    _check_dim("chunk_size", chunk_size, 1)
    out = []
    with torch.no_grad():
        for rows in x.split(chunk_size):
            log_w = model.log_weights(rows, num_samples, generator=generator)  # (K, b)
            out.append(torch.logsumexp(log_w, dim=0) - math.log(num_samples))
    return torch.cat(out)


def independent_pixels_log_likelihood(train_x: Tensor, test_x: Tensor) -> Tensor:
    """Exact ``log p(x)`` of each test row under independent Bernoulli pixels fitted to ``train_x``.

    ``p_j = (n_j + 1) / (N + 2)`` (add-one smoothing, so an unseen value keeps a finite log-loss),
    ``log p(x) = sum_j log Bernoulli(x_j; p_j)``: the best model that has no latent variable at
    all, the level a VAE decoder that ignores ``z1`` is stuck at. ``(N, D), (B, D) -> (B,)``.
    """
    if train_x.dim() != 2 or test_x.dim() != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"train_x and test_x must be (N, D) and (B, D), got {tuple(train_x.shape)} and {tuple(test_x.shape)}"
        )
    probs = (train_x.sum(0) + 1) / (train_x.shape[0] + 2)
    return Bernoulli(probs=probs).log_prob(test_x).sum(-1)


def active_units(means: Tensor, threshold: float = 0.01) -> Tensor:
    """Active latent units (Burda et al. 2016): ``Cov_x(E_q[u | x]) > threshold``.

    ``means`` is ``(B, dim)``, the posterior mean of each unit for each example; returns a
    boolean ``(dim,)``. A unit whose posterior mean does not vary with ``x`` carries no
    information about ``x``.
    """
    if means.dim() != 2 or means.shape[0] < 2:
        raise ValueError(f"means must have shape (B, dim) with B >= 2, got {tuple(means.shape)}")
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold!r}")
    return means.var(0) > threshold
