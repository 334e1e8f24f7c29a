"""Exact Gaussian expectations, gradients and estimator variances for test functions.

The test functions of Mohamed et al. (2020, sec. 3) -- ``x``, ``x^2``, ``exp(x)``, ``cos(w x)`` --
are all *exponential polynomials*, finite sums ``f(x) = sum_k c_k x^j_k exp(t_k x)`` with complex
``c_k, t_k`` whose sum is real. Products and derivatives of such functions stay in the family,
and their Gaussian expectations have a closed form by exponential tilting: with
``x = mu + sigma eps``, ``eps ~ N(0, 1)`` and ``a = t sigma``,

    E[x^j exp(t x) eps^m] = exp(t mu + t^2 sigma^2 / 2) E[(mu + sigma (Z + a))^j (Z + a)^m],

a polynomial in ``Z ~ N(0, 1)`` whose moments are ``E Z^{2i} = (2i - 1)!!``. From these come the
exact gradient of ``E f`` and the exact per-sample variance of the pathwise and score-function
estimators (chapter *Gradients of expectations*), used as references by tests and chapters.
"""
from __future__ import annotations

import cmath
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from numpy.polynomial import Polynomial
from torch import Tensor

__all__ = [
    "ExpPoly",
    "identity",
    "square",
    "exponential",
    "cosine",
    "constant",
    "expectation",
    "gradient",
    "GradientVariance",
    "per_sample_variance",
]

Term = tuple[complex, int, complex]  # (c, j, t): c x^j exp(t x)


@dataclass(frozen=True)
class ExpPoly:
    """``f(x) = Re sum_k c_k x^j_k exp(t_k x)``, closed under ``+``, ``-``, ``*`` and ``d/dx``."""

    terms: tuple[Term, ...]
    name: str = "f"

    def __call__(self, x: Tensor) -> Tensor:
        """Evaluate on a real tensor: ``Re(c e^{t x}) = e^{Re t x} (Re c cos(Im t x) - Im c sin(Im t x))``."""
        out = torch.zeros_like(x)
        for c, j, t in self.terms:
            phase = t.imag * x
            out = out + x**j * torch.exp(t.real * x) * (c.real * torch.cos(phase) - c.imag * torch.sin(phase))
        return out

    def derivative(self) -> ExpPoly:
        """``d/dx c x^j e^{t x} = c j x^{j-1} e^{t x} + c t x^j e^{t x}``."""
        terms = []
        for c, j, t in self.terms:
            if j > 0:
                terms.append((c * j, j - 1, t))
            if t != 0:
                terms.append((c * t, j, t))
        return ExpPoly(tuple(terms), f"{self.name}'")

    def __mul__(self, other: ExpPoly | float) -> ExpPoly:
        other = _as_exppoly(other)
        terms = tuple((c1 * c2, j1 + j2, t1 + t2) for c1, j1, t1 in self.terms for c2, j2, t2 in other.terms)
        return ExpPoly(terms, f"({self.name})({other.name})")

    __rmul__ = __mul__

    def __add__(self, other: ExpPoly | float) -> ExpPoly:
        other = _as_exppoly(other)
        return ExpPoly(self.terms + other.terms, f"{self.name} + {other.name}")

    __radd__ = __add__

    def __sub__(self, other: ExpPoly | float) -> ExpPoly:
        return self + (-1.0) * _as_exppoly(other)

    def __neg__(self) -> ExpPoly:
        return (-1.0) * self


def constant(b: float) -> ExpPoly:
    """``f(x) = b``."""
    return ExpPoly(((complex(b), 0, 0j),), f"{b:g}")


def _as_exppoly(v: ExpPoly | float) -> ExpPoly:
    if isinstance(v, ExpPoly):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return constant(float(v))
    raise ValueError(f"expected an ExpPoly or a number, got {type(v).__name__}")


def identity() -> ExpPoly:
    """``f(x) = x``."""
    return ExpPoly(((1 + 0j, 1, 0j),), "x")


def square() -> ExpPoly:
    """``f(x) = x^2``."""
    return ExpPoly(((1 + 0j, 2, 0j),), "x^2")


def exponential() -> ExpPoly:
    """``f(x) = exp(x)``."""
    return ExpPoly(((1 + 0j, 0, 1 + 0j),), "exp(x)")


def cosine(w: float) -> ExpPoly:
    """``f(x) = cos(w x) = (e^{i w x} + e^{-i w x}) / 2``."""
    return ExpPoly(((0.5 + 0j, 0, 1j * w), (0.5 + 0j, 0, -1j * w)), f"cos({w:g}x)")


def _normal_moment(i: int) -> float:
    # E Z^i = (i - 1)!! for even i, 0 for odd i
    return 0.0 if i % 2 else float(math.prod(range(i - 1, 0, -2)))


def expectation(f: ExpPoly, mu: float, sigma: float, eps_power: int = 0) -> float:
    """``E[f(x) eps^m]`` for ``x = mu + sigma eps``, ``eps ~ N(0, 1)``, in closed form."""
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    total = 0j
    for c, j, t in f.terms:
        a = t * sigma
        # (mu + sigma a + sigma Z)^j (Z + a)^m as a polynomial in Z
        poly = Polynomial([mu + sigma * a, sigma]) ** j * Polynomial([a, 1]) ** eps_power
        moment = sum(coef * _normal_moment(i) for i, coef in enumerate(poly.coef))
        total += c * cmath.exp(t * mu + t * t * sigma * sigma / 2) * moment
    return float(total.real)


def gradient(f: ExpPoly, mu: float, sigma: float) -> tuple[float, float]:
    """``(d/dmu, d/dsigma) E[f(mu + sigma eps)] = (E[f'(x)], E[f'(x) eps])``."""
    df = f.derivative()
    return expectation(df, mu, sigma), expectation(df, mu, sigma, 1)


class GradientVariance(NamedTuple):
    """Per-sample variance of an estimator of the gradient with respect to mu and sigma."""

    mu: float
    sigma: float


def per_sample_variance(method: str, f: ExpPoly, mu: float, sigma: float, baseline: float = 0.0) -> GradientVariance:
    """Exact variance of one sample of the pathwise or score-function gradient estimator.

    pathwise:       ``f'(x)`` for mu and ``f'(x) eps`` for sigma;
    score_function: ``(f(x) - b) eps / sigma`` for mu and ``(f(x) - b)(eps^2 - 1) / sigma`` for sigma.
    Each variance is ``E[g^2] - (E g)^2`` with ``E g`` the exact gradient.
    """
    g_mu, g_sigma = gradient(f, mu, sigma)
    if method == "pathwise":
        d2 = f.derivative() * f.derivative()
        second = (expectation(d2, mu, sigma), expectation(d2, mu, sigma, 2))
    elif method == "score_function":
        h2 = (f - baseline) * (f - baseline)
        e0, e2, e4 = (expectation(h2, mu, sigma, m) for m in (0, 2, 4))
        second = (e2 / sigma**2, (e4 - 2 * e2 + e0) / sigma**2)
    else:
        raise ValueError(f"method must be 'pathwise' or 'score_function', got {method!r}")
    return GradientVariance(float(second[0] - g_mu**2), float(second[1] - g_sigma**2))
