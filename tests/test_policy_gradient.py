"""companion.control.policy_gradient: interface, closed-form variances, unbiasedness, agreement."""
import math

import pytest
import torch
from torch.distributions import Normal

from companion import closed_forms as cf
from companion.control.policy_gradient import (
    LinearGaussianPolicy,
    LinearQuadraticEnv,
    episode_surrogates,
    expected_return,
    one_step_lq_variances,
    point_mass,
    policy_gradient,
    quadratic_reward_variances,
    rollout,
)
from companion.estimators import gradient_samples, per_sample_gradients, variance_stderr
from helpers import Z, assert_mc_close

f64 = torch.float64
ENV = point_mass(dim=1, dt=0.5, horizon=5, action_cost=0.1)
S0 = torch.tensor([1.0, 0.0], dtype=f64)


def _policy(copies=None, sigma=0.3):
    policy = LinearGaussianPolicy(2, 1, copies=copies, init_sigma=sigma).double()
    with torch.no_grad():
        policy.gain.copy_(torch.tensor([[0.8, 0.9]], dtype=f64).expand_as(policy.gain))
    return policy


def _eps(n, copies=None, seed=0):
    shape = (n, ENV.horizon) + (() if copies is None else (copies,)) + (1,)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=f64)


# --------------------------------------------------------------------------- interface


def test_policy_and_environment_shapes():
    policy = _policy()
    mu, sigma = policy(torch.zeros(7, 2, dtype=f64))
    assert mu.shape == sigma.shape == (7, 1) and (sigma > 0).all()
    copies = _policy(copies=3)
    mu, sigma = copies(torch.zeros(7, 3, 2, dtype=f64))
    assert mu.shape == (7, 3, 1)
    s, reward = ENV.step(torch.zeros(7, 2, dtype=f64), torch.ones(7, 1, dtype=f64))
    assert s.shape == (7, 2) and reward.shape == (7,)
    planar = point_mass(dim=2)
    assert planar.a.shape == (4, 4) and planar.b.shape == (4, 2)


def test_rollout_keeps_or_cuts_the_path():
    policy = _policy()
    traj = rollout(policy, ENV, S0, _eps(4), path=True)
    assert traj.states.shape == (4, ENV.horizon + 1, 2) and traj.actions.shape == (4, ENV.horizon, 1)
    assert traj.rewards.shape == traj.log_probs.shape == (4, ENV.horizon)
    assert traj.rewards.requires_grad and traj.actions.requires_grad
    cut = rollout(policy, ENV, S0, _eps(4), path=False)
    assert not cut.actions.requires_grad and not cut.rewards.requires_grad and cut.log_probs.requires_grad
    # both see the same episodes, and each surrogate's value is the return
    assert torch.allclose(traj.rewards.detach(), cut.rewards)
    for method in ("pathwise", "reinforce"):
        s = episode_surrogates(method, policy, ENV, S0, _eps(4))
        assert torch.allclose(s.detach(), cut.rewards.sum(1))


def test_policy_gradient_is_reproducible_and_batched():
    policy = _policy(copies=3)
    starts = S0.expand(3, 2)
    one, two = (policy_gradient("reinforce", policy, ENV, starts, 8, baseline="mean",
                                generator=torch.Generator().manual_seed(2)) for _ in range(2))
    assert one.value.shape == (3,) and torch.equal(one.value, two.value)
    one.surrogate.backward()
    assert policy.gain.grad.shape == (3, 1, 2)


