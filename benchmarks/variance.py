"""Estimator variance at the statistical limit, on the grids of Mohamed et al. (2020), Figures 2-3.

The problem of their Section 3: ``grad_theta E_{N(x; mu, sigma^2)}[f(x; k)]`` for
``theta in {mu, sigma}``, at ``mu = sigma = 1``, with

* ``f = (x - k)^2`` on ``k = linspace(-3, 3, 100)`` (their Figure 2),
* ``f = exp(-k x^2)`` on ``k = geomspace(0.1, 10, 100)`` (Figure 3, top),
* ``f = cos(k x)`` on ``k = geomspace(0.5, 5, 100)`` (Figure 3, bottom),

the settings of the paper's notebook ``variance_numerical_integration.ipynb`` in
``google-deepmind/mc_gradients``. The paper computes each estimator's variance by numerical
integration; here it is *measured*: ``S`` per-sample gradients of each of companion's estimators
(``companion.estimators.gradient_samples``: pathwise, score function without and with the
leave-one-out baseline, measure-valued with coupling), their sample variance and its standard
error (``variance_stderr``), against the exact per-sample variance:

* exponential polynomials (``(x - k)^2``, ``cos kx``): ``companion.closed_forms.per_sample_variance``;
* ``exp(-k x^2)``: Gauss-Hermite quadrature (``companion.estimators.gaussian_expectation``) of
  polynomials under the Gaussian tilted by ``exp(-c x^2)``, which is exact (see :func:`tilted`);
* measure-valued (all three): composite Gauss-Legendre quadrature over the Rayleigh and the
  double-sided Maxwell x uniform laws of the coupled estimator (:func:`measure_valued_variance`),
  checked against ``scipy.integrate`` in ``tests/test_benchmarks.py`` and, at every grid point
  here, by its mean against the exact gradient.

The leave-one-out baseline ``b_i = mean_{j != i} f_j`` gives terms of variance
``Var[(f - E f) s] + Var[f] E[s^2] / (S - 1)`` (``s`` the score: ``E s^2 = 1/sigma^2`` for mu,
``2/sigma^2`` for sigma), the exact value used for that row.

Also the crossover of ``cos kx`` for mu: the closed forms put it at ``k*`` (``brentq``), and the
measured gap ``Var_pathwise - Var_score`` (on the same draws, paired standard error) must have
the exact gap's sign wherever that gap exceeds five standard errors.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import brentq
from torch.distributions import Normal

from companion import closed_forms as cf
from companion.estimators import gaussian_expectation, gradient_samples, variance_stderr

from ._common import write_result

__all__ = [
    "MU",
    "SIGMA",
    "FUNCTIONS",
    "ESTIMATORS",
    "grid",
    "objective",
    "tilted",
    "exact_gradient",
    "exact_variance",
    "measure_valued_variance",
    "measured_variance",
    "crossover",
    "run",
]

MU, SIGMA = 1.0, 1.0  # the paper's measure N(1, 1)
FUNCTIONS = ("square", "exp", "cos")
ESTIMATORS = ("pathwise", "score_function", "score_function_loo", "measure_valued")
PARAMS = ("mu", "sigma")
# An exact variance below this is zero up to rounding: the measure-valued estimator of mu for
# (x - k)^2 at k = mu is f(mu + R) - f(mu - R) = 4 R (mu - k) = 0 for every draw. Such a row has
# no ratio; the measured variance must then be zero up to rounding too (below ZERO).
ZERO = 1e-12
_OPTIONS = {  # estimator -> (companion method, options)
    "pathwise": ("pathwise", {}),
    "score_function": ("score_function", {}),
    "score_function_loo": ("score_function", {"baseline": "mean"}),
    "measure_valued": ("measure_valued", {"coupling": True}),
}


def grid(function: str, num: int = 100) -> np.ndarray:
    """The paper's grid of ``k`` for ``function`` (100 points in the paper)."""
    if function == "square":
        return np.linspace(-3.0, 3.0, num)
    if function == "exp":
        return np.geomspace(0.1, 10.0, num)
    if function == "cos":
        return np.geomspace(0.5, 5.0, num)
    raise ValueError(f"function must be one of {FUNCTIONS}, got {function!r}")


def objective(function: str, k: float):
    """``f(x; k)`` for tensors (torch) and arrays (numpy): the same formula for both."""
    if function == "square":
        return lambda x: (x - k) ** 2
    if function == "exp":
        return lambda x: (torch.exp if isinstance(x, torch.Tensor) else np.exp)(-k * x**2)
    if function == "cos":
        return lambda x: (torch.cos if isinstance(x, torch.Tensor) else np.cos)(k * x)
    raise ValueError(f"function must be one of {FUNCTIONS}, got {function!r}")


