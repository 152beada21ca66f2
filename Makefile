# horovod-dpsgd: `make demo` (main job) and `make test` (test suite), each set-up included.
VENV ?= .venv
NP ?= 4
PY := $(VENV)/bin/python
HOROVODRUN := $(VENV)/bin/horovodrun
# More MPI processes than cores: let Open MPI yield the CPU while it waits (see docs/install.md).
export OMPI_MCA_mpi_yield_when_idle ?= 1

.PHONY: setup demo example test bench clean

setup:
	VENV=$(abspath $(VENV)) bash scripts/setup.sh

# The paper's Sec. 2.1 experiment on the bundled MNIST sample: SSGD vs DPSGD vs SSGD*, 3 seeds (docs/reproduction.md).
demo: setup
	$(VENV)/bin/horovod-dpsgd compare --np $(NP) --seeds 0,1,2 --batch-size 500 --lr 1.0 --epochs 400 \
		--log-every 10 --eval-every 20 --diag-every 20 --out runs/compare

# Horovod's MNIST example with the one-line change (DPSGD on a ring, 4 learners).
example: setup
	$(HOROVODRUN) -np $(NP) $(PY) examples/pytorch_mnist_mlp.py --topology ring --epochs 5

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) runs build *.egg-info

bench: setup
	$(PY) benchmarks/run.py
