"""The chapters are tests.

nbval only collects ``.ipynb`` files; the book's chapters are MyST text notebooks (``.md`` with a
``kernelspec`` in their front matter). This root conftest hands each of them under ``book/`` to
nbval's own collector, read with jupytext, so pytest re-executes it cell by cell in the chapter's
folder, exactly as the book build does. A failing ``assert`` in a chapter fails the suite.

It also sums the time each chapter takes and prints a table at the end of the run.
"""
from __future__ import annotations

import collections
from pathlib import Path
from unittest import mock

import jupytext
import nbval.plugin

ROOT = Path(__file__).parent
BOOK = ROOT / "book"
CHAPTER_BUDGET_S = 60.0  # quick profile, 2-core CPU

_chapter_seconds: dict[str, float] = collections.defaultdict(float)


def is_notebook(path: Path) -> bool:
    """A MyST text notebook: a ``.md`` file whose front matter names a ``kernelspec``."""
    if path.suffix != ".md":
        return False
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return False
    front_matter = text[3:].split("\n---", 1)[0]
    return "kernelspec:" in front_matter


class MystNotebook(nbval.plugin.IPyNbFile):
    """nbval's collector, fed the notebook jupytext reads from the ``.md`` file."""

    def collect(self):
        nb = jupytext.read(self.path)
        with mock.patch.object(nbval.plugin.nbformat, "read", lambda *args, **kwargs: nb):
            yield from super().collect()


def pytest_collect_file(file_path: Path, parent):
    opt = parent.config.option
    if (opt.nbval or opt.nbval_lax) and BOOK in file_path.parents and is_notebook(file_path):
        return MystNotebook.from_parent(parent, path=file_path)
    return None


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::", 1)[0]
    if path.startswith("book/") and path.endswith(".md"):
        _chapter_seconds[path] += report.duration  # setup (kernel start), call and teardown


def pytest_terminal_summary(terminalreporter):
    if not _chapter_seconds:
        return
    tr = terminalreporter
    tr.section("chapter execution times")
    for path, seconds in sorted(_chapter_seconds.items()):
        flag = "  OVER BUDGET" if seconds > CHAPTER_BUDGET_S else ""
        tr.write_line(f"{seconds:7.1f} s  {path}{flag}")
    tr.write_line(f"{sum(_chapter_seconds.values()):7.1f} s  all chapters (budget {CHAPTER_BUDGET_S:.0f} s each)")
