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
  EXTRAS  = dev,analysis
  MPIEXEC ?= mpiexec
  # Build from source so mpi4py links the cluster's libmpi, not a wheel's; never from pip's
  # cache, which may hold a build against another MPI (another module loaded last time).
  PIPFLAGS = --no-binary=mpi4py
  MPI4PY   = $(PY) -m pip install --quiet --no-cache-dir --no-binary=mpi4py 'mpi4py>=4.0'
else
  EXTRAS  = dev,analysis,mpich
  MPIEXEC ?= $(VENV)/bin/mpiexec
  PIPFLAGS =
  # The PyPI MPICH runs where ranks outnumber cores (laptops, CI, 2-core VMs); there its
  # shared-memory collectives spin and take the cores from the ranks still computing
  # (C-SGD on 16 ranks over 2 cores: 64 samples/s, 464 without them). Set it yourself
  # to override; `dsgd_mpi.run` warns when it is missing on an oversubscribed node.
  MPIR_CVAR_DEVICE_COLLECTIVES ?= none
  export MPIR_CVAR_DEVICE_COLLECTIVES
endif
export MPIEXEC

.PHONY: install run sim demo data test bench lint clean study gpu-check killtest

FMNIST ?= /usr/share/datasets/fashion-mnist

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(MPI4PY)
	$(PY) -m pip install --quiet $(PIPFLAGS) -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-*
	touch $@

# The main job on the embedded default: Fashion-MNIST, small CNN, ring of 4 ranks.
run: $(STAMP) data
	$(MPIEXEC) -n $(NP) $(PY) -m mpi4py -m dsgd_mpi.run configs/quickstart.yaml data.root=$(FMNIST) \
	  run.overwrite=true

# The same run with NP replicas in one process (the simulator): no MPI, same HDF5 layout.
sim: $(STAMP) data
	$(PY) -m dsgd_mpi.sim configs/quickstart.yaml --workers $(NP) data.root=$(FMNIST) \
	  run.name=quickstart_sim run.overwrite=true

# Gossip alone: the consensus distance shrinking round by round.
demo: $(STAMP)
	$(MPIEXEC) -n $(NP) $(PY) -m mpi4py -m dsgd_mpi.demo

# Real data, offline: Debian's dataset-fashion-mnist package where apt works.
data:
	@if ls $(FMNIST)/train-images-idx3-ubyte.gz >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "Installing Fashion-MNIST from Debian (dataset-fashion-mnist)..."; \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
	  echo "Fashion-MNIST not found in $(FMNIST). Either:"; \
	  echo "  sudo apt-get install dataset-fashion-mnist          (Debian/Ubuntu)"; \
	  echo "  make run FMNIST=/path/to/idx/files                  (the 4 standard .gz files)"; \
	  echo "  or run with data.download=true data.root=data/fmnist where there is internet"; \
	  exit 2; \
	fi

# The consensus-distance study, third edition (issue 26; studies/consensus/README.md): Kong's
# and Zhu's cells on the one-process simulator (`dsgd_mpi.study --sim N`, one thread per plan),
# one cell also on MPI ranks and in the simulator's reference mode, then docs/RESULTS.md with a
# verdict per claim (claims 1, 5a, 5b carried forward from the second edition's runs).
# Finished runs with the same config are skipped: rm -rf $(STUDY) to start over.
# STUDY_QUICK=1: the same pipeline on a tiny synthetic grid (a few steps per run) in
# runs/study-quick/ (configs, runs, and the report in runs/study-quick/docs), to check it.
ifeq ($(STUDY_QUICK),1)
  STUDY_ROOT = runs/study-quick
  STUDY      = $(STUDY_ROOT)/runs
  STUDY_CFG  = $(STUDY_ROOT)/configs
  STUDY_DOCS = $(STUDY_ROOT)/docs
  STUDY_GEN  = --quick $(STUDY_ROOT)
else
  STUDY      = runs/study/fmnist
  STUDY_CFG  = configs/study/fmnist
  STUDY_DOCS = docs
  STUDY_GEN  =
endif
# The plans run STUDY_JOBS at a time, one thread each: on CPU two single-thread processes
# train ~2x faster than one process with two threads. plans.txt orders them (the longest
# first, the MPI plan last, beside the last simulator plan; run_plans.sh).
STUDY_JOBS ?= $(shell nproc)
PLANS = xargs -P $(STUDY_JOBS) -I{} studies/consensus/run_plans.sh $(PY) {} $(FMNIST)
study: $(STAMP) data
	@mkdir -p $(STUDY) && date +%s > $(STUDY)/.started
	@status=0; \
	if [ -n "$(STUDY_GEN)" ]; then $(PY) -m studies.consensus.generate $(STUDY_GEN) || exit $$?; fi; \
	grep -v '^#' $(STUDY_CFG)/plans.txt | $(PLANS) || status=$$?; \
	$(PY) -m dsgd_mpi.analyze $(STUDY)/*.h5 --out $(STUDY_DOCS)/study/analyze > /dev/null || status=$$?; \
	took=$$(( $$(date +%s) - $$(cat $(STUDY)/.started) )); \
	$(PY) -m studies.consensus.report $(STUDY)/*.h5 --out $(STUDY_DOCS) \
	  --note "\`make study\` took $$((took / 60)) min $$((took % 60)) s on $$(nproc) cores ($$(date -u +%F))." \
	  || status=$$?; \
	exit $$status

test: $(STAMP)
	$(PY) -m pytest -q

# The lose-nothing kill loop with the 50 kills the README quotes (the suite runs 12).
killtest: $(STAMP)
	DSGD_KILLS=50 $(PY) -m pytest -q -s tests/test_lose_nothing_mpi.py -k kills_at_random

# On a machine with GPUs (< 5 min): gossip vs numpy on device buffers, direct and staged; a
# 2-rank training run with evaluation and exact distance; the step time vs a step without
# communication. Everything is skipped, and says so, where torch sees no GPU.
gpu-check: $(STAMP)
	$(PY) -m pytest -q -rs -s tests/gpu

bench: $(STAMP)
	$(MPIEXEC) -n 4 $(PY) -m mpi4py -m dsgd_mpi.bench gossip --topology ring --numel 270000 --json
	$(MPIEXEC) -n 4 $(PY) -m mpi4py -m dsgd_mpi.bench gossip --topology ring --numel 11000000 --json

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
