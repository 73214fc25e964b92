# The two commands of the README: `make demo` and `make test`. Both are idempotent.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_runs
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

# The order matters: torch 2.13.0 first (the CPU wheel on disk; a bare `torch` would pull a
# multi-GB CUDA build), then fbgemm-gpu-cpu, then torchrec WITHOUT its deps (its metadata asks
# for the CUDA fbgemm-gpu), then everything else.
$(STAMP): requirements/base.txt requirements/dev.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "setup: $(PYTHON) not found (expected Python 3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q fbgemm-gpu-cpu==1.8.0
	$(PIP) install -q --no-deps torchrec==1.8.0
	$(PIP) install -q -r requirements/base.txt -r requirements/dev.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, torchrec, fbgemm_gpu, ray; print('stack ok: torch', torch.__version__, 'torchrec', torchrec.__version__, 'ray', ray.__version__)"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/recsys data prepare ml100k-ctr
	$(VENV)/bin/recsys train --config configs/autoint_ml100k.yaml --num-workers 2 \
		--set output.run_root=$(DEMO_DIR)/runs --set output.model_repo=$(DEMO_DIR)/model_repo
	$(VENV)/bin/recsys evaluate --artifact $(DEMO_DIR)/model_repo/autoint_ml100k \
		--split test --output $(DEMO_DIR)/eval_test
	$(VENV)/bin/recsys verify-artifact --artifact $(DEMO_DIR)/model_repo/autoint_ml100k
	$(PY) scripts/demo_serve.py --model-repo $(DEMO_DIR)/model_repo --model autoint_ml100k

lint: setup
	$(VENV)/bin/ruff check recsys serving training tests benchmarks scripts
	$(VENV)/bin/lint-imports

# The whole suite, slow end-to-end tests included (what CI runs), then the benchmark smoke runs.
test: lint
	$(PY) -m pytest -q --durations=15 tests
	$(PY) benchmarks/model_quality.py --smoke --output $${TMPDIR:-/tmp}/model_quality_smoke.json
	$(PY) benchmarks/train_throughput.py --smoke --output $${TMPDIR:-/tmp}/train_throughput_smoke.json
	$(PY) benchmarks/serve_load.py --smoke --output $${TMPDIR:-/tmp}/serve_load_smoke.json
	$(PY) benchmarks/embedding_tradeoffs.py --smoke --fresh --output $${TMPDIR:-/tmp}/embedding_tradeoffs_smoke.json

test-fast: lint
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
