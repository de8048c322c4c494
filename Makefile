# Two commands matter: `make demo` and `make test`. Both set up ./.venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.part_distillation-installed
export DETECTRON2_DATASETS ?= $(CURDIR)/datasets

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# Re-run the installer only when what it installs changed; the installer itself is idempotent too.
$(STAMP): scripts/install_deps.sh requirements.txt requirements-dev.txt setup.py
	VENV=$(VENV) bash scripts/install_deps.sh
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: setup
	$(PY) tools/run_toy_pipeline.py --output output/demo

test: setup lint
	$(PY) -m pytest -q tests

# ruff.toml: pyflakes + pycodestyle at line length 120, and the formatter's style.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	@set -e; for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b; done

clean:
	rm -rf output build *.egg-info
