"""Run one chapter as the book build does and show what it printed.

    .venv/bin/python tools/run_chapter.py book/foundations/gradients_of_expectations.md [outdir]

Executes the MyST notebook with nbclient in the chapter's folder, prints each cell's text output,
and writes its figures to ``outdir`` (default ``/tmp/chapter_figures``) so they can be looked at.
For the pass/fail check, use ``pytest --nbval-lax <chapter>`` (what ``make test`` runs).
"""
import base64
import sys
import time
from pathlib import Path

import jupytext
import nbclient


def main(path: str, outdir: str = "/tmp/chapter_figures") -> None:
    chapter = Path(path).resolve()
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    nb = jupytext.read(chapter)
    start = time.perf_counter()
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(chapter.parent)}})
    client.execute()
    print(f"{chapter.name}: executed in {time.perf_counter() - start:.1f} s")
    n_fig = 0
    for i, cell in enumerate(nb.cells):
        for o in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if o.get("output_type") == "stream":
                print(f"[cell {i}]", o["text"], end="" if o["text"].endswith("\n") else "\n")
            elif "image/png" in o.get("data", {}):
                target = out / f"{chapter.stem}_{n_fig}.png"
                target.write_bytes(base64.b64decode(o["data"]["image/png"]))
                print(f"[cell {i}] figure -> {target}")
                n_fig += 1
            elif "text/plain" in o.get("data", {}):
                print(f"[cell {i}]", o["data"]["text/plain"])


if __name__ == "__main__":
    main(*sys.argv[1:])
