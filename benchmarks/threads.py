"""Each chapter's time with the book's thread policy and with torch's default, idle and loaded.

    .venv/bin/python benchmarks/threads.py                       # every chapter of _toc.yml
    .venv/bin/python benchmarks/threads.py book/generative/diffusion.md ...

For every chapter, four runs: {one intra-op thread (``companion.runtime``'s policy on a CPU),
torch's default (``COMPANION_THREADS=default``)} x {idle, one busy process}. The busy process is
a pure-Python loop (one core, like a reader's browser tab or a neighbour on a shared CI runner),
started by this script before the loaded runs and stopped after them. A chapter is executed as
the book build does (nbclient, a fresh kernel in the chapter's folder) and timed from kernel
start to the last cell. The table goes to stdout and to ``benchmarks/results/cpu/threads.md``
(the thread policy is a CPU matter). A run is stopped after ``--cap`` seconds (default 300) and shown as
``> cap``; ``--resume LOG`` keeps the lines of an interrupted run's output and runs only the rest. Not part of ``python -m benchmarks``, since it executes every
chapter four times; ``python -m benchmarks --chapters`` times each chapter once.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = (("policy", None), ("torch default", "default"))


def chapters_from_toc() -> list[Path]:
    toc = (ROOT / "_toc.yml").read_text()
    paths = [ROOT / f"{entry}.md" for entry in re.findall(r"file:\s*(\S+)", toc)]
    return [p for p in paths if p.is_file() and "{code-cell}" in p.read_text()]


def run_chapter(path: Path, threads: str | None, cap: float) -> float:
    """Seconds to execute the chapter in a fresh kernel with ``COMPANION_THREADS=threads``.

    The run happens in its own process group, killed (kernel included) after ``cap`` seconds;
    a run that hits the cap returns ``inf``.
    """
    env = dict(os.environ)
    env.pop("COMPANION_THREADS", None)
    if threads is not None:
        env["COMPANION_THREADS"] = threads
    proc = subprocess.Popen([sys.executable, __file__, "--execute-one", str(path)], env=env,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=cap)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return float("inf")
    if proc.returncode != 0:
        raise RuntimeError(f"{path} failed with COMPANION_THREADS={threads}")
    return float(out.strip().splitlines()[-1])


def execute_one(path: Path) -> float:
    """Execute one chapter as the book build does; seconds from kernel start to the last cell."""
    import jupytext
    import nbclient

    nb = jupytext.read(path)
    client = nbclient.NotebookClient(nb, timeout=3600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    return time.perf_counter() - start


@contextlib.contextmanager
def busy_process():
    """One CPU-bound process beside the chapter, stopped on exit."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        yield
    finally:
        proc.kill()
        proc.wait()


LOG_LINE = re.compile(r"^(\S+\.md)\s+(idle|loaded)\s+(policy|torch default)\s+(>\s*)?([0-9.]+) s$")


def read_log(path: Path) -> dict[tuple[str, str, str], float]:
    """The measurements printed by an earlier (interrupted) run of this script."""
    times = {}
    for line in path.read_text().splitlines():
        match = LOG_LINE.match(line.strip())
        if match:
            chapter, load, name, capped, seconds = match.groups()
            times[Path(chapter).stem, load, name] = float("inf") if capped else float(seconds)
    return times


def _fmt(seconds: float, cap: float) -> str:
    return f"> {cap:.0f} s" if seconds == float("inf") else f"{seconds:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("chapters", nargs="*", help="chapter files (default: every chapter of _toc.yml)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu" / "threads.md"))
    parser.add_argument("--loads", nargs="+", choices=("idle", "loaded"), default=["idle", "loaded"],
                        help="which conditions to run (default both)")
    parser.add_argument("--cap", type=float, default=300.0,
                        help="seconds after which a run is stopped and reported as '> cap' (default 300)")
    parser.add_argument("--execute-one", metavar="CHAPTER", help=argparse.SUPPRESS)
    parser.add_argument("--resume", metavar="LOG",
                        help="a log of an interrupted run (this script's stdout): its measured lines are "
                             "kept and not rerun")
    args = parser.parse_args()
    if args.execute_one:
        print(execute_one(Path(args.execute_one)))
        return
    chapters = [Path(c).resolve() for c in args.chapters] or chapters_from_toc()
    times: dict[tuple[str, str, str], float] = read_log(Path(args.resume)) if args.resume else {}
    for load in args.loads:
        todo = [p for p in chapters if any((p.stem, load, name) not in times for name, _ in CONDITIONS)]
        if not todo:
            continue
        with busy_process() if load == "loaded" else contextlib.nullcontext():
            for path in todo:
                for name, threads in CONDITIONS:
                    if (path.stem, load, name) in times:
                        continue
                    seconds = run_chapter(path, threads, args.cap)
                    times[path.stem, load, name] = seconds
                    print(f"{path.relative_to(ROOT)}  {load:6s}  {name:13s}  {_fmt(seconds, args.cap)}", flush=True)
    import torch

    lines = [
        "| chapter | idle, policy (1 thread) | idle, torch default | loaded, policy | loaded, torch default |",
        "|---|---|---|---|---|",
    ]
    totals = [0.0] * 4
    for path in chapters:
        row = [times[path.stem, load, name] for load in ("idle", "loaded") for name, _ in CONDITIONS]
        totals = [t + r for t, r in zip(totals, row)]
        lines.append(f"| {path.stem} | " + " | ".join(_fmt(r, args.cap) for r in row) + " |")
    capped = [sum(min(times[p.stem, load, name], args.cap) for p in chapters) for load in ("idle", "loaded")
              for name, _ in CONDITIONS]
    lines.append("| **all** | " + " | ".join(
        f"**{'> ' if t == float('inf') else ''}{c:.0f} s**" for t, c in zip(totals, capped)) + " |")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    header = (f"Measured {time.strftime('%Y-%m-%d')} on {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
              f"(default {torch.get_num_threads()} intra-op threads); 'loaded' = one busy-loop process beside the chapter. "
              f"A run still going after {args.cap:.0f} s was stopped (`> {args.cap:.0f} s`); the totals count "
              f"such runs as {args.cap:.0f} s.\n")
    table = header + "\n" + "\n".join(lines) + "\n"
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)


if __name__ == "__main__":
    main()
