"""Bayesian layers with factorized Gaussian weights, sampled four ways.

Chapter *Bayesian layers and local reparameterization*. Every weight is Gaussian and independent,
``W_oi ~ N(weight_loc_oi, weight_scale_oi^2)``; the bias is an ordinary (deterministic) parameter.
The layers differ only in how a minibatch of ``B`` rows draws its weights (``mode``):

``"local"``
    local reparameterization (Kingma, Salimans and Welling 2015): the pre-activation of row ``n``
    is Gaussian given ``x_n``, so it is drawn directly,
    ``b_n = x_n mu^T + bias + sqrt(x_n^2 (s^2)^T) * eps_n``, one independent draw per row;
``"per_example"``
    one independent weight matrix ``W_n = mu + s * E_n`` per row (the exact, slow reference);
``"shared"``
    one weight matrix for the whole minibatch (Bayes by backprop as usually implemented,
    Blundell et al. 2015);
``"flipout"``
    one shared perturbation ``Delta = s * E``, decorrelated across rows by random signs,
    ``W_n = mu + Delta * (r_n s_n^T)`` with ``r_n``, ``s_n`` in ``{-1, 1}`` (Wen et al. 2018).

For one row all four modes give the pre-activation the same law (mean ``x mu^T + bias``, variance
``x^2 (s^2)^T``); they differ in how rows co-vary, and hence in the variance of minibatch gradients
and in cost. In eval mode every layer returns the mean ``x mu^T + bias``.

The module also holds the small networks and the evaluation used by the chapter: a Bayesian MLP
and CNN, the negative ELBO, minibatch gradients of a network in any mode (via
:func:`companion.estimators.per_sample_gradients`), Monte Carlo predictive probabilities,
expected calibration error and a reliability curve, and a paired bootstrap interval.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..estimators import per_sample_gradients
from .._checks import check_count

__all__ = [
    "MODES",
    "BayesLayer",
    "BayesLinear",
    "BayesConv2d",
    "BayesMLP",
    "ConvClassifier",
    "gaussian_kl",
    "negative_elbo",
    "minibatch_gradients",
    "variance_terms",
    "predictive_probs",
    "predictive_entropy",
    "expected_calibration_error",
    "Reliability",
    "reliability_curve",
    "bootstrap_interval",
]

MODES = ("local", "per_example", "shared", "flipout")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))  # log(exp(y) - 1), stable for large y


def _signs(shape, generator, like: Tensor) -> Tensor:
    bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return (2 * bits - 1).to(like.dtype)


def _std(variance: Tensor) -> Tensor:
    # sqrt(max(v, tiny)): exact wherever v > 0; where a whole receptive field is zero (v = 0), the
    # clamp gives the correct zero derivative instead of sqrt's infinite one (0 * inf = nan)
    return variance.clamp_min(torch.finfo(variance.dtype).tiny).sqrt()


def gaussian_kl(loc: Tensor, scale: Tensor, prior_scale: float) -> Tensor:
    """``sum KL(N(loc, scale^2) || N(0, prior_scale^2))`` over all elements::

        KL = log(p / s) + (s^2 + mu^2) / (2 p^2) - 1/2     per element.

    A scalar; equal to ``torch.distributions.kl_divergence`` of the two Normals, summed.
    """
    p2 = prior_scale**2
    return (math.log(prior_scale) - scale.log() + (scale**2 + loc**2) / (2 * p2) - 0.5).sum()


class BayesLayer(nn.Module):
    """What :class:`BayesLinear` and :class:`BayesConv2d` share: the Gaussian weights and their prior.

    Parameters ``weight_loc`` (the means ``mu``) and ``weight_rho`` (``s = softplus(rho)``), a
    deterministic ``bias``; the attributes ``mode`` (one of :data:`MODES`, settable),
    ``prior_scale`` and ``weight_scale``; and :meth:`kl`, the exact KL to the prior
    ``N(0, prior_scale^2)`` on every weight. The initial means are those of ``nn.Linear`` and
    ``nn.Conv2d`` (uniform on ``+-1/sqrt(fan_in)``), the initial scales ``init_scale``.
    """

    def __init__(self, weight_shape: tuple[int, ...], out_features: int, fan_in: int, mode: str,
                 prior_scale: float, init_scale: float) -> None:
        super().__init__()
        self.mode = mode
        self.prior_scale = _check_positive("prior_scale", prior_scale)
        init_scale = _check_positive("init_scale", init_scale)
        self.weight_loc = nn.Parameter(torch.empty(weight_shape))
        self.weight_rho = nn.Parameter(torch.full(weight_shape, _inverse_softplus(init_scale)))
        self.bias = nn.Parameter(torch.empty(out_features))
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight_loc, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    @property
    def mode(self) -> str:
        """How a minibatch draws its weights: one of :data:`MODES`."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = _check_mode(value)

    @property
    def weight_scale(self) -> Tensor:
        """The standard deviations ``s = softplus(weight_rho)`` of the weights, positive."""
        return F.softplus(self.weight_rho)

    def kl(self) -> Tensor:
        """``KL(q(W) || p(W))`` to the prior ``N(0, prior_scale^2)`` on every weight (a scalar)."""
        return gaussian_kl(self.weight_loc, self.weight_scale, self.prior_scale)

    def _check_input(self, x: Tensor, dim: int, name: str) -> None:
        if not isinstance(x, Tensor) or x.dim() != dim or x.shape[1] != self.weight_loc.shape[1]:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape {name}, got {shape}")
        if x.dtype != self.weight_loc.dtype:
            raise ValueError(f"x must have dtype {self.weight_loc.dtype} (the layer's), got {x.dtype}")

    def _check_noise(self, noise, shapes: tuple[tuple[int, ...], ...]) -> tuple[Tensor, ...]:
        if not isinstance(noise, (tuple, list)) or len(noise) != len(shapes) or any(
            not isinstance(e, Tensor) or tuple(e.shape) != s for e, s in zip(noise, shapes)
        ):
            got = [tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__ for e in noise] \
                if isinstance(noise, (tuple, list)) else type(noise).__name__
            raise ValueError(f"noise for mode {self.mode!r} must be tensors of shapes {list(shapes)}, got {got}")
        return tuple(noise)


