"""Procedural textures with randomized coordinates, fitted by pathwise gradients.

Chapter *Procedural textures*. A procedural texture is a function of the coordinates (Perlin
1985); randomizing the coordinates makes it a random field. Here::

    t(x) = sin(w . u + phi),     u = x + sigma eps,     eps ~ N(0, I) at every pixel,

in 1-D (``w`` a scalar, ``x`` ``(N,)``) or 2-D (``w`` ``(2,)``, ``x`` ``(H, W, 2)``). The noise enters
as a random phase ``sigma w . eps`` at each pixel, so (the characteristic function of a Gaussian)::

    E[t(x)] = exp(-sigma^2 |w|^2 / 2) sin(w . x + phi)        (:func:`expected_texture`).

A texture is compared with a target through statistics that average over the image, here the
autocorrelation at small lags (:func:`autocorrelation`), which does not change when the texture
is translated (so it cannot see ``phi``) and concentrates as the image grows (so one image
suffices). Its expectation is ``exp(-sigma^2 |w|^2) cos(w . tau) / 2`` up to a boundary term
(:func:`expected_autocorrelation`, exact). :func:`texture_loss` is the squared distance between
a texture's statistics and the target's; its expectation over ``eps`` is differentiated
pathwise. The matching of texture statistics follows Portilla and Simoncelli (2000).

Shapes: samples first, ``(S, *grid)``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "pixel_grid",
    "texture",
    "expected_texture",
    "autocorrelation",
    "expected_autocorrelation",
    "texture_loss",
    "TextureModel",
]

F64 = torch.float64


def _frequency(w) -> Tensor:
    w = w if isinstance(w, Tensor) else torch.as_tensor(w, dtype=F64)
    if not w.is_floating_point() or w.dim() > 1 or not bool(torch.all(torch.isfinite(w))):
        raise ValueError("w must be a finite float, or a 1-d floating-point tensor (one entry per dimension)")
    return w


def _check_coordinates(x: Tensor, w: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError("x must be a floating-point tensor of coordinates")
    if w.dim() == 1 and (x.dim() < 2 or x.shape[-1] != w.shape[0]):
        raise ValueError(f"for w of shape ({w.shape[0]},), x must have shape (..., {w.shape[0]})")


def _phase(x: Tensor, w: Tensor) -> Tensor:
    return x * w if w.dim() == 0 else x @ w


def _check_sigma(sigma) -> None:
    s = sigma if isinstance(sigma, Tensor) else torch.as_tensor(sigma, dtype=F64)
    if bool(torch.any(s < 0)) or not bool(torch.all(torch.isfinite(s))):
        raise ValueError("sigma must be finite and >= 0")


def pixel_grid(*shape: int, dtype: torch.dtype = F64) -> Tensor:
    """Integer pixel coordinates: ``pixel_grid(N)`` is ``(N,)``; ``pixel_grid(H, W)`` is ``(H, W, 2)``."""
    if not shape or len(shape) > 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in shape):
        raise ValueError(f"shape must be one or two ints >= 2, got {shape!r}")
    axes = [torch.arange(n, dtype=dtype) for n in shape]
    if len(shape) == 1:
        return axes[0]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)


def texture(x: Tensor, w, phi, sigma, num_samples: int | None = None, *, eps: Tensor | None = None,
            generator: torch.Generator | None = None) -> Tensor:
    """Samples of the texture ``sin(w . (x + sigma eps) + phi)``: ``(S, *grid)``.

    x
        coordinates: ``(*grid,)`` for a scalar ``w``, ``(*grid, D)`` for ``w`` of shape ``(D,)``.
    w, phi, sigma
        frequency (scalar or ``(D,)``), phase and noise scale (``>= 0``); tensors may require
        grad: the samples are differentiable in them (the pathwise gradient).
    eps
        standard normals with the shape of ``x`` behind the sample dimension, ``(S, *x.shape)``;
        or ``num_samples`` fresh ones from ``generator``.
    """
    w = _frequency(w)
    _check_coordinates(x, w)
    _check_sigma(sigma)
    if eps is None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1 when eps is not given, got {num_samples!r}")
        eps = torch.randn(num_samples, *x.shape, generator=generator, dtype=x.dtype)
    elif not isinstance(eps, Tensor) or eps.shape[1:] != x.shape:
        raise ValueError(f"eps must have shape (S, *{tuple(x.shape)})")
    u = x + sigma * eps  # the randomized coordinates
    return torch.sin(_phase(u, w) + phi)


def expected_texture(x: Tensor, w, phi, sigma) -> Tensor:
    """``E[t(x)] = exp(-sigma^2 |w|^2 / 2) sin(w . x + phi)``: ``(*grid,)``.

    The noise adds the Gaussian phase ``sigma w . eps``, whose characteristic function is
    ``E[exp(i sigma w . eps)] = exp(-sigma^2 |w|^2 / 2)``: noise in the coordinates damps the
    mean texture, more at high frequencies (a Gaussian blur of width ``sigma``).
    """
    w = _frequency(w)
    _check_coordinates(x, w)
    _check_sigma(sigma)
    return torch.exp(-0.5 * sigma**2 * (w**2).sum()) * torch.sin(_phase(x, w) + phi)


def _lag_index(dims: int, max_lag: int, sizes: tuple[int, ...]) -> tuple[Tensor, ...]:
    """Half of the lags with ``|tau_i| <= max_lag``, origin excluded (``R(-tau) = R(tau)``).

    As indices into the zero-padded circular autocorrelation, whose axes have ``sizes``.
    """
    if isinstance(max_lag, bool) or not isinstance(max_lag, int) or max_lag < 1:
        raise ValueError(f"max_lag must be an int >= 1, got {max_lag!r}")
    if dims == 1:
        return (torch.arange(1, max_lag + 1),)
    ks = torch.arange(-max_lag, max_lag + 1)
    i, j = torch.meshgrid(torch.arange(0, max_lag + 1), ks, indexing="ij")
    keep = (i > 0) | (j > 0)  # the half-plane: first nonzero coordinate positive
    return i[keep], j[keep] % sizes[1]


def autocorrelation(t: Tensor, max_lag: int, dims: int = 1) -> Tensor:
    """The sample autocorrelation of textures at small lags: ``(..., L)``.

    ``R(tau) = mean_x t(x) t(x + tau)`` over the pixels where both exist, for the lags ``tau`` of
    half the window ``|tau_i| <= max_lag`` without the origin (``L = max_lag`` in 1-D,
    ``max_lag (2 max_lag + 1) + max_lag`` in 2-D, first coordinate ascending). ``t`` is
    ``(..., N)`` (``dims = 1``) or ``(..., H, W)`` (``dims = 2``). Computed for all lags at once
    with a zero-padded FFT (``torch.fft``). Translating the texture leaves ``R`` unchanged up to
    the image's edges: the statistic does not see ``phi``.
    """
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims!r}")
    if not isinstance(t, Tensor) or t.dim() < dims or not t.is_floating_point():
        raise ValueError(f"t must be a floating-point tensor with at least {dims} dimension(s)")
    shape = tuple(t.shape[-dims:])
    if min(shape) <= max_lag:
        raise ValueError(f"the texture's last {dims} dimension(s) {shape} must exceed max_lag = {max_lag}")
    padded = tuple(2 * n for n in shape)
    axes = tuple(range(-dims, 0))
    spectrum = torch.fft.rfftn(t, s=padded, dim=axes)
    circular = torch.fft.irfftn(spectrum.abs() ** 2, s=padded, dim=axes)  # sum_x t(x) t(x + tau)
    index = _lag_index(dims, max_lag, padded)
    # pixels where both t(x) and t(x + tau) exist: prod_i (n_i - |tau_i|)
    lags = [torch.where(k > n, k - p, k) for k, n, p in zip(index, shape, padded)]
    overlap = torch.stack([n - k.abs() for k, n in zip(lags, shape)]).prod(0).to(t.dtype)
    return circular[(..., *index)] / overlap


def expected_autocorrelation(x: Tensor, w, phi, sigma, max_lag: int) -> Tensor:
    """``E[R(tau)]`` of :func:`autocorrelation` for textures on the grid ``x``, exactly: ``(L,)``.

    At distinct pixels the noises are independent, so ``E[t(x) t(x')] = m(x) m(x')`` with ``m`` the
    :func:`expected_texture`; averaged over the pixels of each lag::

        E[R(tau)] = mean_x m(x) m(x + tau)
                  = exp(-sigma^2 |w|^2) [cos(w . tau) - mean_x cos(w . (2x + tau) + 2 phi)] / 2,

    whose second term, the only one that depends on ``phi``, is an edge effect that shrinks
    like ``1 / (N |w|)``.
    """
    w = _frequency(w)
    dims = 1 if w.dim() == 0 else w.shape[0]
    return autocorrelation(expected_texture(x, w, phi, sigma), max_lag, dims)


def texture_loss(t: Tensor, target_stats: Tensor, max_lag: int, dims: int = 1) -> Tensor:
    """``|R(t) - R_target|^2`` for each sample ``(S, *grid) -> (S,)``.

    Averaged over samples drawn with :func:`texture` (an ``eps`` with a path to the parameters),
    its mean estimates the expected loss ``E_eps[|R(t_theta(eps)) - R_target|^2]`` and its
    gradient the pathwise gradient of that expectation.
    """
    stats = autocorrelation(t, max_lag, dims)
    if not isinstance(target_stats, Tensor) or target_stats.shape != stats.shape[-1:]:
        raise ValueError(f"target_stats must have shape ({stats.shape[-1]},)")
    return ((stats - target_stats) ** 2).sum(-1)


class TextureModel(torch.nn.Module):
    """The texture's parameters as a module: ``w``, ``phi`` and ``log_sigma`` (so ``sigma > 0``).

    ``model(x, eps)`` returns :func:`texture` samples ``(S, *grid)`` for the noise ``eps``
    ``(S, *x.shape)``; fit it with :func:`companion.train.train` and :func:`texture_loss`.
    """

    def __init__(self, w, phi: float, sigma: float) -> None:
        super().__init__()
        w = _frequency(w).detach().clone()
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
            raise ValueError(f"sigma must be a number > 0, got {sigma!r}")
        self.w = torch.nn.Parameter(w.to(F64))
        self.phi = torch.nn.Parameter(torch.tensor(float(phi), dtype=F64))
        self.log_sigma = torch.nn.Parameter(torch.tensor(math.log(sigma), dtype=F64))

    @property
    def sigma(self) -> Tensor:
        return self.log_sigma.exp()

    def forward(self, x: Tensor, eps: Tensor) -> Tensor:
        return texture(x, self.w, self.phi, self.sigma, eps=eps)
