"""What every sub-benchmark shares: the machine record, the clocks, interleaved timing, the files.

Timing. A CPU run uses one intra-op thread (``companion.runtime``'s policy), so the process's
CPU time (``time.process_time``) measures the work itself; on an idle machine it equals the
wall-clock time, and on a shared one it stays meaningful where the wall clock does not (it
excludes the time spent waiting for a core). Both are recorded; the ratios the book asserts
use ``cpu_s`` on a CPU and ``wall_s`` on CUDA, where the host's CPU time says nothing about the
kernels (every timed block there ends with ``torch.cuda.synchronize()``).

Competing implementations are timed in interleaved rounds (A, B, C, A, B, C, ...), so that a
change in the machine's load hits all of them alike; a result is the median over the rounds.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

__all__ = [
    "ROOT",
    "RESULTS",
    "machine",
    "primary_metric",
    "Clock",
    "interleaved",
    "summarize",
    "write_result",
]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine(device: torch.device) -> dict:
    """The machine a result was measured on: CPU, cores, threads, versions, GPU, load, date."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "git_commit": _git_commit(),
    }
    try:
        import pyro

        info["pyro"] = pyro.__version__
    except ImportError:  # Pyro is in the [book] extra; the throughput and training rows need it
        info["pyro"] = None
    return info


def primary_metric(device: torch.device | str) -> str:
    """``"cpu_s"`` on a CPU (one thread: the work itself), ``"wall_s"`` on CUDA."""
    return "wall_s" if torch.device(device).type == "cuda" else "cpu_s"


class Clock:
    """Wall-clock and process CPU time of a block; synchronizes CUDA before reading."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"

    def now(self) -> tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()


def interleaved(fns: dict[str, Callable[[], object]], *, rounds: int, number: int,
                device: torch.device, warmup: int = 1) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each function: ``rounds`` interleaved rounds of ``number`` calls.

    Returns ``{name: {"wall_s": [...], "cpu_s": [...]}}``, one entry per round. Each function is
    first called ``warmup`` times, untimed (first-call costs: imports, caches, allocations).
    """
    clock = Clock(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: {"wall_s": [], "cpu_s": []} for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            wall0, cpu0 = clock.now()
            for _ in range(number):
                fn()
            wall1, cpu1 = clock.now()
            times[name]["wall_s"].append((wall1 - wall0) / number)
            times[name]["cpu_s"].append((cpu1 - cpu0) / number)
    return times


def summarize(seconds: list[float]) -> dict:
    """Median and quartiles of per-call times, in seconds."""
    xs = sorted(seconds)
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "rounds": len(xs)}


def write_result(out_dir: Path, name: str, *, device: torch.device, profile: str, settings: dict,
                 rows: list[dict], extra: dict | None = None, started: float | None = None) -> Path:
    """``<out_dir>/<name>.json``: the machine, the settings, the rows (and anything in ``extra``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "profile": profile,
        "machine": machine(device),
        "seconds": None if started is None else round(time.perf_counter() - started, 1),
        "settings": settings,
        "rows": rows,
    }
    if extra:
        record.update(extra)
    path = out_dir / f"{name}.json"
    path.write_text(_dumps(record))
    return path


def _dumps(record: dict) -> str:
    """JSON with one top-level key per line and one row per line (small, and diffs read well);
    floats to 7 significant digits, far below any standard error here."""
    def compact(value):
        return json.dumps(_rounded(value), separators=(",", ":"), default=_plain)

    lines = [f"{json.dumps(key)}:{compact(value)}" for key, value in record.items() if key != "rows"]
    rows = ",\n".join(compact(row) for row in record["rows"])
    return "{\n" + ",\n".join(lines) + ',\n"rows":[\n' + rows + "\n]}\n"


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.7g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")
