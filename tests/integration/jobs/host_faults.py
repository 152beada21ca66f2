"""Training across emulated hosts that loses a host, then resumes from its checkpoint.

    horovodrun -H h1:2,h2:2 ... python tests/integration/jobs/host_faults.py MODE DIR

Trains STEPS steps with the default topology, checkpointing into DIR/last every 2 steps. MODE:

* ``kill_host``: at step 5 every learner of the last host kills itself (SIGKILL);
* ``cut_link``: after the checkpoint of step 4, rank 0 writes DIR/cut and waits there for DIR/go, which
  tests/integration/test_hosts.py writes once it has taken the last host's link down; the learners then train on;
* ``resume``: resumes from DIR/last and trains to STEPS; rank 0 writes DIR/resumed.json: the step it resumed
  at, and the largest difference between the final weights and the single-process reference trained from
  scratch (0 up to rounding when the checkpoint restored exactly the state it saved).
"""

import json
import os
import signal
import sys
import time

import torch
import horovod.torch as hvd

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "support"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import horovod_dpsgd as hd  # noqa: E402
from hosts import loss_fn, make_model, sgd  # noqa: E402
from reference import dpsgd_reference  # noqa: E402

STEPS = 10
mode, directory = sys.argv[1], sys.argv[2]
last = os.path.join(directory, "last")
hvd.init()
model = make_model()
opt = hd.DistributedOptimizer(sgd(model), named_parameters=model.named_parameters(), seed=3)
first = hd.checkpoint.load(last, model, opt)["step"] if mode == "resume" else 0
victims = opt.topology.layout.hosts[-1] if opt.topology.layout is not None else (hvd.size() - 1,)
for t in range(first, STEPS):
    if mode == "kill_host" and t == 5 and hvd.rank() in victims:
        os.kill(os.getpid(), signal.SIGKILL)
    opt.zero_grad()
    loss_fn(model, hvd.rank(), t).backward()
    opt.step()
    if (t + 1) % 2 == 0:
        hd.checkpoint.save(last, model, opt, extra={"step": t + 1})
        if mode == "cut_link" and t + 1 == 4 and hvd.rank() == 0:
            open(os.path.join(directory, "cut"), "w").close()
            while not os.path.exists(os.path.join(directory, "go")):
                time.sleep(0.05)
if mode == "resume":
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    got = torch.stack(hvd.allgather_object(flat))
    models = [make_model() for _ in range(hvd.size())]
    want = torch.stack(dpsgd_reference(models, [sgd(m) for m in models], opt.topology, loss_fn, STEPS))
    if hvd.rank() == 0:
        with open(os.path.join(directory, "resumed.json"), "w") as f:
            json.dump({"first": first, "max_abs_diff": float((got - want).abs().max()),
                       "topology": opt.topology.name}, f)
