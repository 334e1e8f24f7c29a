"""companion.science.reaction_networks: interface, exact moments, simulators against them."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from companion.estimators import mc_summary, per_sample_gradients, variance_stderr
from companion.science import reaction_networks as rn
from helpers import Z, assert_mc_close

F64 = torch.float64
RATES = (20.0, 4.0, 10.0, 1.0)  # k_m, g_m, k_p, g_p per hour


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- interface


def test_network_rejects_bad_definitions():
    nu = torch.tensor([[1.0], [-1.0]], dtype=F64)
    with pytest.raises(ValueError, match="agree with the stoichiometry"):
        rn.ReactionNetwork(nu, lambda x: torch.ones(x.shape[0], 3, dtype=F64))
    with pytest.raises(ValueError, match="stoichiometry"):
        rn.ReactionNetwork(torch.ones(3, dtype=F64), lambda x: x)
    with pytest.raises(ValueError, match="integer"):
        rn.ReactionNetwork(nu / 2, lambda x: torch.ones(x.shape[0], 2, dtype=F64))
    with pytest.raises(ValueError, match="callable"):
        rn.ReactionNetwork(nu, 3.0)
    with pytest.raises(ValueError, match="species"):
        rn.ReactionNetwork(nu, lambda x: torch.ones(x.shape[0], 2, dtype=F64), species=("A", "B"))
    with pytest.raises(ValueError, match=">= 0"):
        rn.ReactionNetwork.first_order(nu, torch.tensor([1.0, -1.0]), torch.zeros(2, 1))


@pytest.mark.parametrize("bad", [{"k_m": -1.0}, {"g_p": float("nan")}, {"k_p": torch.ones(2)}])
def test_negative_or_malformed_rates_raise(bad):
    args = dict(zip(["k_m", "g_m", "k_p", "g_p"], RATES)) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        rn.gene_expression(**args)


def test_simulators_reject_bad_arguments():
    net = rn.gene_expression(*RATES)
    with pytest.raises(ValueError, match="x0"):
        rn.ssa(net, [-1, 0], 1.0, 5)
    with pytest.raises(ValueError, match="integer"):
        rn.ssa(net, [0.5, 0], 1.0, 5)
    with pytest.raises(ValueError, match="x0"):
        rn.cle(net, [0, 0, 0], 1.0, 5, dt=0.1)
    with pytest.raises(ValueError, match="t_end"):
        rn.ssa(net, [0, 0], 0.0, 5)
    with pytest.raises(ValueError, match="num_paths"):
        rn.ssa(net, [0, 0], 1.0, 0)
    with pytest.raises(ValueError, match="whole number"):
        rn.cle(net, [0, 0], 1.0, 5, dt=0.3)
    with pytest.raises(ValueError, match="dt"):
        rn.tau_leap(net, [0, 0], 1.0, 5, dt=-0.1)
    with pytest.raises(ValueError, match="eps"):
        rn.cle(net, [0, 0], 1.0, 5, dt=0.5, eps=torch.zeros(5, 3, 4, dtype=F64))
    with pytest.raises(ValueError, match="times"):
        rn.ssa(net, [0, 0], 1.0, 5, times=torch.tensor([0.5, 0.2]))
    with pytest.raises(ValueError, match="network"):
        rn.ssa("gene", [0, 0], 1.0, 5)
    bad = rn.ReactionNetwork(torch.tensor([[1.0]]), lambda x: x - 1)  # -1 at x = 0
    with pytest.raises(ValueError, match="negative rate"):
        rn.ssa(bad, [0], 1.0, 3)
    unknown = rn.ReactionNetwork(torch.tensor([[1.0]]), lambda x: x + 1)
    with pytest.raises(ValueError, match="affine"):
        rn.linear_moments(unknown, [0.0], 1.0)


@pytest.mark.parametrize("args,name", [((10.0, 0.0, 1.0), "gamma"), ((-1.0, 0.5, 1.0), "k"),
                                       ((10.0, 0.5, -1.0), "t")])
def test_immigration_death_mean_rejects_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        rn.immigration_death_mean(*args)


def test_shapes_determinism_and_recorded_paths():
    net = rn.gene_expression(*RATES)
    a = rn.ssa(net, [0, 0], 0.5, 50, generator=_gen(1))
    b = rn.ssa(net, [0, 0], 0.5, 50, generator=_gen(1))
    assert a.shape == (50, 2) and torch.equal(a, b) and torch.all(a == a.round())
    times = torch.tensor([0.1, 0.25, 0.5], dtype=F64)
    rec = rn.ssa(net, [0, 0], 0.5, 50, generator=_gen(1), times=times)
    assert rec.shape == (50, 3, 2) and torch.equal(rec[:, -1], a)  # same stream, same path
    path = rn.cle(net, [0.0, 0.0], 0.5, 7, dt=0.05, generator=_gen(2), return_path=True)
    assert path.shape == (7, 11, 2)
    assert rn.tau_leap(net, [0, 0], 0.5, 7, dt=0.05, generator=_gen(3)).shape == (7, 2)


def test_cle_is_differentiable_and_finite_at_zero_propensity():
    k = torch.tensor(10.0, dtype=F64, requires_grad=True)
    gamma = torch.tensor(0.5, dtype=F64, requires_grad=True)
    x = rn.cle(rn.immigration_death(k, gamma), [0.0], 1.0, 20, dt=0.1, generator=_gen(4))
    grads = torch.autograd.grad(x.sum(), (k, gamma))  # the death propensity is 0 at t = 0
    assert all(torch.isfinite(gr) for gr in grads)


# --------------------------------------------------------------------------- exact references


def test_immigration_death_numbers():
    k = torch.tensor(10.0, dtype=F64, requires_grad=True)
    gamma = torch.tensor(0.5, dtype=F64, requires_grad=True)
    m = rn.immigration_death_mean(k, gamma, 3.0)
    dk, dg = torch.autograd.grad(m, (k, gamma))
    assert round(m.item(), 4) == 15.5374
    assert round(dk.item(), 5) == 1.55374
    assert round(dg.item(), 5) == -17.68698
    # a non-zero start decays: m0 e^{-gamma t} adds to the mean
    assert math.isclose(rn.immigration_death_mean(10.0, 0.5, 3.0, m0=4.0).item(),
                        15.537396797 + 4 * math.exp(-1.5), rel_tol=1e-9)


def test_linear_moments_against_scipy_ode():
    net = rn.gene_expression(*RATES)
    km, gm, kp, gp = RATES

    def rhs(t, y):
        m, p, vm, cmp_, vp = y
        return [km - gm * m, kp * m - gp * p,
                km + gm * m - 2 * gm * vm,
                kp * vm - (gm + gp) * cmp_,
                kp * m + gp * p + 2 * kp * cmp_ - 2 * gp * vp]

    sol = integrate.solve_ivp(rhs, (0, 1.5), [1, 3, 0, 0, 0], rtol=1e-11, atol=1e-11)
    mean, cov = rn.linear_moments(net, [1.0, 3.0], 1.5)
    m, p, vm, cmp_, vp = sol.y[:, -1]
    assert np.allclose(mean.numpy(), [m, p], rtol=1e-8)
    assert np.allclose(cov.numpy(), [[vm, cmp_], [cmp_, vp]], rtol=1e-7)


def test_ssa_immigration_death_is_poisson():
    x = rn.ssa(rn.immigration_death(10.0, 0.5), [0], 3.0, 20_000, generator=_gen(5))[:, 0]
    mean = 15.537396797
    values = np.arange(5, 30)
    observed = np.array([(x == v).sum().item() for v in values], dtype=float)
    expected = 20_000 * stats.poisson(mean).pmf(values)
    observed = np.append(observed, 20_000 - observed.sum())
    expected = np.append(expected, 20_000 - expected.sum())
    assert stats.chisquare(observed, expected).pvalue > 1e-4  # false-alarm rate 1e-4


def test_ssa_protein_moments():
    net = rn.gene_expression(*RATES)
    x = rn.ssa(net, [0, 0], 1.0, 20_000, generator=_gen(6))
    mean, cov = rn.linear_moments(net, [0.0, 0.0], 1.0)
    assert_mc_close(x, mean)
    assert abs(x[:, 1].var() - cov[1, 1]) <= Z * variance_stderr(x[:, 1])


@pytest.mark.parametrize("scheme", ["cle", "tau_leap"])
def test_euler_stationary_variance_inflation(scheme):
    net = rn.immigration_death(10.0, 1.0)
    sim = rn.cle if scheme == "cle" else rn.tau_leap
    x = sim(net, [10], 10.0, 20_000, dt=0.5, generator=_gen(7))[:, 0]
    predicted = 10.0 * 2 / (2 - 0.5)  # 13.33, not 10
    assert abs(x.var() - predicted) <= Z * variance_stderr(x)
    assert abs(x.mean() - 10.0) <= Z * x.std() / math.sqrt(len(x))


# --------------------------------------------------------------------------- agreement


def test_cle_pathwise_gradient_matches_euler_mean_derivative():
    theta = tuple(torch.tensor(v, dtype=F64) for v in RATES)

    def protein(rates, eps_one):
        return rn.cle(rn.gene_expression(*rates), [0.0, 0.0], 1.0, 1, dt=0.1, eps=eps_one.unsqueeze(0))[0, 1]

    eps = torch.randn(2_000, 10, 4, generator=_gen(8), dtype=F64)
    grads = per_sample_gradients(protein, theta, eps)
    leaves = [t.clone().requires_grad_() for t in theta]
    euler = torch.autograd.grad(protein(leaves, torch.zeros(10, 4, dtype=F64)), leaves)
    for per_path, exact in zip(grads, euler):
        s = mc_summary(per_path)
        assert abs(s.mean - exact) <= Z * s.stderr


def test_ssa_common_random_numbers_couple_the_paths():
    up = rn.ssa(rn.immigration_death(10.5, 0.5), [0], 3.0, 5_000, generator=_gen(9))[:, 0]
    down = rn.ssa(rn.immigration_death(9.5, 0.5), [0], 3.0, 5_000, generator=_gen(9))[:, 0]
    fd = mc_summary(up - down)
    exact = (rn.immigration_death_mean(10.5, 0.5, 3.0) - rn.immigration_death_mean(9.5, 0.5, 3.0)).item()
    assert abs(fd.mean - exact) <= Z * fd.stderr
    assert fd.variance < 0.5 * (up.var() + down.var())  # coupled: far below independent runs
