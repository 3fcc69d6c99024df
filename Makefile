# The README's two commands: `make quickstart` (environment + main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: env quickstart test bench export-matrix clean

env: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing vizoo[all] into $(VENV) (a few minutes on a fresh machine)"
	$(PY) -m pip install -qq --upgrade pip
	@# the demos need OpenCV's GUI build; the headless wheel also installs cv2, so never keep both
	@if $(PY) -m pip show -qq opencv-python-headless 2>/dev/null; then \
		$(PY) -m pip uninstall -y -qq opencv-python-headless opencv-python; fi
	$(PY) -m pip install -qq -e '.[all]'
	@$(VENV)/bin/vizoo doctor --no-selfcheck > $(VENV)/doctor.txt || (cat $(VENV)/doctor.txt; exit 1)
	@echo "environment ready ($(VENV)/doctor.txt lists the versions; 'vizoo doctor' checks them)"
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
	$(PY) benchmarks/demo_fps.py

clean:
	rm -rf runs .pytest_cache
