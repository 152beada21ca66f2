"""The exchange's design alternative on one machine: mix chunks as they arrive, or receive, then mix.

The plugin receives a peer's whole model into a buffer while the backward pass runs and mixes it
into the parameters in ``step()`` (``w.lerp_(w_peer, 0.5)``): the transfer overlaps the backward
pass, and the mix is one more pass over memory. Receiving into a few small buffers and mixing each
chunk while it is still in cache saves that pass's memory traffic, but the mix must then happen as
the chunks arrive, which the backward pass (it reads the weights) forbids: no overlap. This script
measures the two for a random-peer exchange of ``--numel`` float32 weights, with pure mpi4py,
so that you can weigh the saving on your machine:

    mpirun -np 2 python benchmarks/streamed_mix.py --numel 11182000

``transfer``: the exchange alone; ``receive, then mix``: the plugin's scheme; ``streamed, K KiB``:
chunks of K KiB into 4 rotating buffers, each mixed when both its send and its receive are done.
"""

import argparse
import statistics
import time

import torch
from mpi4py import MPI


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=11_182_000, help="float32 weights (default: ResNet-18)")
    parser.add_argument("--chunks", default="256,1024,4096", help="chunk sizes to try, KiB")
    parser.add_argument("--reps", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), args.numel
    peer = rank ^ 1
    if comm.Get_size() % 2:
        raise SystemExit("run with an even number of processes: rank pairs 0-1, 2-3, ... exchange")
    w, full = torch.randn(n), torch.empty(n)

    def wait(requests):
        while not MPI.Request.Testall(requests):
            pass

    def transfer():
        wait([comm.Irecv(full.numpy(), source=peer), comm.Isend(w.numpy(), dest=peer)])

    def receive_then_mix():
        transfer()
        w.lerp_(full, 0.5)

    def streamed(chunk, slots=4):
        buffers = [torch.empty(chunk) for _ in range(slots)]
        starts = range(0, n, chunk)
        sends = [comm.Isend(w[s:s + chunk].numpy(), dest=peer, tag=1) for s in starts]

        def receive(i):
            s = starts[i]
            return comm.Irecv(buffers[i % slots][:min(chunk, n - s)].numpy(), source=peer, tag=1)

        receives = {i: receive(i) for i in range(min(slots, len(starts)))}
        for i, s in enumerate(starts):
            wait([receives.pop(i), sends[i]])  # the peer has read this chunk of w, and its chunk is here
            m = min(chunk, n - s)
            w[s:s + m].lerp_(buffers[i % slots][:m], 0.5)
            if i + slots < len(starts):
                receives[i + slots] = receive(i + slots)

    def median_ms(fn):
        times = []
        for _ in range(args.reps):
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * max(comm.allgather(statistics.median(times)))

    results = {"transfer": median_ms(transfer), "receive, then mix": median_ms(receive_then_mix)}
    for kib in (int(k) for k in args.chunks.split(",")):
        results[f"streamed, {kib} KiB"] = median_ms(lambda: streamed(kib * 256))
    if rank == 0:
        print(f"{4 * n / 1e6:.0f} MB per peer, {comm.Get_size()} processes (ms, median of {args.reps}, slowest rank):")
        for name, ms in results.items():
            print(f"  {name:20s} {ms:7.2f}   transfer / this = {results['transfer'] / ms:.2f}")


if __name__ == "__main__":
    main()
