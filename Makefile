# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Each creates/updates .venv and installs what it needs. On CPU machines torch is pinned to the
# CPU build first, so nothing pulls a multi-GB CUDA torch (constraints-cpu.txt keeps it that way).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.raylign-installed
export DS_BUILD_OPS := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-fast bench docs clean

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints-cpu.txt torch
	$(PIP) install -q -c constraints-cpu.txt -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/demo.py --out runs/demo

test: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider

test-fast: $(STAMP)
	$(PY) -m pytest tests/unit -q -p no:cacheprovider

bench: $(STAMP)
	$(VENV)/bin/raylign bench --quick --out bench_out

docs: $(STAMP)
	$(PY) docs/gen_docs.py

clean:
	rm -rf $(VENV) runs bench_out .pytest_cache
