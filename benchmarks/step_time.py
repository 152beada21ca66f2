"""Side-by-side step and exchange timings; run under horovodrun (see benchmarks/run.py).

Every variant gets its own model and optimizer. Each repetition times every variant once, the
mean of ``--steps`` steps (after ``--warmup`` steps) on the slowest learner, in an order rotated
from one repetition to the next, so that drifts in machine speed hit the variants alike. The
result keeps every repetition's figure: benchmarks/run.py compares variants repetition by
repetition (paired ratios) and reports their median and quartiles.

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
from horovod_dpsgd.comm.hosts import cross_routes

MODELS = {
    "mlp1m": (lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 320), torch.nn.ReLU(),
                                          torch.nn.Linear(320, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10)),
    "resnet50": (lambda: torchvision.models.resnet50()),
}
VARIANTS = ("horovod_ssgd", "horovod_ssgd_2", "plugin_ssgd", "plugin_ssgd_ignore_nonfinite", "dpsgd_random_peer",
            "dpsgd_ring", "local_no_comm")
#: DPSGD variants: the optimizer's keyword arguments (compression: fp16 on the wire).
DPSGD = {
    "dpsgd_random_peer": {"topology": "random_peer"},
    "dpsgd_random_peer_inline": {"topology": "random_peer", "overlap": False},
    "dpsgd_ring": {"topology": "ring"},
    "dpsgd_default": {},                                       # the one-line swap: topology="auto"
    "dpsgd_default_fp16": {"compression": "fp16"},
    "dpsgd_hierarchical": {"topology": "hierarchical"},
    "dpsgd_hierarchical_leader": {"topology": "hierarchical:leader"},
    "dpsgd_hierarchical_every2": {"topology": "hierarchical:every=2"},  # across hosts every 2nd step
    "dpsgd_hierarchical_every2_fp16": {"topology": "hierarchical:every=2", "compression": "fp16"},
    "dpsgd_one_peer_exponential": {"topology": "one_peer_exponential"},
    "dpsgd_periodic4": {"topology": "periodic:4"},             # Gossip-PGA: auto in between, global every 4
    "dpsgd_local_sgd4": {"topology": "local_sgd:4"},
}


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
    if variant in ("horovod_ssgd", "horovod_ssgd_2"):  # the second one measures the noise: same code, own model
        opt = hvd.DistributedOptimizer(opt, named_parameters=named)
    elif variant == "plugin_ssgd":
        opt = horovod_dpsgd.DistributedOptimizer(opt, named_parameters=named, algorithm="ssgd")
    elif variant == "plugin_ssgd_ignore_nonfinite":
        opt = horovod_dpsgd.DistributedOptimizer(opt, named_parameters=named, algorithm="ssgd", nonfinite="ignore")
    elif variant in ("dpsgd_diag50", "dpsgd_diag50_reuse_grad"):
        opt = horovod_dpsgd.DistributedOptimizer(opt, named_parameters=named, topology="random_peer",
                                                 callbacks=callbacks)
    elif variant in DPSGD:
        kwargs = dict(DPSGD[variant])
        if kwargs.get("compression") == "fp16":
            kwargs["compression"] = hvd.Compression.fp16
        opt = horovod_dpsgd.DistributedOptimizer(opt, named_parameters=named, **kwargs)
    elif variant != "local_no_comm":
        raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS + tuple(DPSGD))}")
    return model, opt, callbacks


#: per variant, seconds of each timed step spent in ``opt.step()`` (waiting for the exchange or the allreduce,
#: mixing, the local update): the rest of the step is the forward and backward pass
IN_STEP = {}


def run_steps(model, opt, callbacks, data, target, steps, in_step=None):
    """The time of each of ``steps`` training steps, and whether a diagnostic ran in it; ``in_step``, if
    given, receives the time of each step's ``opt.step()``."""
    times, diagnosed = [], []
    for _ in range(steps):
        counts = [cb.count for cb in callbacks]
        start = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(model(data), target)
        loss.backward()
        for cb in callbacks:
            cb.observe(data, target, loss)
        before = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
        if in_step is not None:
            in_step.append(times[-1] - (before - start))
        diagnosed.append(counts != [cb.count for cb in callbacks])
    return times, diagnosed


