"""companion.two_sample: energy distance and MMD against scipy and brute force; their tests."""
import itertools
import math

import pytest
import scipy.stats
import torch

from companion.two_sample import (
    energy_distance,
    gaussian_kernel,
    jackknife_stderr,
    median_bandwidth,
    mmd2,
    permutation_test,
)
from helpers import Z, assert_mc_close


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _brute_force(x, y, k, unbiased):
    """The statistic by explicit double sums over pairs: k(a, b) a Python function."""
    m, n = len(x), len(y)
    pairs_xx = [(i, j) for i, j in itertools.product(range(m), repeat=2) if i != j or not unbiased]
    pairs_yy = [(i, j) for i, j in itertools.product(range(n), repeat=2) if i != j or not unbiased]
    kxx = sum(k(x[i], x[j]) for i, j in pairs_xx) / (m * (m - 1) if unbiased else m * m)
    kyy = sum(k(y[i], y[j]) for i, j in pairs_yy) / (n * (n - 1) if unbiased else n * n)
    kxy = sum(k(a, b) for a in x for b in y) / (m * n)
    return kxx + kyy - 2 * kxy


def test_energy_distance_squared_is_scipy_squared_in_1d():
    # scipy returns sqrt(2 E|X-Y| - E|X-X'| - E|Y-Y'|) with empirical (V-statistic) means
    g = _gen(0)
    x = torch.randn(300, generator=g, dtype=torch.float64)
    y = 1.3 * torch.randn(170, generator=g, dtype=torch.float64) + 0.4
    ours = energy_distance(x, y, unbiased=False).item()
    theirs = scipy.stats.energy_distance(x.numpy(), y.numpy())
    assert ours == pytest.approx(theirs**2, rel=1e-10)  # float64 rounding only


@pytest.mark.parametrize("unbiased", [True, False])
def test_energy_distance_and_mmd_match_brute_force_in_2d(unbiased):
    g = _gen(1)
    x = torch.randn(25, 2, generator=g, dtype=torch.float64)
    y = torch.randn(18, 2, generator=g, dtype=torch.float64) * 0.7 + 0.5
    energy = _brute_force(x, y, lambda a, b: -torch.linalg.norm(a - b).item(), unbiased)
    assert energy_distance(x, y, unbiased=unbiased).item() == pytest.approx(energy, rel=1e-10, abs=1e-12)
    h = 0.8
    gauss = _brute_force(x, y, lambda a, b: math.exp(-torch.sum((a - b) ** 2).item() / (2 * h * h)), unbiased)
    assert mmd2(x, y, bandwidth=h, unbiased=unbiased).item() == pytest.approx(gauss, rel=1e-10, abs=1e-12)


def test_the_u_statistic_is_unbiased_and_the_v_statistic_is_not():
    # x and y from the same law: D^2 = MMD^2 = 0. 400 replicates; Z standard errors of their mean
    g = _gen(2)
    u_energy, v_energy, u_mmd = [], [], []
    for _ in range(400):
        x = torch.randn(20, 2, generator=g, dtype=torch.float64)
        y = torch.randn(15, 2, generator=g, dtype=torch.float64)
        u_energy.append(energy_distance(x, y))
        v_energy.append(energy_distance(x, y, unbiased=False))
        u_mmd.append(mmd2(x, y, bandwidth=1.0))
    assert_mc_close(torch.stack(u_energy), 0.0)
    assert_mc_close(torch.stack(u_mmd), 0.0)
    v = torch.stack(v_energy)
    assert v.mean() > Z * v.std() / math.sqrt(len(v))  # biased upwards: its diagonal terms are 0


def test_energy_distance_of_gaussians_matches_its_closed_form():
    # 1-D: E|X - Y| for X ~ N(0,1), Y ~ N(d,1) is E|N(d, 2)| = 2 phi(d/sqrt2) sqrt2 + d (2 Phi(d/sqrt2) - 1)
    d = 1.0
    s = math.sqrt(2.0)
    e_xy = s * math.sqrt(2 / math.pi) * math.exp(-(d / s) ** 2 / 2) + d * (2 * scipy.stats.norm.cdf(d / s) - 1)
    exact = 2 * e_xy - 2 * s * math.sqrt(2 / math.pi)  # E|X - X'| = E|N(0, 2)| = sqrt2 sqrt(2/pi)
    g = _gen(3)
    values = torch.stack([
        energy_distance(torch.randn(50, generator=g, dtype=torch.float64),
                        torch.randn(50, generator=g, dtype=torch.float64) + d)
        for _ in range(300)
    ])
    assert_mc_close(values, exact)


