# horovod-dpsgd: `make demo` (main job) and `make test` (test suite), each set-up included.
VENV ?= .venv
NP ?= 4
PY := $(VENV)/bin/python
HOROVODRUN := $(VENV)/bin/horovodrun
# More MPI processes than cores: let Open MPI yield the CPU while it waits (see docs/install.md).
export OMPI_MCA_mpi_yield_when_idle ?= 1

.PHONY: setup demo reproduce example test bench clean

setup:
	VENV=$(abspath $(VENV)) bash scripts/setup.sh

# The paper's Sec. 2.1 and 2.2 experiments (reduced: the demo recipes of horovod_dpsgd/experiments/recipes.py),
# simulated learners on the bundled MNIST sample, and its Fig. 2 (docs/reproduction.md).
demo: setup
	$(VENV)/bin/horovod-dpsgd compare --recipe demo2.1 --out runs/demo/sec2.1
	$(VENV)/bin/horovod-dpsgd compare --recipe demo2.2 --out runs/demo/sec2.2
	$(VENV)/bin/horovod-dpsgd figure2 runs/demo/sec2.1 runs/demo/sec2.2 --out runs/demo/figure2.png

# The full Sec. 2 study behind docs/reproduction.md and its figures in docs/img/ (18 runs of 1-1.5 minutes each
# on 2 cores), with the landscape and Hessian of the Sec. 2.2 SSGD and DPSGD solutions (seed 0).
reproduce: setup
	$(VENV)/bin/horovod-dpsgd compare --recipe sec2.1 --out runs/sec2.1
	$(VENV)/bin/horovod-dpsgd compare --recipe sec2.2 --out runs/sec2.2 --keep-checkpoints
	$(VENV)/bin/horovod-dpsgd figure2 runs/sec2.1 runs/sec2.2 --out docs/img/figure2.png \
		--diagnostics-out docs/img/diagnostics.png
	for run in ssgd dpsgd; do \
		$(VENV)/bin/horovod-dpsgd landscape runs/sec2.2/$$run-seed0/checkpoint/last --out runs/sec2.2/landscape-$$run && \
		$(VENV)/bin/horovod-dpsgd hessian runs/sec2.2/$$run-seed0/checkpoint/last --out runs/sec2.2/hessian-$$run && \
		cp runs/sec2.2/landscape-$$run.png runs/sec2.2/hessian-$$run.png docs/img/ || exit 1; \
	done

# Horovod's MNIST example with the one-line change (DPSGD on a ring, 4 learners).
example: setup
	$(HOROVODRUN) -np $(NP) $(PY) examples/pytorch_mnist_mlp.py --topology ring --epochs 5

test: setup
	$(PY) -m pytest -q -p no:cacheprovider --durations=25

clean:
	rm -rf $(VENV) runs build *.egg-info

bench: setup
	$(PY) benchmarks/run.py
