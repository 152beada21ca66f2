"""DPSGD optimizers freed just before the process exits:
``horovodrun -np 4 python tests/integration/jobs/clean_exit.py``.

The job must exit with status 0: the optimizers' communication threads end while Python shuts down, and
must not abort the process (they did, 1 run in 2, while they still held the last exchange's buffers).
"""

import torch
import horovod.torch as hvd

import horovod_dpsgd as hd


def train():
    learners = []
    for _ in range(3):
        model = torch.nn.Linear(1024, 1024)
        opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), topology="ring")
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 1024)).pow(2).mean().backward()
            opt.step()
        learners.append((model, opt))
    print(f"rank {hvd.rank()} done", flush=True)
    # Returning frees the optimizers, and so ends their communication threads, right before the process exits.


hvd.init()
train()
