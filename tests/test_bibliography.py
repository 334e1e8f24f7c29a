"""book/references.bib parses, with one entry per key (a broken entry stops the book build)."""
import re
from pathlib import Path

from pybtex.database import parse_file

BIB = Path(__file__).resolve().parents[1] / "book" / "references.bib"


def test_bibliography_parses_with_unique_keys():
    keys = re.findall(r"^@\w+\{([^,\s]+),", BIB.read_text(), flags=re.M)
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    assert not duplicates, f"keys defined twice: {duplicates}"
    assert len(parse_file(str(BIB)).entries) == len(keys)


def test_every_cited_key_exists():
    keys = set(re.findall(r"^@\w+\{([^,\s]+),", BIB.read_text(), flags=re.M))
    book = BIB.parent
    cited = set()
    for page in book.rglob("*.md"):
        for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", page.read_text()):
            cited.update(k.strip() for k in group.split(","))
    missing = sorted(cited - keys)
    assert not missing, f"cited but not in references.bib: {missing}"