def test_permutation_test_is_calibrated_under_the_null_and_rejects_a_shift():
    g = _gen(4)
    p_values = []
    for _ in range(200):
        x, y = torch.randn(30, 2, generator=g), torch.randn(25, 2, generator=g)
        p_values.append(permutation_test(x, y, num_permutations=99, generator=g).p_value)
    # P(p <= 0.2) = 0.2 exactly for an exact test with B + 1 = 100; binomial standard error
    frac = sum(p <= 0.2 for p in p_values) / len(p_values)
    assert abs(frac - 0.2) <= Z * math.sqrt(0.2 * 0.8 / len(p_values))
    x, y = torch.randn(100, 2, generator=g), torch.randn(100, 2, generator=g) + 1.0
    for statistic in ("energy", "mmd"):
        result = permutation_test(x, y, statistic=statistic, num_permutations=199, generator=g)
        assert result.p_value == 1 / 200 and result.null.shape == (199,)
        assert torch.all(result.null < result.statistic)


def test_permutation_test_is_deterministic_given_a_generator():
    x, y = torch.randn(40, 2, generator=_gen(5)), torch.randn(30, 2, generator=_gen(6))
    a = permutation_test(x, y, num_permutations=50, generator=_gen(7))
    b = permutation_test(x, y, num_permutations=50, generator=_gen(7))
    assert torch.equal(a.null, b.null) and a.p_value == b.p_value
    assert a.statistic == energy_distance(x, y)


@pytest.mark.parametrize("statistic", ["energy", "mmd"])
def test_jackknife_matches_delete_one_recomputation(statistic):
    g = _gen(8)
    x = torch.randn(12, 2, generator=g, dtype=torch.float64)
    y = torch.randn(9, 2, generator=g, dtype=torch.float64) + 0.3

    def stat(a, b):
        return energy_distance(a, b) if statistic == "energy" else mmd2(a, b, bandwidth=0.9)

    drop_x = torch.stack([stat(torch.cat([x[:i], x[i + 1:]]), y) for i in range(12)])
    drop_y = torch.stack([stat(x, torch.cat([y[:j], y[j + 1:]])) for j in range(9)])
    var = 11 / 12 * (drop_x - drop_x.mean()).square().sum() + 8 / 9 * (drop_y - drop_y.mean()).square().sum()
    fast = jackknife_stderr(x, y, statistic=statistic, bandwidth=0.9)
    assert fast.item() == pytest.approx(var.sqrt().item(), rel=1e-9)  # float64 rounding


def test_jackknife_variance_estimates_the_sampling_variance():
    # 300 replicates of a non-degenerate case (a shift). The jackknife variance is biased upwards
    # by O(1/n) (Efron-Stein), so: not below the replicates' variance by more than Z standard
    # errors, and not above it by more than that plus a 10% allowance for the bias (measured
    # ratios 1.02-1.15 over three seeds of 300 replicates at n = 60, each +-9% noise)
    g = _gen(9)
    values, jk_var = [], []
    for _ in range(300):
        x = torch.randn(60, 2, generator=g, dtype=torch.float64)
        y = torch.randn(60, 2, generator=g, dtype=torch.float64) + 0.5
        values.append(energy_distance(x, y))
        jk_var.append(jackknife_stderr(x, y) ** 2)
    values, jk_var = torch.stack(values), torch.stack(jk_var)
    emp = values.var()
    centred = values - values.mean()
    se_emp = (((centred**4).mean() - centred.square().mean() ** 2) / len(values)).sqrt()
    se_jk = jk_var.std() / math.sqrt(len(jk_var))
    se = (se_emp**2 + se_jk**2).sqrt()
    assert jk_var.mean() >= emp - Z * se
    assert jk_var.mean() <= 1.1 * emp + Z * se


def test_gaussian_kernel_and_median_bandwidth():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    k = gaussian_kernel(x, x, 5.0)
    assert torch.allclose(k, torch.tensor([[1.0, math.exp(-0.5)], [math.exp(-0.5), 1.0]]))
    assert median_bandwidth(torch.tensor([0.0, 1.0]), torch.tensor([3.0, 7.0])) == 3.0  # median of 1,3,7,2,6,4


def test_bad_arguments_raise():
    x, y = torch.randn(10, 2), torch.randn(8, 2)
    with pytest.raises(ValueError, match="x must"):
        energy_distance(torch.randn(3, 2, 2), y)
    with pytest.raises(ValueError, match="y must"):
        energy_distance(x, torch.randn(1, 2))
    with pytest.raises(ValueError, match="same dimension"):
        energy_distance(x, torch.randn(8, 3))
    with pytest.raises(ValueError, match="floating-point"):
        energy_distance(torch.ones(10, 2, dtype=torch.long), y)
    with pytest.raises(ValueError, match="bandwidth"):
        mmd2(x, y, bandwidth=0.0)
    with pytest.raises(ValueError, match="statistic"):
        permutation_test(x, y, statistic="ks")
    with pytest.raises(ValueError, match="num_permutations"):
        permutation_test(x, y, num_permutations=0)
    with pytest.raises(ValueError, match="at least 3"):
        jackknife_stderr(x[:2], y)