class BayesLinear(BayesLayer):
    """A linear layer with Gaussian weights ``W ~ N(weight_loc, weight_scale^2)`` elementwise.

    ``weight_loc`` and ``weight_rho`` have shape ``(out, in)``; ``weight_scale = softplus(weight_rho)``;
    ``bias`` ``(out,)`` is deterministic. ``forward(x)`` with ``x`` of shape ``(B, in)`` returns
    ``(B, out)``: in training mode a draw according to ``mode`` (see the module docstring), in
    eval mode the mean ``x weight_loc^T + bias``. Local reparameterization draws

    ::

        b = x mu^T + bias + sqrt(x^2 (s^2)^T) * eps,     eps ~ N(0, I)  of shape (B, out).

    noise
        The standard-normal and sign draws of one call, as returned by :meth:`sample_noise`
        (explicit noise makes the layer a pure function, e.g. for ``torch.func``); drawn from
        ``generator`` if ``None``.

    Chapter *Bayesian layers and local reparameterization*; Kingma et al. (2015), Wen et al. (2018).
    """

    def __init__(self, in_features: int, out_features: int, *, mode: str = "local",
                 prior_scale: float = 1.0, init_scale: float = 0.05) -> None:
        check_count("in_features", in_features)
        check_count("out_features", out_features)
        super().__init__((out_features, in_features), out_features, in_features, mode,
                         prior_scale, init_scale)
        self.in_features, self.out_features = in_features, out_features

    def noise_shapes(self, batch_size: int) -> tuple[tuple[int, ...], ...]:
        """The shapes of the noise tensors of one call on ``batch_size`` rows, in this mode."""
        b, o, i = batch_size, self.out_features, self.in_features
        return {"local": ((b, o),), "per_example": ((b, o, i),), "shared": ((o, i),),
                "flipout": ((o, i), (b, i), (b, o))}[self.mode]

    def sample_noise(self, batch_size: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        """Fresh noise for one call: standard normals, and for ``"flipout"`` the two sign tensors."""
        check_count("batch_size", batch_size)
        shapes, like = self.noise_shapes(batch_size), self.weight_loc
        eps = torch.randn(shapes[0], generator=generator, dtype=like.dtype, device=like.device)
        if self.mode != "flipout":
            return (eps,)
        return (eps, _signs(shapes[1], generator, like), _signs(shapes[2], generator, like))

    def forward(self, x: Tensor, *, noise: Sequence[Tensor] | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        self._check_input(x, 2, f"(B, {self.in_features})")
        mean = F.linear(x, self.weight_loc, self.bias)  # (B, out)
        if not self.training:
            return mean
        b = x.shape[0]
        noise = self.sample_noise(b, generator=generator) if noise is None else self._check_noise(
            noise, self.noise_shapes(b))
        s = self.weight_scale
        if self.mode == "local":
            return mean + _std(F.linear(x**2, s**2)) * noise[0]
        if self.mode == "per_example":  # W_n - mu = s * E_n, one (out, in) matrix per row
            return mean + torch.einsum("boi,bi->bo", s * noise[0], x)
        if self.mode == "shared":
            return mean + F.linear(x, s * noise[0])
        eps, sign_in, sign_out = noise  # flipout
        return mean + F.linear(x * sign_in, s * eps) * sign_out


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value) \
        if isinstance(value, (tuple, list)) else None
    if pair is None or len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


class BayesConv2d(BayesLayer):
    """A 2-D convolution with Gaussian kernels ``W ~ N(weight_loc, weight_scale^2)`` elementwise.

    ``weight_loc`` and ``weight_rho`` have shape ``(out, in, kh, kw)``; ``bias`` ``(out,)`` is
    deterministic. ``forward(x)`` with ``x`` of shape ``(B, in, H, W)`` returns ``(B, out, H', W')``.
    Each output pixel is a weighted sum of a patch of ``x``, so with independent Gaussian weights it
    is Gaussian too, and local reparameterization draws it directly::

        b = conv(x, mu) + bias + sqrt(conv(x^2, s^2)) * eps,     eps ~ N(0, I)  (B, out, H', W').

    ``"per_example"`` draws one kernel per row (a grouped convolution), ``"shared"`` one kernel for
    the minibatch, ``"flipout"`` one shared perturbation with per-row signs on the input and output
    channels (Wen et al. 2018). Eval mode returns ``conv(x, mu) + bias``. ``noise`` and
    ``generator`` as in :class:`BayesLinear`.

    Chapter *Bayesian layers and local reparameterization*; Kingma et al. (2015).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], *,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 mode: str = "local", prior_scale: float = 1.0, init_scale: float = 0.05) -> None:
        check_count("in_channels", in_channels)
        check_count("out_channels", out_channels)
        kh, kw = _pair(kernel_size, "kernel_size")
        self.stride, self.padding = _pair(stride, "stride"), _pair(padding, "padding")
        if kh < 1 or kw < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError("kernel_size and stride must be positive and padding non-negative, got "
                             f"{kernel_size!r}, {stride!r}, {padding!r}")
        super().__init__((out_channels, in_channels, kh, kw), out_channels, in_channels * kh * kw,
                         mode, prior_scale, init_scale)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(H', W')`` for an input of ``(H, W)``: ``floor((H + 2 p - k) / stride) + 1``."""
        return tuple((n + 2 * p - k) // s + 1 for n, p, k, s in
                     zip((height, width), self.padding, self.kernel_size, self.stride))

    def noise_shapes(self, input_shape: Sequence[int]) -> tuple[tuple[int, ...], ...]:
        """The shapes of the noise tensors of one call on an input of ``input_shape``, in this mode."""
        b, _, h, w = input_shape
        o, i, (kh, kw) = self.out_channels, self.in_channels, self.kernel_size
        return {"local": ((b, o, *self.output_size(h, w)),), "per_example": ((b, o, i, kh, kw),),
                "shared": ((o, i, kh, kw),), "flipout": ((o, i, kh, kw), (b, i), (b, o))}[self.mode]

    def sample_noise(self, input_shape: Sequence[int], *,
                     generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        """Fresh noise for one call on an input of ``input_shape`` ``(B, in, H, W)``."""
        if len(input_shape) != 4:
            raise ValueError(f"input_shape must be (B, in, H, W), got {tuple(input_shape)}")
        shapes, like = self.noise_shapes(input_shape), self.weight_loc
        eps = torch.randn(shapes[0], generator=generator, dtype=like.dtype, device=like.device)
        if self.mode != "flipout":
            return (eps,)
        return (eps, _signs(shapes[1], generator, like), _signs(shapes[2], generator, like))

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None = None, groups: int = 1) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, groups=groups)

    def forward(self, x: Tensor, *, noise: Sequence[Tensor] | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        self._check_input(x, 4, f"(B, {self.in_channels}, H, W)")
        mean = self._conv(x, self.weight_loc, self.bias)  # (B, out, H', W')
        if not self.training:
            return mean
        noise = self.sample_noise(x.shape, generator=generator) if noise is None else self._check_noise(
            noise, self.noise_shapes(x.shape))
        s = self.weight_scale
        if self.mode == "local":
            return mean + _std(self._conv(x**2, s**2)) * noise[0]
        if self.mode == "per_example":  # B kernels as one grouped convolution
            b, i, h, w = x.shape
            delta = (s * noise[0]).reshape(-1, i, *self.kernel_size)  # (B out, in, kh, kw)
            return mean + self._conv(x.reshape(1, b * i, h, w), delta, groups=b).reshape(mean.shape)
        if self.mode == "shared":
            return mean + self._conv(x, s * noise[0])
        eps, sign_in, sign_out = noise  # flipout
        return mean + self._conv(x * sign_in[:, :, None, None], s * eps) * sign_out[:, :, None, None]


def _set_mode(layers, mode: str) -> None:
    _check_mode(mode)
    for layer in layers:
        layer.mode = mode


class BayesMLP(nn.Module):
    """``BayesLinear(sizes[0], sizes[1]) -> ReLU -> ... -> BayesLinear(sizes[-2], sizes[-1])``.

    ``forward(x, noise=...)`` takes one noise tuple per layer (from :meth:`sample_noise`), or draws
    them from ``generator``; ``kl()`` sums the layers' KL; setting ``mode`` sets every layer's.
    """

    def __init__(self, sizes: Sequence[int], *, mode: str = "local", prior_scale: float = 1.0,
                 init_scale: float = 0.05) -> None:
        super().__init__()
        sizes = list(sizes)
        if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"sizes must be at least two positive ints, got {sizes}")
        self.layers = nn.ModuleList(
            BayesLinear(a, b, mode=mode, prior_scale=prior_scale, init_scale=init_scale)
            for a, b in zip(sizes[:-1], sizes[1:]))

    @property
    def mode(self) -> str:
        return self.layers[0].mode

    @mode.setter
    def mode(self, value: str) -> None:
        _set_mode(self.layers, value)

    def sample_noise(self, batch_size: int, *, generator: torch.Generator | None = None):
        """One noise tuple per layer for a call on ``batch_size`` rows."""
        return tuple(layer.sample_noise(batch_size, generator=generator) for layer in self.layers)

    def forward(self, x: Tensor, *, noise=None, generator: torch.Generator | None = None) -> Tensor:
        if noise is not None and len(noise) != len(self.layers):
            raise ValueError(f"noise must hold one tuple per layer ({len(self.layers)}), got {len(noise)}")
        for j, layer in enumerate(self.layers):
            x = layer(x, noise=None if noise is None else noise[j], generator=generator)
            if j < len(self.layers) - 1:
                x = torch.relu(x)
        return x

    def kl(self) -> Tensor:
        return sum(layer.kl() for layer in self.layers)


