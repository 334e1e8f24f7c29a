# Two commands do all the set-up on a fresh machine:
#   make book   build the HTML site into _build/html (math typeset offline)
#   make test   run the unit tests and re-execute every chapter under nbval
# and one measures: make bench (benchmarks/results/<device>/; BENCH_OPTS="--device cuda", "--quick")
# Both create .venv if it is missing. A torch already installed in .venv is kept (install your
# CUDA build there first for a GPU); otherwise TORCH_SPEC, the CPU build, is installed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
MATHJAX_VERSION ?= 3.2.2
MATHJAX := _vendor/mathjax
BUILD_OPTS ?= -W --keep-going --all  # --all: every page rewritten, so no page keeps a stale navigation
PYTEST_OPTS ?=
BENCH_OPTS ?=

.PHONY: book book-check test bench clean mathjax chromium

book: $(VENV)/.installed-book $(MATHJAX)/tex-chtml.js
	$(VENV)/bin/jupyter-book build . --builder html $(BUILD_OPTS)
	@echo "The book is at file://$(CURDIR)/_build/html/index.html"

# every page of the built site in headless Chromium (Debian's): math typeset, images loaded,
# no console errors, no request leaving the machine, the navigation complete; screenshots
book-check: $(VENV)/.installed-test chromium
	$(PY) -m pytest site_tests -p no:cacheprovider $(PYTEST_OPTS)
	@echo "Screenshots of the intro and of each part's first chapter: $(CURDIR)/_build/screenshots/"

# Debian's chromium, when no Chromium is on the PATH (needs root, as on CI)
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

test: $(VENV)/.installed-test
	$(PY) -m pytest --nbval-lax --nbval-cell-timeout=600 --durations=10 $(PYTEST_OPTS)

# the book's measured comparisons (python -m benchmarks): results/<device>/*.json, which the
# appendix chapter "Benchmarks" renders; --quick for a few seconds each, --chapters for chapter times
bench: $(VENV)/.installed-test
	$(PY) -m benchmarks $(BENCH_OPTS)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, and only if none is there: an open `torch>=2.2` would fetch a multi-GB CUDA build
$(VENV)/.torch: | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	@$(PY) -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
	@touch $@

$(VENV)/.installed-%: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -e ".[$*]"
	@touch $@

# MathJax 3 from the npm registry, served from the site itself so math renders offline
mathjax: $(MATHJAX)/tex-chtml.js
$(MATHJAX)/tex-chtml.js:
	rm -rf _vendor/npm && mkdir -p _vendor/npm $(MATHJAX)
	cd _vendor/npm && npm pack --silent mathjax@$(MATHJAX_VERSION) >/dev/null && tar -xzf mathjax-*.tgz
	cd _vendor/npm/package/es5 && cp -r --parents tex-chtml.js output/chtml input/tex/extensions ui a11y sre \
		$(CURDIR)/$(MATHJAX)/
	rm -rf _vendor/npm

clean:
	rm -rf _build .jupyter_cache .pytest_cache
