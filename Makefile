# rhovae: `make test` builds .venv from scratch (CPU torch from the local wheel) and runs the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt

.PHONY: setup data test docs demo lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned, so nothing can pull a CUDA build of several GB
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# Fashion-MNIST (Debian's dataset-fashion-mnist) and English words (wamerican, for --dataset words),
# where we are root with apt; elsewhere the tests that need them skip and say why.
data:
	@if { [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -f /usr/share/dict/words ]; } \
		&& command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist wamerican >/dev/null) \
		|| echo "note: could not install dataset-fashion-mnist/wamerican; the tests that need them skip"; \
	fi

test: setup data
	$(VENV)/bin/ruff check src tests benchmarks docs/hooks.py
	$(PY) -m pytest -q

# The documentation site (mkdocs.yml): MkDocs + Material + mkdocstrings, into site/. --strict: a broken
# link or anchor, or a public name without a docstring (docs/hooks.py), fails the build.
$(VENV)/.docs-installed: $(VENV)/.installed
	$(PIP) -e ".[docs]"
	touch $@

docs: setup $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# The offline demo: `rhovae compare --preset quick`: the MLP VAE with the diagonal and the AR(1)
# posterior, 5 epochs x 3 seeds, on Fashion-MNIST (Debian package) or, where that cannot be installed,
# the 5,000-image MNIST subset; prints a table and the path of the report. Finished runs are reused.
demo: setup data
	$(VENV)/bin/rhovae compare --preset quick --out runs/demo

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks docs/hooks.py
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: setup
	$(PY) benchmarks/bench_posteriors.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis site
