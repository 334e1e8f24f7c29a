"""Whole-book execution time per chapter, in the quick profile, from a test run.

``make test`` re-executes every chapter under nbval, and the root ``conftest.py`` prints a table
of each chapter's seconds (kernel start, every cell, teardown) at the end of the run::

    ============== chapter execution times ==============
       21.3 s  book/foundations/gradients_of_expectations.md
       ...
      512.0 s  all chapters (budget 60 s each)

:func:`run` either runs that test (``python -m pytest --nbval-lax book/``, minutes: hence
``python -m benchmarks --chapters``, off by default) or reads the log of one already run
(``--chapters-log FILE``, e.g. ``make test | tee test.log``), and writes ``chapters.json``.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from ._common import ROOT, write_result

__all__ = ["parse_chapter_times", "run"]

_LINE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?) s\s+(book/\S+\.md)(\s+OVER BUDGET)?\s*$")
_HEADER = re.compile(r"=+ chapter execution times =+")


def parse_chapter_times(log: str) -> list[dict]:
    """The rows of the conftest's table in a pytest log: ``[{"chapter", "seconds", "over_budget"}]``."""
    parts = _HEADER.split(log)
    if len(parts) < 2:
        raise ValueError("the log has no 'chapter execution times' section (run pytest with --nbval-lax)")
    rows = []
    for line in parts[-1].splitlines():
        match = _LINE.match(line)
        if match:
            rows.append({"chapter": match.group(2), "seconds": float(match.group(1)),
                         "over_budget": match.group(3) is not None})
    if not rows:
        raise ValueError("the 'chapter execution times' section lists no chapter")
    return rows


def _run_tests() -> tuple[str, int]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("COMPANION_PROFILE", "quick")
    cmd = [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-cell-timeout=600", "-p", "no:cacheprovider",
           "-q", "book/"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    return proc.stdout + proc.stderr, proc.returncode


def run(out_dir: Path, *, quick: bool, device: torch.device, log: Path | None = None, seed: int = 0) -> Path:
    """Per-chapter seconds from ``log`` (a saved pytest output) or from a fresh test run."""
    started = time.perf_counter()
    if log is not None:
        text, status, source = Path(log).read_text(), None, f"log {Path(log).name}"
    else:
        text, status = _run_tests()
        source = "python -m pytest --nbval-lax book/ (this run)"
    rows = parse_chapter_times(text)
    settings = {"source": source, "profile": os.environ.get("COMPANION_PROFILE", "quick"),
                "pytest_exit_status": status, "budget_s_per_chapter": 60,
                "total_s": round(sum(r["seconds"] for r in rows), 1)}
    return write_result(out_dir, "chapters", device=device, profile="quick" if quick else "full",
                        settings=settings, rows=rows, started=started)
