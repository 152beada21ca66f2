"""A learner fails mid-training: ``horovodrun -np 4 python tests/integration/jobs/faults.py {kill,raise,hang} RANK``.

The job must end with a non-zero exit naming the failed rank, never hang.
"""

import os
import signal
import sys
import time

import torch
import horovod.torch as hvd

import horovod_dpsgd as hd

mode, victim = sys.argv[1], int(sys.argv[2])
hvd.init()
torch.manual_seed(0)
model = torch.nn.Linear(32, 32)
opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), topology="ring")
for t in range(100_000):
    if t == 5 and hvd.rank() == victim:
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "hang":
            time.sleep(3600)
        raise RuntimeError(f"learner {victim} failed on purpose at step {t}")
    opt.zero_grad()
    model(torch.randn(8, 32)).pow(2).mean().backward()
    opt.step()
