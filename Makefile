# The two set-up commands: `make install` then `make test`. Everything else reproduces a result.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= synthetic
# Extra Hydra overrides for the drivers, e.g. make reproduce-fig3 ARGS="trainer=gpu"
ARGS ?=
# Where torch comes from: PyPI's (the lock's CUDA 13 build) unless given, e.g. for an older NVIDIA driver
# make install TORCH_INDEX=https://download.pytorch.org/whl/cu126 (the lock's versions, that index's build)
TORCH_INDEX ?=
# The virtual environment of make gpu-env: the GPU machine's packages (docs/performance.md)
GPU_ENV ?= .gpu-env

.PHONY: install lint test reproduce-fig1 reproduce-fig2 reproduce-fig3 reproduce-fig4 reproduce-sensitivity reproduce-targets reproduce-claims reproduce-failures \
        reproduce-table1 reproduce-table2 teachers data bench gpu-check gpu-wheels gpu-env clean

install:  ## .venv with the exact pins of requirements/lock.txt, kd installed editable
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(PY) -m pip install --quiet --index-url $(TORCH_INDEX) $(shell grep -E '^torch(vision)?==' requirements/lock.txt))
	$(PY) -m pip install --quiet --constraint requirements/lock.txt --editable ".[dev]"
	@$(PY) scripts/check_torch.py

lint:  ## ruff's lint and format checks (pyproject.toml [tool.ruff]); `ruff format . && ruff check --fix .` fixes most
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test:  ## the whole suite, CPU only, W&B offline in a temporary folder
	WANDB_MODE=offline WANDB_DIR=$$(mktemp -d) $(PY) -m pytest -q

reproduce-fig1 reproduce-fig2 reproduce-fig3 reproduce-fig4 reproduce-sensitivity reproduce-targets:
	$(PY) -m experiments.$(subst reproduce-,,$@) --data $(DATA) $(ARGS)

reproduce-claims:  ## the claims side by side, from fig3's and sensitivity's published tables (no training)
	$(PY) -m experiments.claims $(ARGS)

reproduce-failures:
	$(PY) -m experiments.failures --data $(DATA) $(ARGS)

reproduce-table1:
	$(PY) -m experiments.table1 $(ARGS)

reproduce-table2:
	$(PY) -m experiments.table2 $(ARGS)

teachers:  ## train (or find) the teachers a table needs: make teachers DATA=cifar100 (table 1) or DATA=imagenet
	$(PY) -m experiments.teachers --data $(DATA) $(ARGS)

data:  ## download / prepare a real data set: make data DATA=cifar100 (or fashion_mnist), or DATA=imagenet VAL_LABELS=LOC_val_solution.csv
	$(PY) scripts/prepare_data.py $(DATA) --root data/$(DATA) $(if $(VAL_LABELS),--val-labels $(VAL_LABELS))

bench:
	$(PY) scripts/benchmark.py $(ARGS)

gpu-check:  ## the GPU path checked and measured in one command (scripts/gpu_check.sh; ARGS="--cpu" rehearses it)
	PYTHON=$(PY) bash scripts/gpu_check.sh $(ARGS)

gpu-wheels:  ## wheels of the pinned packages a bare GPU machine lacks (hydra-core, omegaconf, antlr4), into .whl/
	PYTHON=$(PY) bash scripts/gpu_check.sh --wheels

gpu-env:  ## $(GPU_ENV): a Python like the GPU machine's (no hydra, wandb, submitit); then make gpu-check VENV=$(GPU_ENV) ARGS=--cpu
	$(or $(shell PYENV_VERSION=3.12 pyenv which python3.12 2>/dev/null),$(PYTHON)) -m venv $(GPU_ENV)
	$(GPU_ENV)/bin/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) --extra-index-url https://pypi.org/simple) \
		torch==2.11.0 torchvision==0.26.0 lightning==2.6.6 torchmetrics==1.9.0 pytest pandas scipy matplotlib

clean:
	rm -rf logs teachers outputs multirun wandb
