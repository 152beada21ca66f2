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

# The full Sec. 2 study behind docs/reproduction.md and its figures in docs/img/, as that page lists it: Sec. 2.1
# with the SSGD* sweep and Sec. 2.2, 3 seeds each (27 runs of 3000 steps, 1.5-4.5 minutes each on 2 cores), the
# landscape and Hessian of every Sec. 2.2 SSGD and DPSGD solution, then the sensitivity runs (input scaling,
# topology and n in Sec. 2.2, n in Sec. 2.1).
HD := $(VENV)/bin/horovod-dpsgd
SWEEP := --run 'ssgd*0.001:algorithm=ssgd,noise_sigma=0.001' --run 'ssgd*0.003:algorithm=ssgd,noise_sigma=0.003' \
	--run 'ssgd*0.01:algorithm=ssgd,noise_sigma=0.01' --run 'ssgd*0.03:algorithm=ssgd,noise_sigma=0.03'
reproduce: setup
	$(HD) compare --recipe sec2.1 --out runs/sec2.1 --run ssgd:algorithm=ssgd --run dpsgd:algorithm=dpsgd,topology=full $(SWEEP)
	$(HD) compare --recipe sec2.2 --out runs/sec2.2 --keep-checkpoints
	$(HD) figure2 runs/sec2.1 runs/sec2.2 --draw 'ssgd,dpsgd,ssgd*0.01,ssgd*' --out docs/img/figure2.png \
		--diagnostics-out docs/img/diagnostics.png
	$(HD) figure2 runs/sec2.1 runs/sec2.2 --windows 0,250,500,1000,2000,3000 --out runs/figure2-windows.png
	for seed in 0 1 2; do for run in ssgd dpsgd; do \
		$(HD) landscape runs/sec2.2/$$run-seed$$seed/checkpoint/last --out runs/sec2.2/landscape-$$run-seed$$seed && \
		$(HD) hessian runs/sec2.2/$$run-seed$$seed/checkpoint/last --grid 5 --out runs/sec2.2/hessian-$$run-seed$$seed \
		|| exit 1; done; done
	for run in ssgd dpsgd; do \
		cp runs/sec2.2/landscape-$$run-seed0.png docs/img/landscape-$$run.png && \
		cp runs/sec2.2/hessian-$$run-seed0.png docs/img/hessian-$$run.png || exit 1; done
	$(HD) compare --recipe sec2.2 --seeds 0 --out runs/fig2b --run dpsgd-ring1:algorithm=dpsgd,topology=ring \
		--run ssgd-std:algorithm=ssgd,pixel_max=none --run dpsgd-ring1-std:algorithm=dpsgd,topology=ring,pixel_max=none
	$(HD) compare --recipe sec2.2 --seeds 0 --np 16 --batch-size 125 --probe-batches 32 --out runs/fig2b \
		--run dpsgd-ring1-n16:algorithm=dpsgd,topology=ring --run ssgd-n16:algorithm=ssgd
	$(HD) figure2 runs/sec2.1 runs/fig2b --windows 0,250,500,1000,2000,3000 --out runs/fig2b/figure2.png
	$(HD) compare --recipe sec2.1 --seeds 0 --out runs/sens \
		--run ssgd-std:algorithm=ssgd,pixel_max=none --run dpsgd-std:algorithm=dpsgd,topology=full,pixel_max=none \
		--run ssgd-x1:algorithm=ssgd,pixel_max=1 --run dpsgd-x1:algorithm=dpsgd,topology=full,pixel_max=1
	$(HD) compare --recipe sec2.1 --np 10 --batch-size 200 --probe-batches 20 --max-steps 1000 --out runs/nsens \
		--run ssgd-n10:algorithm=ssgd --run dpsgd-n10:algorithm=dpsgd,topology=full
	$(HD) compare --recipe sec2.1 --np 2 --batch-size 1000 --probe-batches 4 --max-steps 1000 --out runs/nsens \
		--run ssgd-n2:algorithm=ssgd --run dpsgd-n2:algorithm=dpsgd,topology=full
	$(HD) figure2 runs/nsens runs/sec2.2 --windows 0,100,300,1000 --at-steps 250,500,750,1000 --out runs/nsens/figure2.png

# Horovod's MNIST example with the one-line change (DPSGD on a ring, 4 learners).
example: setup
	$(HOROVODRUN) -np $(NP) $(PY) examples/pytorch_mnist_mlp.py --topology ring --epochs 5

test: setup
	$(PY) -m pytest -q -p no:cacheprovider --durations=25

clean:
	rm -rf $(VENV) runs build *.egg-info

bench: setup
	$(PY) benchmarks/run.py
