"""A variational autoencoder with a Gaussian encoder, trained by pathwise or score-function gradients.

Chapter *Variational autoencoders*; Kingma and Welling (2014), Rezende, Mohamed and Wierstra
(2014). The generative model and the amortized posterior are

    p(z) = N(0, I),     p_theta(x | z) = Bernoulli(logits = dec(z))   or   N(dec(z), s^2 I),
    q_phi(z | x) = N(mu_phi(x), diag sigma_phi(x)^2),    z = mu + sigma * eps,  eps ~ N(0, I),

and both networks are trained by maximizing the evidence lower bound of each data point,

    ELBO(x) = E_q[log p(x | z)] - KL(q(z | x) || p(z))
            = E_q[log p(x | z) + log p(z) - log q(z | x)]  =  log p(x) - KL(q(z | x) || p(z | x)).

The KL term has a closed form for Gaussians (:func:`elbo_analytic_kl`); it can also be
estimated at the sample, ``log q(z | x) - log p(z)`` (:func:`elbo_monte_carlo_kl`). The gradient
of the reconstruction term ``E_q[log p(x | z)]`` with respect to the encoder is estimated either
through the sample (pathwise) or by the score function with a leave-one-out baseline
(:func:`elbo_estimate`); the decoder's gradient is the ordinary one in both cases.

Shapes: ``x`` is ``(B, x_dim)``; ``z`` and ``eps`` are ``(S, B, z_dim)``, ``S`` samples per data
point; per-datapoint ELBOs are ``(B,)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence
from torch.nn import functional as F

from ..estimators import Estimate, _check_num_samples, pathwise, per_sample_gradients, score_function
from ..runtime import rng
from .layers import mlp

__all__ = [
    "LIKELIHOODS",
    "VAEConfig",
    "VAE",
    "ESTIMATORS",
    "reparameterize",
    "elbo_analytic_kl",
    "kl_standard_normal",
    "elbo_monte_carlo_kl",
    "elbo_estimate",
    "loss",
    "evaluate_elbo",
    "reconstruct",
    "encoder_gradient_draws",
]

LIKELIHOODS = ("bernoulli", "gaussian")
ESTIMATORS = ("pathwise", "score_function")


@dataclass(frozen=True)
class VAEConfig:
    """Sizes of the VAE; the defaults fit scikit-learn's 8x8 digits on a CPU in seconds."""

    x_dim: int = 64  # 8 x 8 pixels, flattened (784 for MNIST)
    z_dim: int = 8  # enough for digits' ten classes and their styles; 2 for a picture of the latent space
    hidden: tuple[int, ...] = (128,)  # one hidden layer: a few milliseconds per step on a CPU
    likelihood: str = "bernoulli"  # binarized pixels; "gaussian" for real-valued data
    init_log_scale: float = 0.0  # Gaussian decoder: log s at the start (s is learned)

    def __post_init__(self) -> None:
        for name in ("x_dim", "z_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.hidden, tuple) or any(
            isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden
        ):
            raise ValueError(f"hidden must be a tuple of positive ints, got {self.hidden!r}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")


