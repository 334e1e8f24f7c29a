"""companion.sequence_design: the Potts fitness, exact enumeration, annealed Gumbel-Softmax search."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Independent, OneHotCategorical

from companion.estimators import enumerate_expectation
from companion.relaxations import exponential_annealing
from companion.sequence_design import (
    AMINO_ACIDS,
    PottsModel,
    expected_fitness,
    fitness,
    fitness_table,
    global_optimum,
    optimize_design,
    random_potts,
    sequence_fitness,
    sequence_string,
)



def _model(length=3, states=5, seed=0, **kwargs):
    return random_potts(length, states, generator=torch.Generator().manual_seed(seed), **kwargs)


def _brute_force(model, s):
    """F(s) = sum_i h_i[s_i] + sum_{i<j} J_ij[s_i, s_j], term by term."""
    total = sum(model.h[i, s[i]] for i in range(model.length))
    for i, j in itertools.combinations(range(model.length), 2):
        total = total + model.J[i, j, s[i], s[j]]
    return total


# --------------------------------------------------------------------------- interface


def test_random_potts_shapes_symmetry_and_determinism():
    m = _model(4, 20)
    assert m.h.shape == (4, 20) and m.J.shape == (4, 4, 20, 20)
    assert m.length == 4 and m.num_states == 20 and len(AMINO_ACIDS) == 20
    assert torch.equal(m.J, m.J.permute(1, 0, 3, 2))  # J_ji = J_ij^T
    assert torch.all(m.J[range(4), range(4)] == 0)  # no self-coupling
    assert torch.equal(_model(4, 20).J, m.J)


@pytest.mark.parametrize("kwargs, name", [
    ({"length": 0}, "length"), ({"length": 3, "num_states": 1}, "num_states"),
    ({"length": 3, "coupling_scale": -1.0}, "coupling_scale"),
])
def test_random_potts_rejects_bad_parameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        random_potts(**kwargs)


def test_bad_inputs_raise_value_errors_naming_them():
    m = _model()
    with pytest.raises(ValueError, match="y must have shape"):
        fitness(m, torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="sequence"):
        sequence_fitness(m, torch.zeros(3))  # floats are not residues
    with pytest.raises(ValueError, match="model.J"):
        fitness(PottsModel(m.h, m.J[:2]), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="model"):
        fitness((m.h, m.J), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="max_size"):
        fitness_table(m, max_size=10)
    with pytest.raises(ValueError, match="steps"):
        optimize_design(m, 0, 1.0)
    with pytest.raises(ValueError, match="lr"):
        optimize_design(m, 5, 1.0, lr=0.0)
    with pytest.raises(ValueError, match="tau"):
        optimize_design(m, 5, -1.0)


def test_optimize_design_shapes_and_determinism():
    m = _model()
    run = optimize_design(m, 7, 0.5, num_runs=3, num_samples=4, generator=torch.Generator().manual_seed(1))
    assert run.logits.shape == (3, 3, 5) and run.sequence.shape == (3, 3)
    assert run.expected_fitness.shape == (8, 3) and run.tau.shape == (7,)
    again = optimize_design(m, 7, 0.5, num_runs=3, num_samples=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(run.logits, again.logits)
    assert sequence_string(torch.tensor([0, 19, 10])) == "AYM"
    # sequences[t] is what a budget of t steps returns: the same generator replays the first t steps
    assert run.sequences.shape == (8, 3, 3) and torch.equal(run.sequences[-1], run.sequence)
    short = optimize_design(m, 4, 0.5, num_runs=3, num_samples=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(run.sequences[4], short.sequence)
    assert torch.equal(run.sequences[:5], short.sequences)


# --------------------------------------------------------------------------- correctness


def test_fitness_is_the_potts_energy_term_by_term():
    m = _model(4, 6)
    seqs = torch.randint(0, 6, (50, 4), generator=torch.Generator().manual_seed(2))
    ref = torch.stack([_brute_force(m, s) for s in seqs])
    assert torch.allclose(sequence_fitness(m, seqs), ref, rtol=1e-12)
    table = fitness_table(m)
    assert torch.allclose(table[tuple(seqs.T)], ref, rtol=1e-12)


def test_global_optimum_by_a_python_loop():
    m = _model(3, 6, seed=3)
    best = max(itertools.product(range(6), repeat=3), key=lambda s: _brute_force(m, s).item())
    seq, value = global_optimum(m)
    assert tuple(seq.tolist()) == best
    assert value.item() == pytest.approx(_brute_force(m, best).item(), rel=1e-12)


def test_expected_fitness_equals_exact_enumeration():
    # multilinear F and independent positions: E[F(s)] = F(softmax(logits)), to rounding
    m = _model(3, 5, seed=4)
    logits = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    dist = Independent(OneHotCategorical(logits=logits), 1)
    ref = enumerate_expectation(lambda y: fitness(m, y), dist)
    assert expected_fitness(m, logits).item() == pytest.approx(ref.item(), rel=1e-12)


def test_the_relaxed_fitness_agrees_with_the_discrete_one_at_vertices():
    m = _model(3, 5, seed=6)
    seqs = torch.randint(0, 5, (20, 3), generator=torch.Generator().manual_seed(7))
    y = F.one_hot(seqs, 5).double()
    assert torch.allclose(fitness(m, y), torch.stack([_brute_force(m, s) for s in seqs]))


# --------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_annealed_search_finds_the_enumerated_optimum(seed):
    # three generated instances; the best of 16 annealed restarts is the exact optimum
    m = random_potts(3, 20, coupling_scale=0.5, generator=torch.Generator().manual_seed(100 + seed))
    best, value = global_optimum(m)
    schedule = lambda step: exponential_annealing(step, 0.01, tau0=3.0, tau_min=0.1)  # noqa: E731
    run = optimize_design(m, 400, schedule, num_runs=16, num_samples=8, lr=0.05, init_scale=2.0,
                          generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run.best, best)
    assert run.fitness.max().item() == pytest.approx(value.item(), rel=1e-12)
    # the exact expected fitness never exceeds the optimum (it is an average of F)
    assert torch.all(run.expected_fitness <= value + 1e-9)
    assert run.tau[0].item() == 3.0 and run.tau[-1].item() == pytest.approx(0.1)


def test_history_starts_at_the_mean_over_all_sequences():
    # init_scale = 0: uniform distributions, whose expected fitness is the table's mean
    m = _model(3, 5, seed=8)
    run = optimize_design(m, 3, 0.5, num_runs=2, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(run.expected_fitness[0], fitness_table(m).mean().expand(2), rtol=1e-12)
