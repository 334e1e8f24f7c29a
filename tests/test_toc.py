"""The table of contents and the chapters agree: no entry without a file, no page left out."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _entries(node) -> list[str]:
    found = []
    if isinstance(node, dict):
        for key in ("root", "file"):
            if key in node:
                found.append(node[key])
        for value in node.values():
            found += _entries(value) if isinstance(value, (list, dict)) else []
    elif isinstance(node, list):
        for item in node:
            found += _entries(item)
    return found


def _toc_paths() -> list[Path]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    paths = []
    for entry in _entries(toc):
        candidates = [ROOT / entry, ROOT / f"{entry}.md", ROOT / f"{entry}.ipynb"]
        paths.append(next((p for p in candidates if p.is_file()), ROOT / f"{entry}.md"))
    return paths


def test_every_toc_entry_has_a_file():
    missing = [str(p.relative_to(ROOT)) for p in _toc_paths() if not p.is_file()]
    assert not missing, f"_toc.yml lists files that do not exist: {missing}"


def test_every_book_page_is_in_the_toc():
    listed = {p.resolve() for p in _toc_paths()}
    pages = [p for p in (ROOT / "book").rglob("*.md") if "_build" not in p.parts]
    orphans = [str(p.relative_to(ROOT)) for p in pages if p.resolve() not in listed]
    assert not orphans, f"pages under book/ missing from _toc.yml: {orphans}"


def test_every_chapter_imports_companion_and_asserts():
    import importlib.util
    import re

    # the root conftest.py (tests/conftest.py shadows the name "conftest")
    spec = importlib.util.spec_from_file_location("root_conftest", ROOT / "conftest.py")
    root_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(root_conftest)
    is_notebook = root_conftest.is_notebook

    for path in _toc_paths():
        if path.is_file() and is_notebook(path):
            text = path.read_text()
            assert "import companion" in text or "from companion" in text, f"{path.name} does not use companion"
            assert re.search(r"^\s*assert\b", text, re.M), f"{path.name} asserts none of its claims"