def _exppoly(function: str, k: float) -> cf.ExpPoly | None:
    if function == "square":
        return cf.square() - 2 * k * cf.identity() + k * k
    if function == "cos":
        return cf.cosine(k)
    return None  # exp(-k x^2) is not an exponential polynomial


# --------------------------------------------------------------------------- exact: exp(-k x^2)


def tilted(poly, c: float, mu: float = MU, sigma: float = SIGMA) -> float:
    """``E_{N(mu, sigma^2)}[poly(x) exp(-c x^2)]`` for a polynomial ``poly``, exactly.

    ``N(x; mu, sigma^2) exp(-c x^2) = Z N(x; m, s^2)`` with ``s^2 = sigma^2 / (1 + 2 c sigma^2)``,
    ``m = mu / (1 + 2 c sigma^2)`` and ``Z = (s / sigma) exp(m^2 / (2 s^2) - mu^2 / (2 sigma^2))``;
    the polynomial's expectation under ``N(m, s^2)`` is Gauss-Hermite quadrature, exact for
    degree < 160. (Gauss-Hermite applied to ``exp(-k x^2)`` directly is not: at ``k = 10`` its
    80 nodes are coarser than the peak, and the error is tens of percent.)
    """
    s2 = sigma**2 / (1 + 2 * c * sigma**2)
    m = mu / (1 + 2 * c * sigma**2)
    z = math.sqrt(s2) / sigma * math.exp(m**2 / (2 * s2) - mu**2 / (2 * sigma**2))
    loc, scale = torch.tensor(m, dtype=torch.float64), torch.tensor(math.sqrt(s2), dtype=torch.float64)
    return z * gaussian_expectation(poly, loc, scale).item()


def _exp_moments(k: float, mu: float, sigma: float) -> dict:
    """The expectations of f = exp(-k x^2) that the pathwise and score-function variances need."""
    def eps(x):
        return (x - mu) / sigma

    def one(x):
        return torch.ones_like(x)

    return {
        "f": tilted(one, k, mu, sigma),
        "f2": tilted(one, 2 * k, mu, sigma),
        "grad": (tilted(lambda x: -2 * k * x, k, mu, sigma),
                 tilted(lambda x: -2 * k * x * eps(x), k, mu, sigma)),
        # E[f'^2], E[f'^2 eps^2]
        "path2": (tilted(lambda x: (2 * k * x) ** 2, 2 * k, mu, sigma),
                  tilted(lambda x: (2 * k * x * eps(x)) ** 2, 2 * k, mu, sigma)),
        # E[f^a eps^2], E[f^a (eps^2 - 1)^2] for a = 1, 2
        "score": {a: (tilted(lambda x: eps(x) ** 2, a * k, mu, sigma),
                      tilted(lambda x: (eps(x) ** 2 - 1) ** 2, a * k, mu, sigma)) for a in (1, 2)},
    }


# --------------------------------------------------------------------------- exact: all


def exact_gradient(function: str, k: float, mu: float = MU, sigma: float = SIGMA) -> tuple[float, float]:
    """``(d/dmu, d/dsigma) E[f(x; k)]`` in closed form (exact quadrature for ``exp(-k x^2)``)."""
    f = _exppoly(function, k)
    if f is not None:
        return cf.gradient(f, mu, sigma)
    return _exp_moments(k, mu, sigma)["grad"]


def exact_variance(function: str, k: float, estimator: str, num_samples: int,
                   mu: float = MU, sigma: float = SIGMA) -> tuple[float, float]:
    """Exact per-sample variance ``(for mu, for sigma)`` of one of :data:`ESTIMATORS`.

    ``num_samples`` matters only for the leave-one-out baseline (see the module docstring).
    """
    if estimator == "measure_valued":
        return measure_valued_variance(objective(function, k), mu, sigma)[0]
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    score_moment = (1 / sigma**2, 2 / sigma**2)  # E[s^2] for mu and sigma
    f = _exppoly(function, k)
    if f is not None:
        if estimator == "pathwise":
            return tuple(cf.per_sample_variance("pathwise", f, mu, sigma))
        if estimator == "score_function":
            return tuple(cf.per_sample_variance("score_function", f, mu, sigma, baseline=0.0))
        mean = cf.expectation(f, mu, sigma)
        var_f = cf.expectation(f * f, mu, sigma) - mean**2
        exact_b = cf.per_sample_variance("score_function", f, mu, sigma, baseline=mean)
        return tuple(v + var_f * e / (num_samples - 1) for v, e in zip(exact_b, score_moment))
    m = _exp_moments(k, mu, sigma)
    grad = m["grad"]
    if estimator == "pathwise":
        return tuple(p - g**2 for p, g in zip(m["path2"], grad))
    b = 0.0 if estimator == "score_function" else m["f"]
    # E[(f - b)^2 w] = E[f^2 w] - 2 b E[f w] + b^2 E[w], w = eps^2 (mu) or (eps^2 - 1)^2 (sigma)
    second = tuple((m["score"][2][i] - 2 * b * m["score"][1][i] + b * b * (1.0, 2.0)[i]) / sigma**2
                   for i in range(2))
    var = tuple(s - g**2 for s, g in zip(second, grad))
    if estimator == "score_function_loo":
        var_f = m["f2"] - m["f"] ** 2
        var = tuple(v + var_f * e / (num_samples - 1) for v, e in zip(var, score_moment))
    return var


