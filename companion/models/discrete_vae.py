"""A VAE with categorical latents, trained with Gumbel-Softmax, straight-through or REINFORCE.

Chapter *Discrete latent VAE*; Jang, Gu and Poole (2017); Maddison, Mnih and Teh (2017).

The generative model has ``N`` independent categorical latents of ``K`` classes each, written
as one-hot vectors ``z = (z_1, ..., z_N)``, ``z_n in {e_1, ..., e_K}``, with a uniform prior and
a Bernoulli decoder,

    p(z) = prod_n Cat(z_n; 1/K),        p(x | z) = prod_d Bernoulli(x_d; sigmoid(dec(z))_d),

and the encoder gives one set of logits per latent, ``q(z | x) = prod_n Cat(z_n; softmax(phi_n))``
with ``phi = enc(x)`` of shape ``(*batch, N, K)``. The evidence lower bound

    ELBO(x) = E_q[log p(x | z)] - KL(q(z | x) || p(z))                                   (1)

has a closed-form KL (:func:`kl_to_uniform`), so only the reconstruction term needs samples.
:func:`elbo_estimate` estimates (1) and its gradient with one of three estimators:

* ``"gumbel_softmax"``: ``z = softmax((phi + G) / tau)``, a relaxed sample on the simplex fed to
  the decoder, differentiated pathwise: low variance, biased for the gradient of (1);
* ``"straight_through"``: the one-hot ``argmax`` forward, the relaxed sample's gradient backward
  (Bengio et al. 2013): the value is an unbiased estimate of (1), the gradient is biased;
* ``"score_function"``: hard samples and ``(log p(x | z) - b) grad log q(z | x)`` with the
  leave-one-out baseline over the ``S`` samples of each data point (Williams 1992; Kool et al.
  2019): unbiased, and blind to how ``log p(x | z)`` changes with ``z``.

:func:`bias_variance` measures an estimator's squared bias and variance against an exact
gradient, such as autograd of :func:`enumerate_elbo`.

All three use the exact categorical KL of (1), as Jang et al. (2017) do, rather than a Monte
Carlo KL between relaxed densities (Maddison et al. 2017, ``relaxed_log_prob``, the bound of
the *relaxed* model): the KL term and its gradient are then exact, noise-free and identical for
the three, so any difference between them comes from the reconstruction term, and the KL is
that of the discrete model we evaluate. :func:`discrete_elbo` evaluates (1) with hard samples (unbiased), and
:func:`enumerate_elbo` computes it exactly by summing over all ``K^N`` latent values, the
reference for small latent spaces.

Shapes: ``logits`` ``(*batch, N, K)``; a log-likelihood callable maps latents
``(S, *batch, N, K)`` to ``(S, *batch)``; per-data-point values have shape ``batch``.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Bernoulli, Independent, OneHotCategorical, kl_divergence

from ..estimators import Estimate, mc_summary, per_sample_gradients
from ..relaxations import gumbel_max, gumbel_softmax, sample_gumbel
from .layers import mlp
from .._checks import check_count

__all__ = [
    "ESTIMATORS",
    "DiscreteVAE",
    "kl_to_uniform",
    "one_hot_configurations",
    "elbo_estimate",
    "enumerate_elbo",
    "discrete_elbo",
    "logit_gradient_samples",
    "BiasVariance",
    "bias_variance",
    "make_loss",
]

ESTIMATORS = ("gumbel_softmax", "straight_through", "score_function")
LogLik = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------- checks


def _check_estimator(estimator: str) -> str:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    return estimator


def _check_tau(tau) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0 or math.isinf(tau):
        raise ValueError(f"tau must be a positive finite number, got {tau!r}")
    return float(tau)


def _check_logits(logits: Tensor) -> Tensor:
    if not isinstance(logits, Tensor) or logits.dim() < 2 or logits.shape[-1] < 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a tensor of shape (*batch, N, K) with K >= 2, got {shape}")
    return logits


def _posterior(logits: Tensor) -> Independent:
    """q(z | x) = prod_n Cat(z_n; softmax(phi_n)): batch ``batch``, event ``(N, K)``."""
    return Independent(OneHotCategorical(logits=logits), 1)


# --------------------------------------------------------------------------- the objective


def kl_to_uniform(logits: Tensor) -> Tensor:
    """``KL(q || p) = sum_n sum_k q_nk log(K q_nk)`` for ``q = softmax(logits)`` and the uniform prior.

    Shapes: ``(*batch, N, K) -> batch``. Computed with ``torch.distributions.kl_divergence``
    between one-hot categoricals; exact and differentiable.
    """
    _check_logits(logits)
    q = OneHotCategorical(logits=logits)
    p = OneHotCategorical(logits=torch.zeros_like(logits))
    return kl_divergence(q, p).sum(-1)


def one_hot_configurations(n_latents: int, n_classes: int, *, dtype=None, device=None) -> Tensor:
    """All ``K^N`` joint values of ``N`` one-hot latents: shape ``(K^N, N, K)``, in
    ``itertools.product`` order (the last latent varies fastest)."""
    check_count("n_latents", n_latents, 1)
    check_count("n_classes", n_classes, 2)
    index = torch.tensor(list(itertools.product(range(n_classes), repeat=n_latents)), device=device)
    return F.one_hot(index, n_classes).to(dtype or torch.get_default_dtype())


def enumerate_elbo(log_lik: LogLik, logits: Tensor, *, max_support: int = 100_000) -> Tensor:
    """The exact ELBO (1), ``sum_z q(z | x) log p(x | z) - KL(q || p)``, by enumeration.

    Sums over all ``K^N`` latent values, so it is the reference for small latent spaces;
    differentiable in ``logits`` and in the decoder, so autograd gives the exact gradient.
    Shapes: ``logits (*batch, N, K)``; ``log_lik`` maps ``(K^N, *batch, N, K) -> (K^N, *batch)``;
    returns ``batch``.
    """
    _check_logits(logits)
    n, k = logits.shape[-2:]
    if k**n > max_support:
        raise ValueError(f"enumerate_elbo: K^N = {k}^{n} latent values, more than max_support={max_support}")
    z = one_hot_configurations(n, k, dtype=logits.dtype, device=logits.device)  # (M, N, K)
    batch = logits.shape[:-2]
    z = z.reshape(z.shape[0], *([1] * len(batch)), n, k).expand(z.shape[0], *batch, n, k)
    log_q = _posterior(logits).log_prob(z)  # (M, *batch)
    rec = log_lik(z)  # (M, *batch)
    return (log_q.exp() * rec).sum(0) - kl_to_uniform(logits)


def elbo_estimate(
    log_lik: LogLik,
    logits: Tensor,
    num_samples: int,
    *,
    estimator: str,
    tau: float = 1.0,
    gumbels: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Estimate:
    """A Monte Carlo estimate of the ELBO (1) and of its gradient, one per batch element.

    All three estimators start from the same Gumbel noise ``G_s`` (``gumbels`` of shape
    ``(S, *batch, N, K)``, or drawn from ``generator``), so with the same noise they see the same
    hard codes ``one_hot(argmax(phi + G_s))``, exact draws of ``q(z | x)``. ``value`` (shape
    ``batch``, detached) is ``(1/S) sum_s log p(x | z_s) - KL``: with ``z_s`` the relaxed sample
    for ``"gumbel_softmax"`` (the relaxed objective it climbs) and the hard one otherwise (an
    unbiased estimate of (1)). ``surrogate`` is a scalar, the sum over the batch, whose
    ``.backward()`` gives the estimator's gradient:

    * gumbel_softmax:   grad (1/S) sum_s log p(x | softmax((phi + G_s) / tau)) - grad KL
    * straight_through: the same path with ``one_hot(argmax)`` forward (hard, biased gradient)
    * score_function:   ``(1/S) sum_s (f_s - b_s) grad log q(z_s | x)`` with ``f_s = log p(x | z_s)``
      and the leave-one-out baseline ``b_s = mean_{t != s} f_t`` (needs ``S >= 2``; the surrogate
      of :func:`companion.estimators.score_function`), plus the decoder's own gradient.

    ``tau`` is ignored by the score function. Shapes: ``logits (*batch, N, K)``; ``log_lik``
    maps ``(S, *batch, N, K) -> (S, *batch)``. Chapter *Discrete latent VAE*.
    """
    _check_estimator(estimator)
    _check_logits(logits)
    check_count("num_samples", num_samples, 2 if estimator == "score_function" else 1)
    _check_tau(tau)
    shape = (num_samples, *logits.shape)
    if gumbels is None:
        gumbels = sample_gumbel(shape, generator=generator, dtype=logits.dtype, device=logits.device)
    elif not isinstance(gumbels, Tensor) or tuple(gumbels.shape) != shape:
        got = tuple(gumbels.shape) if isinstance(gumbels, Tensor) else type(gumbels).__name__
        raise ValueError(f"gumbels must have shape (num_samples, *logits.shape) = {shape}, got {got}")
    kl = kl_to_uniform(logits)  # (*batch,)
    if estimator == "score_function":
        z = _one_hot(gumbel_max(logits.detach().expand(shape), gumbels=gumbels), gumbels)  # no path
        rec = _check_rec(log_lik(z), z)  # (S, *batch)
        log_q = _posterior(logits).log_prob(z)  # (S, *batch)
        f = rec.detach()
        b = (f.sum(0, keepdim=True) - f) / (num_samples - 1)  # leave-one-out, independent of z_s
        # value f, gradient grad f + (f - b) grad log q (Williams 1992; Kool et al. 2019)
        surrogate = rec + (f - b) * (log_q - log_q.detach())
        return Estimate(f.mean(0) - kl.detach(), surrogate.mean(0).sum() - kl.sum())
    z = gumbel_softmax(logits.expand(shape), tau, hard=estimator == "straight_through", gumbels=gumbels)
    rec = _check_rec(log_lik(z), z)  # (S, *batch)
    return Estimate(rec.detach().mean(0) - kl.detach(), rec.mean(0).sum() - kl.sum())


def _one_hot(index: Tensor, like: Tensor) -> Tensor:
    """``one_hot(index)`` in the dtype and shape of ``like`` (``F.one_hot`` cannot run under ``vmap``)."""
    return torch.zeros_like(like).scatter(-1, index.unsqueeze(-1), 1.0)


def _check_rec(rec: Tensor, z: Tensor) -> Tensor:
    if not isinstance(rec, Tensor) or rec.shape != z.shape[:-2]:
        got = tuple(rec.shape) if isinstance(rec, Tensor) else type(rec).__name__
        raise ValueError(f"log_lik must map latents {tuple(z.shape)} to shape {tuple(z.shape[:-2])}, got {got}")
    return rec


@torch.no_grad()
def discrete_elbo(
    log_lik: LogLik, logits: Tensor, num_samples: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """The ELBO (1) of the discrete model, estimated with hard samples: shape ``(S, *batch)``.

    Row ``s`` is ``log p(x | z_s) - KL`` with ``z_s`` one-hot, drawn exactly by Gumbel-max; each
    row is an unbiased estimate, so ``mc_summary`` of the result gives the estimate per data
    point and its standard error. This is the yardstick on which the three estimators are
    compared, whatever each one optimized.
    """
    _check_logits(logits)
    check_count("num_samples", num_samples, 1)
    shape = (num_samples, *logits.shape)
    gumbels = sample_gumbel(shape, generator=generator, dtype=logits.dtype, device=logits.device)
    z = F.one_hot(gumbel_max(logits.expand(shape), gumbels=gumbels), logits.shape[-1]).to(logits.dtype)
    return log_lik(z) - kl_to_uniform(logits)


def logit_gradient_samples(
    log_lik: LogLik,
    logits: Tensor,
    num_copies: int,
    num_samples: int,
    *,
    estimator: str,
    tau: float = 1.0,
    gumbels: Tensor | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """``num_copies`` independent gradient estimates of ``sum_batch ELBO`` w.r.t. the logits.

    Copy ``c`` is the gradient of :func:`elbo_estimate`'s surrogate with its own Gumbel noise
    ``G_c`` of shape ``(S, *batch, N, K)``, ``S = num_samples`` samples per data point (as in
    training)::

        g_c = grad_phi surrogate(phi; G_c),    c = 1..C,    shape (C, *batch, N, K).

    ``gumbels`` ``(C, S, *batch, N, K)`` fixes the noise (the same noise for two estimators gives
    common random numbers); otherwise it is drawn from ``generator``. ``log_lik`` is that of
    :func:`elbo_estimate`, ``(S, *batch, N, K) -> (S, *batch)``; the decoder inside it is held
    fixed. Computed by :func:`companion.estimators.per_sample_gradients` (one ``vmap`` over
    ``grad``, ``chunk_size`` copies at a time). The exact gradient is the autograd gradient of
    :func:`enumerate_elbo`; the mean and variance of these samples measure bias and variance
    (:func:`bias_variance`).
    """
    _check_estimator(estimator)
    _check_logits(logits)
    check_count("num_copies", num_copies, 1)
    check_count("num_samples", num_samples, 2 if estimator == "score_function" else 1)
    _check_tau(tau)
    shape = (num_copies, num_samples, *logits.shape)
    if gumbels is None:
        gumbels = sample_gumbel(shape, generator=generator, dtype=logits.dtype, device=logits.device)
    elif not isinstance(gumbels, Tensor) or tuple(gumbels.shape) != shape:
        got = tuple(gumbels.shape) if isinstance(gumbels, Tensor) else type(gumbels).__name__
        raise ValueError(f"gumbels must have shape (num_copies, num_samples, *logits.shape) = {shape}, got {got}")

    def program(phi: Tensor, g: Tensor) -> Tensor:
        return elbo_estimate(log_lik, phi, num_samples, estimator=estimator, tau=tau, gumbels=g).surrogate

    return per_sample_gradients(program, logits.detach(), gumbels, chunk_size=chunk_size)


class BiasVariance(NamedTuple):
    """Squared bias ``||E g - g*||^2`` and total variance ``tr Cov g`` of a gradient estimator,
    each with the standard error of its estimate."""

    squared_bias: float
    squared_bias_stderr: float
    variance: float
    variance_stderr: float


def bias_variance(samples: Tensor, exact: Tensor, *, groups: int = 20) -> BiasVariance:
    """Squared bias and total variance of gradient estimates ``samples (C, *shape)`` against ``exact``.

    The ``C`` estimates are split into ``groups`` independent groups of ``n``. In each, with
    ``d_i = g_i - g*``, the squared bias is estimated without its noise floor by the U-statistic

        ||E g - g*||^2 ~= (||sum_i d_i||^2 - sum_i ||d_i||^2) / (n (n - 1)),

    (unbiased: the cross terms ``d_i . d_j``, ``i != j``, have mean ``||E g - g*||^2``) and the total
    variance ``sum_p Var g_p`` by the unbiased sample variances. Each value is the mean over the
    groups and its standard error the groups' spread, ``std / sqrt(groups)``.
    """
    if not isinstance(groups, int) or groups < 2 or samples.shape[0] < 2 * groups:
        raise ValueError(f"groups must be an int >= 2 with at least 2 samples each, got groups={groups!r} "
                         f"for {samples.shape[0]} samples")
    if samples.shape[1:] != exact.shape:
        raise ValueError(f"exact must have shape {tuple(samples.shape[1:])}, got {tuple(exact.shape)}")
    n = samples.shape[0] // groups
    d = (samples[: groups * n] - exact).reshape(groups, n, -1).double()  # (G, n, P)
    sq_bias = ((d.sum(1) ** 2).sum(-1) - (d**2).sum((1, 2))) / (n * (n - 1))  # (G,)
    variance = d.var(1).sum(-1)  # (G,)
    b, v = mc_summary(sq_bias), mc_summary(variance)
    return BiasVariance(b.mean.item(), b.stderr.item(), v.mean.item(), v.stderr.item())


# --------------------------------------------------------------------------- the model


class DiscreteVAE(nn.Module):
    """Encoder ``x -> phi (N, K)`` and Bernoulli decoder ``z (N K) -> logits of x``, both MLPs.

    x_dim:     pixels per image (64 for the 8x8 digits, 784 for MNIST);
    n_latents: ``N`` categorical latents (20 in Jang et al. 2017);
    n_classes: ``K`` classes each (10 in Jang et al. 2017);
    hidden:    encoder widths; the decoder mirrors them (512-256 in Jang et al. for MNIST).
    """

    def __init__(self, x_dim: int, n_latents: int = 20, n_classes: int = 10, hidden: tuple[int, ...] = (256, 128)):
        super().__init__()
        check_count("x_dim", x_dim, 1)
        check_count("n_latents", n_latents, 1)
        check_count("n_classes", n_classes, 2)
        hidden = tuple(hidden)
        if not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden):
            raise ValueError(f"hidden must be a tuple of positive ints, got {hidden!r}")
        self.x_dim, self.n_latents, self.n_classes = x_dim, n_latents, n_classes
        self.encoder = mlp([x_dim, *hidden, n_latents * n_classes])
        self.decoder = mlp([n_latents * n_classes, *reversed(hidden), x_dim])

    def _check_x(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.x_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (*batch, {self.x_dim}), got {shape}")
        return x

    def encode(self, x: Tensor) -> Tensor:
        """Logits ``phi`` of ``q(z | x)``: ``(*batch, D) -> (*batch, N, K)``."""
        return self.encoder(self._check_x(x)).unflatten(-1, (self.n_latents, self.n_classes))

    def decode(self, z: Tensor) -> Tensor:
        """Bernoulli logits of ``p(x | z)``: ``(*batch, N, K) -> (*batch, D)``; ``z`` one-hot or relaxed."""
        if z.shape[-2:] != (self.n_latents, self.n_classes):
            raise ValueError(f"z must have shape (*batch, {self.n_latents}, {self.n_classes}), got {tuple(z.shape)}")
        return self.decoder(z.flatten(-2))

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """``log p(x | z) = sum_d log Bernoulli(x_d; sigmoid(dec(z))_d)``: ``z (..., N, K)``, ``x (*batch, D)``
        broadcast against ``z``'s leading dimensions; returns ``z.shape[:-2]``."""
        return Independent(Bernoulli(logits=self.decode(z)), 1).log_prob(x)

    def elbo_estimate(self, x: Tensor, num_samples: int, *, estimator: str, tau: float = 1.0,
                      generator: torch.Generator | None = None) -> Estimate:
        """:func:`elbo_estimate` for this model and the data ``x (B, D)``: value ``(B,)``."""
        return elbo_estimate(lambda z: self.log_likelihood(x, z), self.encode(x), num_samples,
                             estimator=estimator, tau=tau, generator=generator)

    def enumerate_elbo(self, x: Tensor) -> Tensor:
        """:func:`enumerate_elbo`, the exact ELBO of each row of ``x``: ``(B,)``."""
        return enumerate_elbo(lambda z: self.log_likelihood(x, z), self.encode(x))

    def discrete_elbo(self, x: Tensor, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        """:func:`discrete_elbo`: hard-sample estimates of the ELBO, ``(S, B)``."""
        return discrete_elbo(lambda z: self.log_likelihood(x, z), self.encode(x), num_samples, generator=generator)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Pixel probabilities ``sigmoid(dec(z))`` for one hard sample ``z ~ q(z | x)``: ``(B, D)``."""
        logits = self.encode(x)
        z = F.one_hot(gumbel_max(logits, generator=generator), self.n_classes).to(logits.dtype)
        return torch.sigmoid(self.decode(z))

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Pixel probabilities for ``n`` latents drawn from the uniform prior: ``(n, D)``."""
        check_count("n", n, 1)
        weight = self.decoder[0].weight
        index = torch.randint(self.n_classes, (n, self.n_latents), generator=generator, device=weight.device)
        return torch.sigmoid(self.decode(F.one_hot(index, self.n_classes).to(weight.dtype)))


def make_loss(
    estimator: str, *, num_samples: int, tau: float | Callable[[int], float] = 1.0
) -> Callable[[DiscreteVAE, Tensor], Tensor]:
    """A ``loss_fn(model, x, step)`` for :func:`companion.train.train`: minus the ELBO surrogate per data point.

    ``tau`` is a number or a schedule ``tau(step)`` (e.g. ``lambda t: exponential_annealing(t, r)``);
    ``train`` passes the optimizer step, so a resumed run continues the schedule where it stopped.
    """
    _check_estimator(estimator)
    check_count("num_samples", num_samples, 2 if estimator == "score_function" else 1)
    if not callable(tau):
        _check_tau(tau)

    def loss_fn(model: DiscreteVAE, x: Tensor, step: int = 0) -> Tensor:
        temperature = tau(step) if callable(tau) else tau
        est = model.elbo_estimate(x, num_samples, estimator=estimator, tau=temperature)
        return -est.surrogate / x.shape[0]

    return loss_fn
