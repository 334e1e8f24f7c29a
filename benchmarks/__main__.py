"""``python -m benchmarks``: run the sub-benchmarks and write their results (see ``__init__``)."""
from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import torch

from companion.runtime import use_threads

from . import SUBBENCHMARKS
from ._common import RESULTS

_MODULES = {"variance": "variance", "throughput": "throughput", "training": "training",
            "per_sample": "diffusion_per_sample"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("--quick", action="store_true", help="a few seconds per sub-benchmark")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where to run (results go to benchmarks/results/<device>/)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results/<device>)")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated sub-benchmarks among {', '.join(SUBBENCHMARKS)}")
    parser.add_argument("--chapters", action="store_true",
                        help="also run every chapter under pytest and record its time (minutes)")
    parser.add_argument("--chapters-log", type=Path, default=None,
                        help="record the chapter times of a saved pytest log instead of running them")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """Run the chosen sub-benchmarks; returns ``{name: path of its JSON}``."""
    args = _parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    names = SUBBENCHMARKS if args.only is None else tuple(n.strip() for n in args.only.split(",") if n.strip())
    unknown = sorted(set(names) - set(SUBBENCHMARKS))
    if unknown:
        raise SystemExit(f"--only: unknown sub-benchmarks {unknown}; choose among {list(SUBBENCHMARKS)}")
    out = args.out if args.out is not None else RESULTS / device.type
    threads = use_threads()  # the book's one thread policy: 1 on a CPU, torch's default with CUDA
    print(f"benchmarks: {'quick' if args.quick else 'full'} profile on {device}, {threads} torch thread(s), "
          f"results in {out}", flush=True)
    written, start = {}, time.perf_counter()
    for name in names:
        module = importlib.import_module(f"benchmarks.{_MODULES[name]}")
        tic = time.perf_counter()
        written[name] = module.run(out, quick=args.quick, device=device, seed=args.seed)
        print(f"  {name:<11} {time.perf_counter() - tic:7.1f} s  -> {written[name]}", flush=True)
        print(_summary(name, written[name]), flush=True)
    if args.chapters or args.chapters_log is not None:
        from . import chapters

        tic = time.perf_counter()
        written["chapters"] = chapters.run(out, quick=args.quick, device=device, log=args.chapters_log)
        print(f"  {'chapters':<11} {time.perf_counter() - tic:7.1f} s  -> {written['chapters']}", flush=True)
    print(f"benchmarks: done in {time.perf_counter() - start:.0f} s", flush=True)
    return written


def _summary(name: str, path: Path) -> str:
    """One or two lines on what a result shows (the appendix chapter asserts it)."""
    record = json.loads(path.read_text())
    rows = record["rows"]
    if name == "variance":
        zs = [abs(r["z"]) for r in rows if r["z"] is not None]
        return f"    {len(rows)} measured variances, largest |measured - exact| = {max(zs):.2f} standard errors"
    if name == "throughput":
        metric = record["settings"]["metric"]
        worst = max((r for r in rows if r["implementation"] == "companion"), key=lambda r: r["vs_torch"])
        return (f"    companion / plain torch ({metric}): at most {worst['vs_torch']:.2f}x "
                f"({worst['estimator']}, {worst['mode']}, S = {worst['samples']:,})")
    if name == "training":
        metric = record["settings"]["metric"]
        med = {(r["group"], r["trainer"]): r[metric]["median"] for r in rows}
        lines = [f"    VAE step ({metric}): companion {1e3 * med['vae', 'companion']:.3f} ms, "
                 f"plain torch {1e3 * med['vae', 'plain torch']:.3f} ms"]
        if ("vae", "Pyro Trace_ELBO") in med:
            lines[0] += f", Pyro Trace_ELBO {1e3 * med['vae', 'Pyro Trace_ELBO']:.3f} ms"
        lines.append(f"    DDPM step: companion {1e3 * med['ddpm', 'companion']:.3f} ms, "
                     f"plain torch {1e3 * med['ddpm', 'plain torch']:.3f} ms")
        return "\n".join(lines)
    if name == "per_sample":
        return "    " + "; ".join(f"{r['implementation']} {r['median_ms']:.0f} ms" for r in rows[:2])
    return ""


if __name__ == "__main__":
    main()
