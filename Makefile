# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use. A torch already visible to the venv (system site packages, or
# VENV=/path/to/your/env) is respected; otherwise the measured torch/torchvision pair is installed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dmquant-installed
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE := 1
# pytest-xdist workers: one per core, at most 4 (each runs one intra-op thread, see tests/conftest.py,
# and holds its own torch and miniatures).
JOBS ?= $(shell python3 -c "import os; print(min(4, len(os.sched_getaffinity(0))))" 2>/dev/null || echo 1)

.PHONY: demo test test-fast test-gates bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m dmquant.cli demo --out outputs/demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n $(JOBS)

# Minutes, not a quarter hour: everything but the slow tests and the quality gates.
test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n $(JOBS) -m "not slow and not regression"

# The quality gates alone, on another float code path (the baselines record both; see baselines/).
test-gates: $(STAMP)
	ATEN_CPU_CAPABILITY=$(or $(ISA),default) ONEDNN_MAX_CPU_ISA=$(or $(ONEDNN_ISA),SSE41) $(PY) -m pytest -n $(JOBS) -m regression

bench: $(STAMP)
	$(PY) scripts/benchmark.py

clean:
	rm -rf outputs .pytest_cache build *.egg-info
