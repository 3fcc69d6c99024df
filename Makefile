# The README's two commands: `make quickstart` (environment + main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: env quickstart test bench export-matrix clean

env: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all]'
	$(PY) -c "import vizoo, torch, timm, coremltools, litert_torch, ai_edge_litert; print('vizoo', vizoo.__version__, 'torch', torch.__version__, 'timm', timm.__version__)"
	touch $(STAMP)

## Main job: train -> evaluate -> export -> verify -> benchmark on the bundled data.
quickstart: env
	$(VENV)/bin/vizoo quickstart --out runs/quickstart

## The test suite (under 15 minutes on 2 cores).
test: env
	$(PY) -m pytest -q

## README tables (slow; not part of the tests).
bench: env
	$(PY) benchmarks/engine_overhead.py
	$(PY) benchmarks/latency_compact.py
	$(PY) benchmarks/evit_throughput.py
	$(PY) benchmarks/export_matrix.py

clean:
	rm -rf runs .pytest_cache
