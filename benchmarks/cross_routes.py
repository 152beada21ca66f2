"""The cross-host routes of the hierarchical exchange, as raw mpi4py: both directions on one pair of processes
against one direction per pair (``horovod_dpsgd.comm.hosts.cross_routes``), the same bytes between the same
hosts. Root; ``python benchmarks/cross_routes.py [--layout 4x2] [--rate 1gbit]``.

Brings up an emulated cluster (:class:`horovod_dpsgd.experiments.cluster.EmulatedCluster`) and launches one
horovodrun job across it. Hosts are paired (0-1, 2-3, ...); every carrier (every process of a host) moves its
``1/L`` piece of ``--mbytes`` MB to the paired host and receives one, once with each pair of carriers
exchanging both ways (``Isend``/``Irecv`` between carrier ``l`` of each host: what the plugin did before it
routed one way) and once along the plugin's routes at an even and an odd step, where no pair of processes
carries both directions. Prints MB/s per host link and direction (median of ``--repeats``, the slowest
process) and the ratio of the two, measured in the same job, in alternating order. Writes
benchmarks/results/cross_routes.json. All hosts share this machine's cores.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def worker(out: str, layout_spec: str, mbytes: float, repeats: int) -> None:
    import numpy as np
    from mpi4py import MPI
    from horovod_dpsgd.comm.hosts import Routes, cross_routes, detect_layout
    comm = MPI.COMM_WORLD
    layout = detect_layout(comm)
    rank, shards = comm.Get_rank(), min(layout.local_sizes)
    own = layout.host_of(rank)
    pair = (own, own ^ 1)
    nbytes = int(mbytes * 1e6 / shards)
    send, recv = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)

    def both_ways(step):
        peer = layout.hosts[own ^ 1][layout.local_index(rank)]
        return Routes((peer,), (peer,), (0,))

    ways = {"both ways per pair": both_ways, "one way per pair (the plugin's routes)":
            lambda step: cross_routes(layout, shards, pair, rank, step)}
    times = {name: [] for name in ways}
    for repeat in range(repeats + 1):  # the first is a warm-up
        for name in (list(ways) if repeat % 2 else list(ways)[::-1]):
            routes = ways[name](repeat)
            comm.Barrier()
            start = time.perf_counter()
            requests = [comm.Irecv(recv, source=p) for p in routes.sources]
            requests += [comm.Isend(send, dest=p) for p in routes.dests]
            while not MPI.Request.Testall(requests):
                pass
            elapsed = max(comm.allgather(time.perf_counter() - start))
            if repeat:
                times[name].append(elapsed)
    if rank == 0:
        Path(out).write_text(json.dumps({"layout": repr(layout), "shards": shards, "times": times}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layout", default="4x2", help="HxL: H hosts (even) of L processes.")
    parser.add_argument("--rate", default="1gbit", help="Each host's link rate (tc notation).")
    parser.add_argument("--mbytes", type=float, default=44.7, help="MB per host and direction (a model).")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--out", default=str(HERE / "results" / "cross_routes.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.layout, args.mbytes, args.repeats)

    from horovod_dpsgd.experiments.cluster import EmulatedCluster
    hosts, slots = (int(v) for v in args.layout.split("x"))
    if hosts % 2:
        sys.exit("--layout: give an even number of hosts (they are paired)")
    report = Path("/tmp/cross_routes_worker.json")
    with EmulatedCluster(hosts=hosts, slots=slots, rate=args.rate, prefix="routes") as cluster:
        cmd = cluster.horovodrun_command([sys.executable, __file__, "--worker", str(report), "--layout", args.layout,
                                          "--mbytes", str(args.mbytes), "--repeats", str(args.repeats)])
        proc = cluster.run(cmd, timeout=600)  # the group is stopped on timeout or Ctrl-C
        if proc.returncode != 0:
            sys.exit(f"the job failed:\n{proc.stdout[-4000:]}")
    result = json.loads(report.read_text())
    report.unlink()
    rows = {}
    print(f"{args.layout}, links {args.rate}, {args.mbytes} MB per host and direction, median of {args.repeats}:")
    for name, times in result["times"].items():
        rows[name] = {"ms": 1e3 * statistics.median(times), "MBps": args.mbytes / statistics.median(times),
                      "times": times}
        print(f"  {name:40s} {rows[name]['ms']:6.0f} ms  {rows[name]['MBps']:6.1f} MB/s per host link and direction")
    (both, one) = (rows[n]["ms"] for n in result["times"])
    ratios = [a / b for a, b in zip(*result["times"].values())]
    print(f"  one way / both ways: {one / both:.2f} (per repetition {', '.join(f'{1 / r:.2f}' for r in ratios)})")
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "layout": args.layout,
                                         "rate": args.rate, "mbytes": args.mbytes, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
