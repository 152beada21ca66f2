# horovod-dpsgd: `make demo` (main job) and `make test` (test suite), each set-up included.
VENV ?= .venv
NP ?= 4
PY := $(VENV)/bin/python
HOROVODRUN := $(VENV)/bin/horovodrun
# More MPI processes than cores: let Open MPI yield the CPU while it waits (see docs/install.md).
export OMPI_MCA_mpi_yield_when_idle ?= 1

.PHONY: setup demo test bench clean

setup:
	VENV=$(abspath $(VENV)) bash scripts/setup.sh

demo: setup
	$(HOROVODRUN) -np $(NP) $(PY) examples/pytorch_mnist_mlp.py --topology ring --epochs 5

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) runs build *.egg-info

bench: setup
	$(PY) benchmarks/run.py
