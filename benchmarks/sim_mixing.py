"""The simulator's ways of applying a mixing matrix, timed side by side: ``python benchmarks/sim_mixing.py``.

For each topology and number of learners n, one mix ``X <- W(0) X`` of the stacked parameters of the Sec. 2 MLP
(784-50-50-10: six tensors, 42 310 elements per learner) in one torch thread, applied

* ``per learner``: ``MixingMatrix``'s ``"neighbours"`` way, learner by learner: one gather of its neighbours' rows
  and one matrix-vector product each;
* ``grouped``: the same sums for all learners at once, one gather of all learners' ``c``-th neighbours and one
  multiply-add per neighbour (per group of learners with as many neighbours): a candidate replacement of the
  per-learner loop, kept here because it measured slower (docs/simulator.md);
* ``sparse``: one CSR product;
* ``dense``: one dense product.

Prints the median milliseconds per mix over ``--repeat`` mixes (after 3 warm-up mixes), the ratio of each to the
per-learner way, and which way ``MixingMatrix.of`` picks; checks that every way gives the same result. Wrap it in
``flock /tmp/mpi.lock`` on a shared machine. Writes ``--out`` (JSON).
"""

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from horovod_dpsgd import topology as topologies  # noqa: E402
from horovod_dpsgd.sim.averaging import MixingMatrix  # noqa: E402

SHAPES = [(50, 784), (50,), (50, 50), (50,), (10, 50), (10,)]  # the MLP's parameters, per learner


def grouped(w):
    """``rows <- W rows`` for all learners at once: learners grouped by their number ``c`` of neighbours, then
    ``sum_c W[j, k_c(j)] rows[k_c(j)]`` as ``c`` gathers and multiply-adds of whole ``(g, m)`` blocks."""
    nonzero = w != 0
    counts = nonzero.sum(1)
    groups = []
    for c in np.unique(counts):
        learners = np.flatnonzero(counts == c)
        index = np.stack([np.flatnonzero(nonzero[j]) for j in learners]).reshape(len(learners), c)
        groups.append((torch.from_numpy(learners), torch.from_numpy(index),
                       torch.from_numpy(np.take_along_axis(w[learners], index, 1)).float()))

    def apply_(rows):
        mixed = None if len(groups) == 1 else torch.empty_like(rows)
        for learners, index, weights in groups:
            group = rows.index_select(0, index[:, 0]).mul_(weights[:, :1])
            for c in range(1, index.shape[1]):
                group.addcmul_(rows.index_select(0, index[:, c]), weights[:, c:c + 1])
            if mixed is None:
                mixed = group
            else:
                mixed.index_copy_(0, learners, group)
        rows.copy_(mixed)
    return apply_


def ways(w):
    dense = torch.from_numpy(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sparse = MixingMatrix("sparse", dense.to_sparse_csr())
    return {"per learner": MixingMatrix.by_neighbours(w).apply_, "grouped": grouped(w),
            "sparse": sparse.apply_, "dense": MixingMatrix("dense", dense).apply_}


def timed(apply_, params, repeat):
    for _ in range(3):
        for p in params:
            apply_(p)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for p in params:
            apply_(p)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[16, 64, 256])
    parser.add_argument("--topologies", nargs="*", default=["ring", "ring:2", "random_peer", "exponential"])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", default=str(HERE / "results" / "sim_mixing.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for n in args.sizes:
        g = torch.Generator().manual_seed(0)
        for name in args.topologies:
            w = topologies.from_name(name, n, seed=0).mixing_matrix(0)
            x0 = [torch.randn(n, *s, generator=g).reshape(n, -1) for s in SHAPES]
            results, ms = {}, {}
            for way, apply_ in ways(w).items():
                params = [x.clone() for x in x0]
                apply_(params[0])
                results[way] = params[0]
                ms[way] = timed(apply_, [x.clone() for x in x0], args.repeat)
            for way, r in results.items():
                torch.testing.assert_close(r, results["dense"], rtol=1e-5, atol=1e-5, msg=f"{name} n={n} {way}")
            row = {"n": n, "topology": name, "nonzero_per_row": int((w != 0).sum(1).max()),
                   "picked": MixingMatrix.of(w).kind, "ms": ms}
            rows.append(row)
            print(f"n={n:4d} {name:12s} (<= {row['nonzero_per_row']} per row, picks {row['picked']:10s}) "
                  + "  ".join(f"{way} {t:7.2f} ms ({ms['per learner'] / t:5.1f}x)" for way, t in ms.items()),
                  flush=True)
    result = {"command": " ".join([sys.executable, *sys.argv]), "load": os.getloadavg(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