class ConvClassifier(nn.Module):
    """A small CNN for square one-channel images, Bayesian or deterministic with one code path::

        conv 3x3 (c1) -> ReLU -> maxpool 2 -> conv 3x3 (c2) -> ReLU -> maxpool 2 -> linear (classes)

    ``bayesian=True`` uses :class:`BayesConv2d` and :class:`BayesLinear` (in ``mode``), ``False``
    uses ``nn.Conv2d`` and ``nn.Linear``. ``forward`` takes flat images ``(B, side^2)`` or
    ``(B, 1, side, side)`` and returns logits ``(B, classes)``. ``kl()`` is 0 for the deterministic net.
    """

    def __init__(self, side: int, num_classes: int, *, channels: tuple[int, int] = (8, 16),
                 bayesian: bool = True, mode: str = "local", prior_scale: float = 1.0,
                 init_scale: float = 0.05) -> None:
        super().__init__()
        check_count("side", side, 4)
        check_count("num_classes", num_classes, 2)
        c1, c2 = (check_count("channels", c) for c in channels)
        self.side, self.bayesian = side, bool(bayesian)
        flat = c2 * (side // 4) ** 2
        if self.bayesian:
            opts = dict(mode=mode, prior_scale=prior_scale, init_scale=init_scale)
            self.conv1 = BayesConv2d(1, c1, 3, padding=1, **opts)
            self.conv2 = BayesConv2d(c1, c2, 3, padding=1, **opts)
            self.head = BayesLinear(flat, num_classes, **opts)
        else:
            self.conv1, self.conv2 = nn.Conv2d(1, c1, 3, padding=1), nn.Conv2d(c1, c2, 3, padding=1)
            self.head = nn.Linear(flat, num_classes)

    def _stochastic(self) -> list[nn.Module]:
        return [self.conv1, self.conv2, self.head] if self.bayesian else []

    @property
    def mode(self) -> str | None:
        return self.head.mode if self.bayesian else None

    @mode.setter
    def mode(self, value: str) -> None:
        _set_mode(self._stochastic(), value)

    def forward(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        if x.dim() == 2:
            x = x.reshape(-1, 1, self.side, self.side)
        opts = {"generator": generator} if self.bayesian else {}
        h = F.max_pool2d(torch.relu(self.conv1(x, **opts)), 2)
        h = F.max_pool2d(torch.relu(self.conv2(h, **opts)), 2)
        return self.head(h.flatten(1), **opts)

    def kl(self) -> Tensor:
        if not self.bayesian:
            return self.head.weight.new_zeros(())
        return sum(layer.kl() for layer in self._stochastic())


def negative_elbo(model: nn.Module, batch: tuple[Tensor, Tensor], num_data: int) -> Tensor:
    """``-ELBO / N = mean_batch -log p(y | x, W) + KL(q || p) / N``, one weight draw per call.

    The minibatch mean of the categorical negative log-likelihood stands for the mean over the
    ``N = num_data`` training examples (Blundell et al. 2015, with the KL spread evenly over the
    minibatches). A deterministic model (``kl() = 0``) gets plain cross-entropy. A scalar.
    """
    x, y = batch
    check_count("num_data", num_data)
    return F.cross_entropy(model(x), y) + model.kl() / num_data


def minibatch_gradients(model: BayesMLP, x: Tensor, y: Tensor, *, batch_size: int, num_batches: int,
                        generator: torch.Generator | None = None,
                        chunk_size: int | None = None) -> dict[str, Tensor]:
    """``R = num_batches`` independent minibatch gradients of the data term of the loss.

    Each draw takes ``batch_size`` rows of ``(x, y)`` without replacement and fresh weight noise
    in ``model.mode``, and returns ``grad_theta mean_batch -log p(y | x, W)`` for every parameter
    (the KL term of the ELBO is deterministic, so it shifts the gradient and adds no variance).
    The draws run vectorized: the network is a pure function of its parameters and its explicit
    noise (``torch.func.functional_call``), and :func:`companion.estimators.per_sample_gradients`
    maps ``grad`` over the draws.

    chunk_size
        Draws per vectorized pass, ``None`` for all at once. The noise of one pass is drawn just
        before it (rows first, then noise), so memory grows with ``chunk_size``, not ``R``: one
        ``"per_example"`` draw holds ``batch_size`` weight matrices.

    Returns ``{name: (R, *shape)}`` for every parameter of ``model``.
    """
    check_count("batch_size", batch_size)
    check_count("num_batches", num_batches, 2)
    if chunk_size is not None:
        check_count("chunk_size", chunk_size)
    if batch_size > x.shape[0]:
        raise ValueError(f"batch_size must be at most the number of rows {x.shape[0]}, got {batch_size}")
    device = model.layers[0].weight_loc.device
    sizes = [len(shapes) for shapes in (layer.noise_shapes(batch_size) for layer in model.layers)]
    starts = [sum(sizes[:j]) for j in range(len(sizes))]
    params = dict(model.named_parameters())

    def program(p, batch):
        rows, *eps = batch  # one minibatch: (B,) row indices and its noise tensors
        noise = tuple(tuple(eps[a : a + m]) for a, m in zip(starts, sizes))
        logits = torch.func.functional_call(model, p, (x[rows],), {"noise": noise})
        return F.cross_entropy(logits, y[rows])

    def chunk(n: int) -> dict[str, Tensor]:
        idx = torch.stack([torch.randperm(x.shape[0], generator=generator, device=device)[:batch_size]
                           for _ in range(n)])  # (n, B)
        draws = [model.sample_noise(batch_size, generator=generator) for _ in range(n)]
        flat = tuple(torch.stack([d[j][k] for d in draws])  # (n, ...) per noise tensor
                     for j, m in enumerate(sizes) for k in range(m))
        return per_sample_gradients(program, params, (idx, *flat))

    was_training = model.training
    model.train()
    try:
        step = num_batches if chunk_size is None else chunk_size
        parts = [chunk(min(step, num_batches - a)) for a in range(0, num_batches, step)]
    finally:
        model.train(was_training)
    return {name: torch.cat([part[name] for part in parts]) for name in params}


def variance_terms(samples: Tensor) -> Tensor:
    """Per-draw terms whose mean is the mean per-coordinate variance of ``samples`` ``(R, ...)``::

        q_r = R / (R - 1) * mean_coords (g_r - gbar)^2,     mean_r q_r = mean_coords var_r(g).

    Their standard error ``std(q) / sqrt(R)`` is the standard error of that mean variance (up to
    the O(1/R) dependence through ``gbar``); two methods measured on the same minibatches are
    compared by the mean and standard error of ``q^A - q^B`` (a paired difference).
    """
    if samples.dim() < 1 or samples.shape[0] < 2:
        raise ValueError("samples must have a leading draw dimension of size >= 2")
    r = samples.shape[0]
    dev = samples.reshape(r, -1)
    dev = dev - dev.mean(0)
    return dev.pow(2).mean(1) * r / (r - 1)


@torch.no_grad()
def predictive_probs(model: nn.Module, x: Tensor, num_samples: int, *,
                     generator: torch.Generator | None = None) -> Tensor:
    """The Monte Carlo posterior predictive ``p(y | x) ~= (1/T) sum_t softmax(f(x; W_t))``.

    The model samples its weights as in training (``model.train()`` for the call); a deterministic
    model gives ``T`` identical terms. ``x`` ``(B, ...)`` -> probabilities ``(B, classes)``.
    """
    check_count("num_samples", num_samples)
    was_training = model.training
    model.train()
    try:
        total = 0.0
        for _ in range(num_samples):
            kwargs = {"generator": generator} if generator is not None else {}
            total = total + torch.softmax(model(x, **kwargs), -1)
    finally:
        model.train(was_training)
    return total / num_samples


def predictive_entropy(probs: Tensor) -> Tensor:
    """``H[p] = -sum_c p_c log p_c`` per row of ``probs`` ``(B, C)`` (``0 log 0 = 0``): ``(B,)``."""
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape (B, C), got {tuple(probs.shape)}")
    return -torch.special.xlogy(probs, probs).sum(-1)


class Reliability(NamedTuple):
    """Per confidence bin: mean confidence, accuracy and count (``nan`` where a bin is empty)."""

    confidence: Tensor
    accuracy: Tensor
    count: Tensor


def _check_probs_labels(probs: Tensor, labels: Tensor, num_bins: int) -> None:
    if probs.dim() != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"probs must be (B, C) and labels (B,), got {tuple(probs.shape)} and {tuple(labels.shape)}")
    check_count("num_bins", num_bins)


def reliability_curve(probs: Tensor, labels: Tensor, *, num_bins: int = 10) -> Reliability:
    """Bin the predictions by confidence ``max_c p_c`` into ``num_bins`` equal bins of ``[0, 1]``.

    A calibrated classifier has accuracy equal to confidence in every bin (Guo et al. 2017).
    """
    _check_probs_labels(probs, labels, num_bins)
    conf, pred = probs.max(-1)
    correct = (pred == labels).to(probs.dtype)
    bins = (conf * num_bins).long().clamp(max=num_bins - 1)  # bin j holds [j/M, (j+1)/M); 1.0 in the last
    count = torch.bincount(bins, minlength=num_bins).to(probs.dtype)
    conf_sum = torch.zeros(num_bins, dtype=probs.dtype, device=probs.device).index_add_(0, bins, conf)
    acc_sum = torch.zeros(num_bins, dtype=probs.dtype, device=probs.device).index_add_(0, bins, correct)
    return Reliability(conf_sum / count, acc_sum / count, count)


def expected_calibration_error(probs: Tensor, labels: Tensor, *, num_bins: int = 10) -> Tensor:
    """``ECE = sum_bins (n_b / n) |accuracy_b - confidence_b|`` over equal-width confidence bins.

    Guo et al. (2017); ``probs`` ``(B, C)``, ``labels`` ``(B,)``. A scalar in ``[0, 1]``.
    """
    curve = reliability_curve(probs, labels, num_bins=num_bins)
    filled = curve.count > 0
    gaps = (curve.accuracy[filled] - curve.confidence[filled]).abs()
    return (curve.count[filled] * gaps).sum() / curve.count.sum()


def bootstrap_interval(statistic: Callable[[Tensor], Tensor], n: int, *, num_resamples: int = 1000,
                       level: float = 0.95, generator: torch.Generator | None = None) -> Tensor:
    """A percentile bootstrap interval ``(low, high)`` for ``statistic`` over ``n`` examples.

    ``statistic(idx)`` computes the statistic on the examples ``idx`` (a ``(n,)`` index tensor
    drawn with replacement); passing two models' predictions through one ``idx`` gives a *paired*
    interval for their difference. Efron and Tibshirani (1993). Returns a ``(2,)`` tensor.
    """
    check_count("n", n)
    check_count("num_resamples", num_resamples, 2)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    device = generator.device if generator is not None else None
    values = torch.stack([torch.as_tensor(statistic(torch.randint(n, (n,), generator=generator, device=device)))
                          for _ in range(num_resamples)]).double()
    alpha = (1 - level) / 2
    return torch.quantile(values, torch.tensor([alpha, 1 - alpha], dtype=values.dtype, device=values.device))
