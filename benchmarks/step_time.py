"""Side-by-side step and exchange timings; run under horovodrun (see benchmarks/run.py).

Every variant gets its own model and optimizer, and the variants are timed round-robin
within each repetition, so machine noise hits them alike. Each figure is the median over
repetitions of the mean step time of ``--steps`` steps, after ``--warmup`` steps.

    horovodrun -np 4 python benchmarks/step_time.py --models mlp1m --out results.json
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision
import horovod.torch as hvd
from mpi4py import MPI

import horovod_dpsgd

MODELS = {
    "mlp1m": (lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 320), torch.nn.ReLU(),
                                          torch.nn.Linear(320, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10)),
    "resnet50": (lambda: torchvision.models.resnet50()),
}
VARIANTS = ("horovod_ssgd", "plugin_ssgd", "dpsgd_random_peer", "dpsgd_ring", "local_no_comm")


def build(variant, model_name, seed=0):
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    named = [(f"{variant}.{n}", p) for n, p in model.named_parameters()]
    callbacks = []
    if variant.startswith("dpsgd_diag50"):
        from horovod_dpsgd.diagnostics import NoiseDiagnostics
        probe = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
        callbacks = [NoiseDiagnostics(model, F.cross_entropy, probe, every=50,
                                      reuse_grad=variant == "dpsgd_diag50_reuse_grad")]
    if variant == "horovod_ssgd":
        opt = hvd.DistributedOptimizer(opt, named_parameters=named)
    elif variant == "plugin_ssgd":
        opt = horovod_dpsgd.DistributedOptimizer(opt, named_parameters=named, algorithm="ssgd")
    elif variant in ("dpsgd_random_peer", "dpsgd_diag50", "dpsgd_diag50_reuse_grad"):
        opt = horovod_dpsgd.DistributedOptimizer(opt, named_parameters=named, topology="random_peer",
                                                 callbacks=callbacks)
    elif variant == "dpsgd_random_peer_inline":
        opt = horovod_dpsgd.DistributedOptimizer(opt, named_parameters=named, topology="random_peer", overlap=False)
    elif variant == "dpsgd_ring":
        opt = horovod_dpsgd.DistributedOptimizer(opt, named_parameters=named, topology="ring")
    return model, opt, callbacks


def run_steps(model, opt, callbacks, data, target, steps):
    """The time of each of ``steps`` training steps."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(model(data), target)
        loss.backward()
        for cb in callbacks:
            cb.observe(data, target, loss)
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def diagnostics_overhead(times):
    """Extra time of the steps in ``times`` over as many typical (median) steps, relative to those.

    Measured within one run of a variant, so it does not depend on the noise between variants:
    a 50-step repetition at every=50 holds one diagnostic step.
    """
    typical = statistics.median(times)
    return (sum(times) - len(times) * typical) / (len(times) * typical)


def time_exchange(opt, nbytes, reps, comm):
    """Exchanging one model's weights with a peer and mixing them in, vs raw Sendrecv and hvd.allreduce.

    ``plugin_transfer`` is the exchange alone (sending from the parameters, receiving into a
    buffer); ``plugin_mix`` adds mixing the received weights into the parameters.
    """
    out = {"plugin_transfer": [], "plugin_mix": [], "raw_sendrecv": [], "hvd_allreduce": []}
    numel = nbytes // 4
    send, recv = torch.ones(numel), torch.empty(numel)
    peer_of = opt.topology.partners
    for rep in range(reps):
        step = opt.step_count + rep
        comm.Barrier()
        t0 = time.perf_counter()
        opt._start_exchange()          # benchmark-only: drive one exchange without a training step
        opt._handle.wait()
        t1 = time.perf_counter()
        opt._mix()
        out["plugin_mix"].append(time.perf_counter() - t0)
        out["plugin_transfer"].append(t1 - t0)
        peer = int(peer_of(opt.step_count)[comm.Get_rank()])
        comm.Barrier()
        t0 = time.perf_counter()
        if peer != comm.Get_rank():
            comm.Sendrecv(send.numpy(), dest=peer, recvbuf=recv.numpy(), source=peer)
        out["raw_sendrecv"].append(time.perf_counter() - t0)
        comm.Barrier()
        t0 = time.perf_counter()
        hvd.allreduce(send, name=f"bench.allreduce.{step}")
        out["hvd_allreduce"].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in out.items()}


def sendrecv_curve(comm, reps, sizes=tuple(4 ** k for k in range(5, 14))):
    """Median Sendrecv time between rank pairs (0-1, 2-3, ...) against message bytes, to fit alpha/beta."""
    rank = comm.Get_rank()
    peer = rank ^ 1
    curve = []
    for nbytes in sizes:
        send, recv = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
        times = []
        for _ in range(reps):
            comm.Barrier()
            t0 = time.perf_counter()
            if peer < comm.Get_size():
                comm.Sendrecv(send.numpy(), dest=peer, recvbuf=recv.numpy(), source=peer)
            times.append(time.perf_counter() - t0)
        curve.append((nbytes, statistics.median(comm.allgather(statistics.median(times)))))
    return curve


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="mlp1m,resnet18,resnet50")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=8, help="per learner")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repetition")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    results = {"size": hvd.size(), "batch_size": args.batch_size, "steps": args.steps, "reps": args.reps,
               "models": {}}
    for model_name in args.models.split(","):
        variants = args.variants.split(",")
        built = {v: build(v, model_name) for v in variants}
        nparams = sum(p.numel() for p in built[variants[0]][0].parameters())
        data, target = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))
        times = {v: [] for v in variants}
        overhead = {v: [] for v in variants if built[v][2]}
        for v in variants:
            run_steps(*built[v], data, target, args.warmup)
        for rep in range(args.reps):
            for v in variants:
                comm.Barrier()
                t = run_steps(*built[v], data, target, args.steps)
                # A step is as slow as the slowest learner.
                times[v].append(max(comm.allgather(statistics.mean(t))))
                if v in overhead:
                    overhead[v].append(max(comm.allgather(diagnostics_overhead(t))))
        entry = {"params": nparams, "step_s": {v: statistics.median(ts) for v, ts in times.items()}}
        if overhead:
            entry["diagnostics_overhead"] = {v: statistics.median(o) for v, o in overhead.items()}
        if "dpsgd_random_peer" in built:
            entry["exchange_s"] = time_exchange(built["dpsgd_random_peer"][1], 4 * nparams, max(args.reps, 20), comm)
        results["models"][model_name] = entry
        if hvd.rank() == 0:
            print(json.dumps({model_name: entry}), flush=True)
    results["sendrecv_curve"] = sendrecv_curve(comm, max(args.reps, 5))
    if hvd.rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
