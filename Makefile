# Set-up and the two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint clean

install: $(STAMP)

# Order matters on a fresh machine: torch/torchvision first (they lie on the machine's
# disk; newer releases are multi-GB downloads), then DeepSpeed without build isolation
# (its sdist imports torch at build time), then this project with its test extra; last,
# DeepSpeed's CPU communication op is compiled and the demo dataset generated here rather
# than in the first run.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) --no-build-isolation deepspeed
	$(PIP) --no-build-isolation -e '.[test]'
	$(PY) -m pretrain.prebuild
	touch $(STAMP)

# The main job on the embedded default: MAE on generated shapes, 2 CPU workers.
demo: install
	$(PY) -m pretrain.run

# Two pytest-xdist workers, a test file each at a time (each worker with its own local Ray
# instance), in the order tests/conftest.py gives (longest first).
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

test-fast: install
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

lint: install
	$(VENV)/bin/ruff check pretrain objectives data tests scripts

clean:
	rm -rf runs .pytest_cache
