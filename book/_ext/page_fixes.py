"""Two fixes to the generated pages, applied while each page is written.

1. Each chapter's executed notebook (``.ipynb``) in the page's download menu. sphinx-book-theme
   lists a ``.ipynb`` download only when a launch service (Binder, Colab) is configured. This
   book has none (it is read offline too), so this does the part that matters: it copies the
   notebook MyST-NB executed for the page (``_build/jupyter_execute``) next to the page's source
   under ``_sources/`` and tells the theme about it, before the theme builds its header buttons
   (priority 500 < the theme's 501).
2. Each script once. sphinx-thebe 0.3.1 registers its inline configuration script in a hook that
   runs after the builder has copied the registry, so every page declared ``THEBE_JS_URL`` twice
   and the browser logged a SyntaxError; the browser check (``make book-check``) caught it.
"""
from pathlib import Path
from shutil import copy2


def add_executed_notebook(app, pagename, templatename, context, doctree):
    executed = Path(app.outdir).parent / "jupyter_execute" / f"{pagename}.ipynb"
    if not executed.is_file():
        return  # a prose page, or a page that is not a notebook
    target = Path(app.outdir) / "_sources" / f"{pagename}.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    copy2(executed, target)
    context["ipynb_source"] = f"{pagename}.ipynb"


def each_script_once(app, pagename, templatename, context, doctree):
    seen, unique = set(), []
    for script in context.get("script_files", []):
        # the registry's copy has filename None, the builder's "": the same script
        key = (getattr(script, "filename", None) or "",
               tuple(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app):
    app.connect("html-page-context", add_executed_notebook, priority=500)
    app.connect("html-page-context", each_script_once)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
