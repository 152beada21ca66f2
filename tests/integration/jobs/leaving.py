"""A learner leaves or falls behind: ``horovodrun -np N python tests/integration/jobs/leaving.py CASE``.

Cases (the odd rank is the last one):

* ``finish_early``: the odd rank's loop runs 24 steps, the others 25 (uneven shards, no drop_last).
* ``extra_step``: the odd rank calls ``step()`` once more, without a backward pass, at step 5 of 10.
* ``out_of_step``: the odd rank's step counter moves on by one at step 4, as a lost count would (fault injection).
* ``stall``: the odd rank sleeps 6 s at step 3, then training goes on (the others must warn while they wait).
* ``forever``: train until killed; each rank writes its pid to ``$DPSGD_PID_DIR/pid.RANK`` once training runs.

Ranks print ``rank R done after T steps`` when their loop ends.
"""

import os
import sys
import time

import torch
import horovod.torch as hvd

import horovod_dpsgd as hd


def loss_fn(model, rank, t):
    g = torch.Generator().manual_seed(1000 * t + rank)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    return torch.nn.functional.cross_entropy(model(x), y)


case = sys.argv[1]
hvd.init()
RANK, SIZE = hvd.rank(), hvd.size()
ODD = RANK == SIZE - 1
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
# random peer: point-to-point with one partner per step (at np = 2 always the other rank)
opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), topology="random_peer")

steps = {"finish_early": 24 if ODD else 25, "forever": 10 ** 9}.get(case, 10)
for t in range(steps):
    if case == "forever" and t == 2:
        with open(os.path.join(os.environ["DPSGD_PID_DIR"], f"pid.{RANK}"), "w") as f:
            f.write(str(os.getpid()))
    if case == "stall" and ODD and t == 3:
        time.sleep(6)
    if case == "out_of_step" and ODD and t == 4:
        opt._progress.t += 1
    opt.zero_grad()
    loss_fn(model, RANK, t).backward()
    opt.step()
    if case == "extra_step" and ODD and t == 5:
        opt.step()  # no backward pass since the last step
print(f"rank {RANK} done after {opt.step_count} steps", flush=True)
