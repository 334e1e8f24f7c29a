"""benchmarks: the quick mode of ``python -m benchmarks`` writes what the appendix chapter reads,
its exact references agree with scipy, and its measured claims hold (timings are not asserted
here: the test machine may be busy)."""
import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from benchmarks import SUBBENCHMARKS
from benchmarks import __main__ as entry
from benchmarks import chapters, throughput, variance
from companion import closed_forms as cf
from helpers import Z

MACHINE_KEYS = {"date", "cpu", "cores", "torch_threads", "torch", "device", "load_average_1min"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick mode, run once into a temporary folder: ``{name: record}``."""
    out = tmp_path_factory.mktemp("results")
    written = entry.main(["--quick", "--out", str(out)])
    assert set(written) == set(SUBBENCHMARKS)
    return {name: json.loads(path.read_text()) for name, path in written.items()}


# --------------------------------------------------------------------------- the files


def test_every_result_says_where_and_how_it_was_measured(quick):
    for name, record in quick.items():
        assert record["benchmark"] == name and record["profile"] == "quick"
        assert MACHINE_KEYS <= set(record["machine"]) and record["machine"]["device"] == "cpu"
        assert record["machine"]["torch"] == torch.__version__
        assert record["rows"] and record["settings"]


def test_variance_rows_cover_the_grids(quick):
    rows = quick["variance"]["rows"]
    assert {r["function"] for r in rows} == set(variance.FUNCTIONS)
    assert {r["estimator"] for r in rows} == set(variance.ESTIMATORS)
    curves = quick["variance"]["curves"]
    for function in variance.FUNCTIONS:
        ks = np.array(curves[function]["k"])
        assert ks[0] == pytest.approx(variance.grid(function)[0]) and ks[-1] == pytest.approx(variance.grid(function)[-1])


def test_throughput_and_training_rows(quick):
    rows = quick["throughput"]["rows"]
    for r in rows:
        assert r["samples_per_s"] > 0 and r["calls_per_round"] >= 1
    pyro = {(r["estimator"], r["mode"]) for r in rows if r["implementation"] == "pyro"}
    assert {e for e, _ in pyro} == {"pathwise", "score_function"}  # Pyro has these two
    trainers = {(r["group"], r["trainer"]) for r in quick["training"]["rows"]}
    assert {("vae", "companion"), ("vae", "plain torch"), ("vae", "Pyro Trace_ELBO"),
            ("ddpm", "companion"), ("ddpm", "plain torch")} <= trainers
    if importlib.util.find_spec("companion.models.bayesian") is not None:
        from companion.models.bayesian import MODES

        assert {("bayesian_mlp", mode) for mode in MODES} <= trainers


# --------------------------------------------------------------------------- the claims


def test_measured_variances_match_the_exact_ones(quick):
    # 5 standard errors each (helpers.Z): a correct estimator fails one comparison with
    # probability ~6e-7, the ~100 comparisons of the quick run together with ~6e-5
    for r in quick["variance"]["rows"]:
        if r["z"] is None:  # the estimator is exact there: zero variance, up to rounding
            assert r["exact"] <= variance.ZERO and r["variance"] <= variance.ZERO, r
        else:
            assert abs(r["z"]) <= Z and abs(r["mean_z"]) <= Z, r
    assert quick["variance"]["quadrature_check"]["max_relative_error_of_measure_valued_mean"] < 1e-9


def test_crossover_is_where_scipy_finds_the_two_variances_equal(quick):
    k_star = variance.crossover()["score_function"]
    stored = quick["variance"]["crossover"]["closed_form"]["score_function"]
    assert stored == pytest.approx(k_star, rel=1e-6)  # results keep 7 significant digits
    pdf = stats.norm(variance.MU, variance.SIGMA).pdf

    def var(g):  # Var_{N(1, 1)}[g(x)] by adaptive quadrature (scipy), independent of closed_forms
        m1 = integrate.quad(lambda x: pdf(x) * g(x), -15, 15, limit=200)[0]
        return integrate.quad(lambda x: pdf(x) * g(x) ** 2, -15, 15, limit=200)[0] - m1**2

    pathwise = var(lambda x: -k_star * math.sin(k_star * x))
    score = var(lambda x: math.cos(k_star * x) * (x - variance.MU) / variance.SIGMA**2)
    assert pathwise == pytest.approx(score, rel=1e-7)
    # the measured gaps have the exact gap's sign wherever it is 5 standard errors from zero
    for gap in quick["variance"]["crossover"]["measured_gaps"]:
        if abs(gap["exact"]) > Z * gap["stderr"]:
            assert np.sign(gap["gap"]) == np.sign(gap["exact"]), gap


def test_every_implementation_estimates_the_exact_elbo_and_gradient(quick):
    # value and gradient at the largest S within 5 standard errors of the closed form
    for a in quick["throughput"]["agreement"]:
        for got, exact, se in zip(a["estimate"], a["exact"], a["stderr"]):
            assert abs(got - exact) <= Z * se, a


def test_companion_and_plain_torch_train_to_the_same_model(quick):
    # the same minibatches and the same draws in the same order: equal up to rounding (the KL's
    # terms are summed in another order)
    rows = {(r["group"], r["trainer"]): r for r in quick["training"]["rows"]}
    assert rows["vae", "companion"]["held_out_elbo"] == pytest.approx(rows["vae", "plain torch"]["held_out_elbo"], rel=1e-5)
    assert rows["ddpm", "companion"]["held_out_loss"] == pytest.approx(rows["ddpm", "plain torch"]["held_out_loss"], rel=1e-5)


# --------------------------------------------------------------------------- the references


@pytest.mark.parametrize("k", [0.1, 1.0, 10.0])
def test_tilted_quadrature_of_exp_matches_scipy(k):
    # exp(-k x^2): pathwise and score-function variances against scipy's adaptive quadrature
    pdf = stats.norm(variance.MU, variance.SIGMA).pdf

    def expect(g):
        return integrate.quad(lambda x: pdf(x) * g(x), -15, 15, points=[0.0], limit=200, epsabs=1e-14)[0]

    f = lambda x: math.exp(-k * x * x)  # noqa: E731
    df = lambda x: -2 * k * x * f(x)  # noqa: E731
    eps = lambda x: x - variance.MU  # noqa: E731  (sigma = 1)
    g = (expect(df), expect(lambda x: df(x) * eps(x)))
    exact_pw = (expect(lambda x: df(x) ** 2) - g[0] ** 2, expect(lambda x: (df(x) * eps(x)) ** 2) - g[1] ** 2)
    exact_sf = (expect(lambda x: (f(x) * eps(x)) ** 2) - g[0] ** 2,
                expect(lambda x: (f(x) * (eps(x) ** 2 - 1)) ** 2) - g[1] ** 2)
    assert variance.exact_gradient("exp", k) == pytest.approx(g, rel=1e-9, abs=1e-12)
    assert variance.exact_variance("exp", k, "pathwise", 100) == pytest.approx(exact_pw, rel=1e-8)
    assert variance.exact_variance("exp", k, "score_function", 100) == pytest.approx(exact_sf, rel=1e-8)


@pytest.mark.parametrize("function, k", [("exp", 10.0), ("cos", 3.0), ("square", -2.0)])
def test_measure_valued_quadrature_matches_scipy(function, k):
    f = variance.objective(function, k)
    (var_mu, var_sigma), _ = variance.measure_valued_variance(f)
    rayleigh = lambda r: r * math.exp(-r * r / 2)  # noqa: E731
    g = lambda r: (f(1 + r) - f(1 - r)) / math.sqrt(2 * math.pi)  # noqa: E731
    m1 = integrate.quad(lambda r: rayleigh(r) * g(r), 0, np.inf, limit=200)[0]
    m2 = integrate.quad(lambda r: rayleigh(r) * g(r) ** 2, 0, np.inf, limit=200)[0]
    maxwell = lambda m: m * m * math.exp(-m * m / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    s1, s2 = (integrate.dblquad(lambda u, m: maxwell(m) * (f(1 + m) - f(1 + m * u)) ** p, -12, 12, 0, 1,
                                epsabs=1e-11, epsrel=1e-10)[0] for p in (1, 2))
    assert var_mu == pytest.approx(m2 - m1**2, rel=1e-8)
    assert var_sigma == pytest.approx(s2 - s1**2, rel=1e-8)


def test_leave_one_out_variance_adds_the_baselines_noise():
    # Var[(f - b_i) s] = Var[(f - E f) s] + Var[f] E[s^2] / (S - 1), for an exponential polynomial
    f, s = cf.cosine(2.0), 50
    mean = cf.expectation(f, 1.0, 1.0)
    var_f = cf.expectation(f * f, 1.0, 1.0) - mean**2
    exact_b = cf.per_sample_variance("score_function", f, 1.0, 1.0, baseline=mean)
    loo = variance.exact_variance("cos", 2.0, "score_function_loo", s)
    assert loo == pytest.approx((exact_b.mu + var_f / (s - 1), exact_b.sigma + 2 * var_f / (s - 1)), rel=1e-12)


def test_exact_elbo_matches_quadrature():
    mu, rho = throughput.MU0, throughput.RHO0
    sigma = math.exp(rho)
    f = throughput.integrand(torch.tensor(mu, dtype=torch.float64), torch.tensor(rho, dtype=torch.float64))
    value = integrate.quad(lambda z: stats.norm(mu, sigma).pdf(z) * f(torch.tensor(z, dtype=torch.float64)).item(),
                           -12, 12)[0]
    assert throughput.exact_elbo()[0] == pytest.approx(value, rel=1e-10)


def test_chapter_times_are_read_from_the_conftest_table():
    log = ("....\n==== chapter execution times ====\n   21.3 s  book/foundations/a.md\n"
           "   61.0 s  book/generative/b.md  OVER BUDGET\n   82.3 s  all chapters (budget 60 s each)\n")
    rows = chapters.parse_chapter_times(log)
    assert rows == [{"chapter": "book/foundations/a.md", "seconds": 21.3, "over_budget": False},
                    {"chapter": "book/generative/b.md", "seconds": 61.0, "over_budget": True}]
    with pytest.raises(ValueError, match="chapter execution times"):
        chapters.parse_chapter_times("no table here")


def test_bad_arguments_stop_the_entry_point():
    with pytest.raises(SystemExit):
        entry.main(["--only", "nonsense", "--quick"])
    with pytest.raises(ValueError, match="function"):
        variance.grid("sin")
