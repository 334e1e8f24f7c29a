"""Shared checks: Monte Carlo agreement within a multiple of the standard error."""
import torch

from companion.estimators import mc_summary

# A z-score of 5: a correct estimator fails this check with probability below 1e-6 per
# comparison; seeds are fixed, so a pass is also reproducible.
Z = 5.0


def assert_mc_close(samples: torch.Tensor, exact, z: float = Z) -> None:
    """The mean of ``samples`` (leading sample dimension) is within z standard errors of exact."""
    s = mc_summary(samples.double())
    exact = torch.as_tensor(exact, dtype=torch.float64)
    err = (s.mean - exact).abs()
    assert torch.all(err <= z * s.stderr + 1e-12), (
        f"mean {s.mean.tolist()} vs exact {exact.tolist()}: error {err.tolist()} > {z} x stderr {s.stderr.tolist()}"
    )