class VAE(nn.Module):
    """Encoder ``x -> (mu, log sigma)`` and decoder ``z -> logits`` (or means), both :func:`mlp`.

    ``encode(x)`` returns ``q(z | x)`` and ``decode(z)`` returns ``p(x | z)`` as
    ``torch.distributions`` with the latent or pixel dimension as event dimension, so that
    ``log_prob`` sums over it: ``encode(x).log_prob(z)`` is ``(S, B)`` for ``z`` of shape
    ``(S, B, z_dim)``.
    """

    def __init__(self, config: VAEConfig = VAEConfig()) -> None:
        super().__init__()
        if not isinstance(config, VAEConfig):
            raise ValueError(f"config must be a VAEConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = mlp([config.x_dim, *config.hidden, 2 * config.z_dim])
        self.decoder = mlp([config.z_dim, *reversed(config.hidden), config.x_dim])
        if config.likelihood == "gaussian":
            self.log_scale = nn.Parameter(torch.tensor(float(config.init_log_scale)))

    def encoder_params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu(x), log sigma(x))``, the encoder's outputs: ``(B, z_dim)`` each."""
        _check_x(self, x)
        return self.encoder(x).chunk(2, dim=-1)

    def encode(self, x: Tensor) -> Independent:
        """``q(z | x) = N(mu(x), diag sigma(x)^2)``: batch shape ``(B,)``, event shape ``(z_dim,)``."""
        mu, log_sigma = self.encoder_params(x)  # (B, z_dim) each
        return Independent(Normal(mu, log_sigma.exp()), 1)

    def decode(self, z: Tensor) -> Independent:
        """``p(x | z)``: Bernoulli with logits ``dec(z)`` or Normal with mean ``dec(z)``, event ``(x_dim,)``."""
        _check_z(self, z)
        out = self.decoder(z)  # (..., x_dim)
        if self.config.likelihood == "bernoulli":
            return Independent(Bernoulli(logits=out), 1)
        return Independent(Normal(out, self.log_scale.exp()), 1)

    def log_likelihood(self, z: Tensor, x: Tensor) -> Tensor:
        """``log p(x | z) = decode(z).log_prob(x)``: ``(S, B)`` for ``z`` ``(S, B, z_dim)``, ``x`` ``(B, x_dim)``.

        The same numbers from the decoder's output directly, without the distribution objects
        (their argument checks and broadcasting views cost a tenth of a training step): for the
        Bernoulli decoder ``-binary_cross_entropy_with_logits`` summed over pixels, which is what
        ``Bernoulli.log_prob`` computes. The pixels must be 0 or 1 (a ``ValueError`` otherwise,
        as torch's support check would raise).
        """
        _check_z(self, z)
        out = self.decoder(z)  # (..., x_dim)
        if self.config.likelihood == "gaussian":
            return Normal(out, self.log_scale.exp(), validate_args=False).log_prob(x).sum(-1)
        if not torch.equal(x * x, x):  # x^2 = x exactly when every pixel is 0 or 1
            raise ValueError("x must be binary (0 or 1) for the Bernoulli decoder: binarize it first")
        return -F.binary_cross_entropy_with_logits(out, x.expand_as(out), reduction="none").sum(-1)

    def prior(self) -> Independent:
        """``p(z) = N(0, I)`` on the model's device and dtype: event shape ``(z_dim,)``."""
        ref = next(self.parameters())
        zeros = torch.zeros(self.config.z_dim, dtype=ref.dtype, device=ref.device)
        return Independent(Normal(zeros, torch.ones_like(zeros)), 1)


def _shape(x) -> object:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def _check_z(model: VAE, z: Tensor) -> None:
    if not isinstance(z, Tensor) or z.shape[-1:] != (model.config.z_dim,):
        raise ValueError(f"z must have last dimension z_dim={model.config.z_dim}, got {_shape(z)}")


