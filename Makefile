# Two commands on a fresh machine: `make run` and `make test`.
# Both create .venv on first use and install the package with its MPI.
#
#   MPI=pypi    (default) mpi4py + the mpich wheel from PyPI; no system MPI needed
#   MPI=system  build mpi4py against the mpicc on PATH and use that MPI's mpiexec
#   NP=4        ranks for `make run`

PYTHON ?= python3
VENV   ?= .venv
MPI    ?= pypi
NP     ?= 4
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-$(MPI)

ifeq ($(MPI),system)
  EXTRAS  = dev
  MPIEXEC ?= mpiexec
  # Build from source so mpi4py links the cluster's libmpi, not a wheel's.
  PIPFLAGS = --no-binary=mpi4py
else
  EXTRAS  = dev,mpich
  MPIEXEC ?= $(VENV)/bin/mpiexec
  PIPFLAGS =
endif
export MPIEXEC

.PHONY: install run test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIPFLAGS) -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-*
	touch $@

run: $(STAMP)
	$(MPIEXEC) -n $(NP) $(PY) -m mpi4py -m dsgd_mpi.demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(MPIEXEC) -n 4 $(PY) -m mpi4py -m dsgd_mpi.bench gossip --topology ring --numel 270000 --json
	$(MPIEXEC) -n 4 $(PY) -m mpi4py -m dsgd_mpi.bench gossip --topology ring --numel 11000000 --json

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
