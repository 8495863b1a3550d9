# Two commands on a fresh machine: `make demo` and `make test`. Each installs what it needs into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CACHE  ?= $(HOME)/.cache/slmopt
TINYLM := $(CACHE)/tinylm
# A fixed step count (not a time budget) so the reference weights do not depend on machine load.
TINYLM_STEPS ?= 1800
PYTEST_ARGS ?=

.PHONY: install demo test lint format bench clean gpu-check

# torch first, pinned: this exact spec picks the local CPU wheel (anything else pulls GBs of CUDA).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/tinylm/train.py --out $(TINYLM) --steps $(TINYLM_STEPS)
	$(VENV)/bin/slmopt compile $(TINYLM) --passes "mask-2to4{method=sparsegpt}" \
		--calib $(TINYLM)/calib.txt --eval $(TINYLM)/heldout.txt -o out/demo --force

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check slmopt passes backends cuda tests benchmarks examples
	$(VENV)/bin/ruff format --check slmopt passes backends cuda tests benchmarks examples

format: $(STAMP)
	$(VENV)/bin/ruff format slmopt passes backends cuda tests benchmarks examples

clean:
	rm -rf $(VENV) out build *.egg-info .pytest_cache

# On a machine with a CUDA GPU + nvcc: build the kernels, run the gpu/cuda_build tests, print the op benchmark.
gpu-check:
	bash scripts/gpu_check.sh