def diagnostics_overhead(times, diagnosed):
    """Extra time of the diagnostic steps over typical (median) steps, relative to all steps at that time.

    Measured within one run of a variant, from its own steps, so noise between variants and slow
    steps without a diagnostic do not count: a 50-step repetition at every=50 holds one diagnostic step.
    """
    typical = statistics.median(t for t, d in zip(times, diagnosed) if not d)
    extra = sum(t - typical for t, d in zip(times, diagnosed) if d)
    return extra / (len(times) * typical)


def rotated(items, k):
    """``items`` rotated left by ``k``: each item comes first in turn as ``k`` grows."""
    k %= len(items)
    return items[k:] + items[:k]


def link_bytes(interface):
    """(bytes sent, bytes received) so far through this host's link ``interface``, read by one learner per
    host (``None`` elsewhere, or where the host has no such interface, e.g. a job on one host)."""
    if not interface or hvd.local_rank() != 0:
        return None
    try:
        return tuple(int(open(f"/sys/class/net/{interface}/statistics/{d}_bytes").read()) for d in ("tx", "rx"))
    except OSError:
        return None


def time_variants(built, variants, data, target, steps, reps, comm, interface=None):
    """Per variant, the step time of each repetition (the slowest learner's mean), the diagnostics overhead,
    and the bytes per step through the busiest host's link, each direction (emulated hosts: ``interface``)."""
    times = {v: [] for v in variants}
    overhead = {v: [] for v in variants if built[v][2]}
    moved = {v: [0, 0] for v in variants}
    for rep in range(reps):
        for v in rotated(variants, rep):
            comm.Barrier()
            before = link_bytes(interface)
            t, diagnosed = run_steps(*built[v], data, target, steps, IN_STEP.setdefault(v, []))
            after = link_bytes(interface)
            # A step is as slow as the slowest learner.
            times[v].append(max(comm.allgather(statistics.mean(t))))
            if v in overhead:
                overhead[v].append(max(comm.allgather(diagnostics_overhead(t, diagnosed))))
            if before is not None:
                moved[v] = [m + a - b for m, a, b in zip(moved[v], after, before)]
    per_host = comm.allgather(moved if link_bytes(interface) is not None else None)
    per_host = [m for m in per_host if m is not None]
    link = {v: [max(m[v][d] for m in per_host) / (reps * steps) for d in (0, 1)] for v in variants} \
        if per_host else {}
    return times, overhead, link


def time_nonfinite_check(opt, reps, comm, calls=5):
    """Time of the plugin's NaN/inf check of the gradients (``nonfinite="raise"``) per step, slowest learner.

    It is the one pass over the gradients that ``algorithm="ssgd"`` adds to Horovod's step by
    construction; timing it directly measures that cost without the noise between two runs. Each
    figure is the mean of ``calls`` checks in a row (a single call right after a blocking MPI call
    would also time the process waking up).
    """
    out = []
    for _ in range(reps):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(calls):
            opt._gradients_finite()    # benchmark-only: the .grad of the last step is still there
        out.append(max(comm.allgather((time.perf_counter() - t0) / calls)))
    return out


