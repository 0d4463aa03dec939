# Two commands on a fresh machine:
#   make run    set everything up, load the demo's shipped results, open the dashboard
#   make test   set everything up, lint, run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DB     ?= data/cache.duckdb
PORT   ?= 8501
HOST   ?= 127.0.0.1

.PHONY: run test test-fast setup demo demo-train demo-rebuild system-deps lint typecheck bench gpu-check clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel; unpinned, lm-eval would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

setup: $(STAMP)

# Chromium (browser tests, PDF and PNG export) and poppler (PDF checks) from Debian's packages.
system-deps:
	@missing=""; command -v chromium >/dev/null || missing="chromium"; \
	command -v pdftoppm >/dev/null || missing="$$missing poppler-utils"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" -ne 0 ]; then \
			echo "error: missing$$missing; install with: sudo apt-get install -y $$missing" >&2; exit 1; \
		fi; \
		echo "installing $$missing from Debian's packages" >&2; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# The demo's computed results ship in data/demo_results: `demo` imports them in seconds. `demo-train`
# also trains the demo checkpoints (to evaluate them yourself); `demo-rebuild` retrains from scratch,
# recomputes every demo evaluation and rewrites data/demo_results (about 40 minutes on 2 cores).
demo: setup
	$(BIN)/python -m analysis demo --db $(DB)

demo-train: setup
	$(BIN)/python -m analysis demo --train --db $(DB)

demo-rebuild: setup
	$(BIN)/python -m analysis demo --rebuild --db $(DB)

# A background worker computes the jobs queued from the browser or the command line while the dashboard
# is open (the pages fill in as each checkpoint lands; the Jobs page shows progress). It stops with make.
run: demo
	@echo "dashboard: http://$(HOST):$(PORT)  (Ctrl-C to stop)"
	@$(BIN)/python -m analysis worker --db $(DB) --once > $(VENV)/worker.log 2>&1 & worker=$$!; \
	trap 'kill $$worker 2>/dev/null' EXIT INT TERM; \
	$(BIN)/streamlit run app.py --server.address $(HOST) --server.port $(PORT) --server.headless true \
		--server.fileWatcherType none --browser.gatherUsageStats false -- --db $(DB)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy on app.py, analysis/ and pages/, at the strictness set in pyproject.toml's [tool.mypy].
typecheck: setup
	$(BIN)/python -m mypy

test: setup system-deps lint typecheck
	$(BIN)/pytest

# The quick tier while working: unit and AppTest tests, about 100 s of CPU time. Browser, Ray,
# lm-eval-on-a-checkpoint, training and simulation tests are marked slow; `make test` runs them all.
test-fast: setup lint typecheck
	$(BIN)/pytest -m "not slow"

bench: setup
	$(BIN)/python -m bench

# On a machine with a GPU: the device-aware tests and the benches on cuda, each step under its own timeout
# (about 8 minutes on an H200), report in $$OUT or out/gpu (bench/gpu_check.sh says more). Without a GPU
# it stops with one line; GPU_CHECK="--device cpu --quick" is the dry run on the CPU.
GPU_CHECK ?=
gpu-check: setup
	PYTHON=$(BIN)/python bash bench/gpu_check.sh $(GPU_CHECK)

clean:
	rm -rf $(VENV) data/demo data/cache.duckdb data/cache.duckdb.wal out
