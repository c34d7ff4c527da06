# rhovae: `make test` builds .venv from scratch (CPU torch from the local wheel) and runs the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt

.PHONY: setup data test demo lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned, so nothing can pull a CUDA build of several GB
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# Fashion-MNIST from Debian's dataset-fashion-mnist, where we are root with apt; elsewhere the
# data tests skip and say why.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
		|| echo "note: could not install dataset-fashion-mnist; data tests will skip"; \
	fi

test: setup data
	$(PY) -m pytest -q

# The offline demo: diagonal vs AR(1) posterior, MLP VAE, 5 epochs each on Fashion-MNIST (Debian
# package) or, where that cannot be installed, the 5,000-image MNIST subset; then test ELBO and IWAE.
# Scratch output in runs/demo (replaced on each run).
demo: setup data
	@if [ -d /usr/share/datasets/fashion-mnist ]; then set -- fashion-mnist 5000; else set -- mnist-5k 500; \
		echo "Fashion-MNIST not installed: using the mnist-5k subset"; fi; \
	rm -rf runs/demo; \
	for p in diagonal ar1; do \
		$(VENV)/bin/rhovae train --dataset $$1 --val-size $$2 --posterior $$p --latent-dim 10 --epochs 5 \
			--run-dir runs/demo/$$p --no-progress && \
		$(VENV)/bin/rhovae -q evaluate runs/demo/$$p --iwae-k 100 || exit 1; \
	done

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: setup
	$(PY) benchmarks/bench_posteriors.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
