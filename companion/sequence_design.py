"""A toy protein-design problem: choose one of 20 amino acids at each of L positions.

Chapter *Discrete choices*. The fitness of a sequence ``s = (s_1, ..., s_L)`` is a Potts model,
the pairwise model used for protein families (per-site fields and pairwise couplings):

    F(s) = sum_i h_i[s_i] + sum_{i<j} J_ij[s_i, s_j].

On one-hot codes ``y_i = onehot(s_i)`` it is the multilinear form

    F(y) = sum_i h_i . y_i + sum_{i<j} y_i^T J_ij y_j,

which also scores relaxed sequences (points of a product of simplices). The design distribution
has independent positions, ``s_i ~ Cat(softmax(theta_i))``; because ``F`` is multilinear and the
positions are independent, the expected fitness is ``E[F(s)] = F(softmax(theta))`` exactly.

For a small ``L`` the ``A^L`` sequences can be enumerated, which gives the global optimum that an
annealed Gumbel-Softmax search (Jang et al. 2017; Maddison et al. 2017) is checked against.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .relaxations import gumbel_softmax, sample_gumbel

__all__ = [
    "AMINO_ACIDS",
    "PottsModel",
    "random_potts",
    "fitness",
    "sequence_fitness",
    "fitness_table",
    "global_optimum",
    "expected_fitness",
    "sequence_string",
    "DesignRun",
    "optimize_design",
]

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"  # the 20 standard amino acids, one-letter codes


class PottsModel(NamedTuple):
    """Fields ``h`` of shape ``(L, A)`` and couplings ``J`` of shape ``(L, L, A, A)``.

    ``J[i, j] = J[j, i].T`` and ``J[i, i] = 0``, so that
    ``F(y) = h . y + (1/2) sum_{i != j} y_i^T J_ij y_j``. ``L`` positions, ``A`` states each.
    """

    h: Tensor
    J: Tensor

    @property
    def length(self) -> int:
        return self.h.shape[0]

    @property
    def num_states(self) -> int:
        return self.h.shape[1]


def _check_model(model: PottsModel) -> PottsModel:
    if not isinstance(model, PottsModel):
        raise ValueError(f"model must be a PottsModel, got {type(model).__name__}")
    length, a = model.h.shape
    if model.J.shape != (length, length, a, a):
        raise ValueError(f"model.J must have shape {(length, length, a, a)}, got {tuple(model.J.shape)}")
    return model


def random_potts(
    length: int,
    num_states: int = 20,
    *,
    field_scale: float = 1.0,
    coupling_scale: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> PottsModel:
    """A Potts model with ``h_i[a] ~ N(0, field_scale^2)`` and ``J_ij[a, b] ~ N(0, coupling_scale^2)``.

    One coupling matrix per pair ``i < j``; ``J_ji = J_ij^T`` and ``J_ii = 0``. Couplings
    comparable to the fields (summed over a position's neighbours) make the best residue at one
    position depend on the others, so that the site-wise best sequence ``argmax_a h_i[a]`` is
    usually not the global optimum.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if isinstance(num_states, bool) or not isinstance(num_states, int) or num_states < 2:
        raise ValueError(f"num_states must be an int >= 2, got {num_states!r}")
    for name, scale in [("field_scale", field_scale), ("coupling_scale", coupling_scale)]:
        if not scale >= 0:
            raise ValueError(f"{name} must be >= 0, got {scale!r}")
    a = num_states
    h = field_scale * torch.randn(length, a, generator=generator, dtype=dtype)
    upper = coupling_scale * torch.randn(length, length, a, a, generator=generator, dtype=dtype)
    mask = torch.ones(length, length, dtype=dtype).triu(1)[:, :, None, None]  # pairs i < j
    upper = upper * mask
    return PottsModel(h, upper + upper.transpose(0, 1).transpose(2, 3))  # J_ji = J_ij^T


def fitness(model: PottsModel, y: Tensor) -> Tensor:
    """``F(y) = sum_i h_i . y_i + sum_{i<j} y_i^T J_ij y_j`` for ``y`` of shape ``(..., L, A)``.

    ``y`` may be one-hot (a sequence) or relaxed (a Gumbel-Softmax sample); returns ``(...)``.
    """
    _check_model(model)
    if y.shape[-2:] != model.h.shape:
        raise ValueError(f"y must have shape (..., {model.length}, {model.num_states}), got {tuple(y.shape)}")
    n = model.length * model.num_states
    flat = y.reshape(*y.shape[:-2], n)  # (..., L A)
    coupled = flat @ model.J.transpose(1, 2).reshape(n, n)  # (J y)_ia = sum_jb J_ij[a, b] y_jb
    return ((model.h.reshape(n) + coupled / 2) * flat).sum(-1)  # h . y + y^T J y / 2


def sequence_fitness(model: PottsModel, sequence: Tensor) -> Tensor:
    """``F(s)`` for integer sequences of shape ``(..., L)`` with entries in ``[0, A)``."""
    _check_model(model)
    if sequence.is_floating_point() or sequence.is_complex() or sequence.shape[-1:] != (model.length,):
        raise ValueError(f"sequence must be an integer tensor of shape (..., {model.length}), "
                         f"got {sequence.dtype} {tuple(sequence.shape)}")
    y = F.one_hot(sequence, model.num_states).to(model.h.dtype)
    return fitness(model, y)


def fitness_table(model: PottsModel, *, max_size: int = 20_000_000) -> Tensor:
    """All ``A^L`` fitness values as a tensor of shape ``(A,) * L``: entry ``[s_1, ..., s_L]`` is ``F(s)``.

    Built by broadcasting: ``h_i`` along axis ``i`` plus ``J_ij`` along axes ``i`` and ``j``.
    """
    _check_model(model)
    length, a = model.length, model.num_states
    if a**length > max_size:
        raise ValueError(f"the table has {a}^{length} entries, more than max_size={max_size}")
    table = torch.zeros((a,) * length, dtype=model.h.dtype, device=model.h.device)
    for i in range(length):
        shape = [1] * length
        shape[i] = a
        table = table + model.h[i].reshape(shape)
        for j in range(i + 1, length):
            shape_ij = [1] * length
            shape_ij[i] = shape_ij[j] = a
            table = table + model.J[i, j].reshape(shape_ij)
    return table


def global_optimum(model: PottsModel, **kwargs) -> tuple[Tensor, Tensor]:
    """``(s*, F(s*))`` with ``s* = argmax_s F(s)`` by exact enumeration of :func:`fitness_table`."""
    table = fitness_table(model, **kwargs)
    flat = table.argmax()
    sequence = torch.stack(torch.unravel_index(flat, table.shape))
    return sequence, table.reshape(-1)[flat]


def expected_fitness(model: PottsModel, logits: Tensor) -> Tensor:
    """``E[F(s)]`` for independent ``s_i ~ Cat(softmax(logits_i))``: exactly ``F(softmax(logits))``.

    ``F`` is linear in each ``y_i`` and the positions are independent, so the expectation of each
    term is the term at the means ``p_i = softmax(logits_i)``. ``logits``: ``(..., L, A)``.
    """
    return fitness(model, F.softmax(logits, dim=-1))


def sequence_string(sequence: Tensor, alphabet: str = AMINO_ACIDS) -> str:
    """The one-letter string of an integer sequence of shape ``(L,)``, e.g. ``'MKTW'``."""
    if sequence.dim() != 1:
        raise ValueError(f"sequence must have shape (L,), got {tuple(sequence.shape)}")
    return "".join(alphabet[int(k)] for k in sequence)


class DesignRun(NamedTuple):
    """logits: final ``(R, L, A)``; sequence: ``argmax`` of each run's logits, ``(R, L)``;
    fitness: ``F`` of each run's sequence, ``(R,)``; expected_fitness: exact ``E[F(s)]`` before
    each step and after the last, ``(steps + 1, R)``; tau: the temperature of each step,
    ``(steps,)``; sequences: the most probable sequence of each run before each step and after
    the last, ``(steps + 1, R, L)`` (``sequences[t]`` is what a budget of ``t`` steps returns)."""

    logits: Tensor
    sequence: Tensor
    fitness: Tensor
    expected_fitness: Tensor
    tau: Tensor
    sequences: Tensor

    @property
    def best(self) -> Tensor:
        """The fittest of the runs' sequences, ``(L,)``: the result of ``R`` restarts."""
        return self.sequence[self.fitness.argmax()]


def optimize_design(
    model: PottsModel,
    steps: int,
    tau: float | Callable[[int], float],
    *,
    num_runs: int = 1,
    num_samples: int = 16,
    lr: float = 0.1,
    init_scale: float = 0.0,
    generator: torch.Generator | None = None,
) -> DesignRun:
    """Maximize ``E[F(s)]`` over independent per-position logits with Gumbel-Softmax gradients.

    Each step draws ``num_samples`` relaxed sequences ``y = softmax((theta + G) / tau_t)`` per run
    and takes an Adam step on ``-(1/S) sum_s F(y_s)``, the pathwise gradient of the relaxed
    objective. ``tau`` is a constant or a schedule ``step -> tau_t`` (e.g.
    :func:`companion.relaxations.exponential_annealing`). The ``num_runs`` runs start from
    logits ``init_scale * N(0, 1)`` (uniform distributions for ``init_scale = 0``) and are
    independent restarts: each run's loss depends only on its own logits and Adam acts
    elementwise, so one optimizer over the stacked logits runs them side by side.
    """
    _check_model(model)
    for name, value, minimum in [("steps", steps, 1), ("num_runs", num_runs, 1), ("num_samples", num_samples, 1)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not init_scale >= 0:
        raise ValueError(f"init_scale must be >= 0, got {init_scale!r}")
    if not callable(tau) and not (isinstance(tau, (int, float)) and tau > 0):
        raise ValueError(f"tau must be a positive number or a schedule step -> tau, got {tau!r}")
    schedule = tau if callable(tau) else (lambda step: tau)
    shape = (num_samples, num_runs, model.length, model.num_states)
    init = torch.randn(shape[1:], generator=generator, dtype=model.h.dtype, device=model.h.device)
    logits = (init_scale * init).requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    history, taus, sequences = [], [], []
    for step in range(steps):
        tau_t = schedule(step)
        with torch.no_grad():
            history.append(expected_fitness(model, logits))
            sequences.append(logits.argmax(-1))
        gumbels = sample_gumbel(shape, generator=generator, dtype=logits.dtype, device=logits.device)
        y = gumbel_softmax(logits.expand(shape), tau_t, gumbels=gumbels)  # (S, R, L, A)
        loss = -fitness(model, y).mean(0).sum()  # runs are independent: their losses add
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        taus.append(tau_t)
    with torch.no_grad():
        history.append(expected_fitness(model, logits))
    final = logits.detach()
    sequence = final.argmax(-1)
    sequences.append(sequence)
    return DesignRun(final, sequence, sequence_fitness(model, sequence), torch.stack(history),
                     torch.tensor(taus, dtype=final.dtype), torch.stack(sequences))