@pytest.mark.parametrize("build,match", [
    (lambda: LinearGaussianPolicy(0, 1), "state_dim"),
    (lambda: LinearGaussianPolicy(2, 1, copies=0), "copies"),
    (lambda: LinearGaussianPolicy(2, 1, init_sigma=0.0), "init_sigma"),
    (lambda: _policy()(torch.zeros(3, 5, dtype=f64)), "states must have shape"),
    (lambda: LinearQuadraticEnv(ENV.a, ENV.b.T, ENV.q, ENV.r, 5), "shape"),
    (lambda: LinearQuadraticEnv(ENV.a, ENV.b, ENV.q, ENV.r, 0), "horizon"),
    (lambda: point_mass(dt=0.0), "dt"),
    (lambda: point_mass(dim=0), "dim"),
    (lambda: rollout(_policy(), ENV, S0, torch.zeros(4, 3, 1, dtype=f64)), "eps must have shape"),
    (lambda: rollout(_policy(), "env", S0, _eps(4)), "env"),
    (lambda: rollout(42, ENV, S0, _eps(4)), "policy must be callable"),
    (lambda: rollout(_policy(), ENV, torch.zeros(3, dtype=f64), _eps(4)), "s0"),
    (lambda: episode_surrogates("finite_difference", _policy(), ENV, S0, _eps(4)), "method"),
    (lambda: episode_surrogates("pathwise", _policy(), ENV, S0, _eps(4), baseline="mean"), "baseline"),
    (lambda: episode_surrogates("reinforce", _policy(), ENV, S0, _eps(1), baseline="mean"), "num_samples >= 2"),
    (lambda: policy_gradient("pathwise", _policy(), ENV, S0, 0), "num_episodes"),
    (lambda: policy_gradient("pathwise", _policy(), ENV, S0, 4, eps=_eps(4), generator=torch.Generator()), "not both"),
    (lambda: quadratic_reward_variances(0.5, 0.0, 2.0), "sigma"),
    (lambda: one_step_lq_variances(0.0, -1.0, 1.0), "sigma"),
    (lambda: one_step_lq_variances(math.nan, 1.0, 1.0), "theta"),
])
def test_bad_input_raises(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# --------------------------------------------------------------------------- closed forms


def test_closed_form_values_and_generic_derivation():
    assert quadratic_reward_variances(0.5, 1.0, 2.0) == (4.0, 51.5625, 28.0)
    assert one_step_lq_variances(0.0, 1.0, 1.0)[:2] == (16.0, 1 + 20 + 60)
    for mu, sigma, a_star in [(0.5, 1.0, 2.0), (-1.0, 0.3, 0.5)]:
        reward = cf.square() * (-1.0) + cf.identity() * (2 * a_star) - a_star**2
        d = mu - a_star
        exact = quadratic_reward_variances(mu, sigma, a_star)
        generic = (cf.per_sample_variance("pathwise", reward, mu, sigma).mu,
                   cf.per_sample_variance("score_function", reward, mu, sigma).mu,
                   cf.per_sample_variance("score_function", reward, mu, sigma, baseline=-(d**2 + sigma**2)).mu)
        assert all(abs(x - y) <= 1e-10 * max(1.0, abs(y)) for x, y in zip(exact, generic))


def test_bandit_variances_measured():
    gen = torch.Generator().manual_seed(0)
    mu, sigma, a_star = 0.5, 0.7, 2.0
    exact = quadratic_reward_variances(mu, sigma, a_star)
    params = (torch.tensor(mu, dtype=f64), torch.tensor(sigma, dtype=f64))
    b = -((mu - a_star) ** 2 + sigma**2)
    for label, method, options in [("pathwise", "pathwise", {}), ("reinforce", "score_function", {}),
                                   ("reinforce_baseline", "score_function", {"baseline": b})]:
        g = gradient_samples(method, lambda a: -((a - a_star) ** 2), Normal, params, 100_000, generator=gen,
                             **options)[0]
        assert abs(g.var() - getattr(exact, label)) <= Z * variance_stderr(g), label


@pytest.mark.parametrize("theta,sigma,x0", [(0.0, 1.0, 1.0), (0.4, 0.6, -1.5)])
def test_one_step_variances_measured_through_the_classes(theta, sigma, x0):
    one = torch.ones(1, 1, dtype=f64)
    env = LinearQuadraticEnv(one, one, one, one, horizon=1)
    policy = LinearGaussianPolicy(1, 1, init_sigma=sigma).double()
    params = {"gain": torch.full((1, 1), -theta, dtype=f64), "log_sigma": policy.log_sigma.detach()}
    s0 = torch.tensor([x0], dtype=f64)
    eps = torch.randn(100_000, 1, 1, generator=torch.Generator().manual_seed(1), dtype=f64)
    exact = one_step_lq_variances(theta, sigma, x0)
    b = x0**2 * ((1 + theta) ** 2 + theta**2) + 2 * sigma**2  # E c
    for label, method, baseline in [("pathwise", "pathwise", None), ("reinforce", "reinforce", None),
                                    ("reinforce_baseline", "reinforce", -b)]:
        def cost(params, e):
            pi = lambda s: torch.func.functional_call(policy, params, (s,))
            return -episode_surrogates(method, pi, env, s0, e[None], baseline=baseline)[0]

        g = -per_sample_gradients(cost, params, eps)["gain"][:, 0, 0]  # d/dtheta = -d/dK
        assert abs(g.var() - getattr(exact, label)) <= Z * variance_stderr(g), label
        assert_mc_close(g, 2 * x0**2 * (1 + 2 * theta))


# --------------------------------------------------------------------------- unbiasedness and agreement


def test_simulated_returns_match_the_exact_expected_return():
    policy = _policy()
    with torch.no_grad():
        returns = episode_surrogates("pathwise", policy, ENV, S0, _eps(50_000))
    assert_mc_close(returns, expected_return(ENV, policy.gain.detach(), policy.log_sigma.exp().detach(), S0))


@pytest.mark.parametrize("method,baseline", [("pathwise", None), ("reinforce", None), ("reinforce", "mean")])
def test_multi_step_estimators_are_unbiased(method, baseline):
    # M independent copies of the policy, each with its own N episodes: M estimates in one pass
    M, N = 4_000, 4
    policy = _policy(copies=M)
    est = policy_gradient(method, policy, ENV, S0.expand(M, 2), N, baseline=baseline,
                          generator=torch.Generator().manual_seed(3))
    est.surrogate.backward()
    exact_policy = _policy()
    exact = expected_return(ENV, exact_policy.gain, exact_policy.log_sigma.exp(), S0)
    exact.backward()
    assert_mc_close(policy.gain.grad, exact_policy.gain.grad)
    assert_mc_close(policy.log_sigma.grad, exact_policy.log_sigma.grad)


def test_estimators_agree_for_a_nonlinear_policy_with_state_dependent_noise():
    # a = mu(s) + sigma(s) eps with an MLP for both: no closed form, so the two unbiased
    # estimators are checked against each other, on the same episodes
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()

    def policy_with(params):
        def policy(s):
            out = torch.func.functional_call(net, params, (s,))
            return out[..., :1], torch.nn.functional.softplus(out[..., 1:]) + 0.1
        return policy

    params = {k: v.detach() for k, v in net.named_parameters()}
    eps = _eps(40_000, seed=4)
    grads = {}
    for method in ("pathwise", "reinforce"):
        def ret(params, e):
            return episode_surrogates(method, policy_with(params), ENV, S0, e[None])[0]
        grads[method] = per_sample_gradients(ret, params, eps)
    for name in params:
        a, b = grads["pathwise"][name], grads["reinforce"][name]
        se = (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt()
        assert ((a.mean(0) - b.mean(0)).abs() <= Z * se + 1e-12).all(), name
        # and pathwise is the quieter one, by more than 5 standard errors of the variances
        gap_se = (variance_stderr(a) ** 2 + variance_stderr(b) ** 2).sqrt()
        assert (b.var(0) - a.var(0) > Z * gap_se).all(), name