def _check_x(model: VAE, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != model.config.x_dim:
        raise ValueError(f"x must have shape (batch, x_dim={model.config.x_dim}), got {_shape(x)}")


def _check_model(model: VAE) -> VAE:
    if not isinstance(model, VAE):
        raise ValueError(f"model must be a VAE, got {type(model).__name__}")
    return model


# --------------------------------------------------------------------------- the ELBO


def reparameterize(
    mu: Tensor,
    sigma: Tensor,
    num_samples: int | None = 1,
    *,
    eps: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``z_s = mu + sigma * eps_s`` with ``eps_s ~ N(0, I)``: shape ``(S, *mu.shape)``.

    ``eps`` of shape ``(S, *mu.shape)`` fixes the noise; otherwise it is drawn from
    ``generator`` (through :func:`companion.runtime.rng`, the stream ``Normal.rsample`` uses),
    or from torch's global generator. Gradients flow to ``mu`` and ``sigma`` (Kingma and
    Welling 2014, sec. 2.4). ``sigma`` is not checked for positivity here (that would cost a
    device synchronization per step); the encoder makes it ``exp(log sigma)``.
    ``num_samples=None`` is one draw without the sample dimension (shape ``mu.shape``, the same
    numbers as ``num_samples=1``), as ``rsample()`` without a sample shape.
    """
    if num_samples is not None:
        _check_num_samples(num_samples)
    # torch.broadcast_shapes costs 25 us (Python): only when the shapes differ
    batch = mu.shape if sigma.shape == mu.shape else torch.broadcast_shapes(mu.shape, sigma.shape)
    shape = (*(() if num_samples is None else (num_samples,)), *batch)
    if eps is None and generator is None:
        eps = torch.randn(shape, dtype=mu.dtype, device=mu.device)
    elif eps is None:
        with rng(generator):
            eps = torch.randn(shape, dtype=mu.dtype, device=mu.device)
    elif tuple(eps.shape) != shape:
        raise ValueError(f"eps must have shape {shape} (num_samples, *mu.shape), got {tuple(eps.shape)}")
    return mu + sigma * eps  # (S, B, z_dim)


def _sample_terms(model, x, num_samples, eps, generator):
    """q(z | x), z (S, B, z_dim) and log p(x | z) (S, B), z reparameterized."""
    _check_model(model)
    q = model.encode(x)  # batch (B,), event (z_dim,)
    z = reparameterize(q.base_dist.loc, q.base_dist.scale, num_samples, eps=eps, generator=generator)
    return q, z, model.log_likelihood(z, x)  # (S, B)


def elbo_analytic_kl(
    model: VAE,
    x: Tensor,
    *,
    num_samples: int = 1,
    eps: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-datapoint ELBO with the KL term in closed form: shape ``(B,)``, differentiable.

    ``ELBO(x) ~= (1/S) sum_s log p(x | z_s) - KL(q(z | x) || p(z))``, ``z_s = mu + sigma eps_s``,
    where ``KL = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2)`` (Kingma and Welling 2014,
    appendix B; :func:`kl_standard_normal`). The pathwise estimator of the training loss
    (:func:`loss`), written out: no distribution objects on the hot path.
    """
    mu, log_sigma = _check_model(model).encoder_params(x)  # (B, z_dim) each
    # one draw per data point (the default): no sample dimension, whose broadcasts cost a tenth
    # of a training step; the same numbers as with it
    one = num_samples == 1 and eps is None
    z = reparameterize(mu, log_sigma.exp(), None if one else num_samples, eps=eps, generator=generator)
    log_likelihood = model.log_likelihood(z, x)  # (B,), or (S, B)
    return (log_likelihood if one else log_likelihood.mean(0)) - kl_standard_normal(mu, log_sigma)


def kl_standard_normal(mu: Tensor, log_sigma: Tensor) -> Tensor:
    """``KL(N(mu, diag sigma^2) || N(0, I)) = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1) - sum_j log sigma_j``.

    mu, log_sigma: ``(..., z_dim)``; returns ``(...)``. Equal to
    ``kl_divergence(Independent(Normal(mu, sigma), 1), Independent(Normal(0, 1), 1))`` to rounding
    (``tests/test_vae.py``), without building the three distributions.
    """
    return 0.5 * (mu.square() + (2 * log_sigma).exp() - 1).sum(-1) - log_sigma.sum(-1)


def elbo_monte_carlo_kl(
    model: VAE,
    x: Tensor,
    *,
    num_samples: int = 1,
    eps: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-datapoint ELBO with the KL term estimated at the samples: shape ``(B,)``, differentiable.

    ``ELBO(x) ~= (1/S) sum_s [log p(x | z_s) + log p(z_s) - log q(z_s | x)]`` (Kingma and Welling
    2014, eq. 6): the same expectation as :func:`elbo_analytic_kl`, with more variance.
    """
    q, z, log_likelihood = _sample_terms(model, x, num_samples, eps, generator)
    return (log_likelihood + model.prior().log_prob(z) - q.log_prob(z)).mean(0)  # (B,)


def elbo_estimate(
    model: VAE,
    x: Tensor,
    *,
    estimator: str = "pathwise",
    num_samples: int = 1,
    baseline: object = "mean",
    eps: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Estimate:
    """The ELBO of each data point and a surrogate whose gradient is the chosen estimator.

    ``ELBO(x) = E_q[log p(x | z)] - KL(q || p)``. The KL term is exact (closed form). The
    gradient of the reconstruction term reaches the encoder either

    * ``"pathwise"``: through ``z = mu + sigma eps`` (:func:`companion.estimators.pathwise`), or
    * ``"score_function"``: as ``E[(log p(x | z) - b) grad_phi log q(z | x)]`` with ``z`` drawn
      without a graph (:func:`companion.estimators.score_function`); ``baseline="mean"`` is the
      leave-one-out mean over the ``S`` samples of each data point (Kool et al. 2019), which
      needs ``num_samples >= 2``.

    The decoder's gradient ``E_q[grad_theta log p(x | z)]`` is the same for both. ``value``:
    ``(B,)``, detached; ``surrogate``: a scalar, the sum over the batch. ``eps`` of shape
    ``(S, B, z_dim)`` fixes the noise, ``z = mu + sigma eps`` (common random numbers: the two
    estimators then see the same ``z``); otherwise it is drawn from ``generator``.
    """
    _check_model(model)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    q = model.encode(x)  # batch (B,), event (z_dim,)

    def log_likelihood(z: Tensor) -> Tensor:  # (S, B, z_dim) -> (S, B)
        return model.log_likelihood(z, x)

    if estimator == "pathwise":
        est = pathwise(log_likelihood, q, num_samples, generator=generator, eps=eps)
    else:
        est = score_function(log_likelihood, q, num_samples, baseline=baseline, generator=generator, eps=eps)
    kl = kl_divergence(q, model.prior())  # (B,)
    return Estimate(est.value - kl.detach(), est.surrogate - kl.sum())


def loss(
    model: VAE,
    x: Tensor,
    *,
    estimator: str = "pathwise",
    num_samples: int = 1,
    baseline: object = "mean",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``-(1/B) sum_b ELBO(x_b)`` as a surrogate for :func:`companion.train.train`.

    Use ``functools.partial(loss, estimator="score_function", num_samples=4)`` as ``loss_fn``.
    The pathwise loss is ``-elbo_analytic_kl(...).mean()``: the same estimator and the same
    draws as :func:`elbo_estimate` with ``estimator="pathwise"``, without its generic machinery
    (the training step's hot path; ``benchmarks/training.py`` times it).
    """
    if estimator == "pathwise":
        return -elbo_analytic_kl(model, x, num_samples=num_samples, generator=generator).mean()
    est = elbo_estimate(model, x, estimator=estimator, num_samples=num_samples, baseline=baseline,
                        generator=generator)
    return -est.surrogate / x.shape[0]


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_elbo(
    model: VAE,
    x: Tensor,
    *,
    num_samples: int = 16,
    batch_size: int = 1024,
    generator: torch.Generator | None = None,
) -> float:
    """The mean per-datapoint ELBO of ``x`` (nats), with the analytic KL and ``S`` samples each.

    Computed in chunks of ``batch_size`` rows on the model's device, with the model in eval
    mode. Pass the same ``generator`` seed to compare models with the same noise (common random
    numbers), as chapter *Variational autoencoders* and ``benchmarks/training.py`` do.
    """
    _check_model(model)
    _check_x(model, x)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    ref = next(model.parameters())
    was_training = model.training
    model.eval()
    total = 0.0
    for chunk in x.split(batch_size):
        chunk = chunk.to(ref.device, ref.dtype)
        total += elbo_analytic_kl(model, chunk, num_samples=num_samples, generator=generator).sum().item()
    model.train(was_training)
    return total / x.shape[0]


@torch.no_grad()
def reconstruct(model: VAE, x: Tensor) -> Tensor:
    """The decoder's mean at the encoder's mean, ``E[x | z = mu(x)]``: shape ``(B, x_dim)``.

    For a Bernoulli decoder these are pixel probabilities ``sigmoid(dec(mu(x)))``.
    """
    _check_model(model)
    return model.decode(model.encode(x).base_dist.loc).mean


# --------------------------------------------------------------------------- gradient noise


def encoder_gradient_draws(
    objective: Callable[[VAE, Tensor, Tensor], Tensor],
    model: VAE,
    x: Tensor,
    eps: Tensor,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """One gradient of ``objective`` w.r.t. the encoder's weights per noise draw: ``(R, P)``.

    ``objective(model, x, eps_r)`` returns a scalar for *one* draw ``eps_r`` of shape
    ``(S, B, z_dim)``, e.g. ``lambda m, x, e: elbo_analytic_kl(m, x, num_samples=S, eps=e).mean()``
    or the ``surrogate`` of :func:`elbo_estimate` with ``eps=e``. ``eps`` holds ``R`` draws,
    ``(R, S, B, z_dim)``; row ``r`` of the result is the gradient at draw ``r``, flattened over
    the encoder's ``P`` parameters (in ``model.encoder.named_parameters()`` order)::

        g_r = grad_phi objective(model_phi, x, eps_r),    r = 1..R.

    The draws are independent, so their covariance is the estimator's (chapter *Variational
    autoencoders* compares its trace across estimators); the same ``eps`` for two objectives
    gives common random numbers. Computed by :func:`companion.estimators.per_sample_gradients`
    (one ``vmap`` over ``grad``, ``chunk_size`` draws at a time), with the encoder's parameters
    passed to ``objective`` through ``torch.func.functional_call``; the decoder is held fixed.
    """
    _check_model(model)
    _check_x(model, x)
    if not callable(objective):
        raise ValueError(f"objective must be callable, got {type(objective).__name__}")
    shape = (model.config.z_dim,)
    if not isinstance(eps, Tensor) or eps.dim() != 4 or eps.shape[0] < 2 or eps.shape[2:] != (x.shape[0], *shape):
        raise ValueError(
            f"eps must have shape (R, S, B={x.shape[0]}, z_dim={shape[0]}) with R >= 2 draws, got {_shape(eps)}"
        )
    bound = _Bound(objective, model)
    params = {f"model.encoder.{name}": p for name, p in model.encoder.named_parameters()}

    def program(p: dict[str, Tensor], e: Tensor) -> Tensor:
        return torch.func.functional_call(bound, p, (x, e))

    grads = per_sample_gradients(program, params, eps, chunk_size=chunk_size)
    return torch.cat([g.reshape(eps.shape[0], -1) for g in grads.values()], dim=1)  # (R, P)


class _Bound(nn.Module):
    """``objective(model, x, eps)`` as a module call, so ``functional_call`` can swap the model's weights."""

    def __init__(self, objective: Callable[[VAE, Tensor, Tensor], Tensor], model: VAE) -> None:
        super().__init__()
        self.objective, self.model = objective, model

    def forward(self, x: Tensor, eps: Tensor) -> Tensor:
        return self.objective(self.model, x, eps)
