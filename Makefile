# Every target creates (or reuses) .venv and installs the project with the CPU build of torch.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build, by its local version: PyPI's Linux wheel of torch is a multi-GB CUDA build.
# pip finds it where the project machines keep it (their find-links), else on PyTorch's CPU
# index: PyPI has no "+cpu" version, so that first try fails at once rather than downloading.
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP  := $(VENV)/.snr-dist-installed
EXTRAS := examples,dev,deepspeed,megatron,triton,hf,lightning,tensorboard
# The versions the suite last passed with (pip freeze of that environment). Every install path
# uses it, so an upstream release cannot break a fresh clone overnight; `make constraints`
# moves it forward on purpose. pyproject.toml's ranges stay loose for users.
CONSTRAINTS ?= constraints.txt
LATEST_VENV ?= .venv-latest

.PHONY: demo test test-long lint bench docs clean experiments constraints

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" 2>/dev/null \
	  || $(PIP) install -q --extra-index-url $(TORCH_CPU_INDEX) "$(TORCH_SPEC)"
	$(PY) -c "import torch, sys; sys.exit('a CUDA build of torch was installed; use the CPU wheel' if torch.version.cuda else 0)"
	$(PIP) install -q --constraint $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/snr-dist train --config configs/quickstart.yaml

test: $(STAMP)
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 SNR_DIST_CONSTRAINTS=$(CONSTRAINTS) $(VENV)/bin/pytest -n 2 --durations=15 -q -m "not long"
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir site

# Tests of several minutes each (the elastic node-loss job), kept out of `make test`'s budget.
test-long: $(STAMP)
	OMP_NUM_THREADS=1 SNR_DIST_CONSTRAINTS=$(CONSTRAINTS) $(VENV)/bin/pytest -n 2 -q -m long

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/step_overhead.py

docs: $(STAMP)
	$(VENV)/bin/mkdocs serve

clean:
	rm -rf $(VENV) $(LATEST_VENV) site .pytest_cache .ruff_cache

# The newest releases, on purpose: a new venv resolved without the constraints (torch stays the
# pinned CPU wheel), the whole of `make test` in it, and constraints.txt rewritten from that
# venv only when it passes (a failure leaves the file as it was and the venv to look into).
constraints:
	rm -rf $(LATEST_VENV)
	$(MAKE) test VENV=$(LATEST_VENV) CONSTRAINTS=/dev/null
	{ sed -n '/^#/p' $(CONSTRAINTS); \
	  $(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -iv '^snr[-_]dist'; \
	} > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	git diff --stat -- $(CONSTRAINTS) 2>/dev/null || true

# The claim experiments behind docs/results.md (each < 20 min on 2 cores; reports in runs/experiments/).
EXPERIMENTS ?= label_noise convergence entk_partition double_descent grokking
experiments: $(STAMP)
	for e in $(EXPERIMENTS); do $(VENV)/bin/snr-dist experiment $$e || exit 1; done
