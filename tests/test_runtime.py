import random

import numpy as np
import pytest
import torch

from companion import runtime


def test_device_is_cuda_only_when_available():
    assert runtime.device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_seed_makes_all_three_generators_repeat():
    g = runtime.seed(123)
    first = (random.random(), np.random.rand(), torch.rand(()).item(), torch.rand((), generator=g).item())
    g = runtime.seed(123)
    second = (random.random(), np.random.rand(), torch.rand(()).item(), torch.rand((), generator=g).item())
    assert first == second


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_seed_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="seed"):
        runtime.seed(bad)


def test_profile_default_quick_and_full(monkeypatch):
    monkeypatch.delenv("COMPANION_PROFILE", raising=False)
    assert runtime.profile() == "quick"
    assert runtime.pick(quick=1, full=2) == 1
    monkeypatch.setenv("COMPANION_PROFILE", "full")
    assert runtime.profile() == "full"
    assert runtime.pick(quick=1, full=2) == 2


def test_profile_rejects_unknown(monkeypatch):
    monkeypatch.setenv("COMPANION_PROFILE", "huge")
    with pytest.raises(ValueError, match="COMPANION_PROFILE"):
        runtime.profile()


def test_rng_is_reproducible_and_restores_global_state():
    torch.manual_seed(0)
    expected_global = torch.rand(3)
    torch.manual_seed(0)
    with runtime.rng(torch.Generator().manual_seed(5)):
        a = torch.distributions.Normal(0.0, 1.0).sample((4,))
    assert torch.equal(torch.rand(3), expected_global)  # the global stream was not consumed
    with runtime.rng(torch.Generator().manual_seed(5)):
        b = torch.distributions.Normal(0.0, 1.0).sample((4,))
    assert torch.equal(a, b)


def test_rng_rejects_non_generator():
    with pytest.raises(ValueError, match="generator"):
        with runtime.rng(5):
            pass


def test_thread_policy_one_thread_on_cpu_env_overrides(monkeypatch):
    monkeypatch.delenv("COMPANION_THREADS", raising=False)
    assert runtime.threads() == (None if torch.cuda.is_available() else 1)
    monkeypatch.setenv("COMPANION_THREADS", "3")
    assert runtime.threads() == 3
    monkeypatch.setenv("COMPANION_THREADS", "default")
    assert runtime.threads() is None


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5"])
def test_thread_policy_rejects_bad_env(monkeypatch, bad):
    monkeypatch.setenv("COMPANION_THREADS", bad)
    with pytest.raises(ValueError, match="COMPANION_THREADS"):
        runtime.threads()


def test_use_threads_and_setup_apply_the_policy(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("COMPANION_THREADS", "2")
        assert runtime.use_threads() == 2 == torch.get_num_threads()
        monkeypatch.setenv("COMPANION_THREADS", "1")
        g = runtime.setup(7)
        assert torch.get_num_threads() == 1
        assert torch.rand((), generator=g) == torch.rand((), generator=runtime.seed(7))
        assert runtime.use_threads(2) == 2
        with pytest.raises(ValueError, match="use_threads"):
            runtime.use_threads(0)
    finally:
        torch.set_num_threads(before)