def cross_traffic(averager, step):
    """What learner ``averager.rank`` sends and receives across hosts in ``step``'s exchange, as raw MPI would
    move it: ``(sends, receives)``, lists of ``(rank, numpy bytes)``. A host average: its piece of the model
    along the exchange's own routes (:func:`horovod_dpsgd.comm.hosts.cross_routes`; nothing for a learner that
    carries no piece, and without the sum, relay and gather inside the hosts); a point-to-point plan: the whole
    model to each destination, from each peer."""
    (group,) = averager.flat.groups  # benchmark-only: the parameters' storage (one dtype here)
    plan = averager.topology.plan(averager.rank, step)
    flat = group.flat.view(torch.uint8)
    if plan.hosts or (plan.collective and averager.hosts is not None):
        comms = averager.hosts
        hosts = plan.hosts or tuple(range(comms.layout.num_hosts))
        routes = cross_routes(comms.layout, comms.shards, hosts, averager.rank, step)
        size, shards = group.flat.element_size(), comms.shards

        def piece(k):
            return flat[size * (k * group.numel // shards):size * ((k + 1) * group.numel // shards)]

        return ([(p, piece(comms.local_index).numpy()) for p in routes.dests],
                [(p, torch.empty_like(piece(k)).numpy()) for p, k in zip(routes.sources, routes.pieces)])
    receive = group.recv_buffers(len(plan.peers), group.dtype)  # the plugin's own receive buffers
    return ([(p, flat.numpy()) for p in plan.destinations],
            [(p, buf.view(torch.uint8).numpy()) for p, buf in zip(plan.peers, receive)])


def raw_polled(comm, sends, receives):
    """``Isend``/``Irecv`` of ``sends`` and ``receives`` completed by a ``Testall`` loop, as the plugin does."""
    requests = [comm.Irecv(buf, source=p) for p, buf in receives] + [comm.Isend(buf, dest=p) for p, buf in sends]
    while not MPI.Request.Testall(requests):
        pass


def time_exchange(optimizers, reps, comm):
    """Exchanging one model's weights and mixing them in, per DPSGD optimizer, vs raw MPI and hvd.allreduce.

    For each ``name, optimizer`` in ``optimizers``: ``<name>_transfer`` is the exchange alone
    (sending from the parameters, receiving into buffers; for a host average, its three rounds),
    ``<name>_mix`` adds mixing the received weights into the parameters. ``raw_<name>`` is raw MPI
    (``Isend``/``Irecv`` and a ``Testall`` loop) moving the same bytes between the same memory and the same
    learners, across hosts only: the exchange's point-to-point messages, or for a host average its pieces
    between the hosts (without the sum and gather inside them) (:func:`cross_traffic`). For the random
    peer, raw MPI also moves its bytes two more ways: a blocking ``Sendrecv`` and ``Isend``/``Irecv`` with
    ``Waitall`` (run.py compares with the way of the lowest median: with
    ``OMPI_MCA_mpi_yield_when_idle=1`` in a Horovod process, a blocking call often waits for a
    scheduler tick, about 4 ms here, and polling does not). ``hvd_allreduce`` reduces as many
    bytes in place, as Horovod's SSGD does. Everything is timed in an order rotated from one
    repetition to the next; each list holds one figure per repetition, the slowest learner's.
    """
    rank = comm.Get_rank()
    averagers = {name: opt._averager for name, opt in optimizers.items()}  # benchmark-only
    step = next(iter(optimizers.values())).step_count
    traffic = {name: cross_traffic(a, step) for name, a in averagers.items()}
    (group,) = averagers[next(iter(averagers))].flat.groups
    reduced = torch.ones(group.numel, dtype=group.dtype)

    def exchange(name, averager):
        def run():
            t0 = time.perf_counter()
            averager.start(step)           # benchmark-only: drive one exchange without a training step
            if averager._handle is not None:
                averager._handle.wait()
            t1 = time.perf_counter()
            averager.finish()
            return {f"{name}_transfer": t1 - t0, f"{name}_mix": time.perf_counter() - t0}
        return run

    def timed(name, fn):
        def run():
            t0 = time.perf_counter()
            fn()
            return {name: time.perf_counter() - t0}
        return run

    steps = [exchange(name, a) for name, a in averagers.items()]
    steps += [timed(f"raw_{name}", lambda t=t: raw_polled(comm, *t)) for name, t in traffic.items()]
    if "random_peer" in traffic:
        (sends, receives) = traffic["random_peer"]
        peer, send, recv = (sends[0][0], sends[0][1], receives[0][1]) if sends else (rank, None, None)

        def sendrecv():
            if peer != rank:
                comm.Sendrecv(send, dest=peer, recvbuf=recv, source=peer)

        def isend_irecv():
            if peer != rank:
                MPI.Request.Waitall([comm.Irecv(recv, source=peer), comm.Isend(send, dest=peer)])

        steps += [timed("raw_sendrecv", sendrecv), timed("raw_isend_irecv", isend_irecv)]
    steps.append(timed("hvd_allreduce", lambda: hvd.allreduce_(reduced, name="bench.allreduce")))
    out = {}
    for rep in range(reps):
        for fn in rotated(steps, rep):
            comm.Barrier()
            for k, t in fn().items():
                out.setdefault(k, []).append(max(comm.allgather(t)))
    if "raw_random_peer" in out:
        out["raw_isend_irecv_polled"] = out["raw_random_peer"]  # the name run.py's single-host tables use
    return out


def sendrecv_curve(comm, reps, sizes=tuple(4 ** k for k in range(5, 14))):
    """Median time of an exchange of one message each way between rank pairs (0-1, 2-3, ...) against message
    bytes, to fit alpha/beta: ``Isend``/``Irecv`` completed by a ``Testall`` loop (blocking calls here
    wait for scheduler ticks, see :func:`time_exchange`)."""
    rank = comm.Get_rank()
    peer = rank ^ 1
    curve = []
    for nbytes in sizes:
        send, recv = torch.ones(nbytes, dtype=torch.uint8).numpy(), torch.empty(nbytes, dtype=torch.uint8).numpy()
        times = []
        for _ in range(reps):
            comm.Barrier()
            t0 = time.perf_counter()
            if peer < comm.Get_size():
                raw_polled(comm, [(peer, send)], [(peer, recv)])
            times.append(time.perf_counter() - t0)
        curve.append((nbytes, statistics.median(comm.allgather(statistics.median(times)))))
    return curve


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="mlp1m,resnet18,resnet50")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=8, help="per learner")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed repetition")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--exchanges", default="dpsgd_random_peer,dpsgd_ring",
                        help="DPSGD variants whose exchange alone is timed against raw MPI and hvd.allreduce")
    parser.add_argument("--exchange-reps", type=int, default=20, help="repetitions of the exchange timing (0: skip)")
    parser.add_argument("--link", default=None,
                        help="on emulated hosts: the hosts' link interface (veth0), whose byte counters give the "
                             "bytes per step through the busiest host's link")
    parser.add_argument("--curve-reps", type=int, default=5, help="repetitions of the Sendrecv sweep (0: skip)")
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
        for v in variants:
            run_steps(*built[v], data, target, args.warmup)
        times, overhead, link = time_variants(built, variants, data, target, args.steps, args.reps, comm,
                                              args.link)
        entry = {"params": nparams, "step_s": times}
        if overhead:
            entry["diagnostics_overhead"] = overhead
        if link:
            entry["link_bytes_per_step"] = link
        # the slowest learner's median time in opt.step() (waiting, mixing, updating): the rest is compute
        entry["in_step_s"] = {v: max(comm.allgather(statistics.median(IN_STEP[v]))) for v in variants}
        IN_STEP.clear()
        if "plugin_ssgd" in built:
            entry["nonfinite_check_s"] = time_nonfinite_check(built["plugin_ssgd"][1], max(args.reps, 20), comm)
        exchangers = {v[len("dpsgd_"):]: built[v][1] for v in args.exchanges.split(",") if v in built}
        if exchangers and args.exchange_reps:
            entry["exchange_s"] = time_exchange(exchangers, args.exchange_reps, comm)
        results["models"][model_name] = entry
        if hvd.rank() == 0:
            median_step_s = {v: statistics.median(ts) for v, ts in times.items()}
            print(json.dumps({model_name: {"params": nparams, "median_step_s": median_step_s}}), flush=True)
    if args.curve_reps:
        results["sendrecv_curve"] = sendrecv_curve(comm, max(args.reps, args.curve_reps))
    if hvd.rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
