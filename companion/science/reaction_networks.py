"""Stochastic chemical reaction networks: exact simulation, the chemical Langevin equation, moments.

Chapter *Synthetic biology*. A well-mixed network of ``S`` species and ``R`` reactions is given by
its stoichiometry ``nu`` ``(R, S)`` (row ``r``: the net change of the counts when reaction ``r``
fires) and its propensities ``a(x)`` ``(..., S) -> (..., R)`` (reaction ``r`` fires at rate
``a_r(x)``). Three ways to simulate it:

* :func:`ssa`: Gillespie's direct method (Gillespie 1977), exact for the chemical master
  equation, vectorized over paths; integer counts, so not differentiable in the rates;
* :func:`cle`: the chemical Langevin equation (Gillespie 2000)::

      dX = nu^T a(X) dt + nu^T diag(sqrt(a(X))) dW,

  by Euler-Maruyama with reparameterized increments ``dW = sqrt(dt) eps``, ``eps ~ N(0, I)``:
  a differentiable function of the rate constants and of ``eps`` (the pathwise route);
* :func:`tau_leap`: Poisson tau-leaping (Gillespie 2001), ``X += nu^T Poisson(a(X) dt)``.

For networks whose propensities are affine in the state (zeroth- and first-order reactions,
built with :meth:`ReactionNetwork.first_order`), :func:`linear_moments` gives the exact mean and
covariance of the master equation at any time, differentiable in the rates; and
:func:`immigration_death_mean` is the closed form of the simplest one. :func:`gene_expression`
is the two-stage model of transcription and translation (Thattai and van Oudenaarden 2001).

Counts are float tensors (``torch.float64`` by default); paths come first: ``(num_paths, S)``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .._checks import check_count

__all__ = [
    "ReactionNetwork",
    "immigration_death",
    "gene_expression",
    "ssa",
    "cle",
    "tau_leap",
    "linear_moments",
    "immigration_death_mean",
]

Propensities = Callable[[Tensor], Tensor]


def _as_rate(name: str, value, dtype=torch.float64) -> Tensor:
    rate = torch.as_tensor(value, dtype=dtype) if not isinstance(value, Tensor) else value
    if not rate.is_floating_point() or rate.dim() != 0:
        raise ValueError(f"{name} must be a float or a 0-dimensional floating-point tensor")
    if not bool(torch.isfinite(rate)) or bool(rate < 0):
        raise ValueError(f"{name} must be a finite rate >= 0, got {rate.item()!r}")
    return rate


def _check_time(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class ReactionNetwork:
    """A well-mixed reaction network: stoichiometry ``(R, S)`` and propensities ``x -> a(x)``.

    stoichiometry
        ``nu``, a tensor ``(R, S)``: row ``r`` is the change of the ``S`` counts when reaction
        ``r`` fires.
    propensities
        a function mapping states ``(..., S)`` to rates ``(..., R)``, each ``>= 0`` at
        non-negative states. Rate constants it closes over may require grad (:func:`cle` is
        differentiable in them).
    species
        optional names of the species, for printing.

    The propensities are called once on the zero state, to check that they return ``R`` rates.
    """

    def __init__(self, stoichiometry: Tensor, propensities: Propensities, *,
                 species: tuple[str, ...] | None = None) -> None:
        if not isinstance(stoichiometry, Tensor) or stoichiometry.dim() != 2 or stoichiometry.numel() == 0:
            raise ValueError("stoichiometry must be a non-empty tensor of shape (R, S)")
        if not callable(propensities):
            raise ValueError(f"propensities must be callable, got {type(propensities).__name__}")
        nu = stoichiometry.to(torch.float64)
        if not torch.all(nu == nu.round()):
            raise ValueError("stoichiometry must hold integer changes of the counts")
        num_reactions, num_species = nu.shape
        probe = propensities(torch.zeros(1, num_species, dtype=torch.float64))
        if not isinstance(probe, Tensor) or probe.shape != (1, num_reactions):
            shape = tuple(probe.shape) if isinstance(probe, Tensor) else type(probe).__name__
            raise ValueError(
                f"propensities must map states (..., {num_species}) to rates (..., {num_reactions}) "
                f"to agree with the stoichiometry ({num_reactions} reactions); got {shape} for one state")
        if species is not None and len(species) != num_species:
            raise ValueError(f"species must name {num_species} species, got {species!r}")
        self.stoichiometry = nu
        self.propensities = propensities
        self.species = tuple(species) if species is not None else tuple(f"X{i}" for i in range(num_species))
        self.affine: tuple[Tensor, Tensor] | None = None

    @property
    def num_reactions(self) -> int:
        return self.stoichiometry.shape[0]

    @property
    def num_species(self) -> int:
        return self.stoichiometry.shape[1]

    @classmethod
    def first_order(cls, stoichiometry: Tensor, rate0: Tensor, rate1: Tensor, *,
                    species: tuple[str, ...] | None = None) -> "ReactionNetwork":
        """A network with propensities affine in the state: ``a(x) = c + K x``.

        ``c = rate0`` ``(R,)`` holds the zeroth-order rates, ``K = rate1`` ``(R, S)`` the
        first-order ones; both ``>= 0``. Such networks have exact moment equations
        (:func:`linear_moments`), kept in ``network.affine``.
        """
        c, k = (torch.as_tensor(v, dtype=torch.float64) if not isinstance(v, Tensor) else v
                for v in (rate0, rate1))
        if c.dim() != 1 or k.dim() != 2 or k.shape[0] != c.shape[0]:
            raise ValueError("rate0 must be (R,) and rate1 (R, S), with one R")
        if bool(torch.any(c < 0)) or bool(torch.any(k < 0)):
            raise ValueError("rate0 and rate1 must be >= 0")
        network = cls(stoichiometry, lambda x: c + x @ k.T, species=species)
        if network.num_species != k.shape[1]:
            raise ValueError(f"rate1 must have {network.num_species} columns, got {k.shape[1]}")
        network.affine = (c, k)
        return network


def immigration_death(k, gamma) -> ReactionNetwork:
    """``0 -> X`` at rate ``k``, ``X -> 0`` at rate ``gamma X``: the simplest birth-death network.

    From ``X(0) = 0``, ``X(t)`` is Poisson with mean :func:`immigration_death_mean`.
    Rates are floats or 0-d tensors (which may require grad).
    """
    k, gamma = _as_rate("k", k), _as_rate("gamma", gamma)
    nu = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    zero = torch.zeros((), dtype=k.dtype)
    return ReactionNetwork.first_order(nu, torch.stack([k, zero]),
                                       torch.stack([zero, gamma]).unsqueeze(-1), species=("X",))


def gene_expression(k_m, g_m, k_p, g_p) -> ReactionNetwork:
    """The two-stage model of gene expression, species ``(mRNA, protein)``::

        0 -> M      at rate k_m          (transcription)
        M -> 0      at rate g_m M        (mRNA decay)
        M -> M + P  at rate k_p M        (translation)
        P -> 0      at rate g_p P        (protein decay or dilution)

    Stationary moments (Thattai and van Oudenaarden 2001): ``E[M] = k_m / g_m``, M Poisson,
    ``E[P] = k_m k_p / (g_m g_p)``, Fano factor ``Var[P] / E[P] = 1 + k_p / (g_m + g_p)``.
    Rates are floats or 0-d tensors (which may require grad), all ``>= 0``.
    """
    k_m, g_m, k_p, g_p = (_as_rate(n, v) for n, v in
                          [("k_m", k_m), ("g_m", g_m), ("k_p", k_p), ("g_p", g_p)])
    nu = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    zero = torch.zeros((), dtype=k_m.dtype)
    rate0 = torch.stack([k_m, zero, zero, zero])
    rate1 = torch.stack([torch.stack([zero, zero]), torch.stack([g_m, zero]),
                         torch.stack([k_p, zero]), torch.stack([zero, g_p])])
    return ReactionNetwork.first_order(nu, rate0, rate1, species=("mRNA", "protein"))


def _check_network(network) -> ReactionNetwork:
    if not isinstance(network, ReactionNetwork):
        raise ValueError(f"network must be a ReactionNetwork, got {type(network).__name__}")
    return network


def _initial_state(network: ReactionNetwork, x0, num_paths: int, integer: bool) -> Tensor:
    x0 = torch.as_tensor(x0, dtype=torch.float64) if not isinstance(x0, Tensor) else x0.to(torch.float64)
    if x0.shape not in ((network.num_species,), (num_paths, network.num_species)):
        raise ValueError(f"x0 must have shape ({network.num_species},) or ({num_paths}, {network.num_species})")
    if bool(torch.any(x0 < 0)) or not bool(torch.all(torch.isfinite(x0))):
        raise ValueError("x0 must hold finite counts >= 0")
    if integer and not torch.all(x0 == x0.round()):
        raise ValueError("x0 must hold integer counts for the exact simulation")
    return x0.expand(num_paths, network.num_species).clone()


def ssa(network: ReactionNetwork, x0, t_end: float, num_paths: int, *,
        generator: torch.Generator | None = None, times: Tensor | None = None) -> Tensor:
    """Gillespie's direct method (Gillespie 1977), vectorized over paths: the counts at ``t_end``.

    Each loop step advances every unfinished path by one reaction: with ``a0 = sum_r a_r(x)``
    and two uniforms ``(u1, u2)``, the waiting time is ``tau = -log(1 - u1) / a0`` and the
    reaction is the first ``r`` with ``sum_{r' <= r} a_r' > u2 a0``. A path stops when its next
    reaction would fall after ``t_end`` (or ``a0 = 0``).

    Common random numbers: at step ``n`` the uniforms are drawn for *all* ``num_paths`` paths,
    finished or not, so path ``i``'s ``n``-th reaction always uses row ``i`` of the ``n``-th
    draw. Two calls with identically seeded generators therefore share each path's random
    stream, whatever the rates: finite differences on them are coupled.

    x0
        initial counts, ``(S,)`` or ``(num_paths, S)``, integers ``>= 0``.
    times
        optional increasing observation times in ``[0, t_end]``; then the result is
        ``(num_paths, len(times), S)``, the counts at each time.

    Returns the counts at ``t_end``, ``(num_paths, S)`` (float64).
    """
    _check_network(network)
    t_end = _check_time("t_end", t_end)
    check_count("num_paths", num_paths)
    x = _initial_state(network, x0, num_paths, integer=True)
    if times is not None:
        times = torch.as_tensor(times, dtype=torch.float64)
        if times.dim() != 1 or len(times) == 0 or bool(torch.any(times.diff() <= 0)) \
                or bool(times[0] < 0) or bool(times[-1] > t_end):
            raise ValueError("times must be a 1-d increasing tensor of times in [0, t_end]")
        record = x.unsqueeze(1).repeat(1, len(times), 1)  # (P, K, S)
    nu = network.stoichiometry
    t = torch.zeros(num_paths, dtype=torch.float64)
    active = torch.arange(num_paths)
    with torch.no_grad():
        while len(active):
            u = torch.rand(num_paths, 2, generator=generator, dtype=torch.float64)[active]  # (A, 2)
            xa = x[active]
            a = network.propensities(xa)  # (A, R)
            if bool(torch.any(a < 0)):
                raise ValueError("propensities returned a negative rate")
            cumulative = a.cumsum(-1)  # (A, R)
            a0 = cumulative[:, -1]
            tau = torch.where(a0 > 0, -torch.log1p(-u[:, 0]) / a0, torch.inf)  # a0 = 0: it stops
            t_next = t[active] + tau
            if times is not None:  # x holds on [t, t_next): write it at the times in that interval
                hold = times >= t[active].unsqueeze(-1)  # later reactions overwrite
                record[active] = torch.where(hold.unsqueeze(-1), xa.unsqueeze(1), record[active])
            fire = t_next <= t_end
            active, u, cumulative, a0, xa, t_next = (v[fire] for v in (active, u, cumulative, a0, xa, t_next))
            which = (cumulative <= u[:, 1:] * a0.unsqueeze(-1)).sum(-1)
            which = which.clamp(max=network.num_reactions - 1)  # u2 a0 rounding at the top edge
            x[active] = xa + nu[which]
            t[active] = t_next
    return record if times is not None else x


def _cle_noise(network: ReactionNetwork, num_paths: int, num_steps: int, eps: Tensor | None,
               generator: torch.Generator | None) -> Tensor:
    shape = (num_paths, num_steps, network.num_reactions)
    if eps is not None:
        if not isinstance(eps, Tensor) or eps.shape != shape:
            raise ValueError(f"eps must be a tensor of shape (num_paths, steps, R) = {shape}")
        return eps
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def _num_steps(t_end: float, dt) -> int:
    dt = _check_time("dt", dt)
    steps = round(t_end / dt)
    if steps < 1 or abs(steps * dt - t_end) > 1e-9 * t_end:
        raise ValueError(f"t_end / dt must be a whole number of steps, got {t_end} / {dt}")
    return steps


def _sqrt_rates(a: Tensor) -> Tensor:
    """``sqrt(max(a, 0))`` with a finite gradient at 0 (where the noise of a reaction vanishes)."""
    positive = a > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, a, torch.ones_like(a))),
                       torch.zeros_like(a))


def cle(network: ReactionNetwork, x0, t_end: float, num_paths: int, *, dt: float,
        generator: torch.Generator | None = None, eps: Tensor | None = None,
        return_path: bool = False) -> Tensor:
    """The chemical Langevin equation (Gillespie 2000) by Euler-Maruyama: counts at ``t_end``.

    With ``n = t_end / dt`` steps and standard normals ``eps`` ``(num_paths, n, R)``::

        x_{i+1} = x_i + dt nu^T a(x_i) + sqrt(dt) nu^T (sqrt(a_+(x_i)) * eps_i),

    ``a_+ = max(a, 0)``: a state the Gaussian increments push below zero keeps its (affine)
    drift, and its reactions' noise is cut at zero. The result is a differentiable function of
    the rate constants the propensities close over and of ``eps``: its gradient is the
    pathwise (reparameterization) gradient. For a network with affine propensities, ``eps = 0``
    gives ``E[x_n]`` of the scheme exactly (the Euler solution of the rate equations).

    x0
        ``(S,)`` or ``(num_paths, S)``, counts ``>= 0`` (need not be integers).
    eps
        the standard normal increments ``(num_paths, n, R)``, or drawn from ``generator``.
    return_path
        return the whole path ``(num_paths, n + 1, S)`` instead of ``(num_paths, S)``.

    The stationary variance of the scheme is inflated by the step: for immigration-death,
    ``(k / gamma) 2 / (2 - gamma dt)`` instead of ``k / gamma`` (chapter *Synthetic biology*).
    """
    _check_network(network)
    t_end = _check_time("t_end", t_end)
    check_count("num_paths", num_paths)
    steps = _num_steps(t_end, dt)
    x = _initial_state(network, x0, num_paths, integer=False)
    eps = _cle_noise(network, num_paths, steps, eps, generator)
    nu = network.stoichiometry
    path = [x]
    for i in range(steps):
        a = network.propensities(x)  # (P, R)
        x = x + dt * (a @ nu) + math.sqrt(dt) * ((_sqrt_rates(a) * eps[:, i]) @ nu)
        if return_path:
            path.append(x)
    return torch.stack(path, 1) if return_path else x


def tau_leap(network: ReactionNetwork, x0, t_end: float, num_paths: int, *, dt: float,
             generator: torch.Generator | None = None) -> Tensor:
    """Poisson tau-leaping (Gillespie 2001): ``x_{i+1} = x_i + nu^T Poisson(a_+(x_i) dt)``.

    Integer counts, fixed steps, not differentiable (Poisson draws have no path). Counts can
    overshoot below zero when ``dt`` is large; they are not clipped. Returns ``(num_paths, S)``.
    """
    _check_network(network)
    t_end = _check_time("t_end", t_end)
    check_count("num_paths", num_paths)
    steps = _num_steps(t_end, dt)
    x = _initial_state(network, x0, num_paths, integer=True)
    nu = network.stoichiometry
    with torch.no_grad():
        for _ in range(steps):
            rates = network.propensities(x).clamp(min=0) * dt
            x = x + torch.poisson(rates, generator=generator) @ nu
    return x


def linear_moments(network: ReactionNetwork, x0, t: float) -> tuple[Tensor, Tensor]:
    """Exact mean ``(S,)`` and covariance ``(S, S)`` at time ``t`` of a first-order network.

    For propensities ``a(x) = c + K x`` the master equation closes on its first two moments::

        dm/dt = nu^T c + J m,                          J = nu^T K,
        dC/dt = J C + C J^T + nu^T diag(c + K m) nu,

    a linear system in ``(m, C)`` solved with one matrix exponential (``torch.linalg.matrix_exp``),
    differentiable in the rates. ``x0`` is a deterministic initial state ``(S,)``.
    The network must come from :meth:`ReactionNetwork.first_order` (or :func:`gene_expression`).
    """
    _check_network(network)
    if network.affine is None:
        raise ValueError("network must have affine propensities (ReactionNetwork.first_order)")
    t = _check_time("t", t)
    c, k = network.affine
    nu = network.stoichiometry.to(c.dtype)
    s = network.num_species
    x0 = _initial_state(network, x0, 1, integer=False)[0].to(c.dtype)
    jac = nu.T @ k  # (S, S)
    eye = torch.eye(s, dtype=c.dtype)
    outer = nu.unsqueeze(-1) * nu.unsqueeze(-2)  # (R, S, S): nu_r nu_r^T
    d0 = (c[:, None, None] * outer).sum(0).reshape(-1)  # vec sum_r c_r nu_r nu_r^T
    d1 = torch.einsum("rs,rij->ijs", k, outer).reshape(s * s, s)  # vec sum_r K_rs nu_r nu_r^T
    n = s + s * s + 1
    rows = [torch.cat([jac, torch.zeros(s, s * s, dtype=c.dtype), (nu.T @ c).unsqueeze(-1)], 1),
            torch.cat([d1, torch.kron(jac, eye) + torch.kron(eye, jac), d0.unsqueeze(-1)], 1),
            torch.zeros(1, n, dtype=c.dtype)]
    generator_matrix = torch.cat(rows, 0)  # (n, n), acting on y = (m, vec C, 1)
    y0 = torch.cat([x0, torch.zeros(s * s, dtype=c.dtype), torch.ones(1, dtype=c.dtype)])
    y = torch.linalg.matrix_exp(generator_matrix * t) @ y0
    cov = y[s:s + s * s].reshape(s, s)
    return y[:s], 0.5 * (cov + cov.T)


def immigration_death_mean(k, gamma, t, m0=0.0) -> Tensor:
    """``E[X(t)] = m0 e^{-gamma t} + (k / gamma)(1 - e^{-gamma t})`` for ``0 -> X -> 0``.

    The exact mean of the master equation (and of the rate equation) of
    :func:`immigration_death` started at ``m0``. Arguments are floats or tensors (broadcast),
    with ``k >= 0``, ``gamma > 0``, ``t >= 0``, ``m0 >= 0``; the result is differentiable.
    For ``k = 10``, ``gamma = 0.5``, ``t = 3``, ``m0 = 0``: ``m = 15.5374``,
    ``dm/dk = 1.55374``, ``dm/dgamma = -17.68698``.
    """
    k, gamma, t, m0 = (torch.as_tensor(v, dtype=torch.float64) if not isinstance(v, Tensor) else v
                       for v in (k, gamma, t, m0))
    for name, value, strict in [("k", k, False), ("gamma", gamma, True), ("t", t, False), ("m0", m0, False)]:
        bad = (value <= 0) if strict else (value < 0)
        if bool(torch.any(bad | ~torch.isfinite(value))):
            raise ValueError(f"{name} must be finite and {'> 0' if strict else '>= 0'}")
    growth = -torch.expm1(-gamma * t)  # 1 - e^{-gamma t}, accurate for small gamma t
    return m0 * (1 - growth) + k / gamma * growth
