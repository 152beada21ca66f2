"""Bandwidth between two emulated hosts, per link rate: ``python benchmarks/cluster_bandwidth.py`` (root).

Brings up 2 hosts x 1 slot (:class:`horovod_dpsgd.experiments.cluster.EmulatedCluster`) and, for each
link rate in turn (the same hosts, reshaped), launches a 2-process horovodrun job in which raw mpi4py
moves ``--mbytes`` MB between the hosts: ``MPI.Sendrecv`` (both directions at once) and a one-way
``Send``/``Recv``; with Open MPI's default one TCP connection per peer, and with ``btl_tcp_links 2``.
Prints MB/s per direction (median of ``--repeats``) and writes benchmarks/results/cluster_bandwidth.json.
All hosts share this machine's cores: the figures are for comparing links, not a real network.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def worker(out: str, mbytes: int, repeats: int) -> None:
    """One rank per host: time Sendrecv and one-way transfers of ``mbytes`` MB with the other rank."""
    import numpy as np
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, peer = comm.rank, 1 - comm.rank
    send, recv = np.ones(mbytes * 10 ** 6, np.uint8), np.empty(mbytes * 10 ** 6, np.uint8)
    results = {"sendrecv": [], "one_way": [], "host": MPI.Get_processor_name()}
    for repeat in range(repeats + 1):  # the first is a warm-up
        comm.Barrier()
        start = time.perf_counter()
        comm.Sendrecv(send, peer, recvbuf=recv, source=peer)
        sendrecv = time.perf_counter() - start
        comm.Barrier()
        start = time.perf_counter()
        if rank == 0:
            comm.Send(send, 1)
            comm.Recv(recv[:1], 1)
        else:
            comm.Recv(recv, 0)
            comm.Send(send[:1], 0)
        one_way = time.perf_counter() - start
        if repeat:
            results["sendrecv"].append(mbytes / sendrecv)
            results["one_way"].append(mbytes / one_way)
    hosts = comm.gather(results["host"])
    if rank == 0:
        Path(out).write_text(json.dumps({**results, "hosts": hosts}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", default="none,10gbit,1gbit", help="Comma-separated link rates (tc notation).")
    parser.add_argument("--mbytes", type=int, default=40, help="MB per message.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(HERE / "results" / "cluster_bandwidth.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.mbytes, args.repeats)

    from horovod_dpsgd.experiments.cluster import EmulatedCluster, format_rate, parse_rate
    rows = []
    with EmulatedCluster(hosts=2, slots=1, prefix="bwbench") as cluster:
        for rate in args.rates.split(","):
            cluster.shape(rate)
            for links in (1, 2):
                report = Path(f"/tmp/cluster_bandwidth_{links}.json")
                cmd = cluster.horovodrun_command(
                    [sys.executable, __file__, "--worker", str(report), "--mbytes", str(args.mbytes),
                     "--repeats", str(args.repeats)], mpi_args=f"--mca btl_tcp_links {links}")
                proc = cluster.run(cmd, timeout=600)  # the group is stopped on timeout or Ctrl-C
                if proc.returncode != 0:
                    sys.exit(f"the {rate} job failed:\n{proc.stdout[-4000:]}")
                r = json.loads(report.read_text())
                report.unlink()
                assert r["hosts"] == cluster.hosts, r["hosts"]
                rows.append({"link": format_rate(parse_rate(rate)), "btl_tcp_links": links,
                             "sendrecv_MBps": statistics.median(r["sendrecv"]),
                             "one_way_MBps": statistics.median(r["one_way"]), "samples": r})
                print(f"{rows[-1]['link']:>9}  btl_tcp_links {links}:  Sendrecv {rows[-1]['sendrecv_MBps']:7.0f} MB/s"
                      f"  one-way {rows[-1]['one_way_MBps']:7.0f} MB/s", flush=True)
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "mbytes": args.mbytes,
                                         "repeats": args.repeats, "rows": rows}, indent=1))
    print(f"\nMB/s per direction, median of {args.repeats}, {args.mbytes} MB messages, h1 <-> h2 "
          f"(one rank each); wrote {args.out}")


if __name__ == "__main__":
    main()
