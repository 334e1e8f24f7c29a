"""Every page of the built site, opened in a real browser.

Per page: the math is typeset (MathJax containers for every math element, no raw TeX
delimiters left in the text), every image has loaded with a non-zero size, the browser logged no
error, no request left the machine (the site works offline), the page has a title and a
description, and the left navigation lists every chapter of ``_toc.yml``. Screenshots of the
intro and of the first chapter of each part go to ``_build/screenshots/``.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import pytest

from conftest import ROOT, SITE

TOC = (ROOT / "_toc.yml").read_text()
CHAPTERS = re.findall(r"file:\s*(\S+)", TOC)          # book/foundations/vae, ...
ROOT_PAGE = re.search(r"root:\s*(\S+)", TOC).group(1)  # book/intro
PAGES = sorted(str(p.relative_to(SITE)) for p in SITE.rglob("*.html")
               if not p.relative_to(SITE).parts[0].startswith("_")
               and p.name != "index.html") if SITE.is_dir() else []
FIRST_OF_PART = {m.group(1) for m in re.finditer(r"chapters:\s*\n\s*-\s*file:\s*(\S+)", TOC)}
SCREENSHOT_PAGES = {f"{ROOT_PAGE}.html"} | {f"{c}.html" for c in FIRST_OF_PART}
RAW_TEX = re.compile(r"\$\$|\\\(|\\\)|\\\[|\\\]|\\begin\{")


def test_the_site_was_built_with_every_chapter():
    assert PAGES, f"no pages under {SITE}: run `make book` first"
    missing = [c for c in [ROOT_PAGE, *CHAPTERS] if not (SITE / f"{c}.html").is_file()]
    assert not missing, f"_toc.yml entries with no page: {missing}"


def test_the_front_page_leads_to_the_intro():
    assert f'url={ROOT_PAGE}.html' in (SITE / "index.html").read_text()


@pytest.mark.parametrize("page", PAGES)
def test_page(page, browser, site_url, screenshots):
    origin = urlparse(site_url).netloc
    outside, errors = [], []
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()

    def guard(route):  # any request that would leave the machine is refused and recorded
        url = urlparse(route.request.url)
        if url.scheme in ("data", "blob", "about") or url.netloc == origin:
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    tab.route("**/*", guard)
    tab.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.goto(f"{site_url}/{page}", wait_until="load")
    tab.evaluate("async () => { if (window.MathJax && MathJax.startup) await MathJax.startup.promise; }")
    tab.wait_for_load_state("networkidle")

    assert not outside, f"{page}: requests that leave the machine: {outside}"
    assert not errors, f"{page}: browser errors: {errors}"

    math = tab.evaluate("""() => ({
        elements: document.querySelectorAll('.math').length,
        typeset: document.querySelectorAll('.math mjx-container, mjx-container.MathJax').length,
        text: Array.from(document.querySelectorAll('article')).map(a => a.innerText).join(' '),
    })""")
    assert math["typeset"] >= math["elements"], (
        f"{page}: {math['elements']} math elements, {math['typeset']} typeset by MathJax")
    raw = RAW_TEX.search(math["text"])
    assert raw is None, f"{page}: raw TeX left in the text near: {math['text'][max(0, raw.start() - 60):raw.end() + 60]!r}"

    broken = tab.evaluate("""() => Array.from(document.images)
        .filter(i => !i.complete || i.naturalWidth === 0 || i.naturalHeight === 0)
        .map(i => i.getAttribute('src'))""")
    assert not broken, f"{page}: images that did not load: {broken}"

    if not page.startswith("book/"):
        context.close()
        return  # genindex, search and py-modindex: Sphinx's own pages
    assert tab.title().strip(), f"{page}: no <title>"
    description = tab.evaluate("() => document.querySelector('meta[name=description]')?.content || ''")
    assert description.strip(), f"{page}: no <meta name='description'>"
    nav = tab.evaluate("""() => Array.from(document.querySelectorAll('nav.bd-docs-nav a'))
        .map(a => new URL(a.href).pathname)""")
    listed = {p.lstrip("/").removesuffix(".html") for p in nav}
    missing = [c for c in CHAPTERS if c not in listed]
    assert not missing, f"{page}: chapters missing from the left navigation: {missing}"
    if page in SCREENSHOT_PAGES:
        tab.screenshot(path=str(screenshots / (page.replace("/", "_").removesuffix(".html") + ".png")))
    context.close()
