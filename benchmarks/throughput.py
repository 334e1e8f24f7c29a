"""Samples per second of companion's estimators, of Pyro's, and of the same estimator in plain torch.

One problem for all of them, a one-site model with a Gaussian guide (float32, torch's default):

    p(z) = N(0, 1),  p(y | z) = N(z, 1),  y = 1 observed,  q(z) = N(mu, sigma^2),  sigma = exp(rho),
    ELBO(mu, rho) = E_q[log p(y | z) + log p(z) - log q(z)],

whose value and gradient are known exactly (``exact_elbo``). Each implementation estimates the
ELBO and its gradient with respect to ``(mu, rho)`` from ``S`` draws, for ``S`` from 1e2 to 1e6:

* ``pathwise``: companion's :func:`~companion.estimators.pathwise`; Pyro's ``Trace_ELBO`` on a
  reparameterized guide site; plain torch, ``z = mu + sigma * randn(S)``;
* ``score_function``: companion's :func:`~companion.estimators.score_function`; Pyro's
  ``TraceGraph_ELBO`` on the same site with ``has_rsample_(False)`` (no baseline); plain torch;
* ``score_function_loo``: companion's leave-one-out baseline (``baseline="mean"``); plain torch
  (Pyro has decaying-average and neural baselines, not this one: no Pyro row);
* ``measure_valued``: companion's :func:`~companion.estimators.measure_valued` (coupled);
  plain torch (Pyro has no measure-valued estimator).

Pyro runs its ``S`` particles vectorized (``vectorize_particles=True``), as a Pyro user would.
The integrand ``f(z) = log p(y | z) + log p(z) - log q(z)`` is the same code for companion and
plain torch. companion gets the distribution a user would pass, ``Normal(mu, rho.exp())``, built
inside the timed call, with torch's default argument validation; a second companion row builds
it with ``validate_args=False``, which separates torch.distributions' checks from companion's
own cost.

Two modes: ``value`` (the estimate only, under ``torch.no_grad``, as Pyro's ``loss``) and
``gradient`` (estimate and backward pass, as Pyro's ``loss_and_grads``). Every call ends with
``.item()``, so the work has finished when the clock stops. At the largest ``S`` each
implementation's value and gradient are compared with the exact ones, within five standard
errors of the estimator (per-sample variances measured with
``companion.estimators.per_sample_gradients``).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch.distributions import Normal

from companion.estimators import measure_valued, pathwise, per_sample_gradients, score_function

from ._common import interleaved, primary_metric, summarize, write_result

__all__ = ["Y", "MU0", "RHO0", "ESTIMATORS", "exact_elbo", "integrand", "companion_step", "torch_step",
           "pyro_step", "run"]

Y, MU0, RHO0 = 1.0, 0.3, -0.2  # the observation and the guide's parameters
ESTIMATORS = ("pathwise", "score_function", "score_function_loo", "measure_valued")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def exact_elbo(mu: float = MU0, rho: float = RHO0, y: float = Y) -> tuple[float, float, float]:
    """``(ELBO, dELBO/dmu, dELBO/drho)`` in closed form.

    ``ELBO = -(y - mu)^2 / 2 - mu^2 / 2 - sigma^2 - log 2 pi + (1 + log 2 pi) / 2 + rho``:
    the expected log-densities ``E_q[-(y - z)^2 / 2] = -((y - mu)^2 + sigma^2) / 2`` and
    ``E_q[-z^2 / 2] = -(mu^2 + sigma^2) / 2``, plus the Gaussian entropy ``log(2 pi e sigma^2) / 2``.
    """
    s2 = math.exp(2 * rho)
    value = -0.5 * (y - mu) ** 2 - 0.5 * mu**2 - s2 - 2 * _HALF_LOG_2PI + 0.5 * (1 + math.log(2 * math.pi)) + rho
    return value, y - 2 * mu, 1 - 2 * s2


def _log_normal(x, loc, log_scale):
    return -0.5 * ((x - loc) * torch.exp(-log_scale)) ** 2 - log_scale - _HALF_LOG_2PI


def integrand(mu, rho, y: float = Y):
    """``f(z) = log p(y | z) + log p(z) - log q(z)``: the same code in companion and plain torch."""
    zero = torch.zeros((), dtype=mu.dtype, device=mu.device)

    def f(z):
        return _log_normal(y, z, zero) + _log_normal(z, zero, zero) - _log_normal(z, mu, rho)

    return f


# --------------------------------------------------------------------------- three implementations


def companion_step(estimator: str, mu, rho, num_samples: int, grad: bool, validate: bool | None = None) -> float:
    """One estimate with companion: what a user writes (``validate=False``: ``Normal`` without
    torch's argument validation, to separate its cost from companion's)."""
    f = integrand(mu, rho)
    q = Normal(mu, rho.exp(), validate_args=validate)
    if estimator == "pathwise":
        est = pathwise(f, q, num_samples)
    elif estimator == "score_function":
        est = score_function(f, q, num_samples)
    elif estimator == "score_function_loo":
        est = score_function(f, q, num_samples, baseline="mean")
    else:
        est = measure_valued(f, q, num_samples)
    if grad:
        est.surrogate.backward()
    return est.value.item()


def torch_step(estimator: str, mu, rho, num_samples: int, grad: bool) -> float:
    """The same estimate written by hand in plain torch: the floor.

    The same draws as companion's estimator; without ``grad`` only the value ``mean f`` is
    computed from them (as companion's estimators do under ``no_grad``).
    """
    f = integrand(mu, rho)
    sigma = rho.exp()
    shape, kw = (num_samples,), {"dtype": mu.dtype, "device": mu.device}
    if estimator == "pathwise":
        surrogate = f(mu + sigma * torch.randn(shape, **kw)).mean()
    elif estimator in ("score_function", "score_function_loo"):
        z = (mu + sigma * torch.randn(shape, **kw)).detach()
        fz = f(z)
        if not grad:
            return fz.mean().item()
        log_q = _log_normal(z, mu, rho)
        w = fz.detach()
        if estimator == "score_function_loo":
            w = w - (w.sum() - w) / (num_samples - 1)
        surrogate = (fz + w * (log_q - log_q.detach())).mean()
    else:
        x, r, m = _weak_derivative_draws(mu, sigma, num_samples)
        fx = f(x)  # f's own dependence on (mu, rho), through log q
        if not grad:
            return fx.mean().item()
        g_mu, g_sigma = _weak_derivative_terms(f, mu, sigma, x, r, m)
        surrogate = (fx + g_mu * (mu - mu.detach()) + g_sigma * (sigma - sigma.detach())).mean()
    if grad:
        surrogate.backward()
    return surrogate.item()


@torch.no_grad()
def _weak_derivative_draws(mu, sigma, num_samples: int):
    """``x ~ q`` drawn as ``mu + sigma M U``, with ``R ~ Rayleigh(1)`` (by inversion) and ``M``
    double-sided Maxwell (``|M|`` the norm of three standard normals), ``U ~ U(0, 1)``; each
    ``(S,)``, as companion draws them."""
    shape, kw = (num_samples,), {"dtype": mu.dtype, "device": mu.device}
    r = torch.sqrt(-2 * torch.log1p(-torch.rand(shape, **kw)))
    m = torch.randn((3, *shape), **kw).square().sum(0).sqrt()
    m = m * (2 * torch.randint(0, 2, shape, device=mu.device) - 1)
    return mu.detach() + sigma.detach() * m * torch.rand(shape, **kw), r, m


@torch.no_grad()
def _weak_derivative_terms(f, mu, sigma, x, r, m):
    """The coupled weak-derivative terms (Mohamed et al. 2020, Table 1 and sec. 7.2):
    ``g_mu = (f(mu + sigma R) - f(mu - sigma R)) / (sigma sqrt(2 pi))`` and
    ``g_sigma = (f(mu + sigma M) - f(x)) / sigma``, each ``(S,)``."""
    mu, sigma = mu.detach(), sigma.detach()
    g_mu = (f(mu + sigma * r) - f(mu - sigma * r)) / (sigma * math.sqrt(2 * math.pi))
    g_sigma = (f(mu + sigma * m) - f(x)) / sigma
    return g_mu, g_sigma


def _pyro_parts(estimator: str, num_samples: int, mu0: float, rho0: float):
    import pyro
    import pyro.distributions as dist
    from pyro.infer import Trace_ELBO, TraceGraph_ELBO
    from torch.distributions import constraints

    y = torch.tensor(Y)

    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(z, 1.0), obs=y)

    def guide():
        mu = pyro.param("mu", torch.tensor(mu0))
        sigma = pyro.param("sigma", torch.tensor(math.exp(rho0)), constraint=constraints.positive)
        q = dist.Normal(mu, sigma)
        pyro.sample("z", q if estimator == "pathwise" else q.has_rsample_(False))

    kind = Trace_ELBO if estimator == "pathwise" else TraceGraph_ELBO
    elbo = kind(num_particles=num_samples, vectorize_particles=True, max_plate_nesting=0)
    return pyro, model, guide, elbo


def pyro_step(estimator: str, num_samples: int, device: torch.device):
    """A callable ``grad -> value`` running Pyro's estimator, and its parameters (mu, log sigma)."""
    if estimator not in ("pathwise", "score_function"):
        return None
    pyro, model, guide, elbo = _pyro_parts(estimator, num_samples, MU0, RHO0)
    pyro.clear_param_store()
    with torch.device(device):
        guide()  # creates the parameters on the device

    def step(grad: bool) -> float:
        with torch.device(device):
            if grad:
                loss = elbo.loss_and_grads(model, guide)
            else:
                loss = elbo.loss(model, guide)  # runs under no_grad
        for _, p in pyro.get_param_store().named_parameters():  # unconstrained leaves
            p.grad = None
        return -loss  # Pyro returns -ELBO as a Python float

    return step


# --------------------------------------------------------------------------- agreement


def _per_sample_stderr(estimator: str, num_samples: int, device) -> tuple[float, float, float]:
    """Standard errors of the S-sample estimates of (ELBO, dmu, drho), from per-sample terms.

    Each estimator's term for one draw is written as a program of ``(mu, rho)`` and of that
    draw's noise, and ``per_sample_gradients`` gives its gradient per draw; the variance of those
    over up to 200,000 draws, divided by ``S``, is the squared standard error.
    """
    torch.manual_seed(12345)
    params = (torch.tensor(MU0, device=device), torch.tensor(RHO0, device=device))
    n = min(num_samples, 200_000)  # enough to measure a variance to a few percent
    f = integrand(*params)
    sigma = params[1].exp()
    if estimator == "pathwise":
        eps = torch.randn(n, device=device)

        def program(p, e):
            return integrand(*p)(p[0] + p[1].exp() * e)

        noise, values = eps, f(params[0] + sigma * eps)
    elif estimator in ("score_function", "score_function_loo"):
        z = params[0] + sigma * torch.randn(n, device=device)
        values = f(z)
        b = (values.sum() - values) / (n - 1) if estimator == "score_function_loo" else torch.zeros_like(values)

        def program(p, noise):
            z_i, b_i = noise
            f_i, log_q = integrand(*p)(z_i), _log_normal(z_i, p[0], p[1])
            return f_i + (f_i - b_i).detach() * (log_q - log_q.detach())

        noise = (z, b)
    else:
        x, r, m = _weak_derivative_draws(params[0], sigma, n)
        g_mu, g_sigma = _weak_derivative_terms(f, params[0], sigma, x, r, m)
        values = f(x)

        def program(p, noise):
            x_i, gm, gs = noise
            s = p[1].exp()
            return integrand(*p)(x_i) + gm * (p[0] - p[0].detach()) + gs * (s - s.detach())

        noise = (x, g_mu, g_sigma)
    grads = per_sample_gradients(program, params, noise)
    spread = [values.var(), grads[0].var(), grads[1].var()]
    return tuple(math.sqrt(v.item() / num_samples) for v in spread)


# --------------------------------------------------------------------------- the run


def run(out_dir: Path, *, quick: bool, device: torch.device, seed: int = 0) -> Path:
    """Time every implementation at every ``S``; write ``throughput.json``; returns its path."""
    started = time.perf_counter()
    sizes = (100, 10_000, 100_000) if quick else (100, 1_000, 10_000, 100_000, 1_000_000)
    rounds = 3 if quick else 9
    budget = 0.005 if quick else 0.05  # seconds of work per implementation and round
    torch.manual_seed(seed)
    mu = torch.tensor(MU0, device=device, requires_grad=True)
    rho = torch.tensor(RHO0, device=device, requires_grad=True)
    metric = primary_metric(device)
    rows, agreement = [], []
    for num_samples in sizes:
        for estimator in ESTIMATORS:
            pyro = pyro_step(estimator, num_samples, device)
            for mode in ("value", "gradient"):
                grad = mode == "gradient"

                def run_companion(grad=grad, estimator=estimator, num_samples=num_samples):
                    with torch.set_grad_enabled(grad):
                        out = companion_step(estimator, mu, rho, num_samples, grad)
                    mu.grad = rho.grad = None
                    return out

                def run_unvalidated(grad=grad, estimator=estimator, num_samples=num_samples):
                    with torch.set_grad_enabled(grad):
                        out = companion_step(estimator, mu, rho, num_samples, grad, validate=False)
                    mu.grad = rho.grad = None
                    return out

                def run_torch(grad=grad, estimator=estimator, num_samples=num_samples):
                    with torch.set_grad_enabled(grad):
                        out = torch_step(estimator, mu, rho, num_samples, grad)
                    mu.grad = rho.grad = None
                    return out

                fns = {"companion": run_companion, "companion, validate_args=False": run_unvalidated,
                       "torch": run_torch}
                if pyro is not None:
                    fns["pyro"] = lambda grad=grad, pyro=pyro: pyro(grad)
                # calls per round: about `budget` seconds each, from one untimed call
                probe = time.perf_counter()
                run_torch()
                number = max(1, int(budget / max(time.perf_counter() - probe, 1e-6)))
                times = interleaved(fns, rounds=rounds, number=number, device=device, warmup=2)
                med = {name: summarize(t[metric])["median"] for name, t in times.items()}
                for name, t in times.items():
                    rows.append({
                        "samples": num_samples, "estimator": estimator, "mode": mode,
                        "implementation": name,
                        "wall_s": summarize(t["wall_s"]), "cpu_s": summarize(t["cpu_s"]),
                        "samples_per_s": num_samples / med[name],
                        "vs_torch": med[name] / med["torch"],
                        "calls_per_round": number,
                    })
            if num_samples == sizes[-1]:
                agreement.extend(_agreement(estimator, num_samples, mu, rho, pyro, device))
    settings = {"sizes": list(sizes), "rounds": rounds, "seconds_per_round": budget, "metric": metric,
                "mu": MU0, "rho": RHO0, "y": Y, "dtype": "float32",
                "pyro": {"pathwise": "Trace_ELBO", "score_function": "TraceGraph_ELBO"},
                "validation": "torch.distributions default (on)"}
    return write_result(out_dir, "throughput", device=device, profile="quick" if quick else "full",
                        settings=settings, rows=rows, extra={"agreement": agreement}, started=started)


def _agreement(estimator, num_samples, mu, rho, pyro, device) -> list[dict]:
    """Each implementation's value and gradient at ``num_samples`` against the exact ones."""
    exact = exact_elbo()
    stderr = _per_sample_stderr(estimator, num_samples, device)
    out = []
    impls = {"companion": companion_step, "torch": torch_step}
    for name, fn in impls.items():
        value = fn(estimator, mu, rho, num_samples, True)
        got = (value, mu.grad.item(), rho.grad.item())
        mu.grad = rho.grad = None
        out.append({"estimator": estimator, "implementation": name, "samples": num_samples,
                    "estimate": got, "exact": exact, "stderr": stderr})
    if pyro is not None:
        out.append(_pyro_agreement(estimator, num_samples, exact, stderr, device))
    return out


def _pyro_agreement(estimator, num_samples, exact, stderr, device) -> dict:
    pyro, model, guide, elbo = _pyro_parts(estimator, num_samples, MU0, RHO0)
    pyro.clear_param_store()
    with torch.device(device):
        loss = elbo.loss_and_grads(model, guide)
    store = pyro.get_param_store()
    # Pyro minimizes -ELBO; its "sigma" is stored unconstrained, as log sigma = rho
    leaves = dict(store.named_parameters())
    got = (-loss, -leaves["mu"].grad.item(), -leaves["sigma"].grad.item())
    return {"estimator": estimator, "implementation": "pyro", "samples": num_samples,
            "estimate": got, "exact": exact, "stderr": stderr}
