"""Seed-to-seed spread of the *Bayesian dropout* chapter's measurements.

The chapter checks its claims over three seeds (five in the full profile); this script repeats
its runs over any seeds and training lengths and prints, per data size N, the learned drop rates
and, for the N whose uncertainty the chapter plots, the MC-dropout spread inside the data, in the
gap and outside: a way to see how robust the claims are beyond the chapter's seeds.

    .venv/bin/python benchmarks/concrete_dropout_seeds.py [--seeds 0,1,2,3,4] [--steps 1000]
"""
import argparse

import torch

from companion import data
from companion.models.concrete_dropout import fit_regressor, mc_predict, region_spread
from companion.runtime import use_threads

SIZES = (25, 100, 400)  # the chapter's data sizes N
NOISE, GAP, EDGE = 0.3, 1.5, 4.0  # y = sin x + 0.3 eps on 1.5 <= |x| <= 4


def regions(grid: torch.Tensor) -> dict[str, torch.Tensor]:
    a = grid[:, 0].abs()
    return {"inside": (a > GAP + 0.25) & (a < EDGE - 0.25), "gap": a < GAP - 0.25,
            "outside": (a > EDGE + 0.5) & (a < EDGE + 1.5)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=1000)
    parser.add_argument("--uncertainty-n", type=int, default=100)
    args = parser.parse_args()
    use_threads()  # companion.runtime's one thread policy
    grid = torch.linspace(-6, 6, 241).unsqueeze(1)
    for s in [int(v) for v in args.seeds.split(",")]:
        for n in SIZES:
            g = torch.Generator().manual_seed(s)
            x, y = data.gapped_sine(n, noise=NOISE, intervals=((-EDGE, -GAP), (GAP, EDGE)), generator=g)
            model, history = fit_regressor(x, y, steps=args.steps, seed=s, progress=False)
            traj = [round(e["p0"], 3) for e in history.evals[:: max(1, len(history.evals) // 8)]]
            rates = [round(p, 4) for p in model.drop_rates()]
            line = f"seed {s} N {n:4d} p {rates} sigma {model.sigma.item():.3f} p0 path {traj}"
            if n == args.uncertainty_n:
                pred = mc_predict(model, grid, args.passes, generator=g)
                r = {k: region_spread(pred.samples, m) for k, m in regions(grid).items()}
                line += " | " + " ".join(f"{k} {v.rms_std:.4f}±{v.stderr:.4f}" for k, v in r.items())
            print(line, flush=True)


if __name__ == "__main__":
    main()