def _gauss_legendre(a: float, b: float, panels: int, order: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of composite Gauss-Legendre quadrature on ``[a, b]``."""
    t, w = np.polynomial.legendre.leggauss(order)
    edges = np.linspace(a, b, panels + 1)
    half = np.diff(edges)[:, None] / 2
    mid = (edges[:-1] + edges[1:])[:, None] / 2
    return (mid + half * t).ravel(), (half * w).ravel()


def measure_valued_variance(f, mu: float = MU, sigma: float = SIGMA) -> tuple[tuple[float, float], tuple[float, float]]:
    """Exact per-sample variance and mean ``((var_mu, var_sigma), (mean_mu, mean_sigma))`` of the
    coupled measure-valued estimator (Mohamed et al. 2020, sec. 6 and 7.2), by quadrature.

    * mu: ``g = (f(mu + sigma R) - f(mu - sigma R)) / (sigma sqrt(2 pi))``, ``R ~ Rayleigh(1)``
      (density ``r exp(-r^2 / 2)``);
    * sigma: ``g = (f(mu + sigma M) - f(mu + sigma M U)) / sigma``, ``M`` double-sided Maxwell
      (density ``m^2 exp(-m^2 / 2) / sqrt(2 pi)``), ``U ~ U(0, 1)``, so that ``M U ~ N(0, 1)``.

    Composite Gauss-Legendre on ``[0, 10]`` and ``[-10, 10]`` x ``[0, 1]`` (the tails beyond 10
    carry less than ``e^-48``), panels of width 0.05 and 0.1 x 0.04, eight nodes each: exact to
    rounding for the smooth ``f`` of the grids. ``f`` maps numpy arrays elementwise.
    """
    r, wr = _gauss_legendre(0.0, 10.0, 200)
    density_r = r * np.exp(-0.5 * r**2)
    g_mu = (f(mu + sigma * r) - f(mu - sigma * r)) / (sigma * math.sqrt(2 * math.pi))
    mean_mu = np.sum(wr * density_r * g_mu)
    var_mu = np.sum(wr * density_r * g_mu**2) - mean_mu**2
    m, wm = _gauss_legendre(-10.0, 10.0, 200)
    u, wu = _gauss_legendre(0.0, 1.0, 25)
    density_m = m**2 * np.exp(-0.5 * m**2) / math.sqrt(2 * math.pi)
    g_sigma = (f(mu + sigma * m)[:, None] - f(mu + sigma * m[:, None] * u[None, :])) / sigma  # (M, U)
    weight = (wm * density_m)[:, None] * wu[None, :]
    mean_sigma = np.sum(weight * g_sigma)
    var_sigma = np.sum(weight * g_sigma**2) - mean_sigma**2
    return (float(var_mu), float(var_sigma)), (float(mean_mu), float(mean_sigma))


# --------------------------------------------------------------------------- measured


def measured_variance(function: str, k: float, num_samples: int, generator: torch.Generator,
                      device: torch.device | str = "cpu") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-sample gradients ``{estimator: (g_mu (S,), g_sigma (S,))}`` from companion's estimators.

    The pathwise and score-function rows share one standard-normal draw ``eps`` (common random
    numbers, so their variances can be compared pairwise); the measure-valued estimator draws
    its Rayleigh, Maxwell and uniform variables from ``generator``. float64 on ``device``.
    """
    params = (torch.tensor(MU, dtype=torch.float64, device=device),
              torch.tensor(SIGMA, dtype=torch.float64, device=device))
    eps = torch.randn(num_samples, generator=generator, dtype=torch.float64, device=device)
    f = objective(function, k)
    out = {}
    for name in ESTIMATORS:
        method, options = _OPTIONS[name]
        noise = {"generator": generator} if method == "measure_valued" else {"eps": eps}
        out[name] = gradient_samples(method, f, Normal, params, num_samples, **noise, **options)
    return out


def crossover(mu: float = MU, sigma: float = SIGMA) -> dict[str, float]:
    """The ``k`` above which the score function's variance for mu is below the pathwise one's,
    for ``cos kx``: without and with the (large-S) mean baseline, from the closed forms."""
    def gap(k, baseline):
        f = cf.cosine(k)
        b = cf.expectation(f, mu, sigma) if baseline else 0.0
        return (cf.per_sample_variance("pathwise", f, mu, sigma).mu
                - cf.per_sample_variance("score_function", f, mu, sigma, baseline=b).mu)

    ks = grid("cos")
    out = {}
    for name, baseline in (("score_function", False), ("score_function_mean_baseline", True)):
        gaps = np.array([gap(k, baseline) for k in ks])
        changes = np.flatnonzero(np.diff(np.sign(gaps)))
        if len(changes) != 1:
            raise RuntimeError(f"expected one crossover on the cos grid for {name}, found {len(changes)}")
        i = changes[0]
        out[name] = brentq(lambda k: gap(k, baseline), ks[i], ks[i + 1], xtol=1e-12)
    return out


def _paired_gap(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """``Var a - Var b`` from paired samples and its standard error ``std(d) / sqrt(S)``,
    ``d_i = (a_i - mean a)^2 - (b_i - mean b)^2`` (the delta method, large S)."""
    d = (a - a.mean()) ** 2 - (b - b.mean()) ** 2
    n = a.shape[0]
    return (a.var() - b.var()).item(), (d.std() / math.sqrt(n)).item()


# --------------------------------------------------------------------------- the run


def run(out_dir: Path, *, quick: bool, device: torch.device, seed: int = 0) -> Path:
    """Measure every estimator on the grids, write ``variance.json``; returns its path."""
    started = time.perf_counter()
    num_samples = 20_000 if quick else 100_000
    every = 33 if quick else 2  # measured k: every 33rd grid point in quick (4 per panel), every other in full
    curve_points = 30 if quick else 100  # exact curves for the figure
    g = torch.Generator(device=device).manual_seed(seed)
    rows, checks, curves, gaps = [], [], {}, []
    for function in FUNCTIONS:
        ks = grid(function)
        for k in ks[::every]:
            samples = measured_variance(function, float(k), num_samples, g, device)
            grad = exact_gradient(function, float(k))
            for name in ESTIMATORS:
                exact = exact_variance(function, float(k), name, num_samples)
                for p, param in enumerate(PARAMS):
                    x = samples[name][p]
                    var, se = x.var().item(), variance_stderr(x).item()
                    mean, mean_se = x.mean().item(), (x.std() / math.sqrt(num_samples)).item()
                    row = {"function": function, "k": float(k), "parameter": param, "estimator": name,
                           "samples": num_samples, "variance": var, "stderr": se, "exact": exact[p],
                           "ratio": None, "ratio_stderr": None, "z": None,
                           "mean": mean, "mean_stderr": mean_se, "gradient": grad[p], "mean_z": None}
                    if exact[p] > ZERO:  # else a degenerate row: the estimator is exact there
                        row.update(ratio=var / exact[p], ratio_stderr=se / exact[p], z=(var - exact[p]) / se,
                                   mean_z=(mean - grad[p]) / mean_se)
                    rows.append(row)
            if function == "cos":
                gap, gap_se = _paired_gap(samples["pathwise"][0], samples["score_function"][0])
                exact_gap = (exact_variance("cos", float(k), "pathwise", num_samples)[0]
                             - exact_variance("cos", float(k), "score_function", num_samples)[0])
                gaps.append({"k": float(k), "gap": gap, "stderr": gap_se, "exact": exact_gap})
        # the quadrature of the measure-valued reference, checked at every curve point by its mean
        curve_ks = grid(function, curve_points)
        curves[function] = {"k": curve_ks.tolist()}
        values = {name: [] for name in ESTIMATORS}
        for k in curve_ks:
            for name in ESTIMATORS[:-1]:
                values[name].append(exact_variance(function, float(k), name, num_samples))
            var_mv, mean_mv = measure_valued_variance(objective(function, float(k)))
            values["measure_valued"].append(var_mv)
            grad = exact_gradient(function, float(k))
            checks.append(max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(mean_mv, grad)))
        for name in ESTIMATORS:
            curves[function][name] = {param: [v[p] for v in values[name]] for p, param in enumerate(PARAMS)}
    settings = {
        "mu": MU, "sigma": SIGMA, "samples": num_samples, "dtype": "float64", "seed": seed,
        "grids": {f: {"first": float(grid(f)[0]), "last": float(grid(f)[-1]), "points": 100,
                      "spacing": "linear" if f == "square" else "geometric",
                      "measured_every": every} for f in FUNCTIONS},
        "source": "Mohamed et al. (2020), Figures 2 and 3; google-deepmind/mc_gradients, "
                  "variance_numerical_integration.ipynb",
    }
    extra = {
        "curves": curves,
        "crossover": {"closed_form": crossover(), "measured_gaps": gaps},
        "quadrature_check": {"max_relative_error_of_measure_valued_mean": max(checks)},
    }
    return write_result(out_dir, "variance", device=device, profile="quick" if quick else "full",
                        settings=settings, rows=rows, extra=extra, started=started)
