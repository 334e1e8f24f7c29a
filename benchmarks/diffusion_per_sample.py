"""Per-example gradients of the diffusion schedule: copies of phi against ``per_sample_gradients``.

    .venv/bin/python benchmarks/diffusion_per_sample.py            # the chapter's quick sizes
    .venv/bin/python benchmarks/diffusion_per_sample.py --pairs 20000 --repeats 5

The diffusion chapter used to get one gradient per ``(x0, t)`` pair by giving each pair its own
copy of the schedule's parameters ``phi`` (an ``(N, K)`` leaf) and one backward pass through
``companion.estimators.pathwise`` / ``score_function``. It now writes the estimate for *one*
draw as a program of ``phi`` and of that draw's noise and calls
``companion.estimators.per_sample_gradients`` (``vmap`` over ``grad``). This script times both
on the same objective, the one the copies computed (the gradient of the unweighted
epsilon-MSE ``E||eps - eps_theta(x_t, t)||^2`` at integer steps, two draws per pair), on the
same noise, checks that they return the same rows, and times the chapter's new estimator of the
gradient of ``E[L_hat^2]`` (``diffusion.variance_gradient_samples``) at the same sizes.

Sizes are the chapter's: the denoiser ``EpsMLP(2, hidden=64, depth=3)`` in float64, 32 knots,
``--pairs`` pairs (100,000 was the chapter's old count), two draws each. Each variant runs
once to warm up, then ``--repeats`` times; the table gives the median time in milliseconds
(stdout, and ``--out`` if given).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.distributions import Independent, Normal

from companion.estimators import pathwise, per_sample_gradients, score_function
from companion.models import diffusion as dm
from companion.runtime import use_threads


# --------------------------------------------------------------------------- the replaced version


def _copy_per_sample(method, eps_model, schedule, x0, t, eps):
    """The chapter's former ``schedule_gradient_samples``: one copy of ``phi`` per pair.

    Gradient of ``E_eps ||eps - eps_theta(x_t, t)||^2`` with respect to ``phi``, per pair, from
    the draws ``eps (S, N, D)``; the score function uses the leave-one-out baseline.
    """
    n = x0.shape[0]
    phi = schedule.phi.detach().to(x0).expand(n, -1).clone().requires_grad_(True)  # (N, K)
    lam = dm.monotone_log_snr(t, phi, schedule.knots, schedule.log_snr_max, schedule.log_snr_min)
    a = torch.sigmoid(lam).unsqueeze(-1)  # (N, 1)
    loc, scale = a.sqrt() * x0, (1 - a).sqrt().expand_as(x0)  # (N, D)

    def f(x_t):  # (S, N, D) -> (S, N)
        s = x_t.shape[0]
        e = (x_t - loc) / scale
        pred = eps_model(x_t.reshape(s * n, -1), t.repeat(s)).reshape(x_t.shape)
        return (e - pred).square().sum(-1)

    q = Independent(Normal(loc, scale), 1)
    if method == "pathwise":
        est = pathwise(f, q, eps.shape[0], eps=eps)
    else:
        est = score_function(f, q, eps.shape[0], baseline="mean", eps=eps)
    (grad,) = torch.autograd.grad(est.surrogate, phi)
    return grad


# --------------------------------------------------------------------------- the same, per draw


def _per_draw(method, eps_model, schedule, x0, t, eps):
    """The same rows from ``per_sample_gradients``: programs written for one draw."""
    args = (schedule.knots, schedule.log_snr_max, schedule.log_snr_min)
    s, n = eps.shape[0], x0.shape[0]
    xs, ts, es = x0.repeat(s, 1), t.repeat(s), eps.reshape(s * n, -1)
    phi = schedule.phi.detach().to(x0)

    def moments(p, t_i):
        a = torch.sigmoid(dm.monotone_log_snr(t_i, p, *args))
        return a.sqrt(), (1 - a).sqrt()

    def mse(p, x0_i, t_i, z):
        m, sd = moments(p, t_i)
        return ((z - m * x0_i) / sd - eps_model(z[None], t_i[None])[0]).square().sum()

    if method == "pathwise":
        def program(p, noise):
            x0_i, t_i, e = noise
            m, sd = moments(p, t_i)
            return mse(p, x0_i, t_i, m * x0_i + sd * e)

        grads = per_sample_gradients(program, phi, (xs, ts, es))
    else:
        with torch.no_grad():
            m, sd = moments(phi, ts)
            z = m.unsqueeze(-1) * xs + sd.unsqueeze(-1) * es
            f = ((z - m.unsqueeze(-1) * xs) / sd.unsqueeze(-1) - eps_model(z, ts)).square().sum(-1)
            f = f.reshape(s, n)
            b = ((f.sum(0) - f) / (s - 1)).reshape(-1)

        def program(p, noise):
            x0_i, t_i, z_i, b_i = noise
            m_i, sd_i = moments(p, t_i)
            log_q = Normal(m_i * x0_i, sd_i, validate_args=False).log_prob(z_i).sum()
            f_i = mse(p, x0_i, t_i, z_i)
            return f_i + (f_i - b_i).detach() * (log_q - log_q.detach())

        grads = per_sample_gradients(program, phi, (xs, ts, z, b))
    return grads.reshape(s, n, -1).mean(0)


# --------------------------------------------------------------------------- timing


def _median_ms(fn, repeats):
    fn()  # warm-up (the first torch.func call also imports torch._dynamo)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times), min(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=100_000, help="(x0, t) pairs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default: companion's policy")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    threads = use_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    abar = dm.abar(dm.linear_betas())
    eps_model = dm.EpsMLP(2, hidden=64, depth=3).double().requires_grad_(False)
    schedule = dm.MonotoneSchedule(abar, num_knots=32)
    n = args.pairs
    x0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    t_int = torch.randint(1, dm.T + 1, (n,), generator=g)
    eps = torch.randn(2, n, 2, generator=g, dtype=torch.float64)

    rows = []
    for method in ("pathwise", "score_function"):
        old = _copy_per_sample(method, eps_model, schedule, x0, t_int, eps)
        new = _per_draw(method, eps_model, schedule, x0, t_int, eps)
        err = ((old - new).abs().max() / old.abs().max()).item()
        assert err < 1e-9, f"{method}: the two versions disagree (relative error {err:.2e})"
        for name, fn in (("copies of phi (replaced)", _copy_per_sample), ("per_sample_gradients", _per_draw)):
            ms = _median_ms(lambda: fn(method, eps_model, schedule, x0, t_int, eps), args.repeats)
            rows.append((f"unweighted eps-MSE, {method}", name, *ms))
    denoiser = dm.LogSNRDenoiser(eps_model, abar)
    t_real = dm.sample_time(n, generator=g)
    for method in ("pathwise", "score_function"):
        baseline = "mean" if method == "score_function" else None
        ms = _median_ms(lambda: dm.variance_gradient_samples(method, denoiser, schedule, x0, t_real, eps,
                                                             baseline=baseline), args.repeats)
        rows.append((f"E[L_hat^2] (chapter), {method}", "variance_gradient_samples", *ms))

    lines = [
        f"Per-pair schedule gradients, {n:,} pairs x 2 draws, K = 32, EpsMLP(2, 64, 3) float64; "
        f"torch {torch.__version__}, {threads} thread(s), {platform.processor() or platform.machine()}",
        "",
        "| objective, estimator | implementation | median ms | min ms | max ms |",
        "|---|---|---:|---:|---:|",
    ] + [f"| {a} | {b} | {m:,.0f} | {lo:,.0f} | {hi:,.0f} |" for a, b, m, lo, hi in rows]
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
