"""Each chapter's time with the book's thread policy and with torch's default, idle and loaded.

    .venv/bin/python benchmarks/threads.py                       # every chapter of _toc.yml
    .venv/bin/python benchmarks/threads.py book/generative/diffusion.md ...

For every chapter, four runs: {one intra-op thread (``companion.runtime``'s policy on a CPU),
torch's default (``COMPANION_THREADS=default``)} x {idle, one busy process}. The busy process is
a pure-Python loop (one core, like a reader's browser tab or a neighbour on a shared CI runner),
started by this script before the loaded runs and stopped after them. A chapter is executed as
the book build does (nbclient, a fresh kernel in the chapter's folder) and timed from kernel
start to the last cell. The table goes to stdout and to ``benchmarks/results/threads.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
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


def run_chapter(path: Path, threads: str | None) -> float:
    """Seconds to execute the chapter in a fresh kernel with ``COMPANION_THREADS=threads``."""
    import jupytext
    import nbclient

    env = dict(os.environ)
    env.pop("COMPANION_THREADS", None)
    if threads is not None:
        env["COMPANION_THREADS"] = threads
    nb = jupytext.read(path)
    client = nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    with _environ(env):
        client.execute()
    return time.perf_counter() - start


@contextlib.contextmanager
def _environ(env: dict):
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("chapters", nargs="*", help="chapter files (default: every chapter of _toc.yml)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "threads.md"))
    args = parser.parse_args()
    chapters = [Path(c).resolve() for c in args.chapters] or chapters_from_toc()
    times: dict[tuple[str, str, str], float] = {}
    for load in ("idle", "loaded"):
        with busy_process() if load == "loaded" else contextlib.nullcontext():
            for path in chapters:
                for name, threads in CONDITIONS:
                    seconds = run_chapter(path, threads)
                    times[path.stem, load, name] = seconds
                    print(f"{path.relative_to(ROOT)}  {load:6s}  {name:13s}  {seconds:6.1f} s", flush=True)
    import torch

    lines = [
        "| chapter | idle, policy (1 thread) | idle, torch default | loaded, policy | loaded, torch default |",
        "|---|---|---|---|---|",
    ]
    totals = [0.0] * 4
    for path in chapters:
        row = [times[path.stem, load, name] for load in ("idle", "loaded") for name, _ in CONDITIONS]
        totals = [t + r for t, r in zip(totals, row)]
        lines.append(f"| {path.stem} | " + " | ".join(f"{r:.1f} s" for r in row) + " |")
    lines.append("| **all** | " + " | ".join(f"**{t:.0f} s**" for t in totals) + " |")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    header = (f"Measured {time.strftime('%Y-%m-%d')} on {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
              f"(default {torch.get_num_threads()} intra-op threads); 'loaded' = one busy-loop process beside the chapter.\n")
    table = header + "\n" + "\n".join(lines) + "\n"
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)


if __name__ == "__main__":
    main()
