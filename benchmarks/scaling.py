"""Communication cost per step and learner, against the number of learners n.

A latency-bandwidth (alpha-beta) model: a message of ``b`` bytes costs ``alpha + b / beta``;
messages to different peers proceed in parallel, sequential rounds add up. Per step and
learner, for a model of ``S`` bytes:

=====================  ==========================  ===========================================
scheme                 bytes sent per learner      sequential latency hops
=====================  ==========================  ===========================================
ring allreduce (SSGD)  2 (n-1)/n S                 2 (n-1)
random peer (DPSGD)    S                           1
ring, k per side       2k S  (fewer when n small)  1  (2k messages share the link)
random graph (p)       degree x S  (about p(n-1))  1
exponential graph      degree x S  (log2 n)        1
full averaging         2 (n-1)/n S (an allreduce)  2 (n-1)
=====================  ==========================  ===========================================

so ring allreduce pays ``2(n-1) alpha`` latency that grows with n, while a random peer
pays one ``alpha`` and ``S`` bytes whatever n is. Graph degrees are those of the topologies
this package builds (the largest degree of any learner: the slowest one sets the pace); a graph
that links every learner to every other one is averaged with one allreduce, as full averaging.

``python benchmarks/scaling.py --measured benchmarks/results/final.json
benchmarks/results/final8.json`` fits alpha and beta to the measured raw Sendrecv times (a
sweep of message sizes between rank pairs at n=2) and prints the model next to the measured
transfers (the exchange without mixing, random peer and ring) and allreduce times at every
measured n. On one machine the learners share its cores, which copy the bytes: that check
gives each learner ``beta * min(1, cores / n)``. Use ``--alpha``/``--beta`` with your cluster's
figures (a link per learner) to predict where DPSGD wins there.

Across emulated hosts (``--hosts benchmarks/results/hosts-NAME.json ...``, written by benchmarks/hosts.py) the
model is host-aware: a step costs the compute measured without communication in the same job
(``local_no_comm``) plus, for a variant that communicates, ``alpha + B / beta``, where ``B`` is the bytes per
step through the busiest host's link (the larger direction, from the interface counters) and ``alpha``, ``beta``
are fitted per link rate to all measured step times at that rate (relative least squares; where more bytes were
not slower, ``beta`` is infinite and ``alpha`` alone is fitted). It prints each point predicted against measured
and whether the prediction is within 20 %: an in-sample check of two parameters per link rate.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from horovod_dpsgd import topology as T  # noqa: E402


def cost(scheme: str, n: int, nbytes: float):
    """(bytes sent per learner, sequential latency hops) of one step."""
    if n == 1:
        return 0.0, 0
    if scheme in ("ring_allreduce", "full"):
        return 2 * (n - 1) / n * nbytes, 2 * (n - 1)
    if scheme == "random_peer":
        return nbytes, 1
    topo = {"ring": T.ring, "random_graph": T.random_graph, "exponential": T.exponential}[scheme](n)
    if topo.plan(0, 0).collective:  # a graph that links everyone (a ring of n <= 3) is averaged by one allreduce
        return cost("full", n, nbytes)
    degree = max(len(topo.plan(j, 0).peers) for j in range(n))
    return degree * nbytes, 1


def predict(scheme, n, nbytes, alpha, beta, cores=None):
    """Seconds of communication per step. ``cores``: the learners share that many cores' copy bandwidth
    (one machine, no network: each learner gets ``beta * min(1, cores / n)``)."""
    b, hops = cost(scheme, n, nbytes)
    if cores:
        beta *= min(1.0, cores / n)
    return hops * alpha + b / beta


def fit(points):
    """alpha, beta from (bytes, seconds) of single messages, least squares in *relative* error
    (so 1 KiB and 64 MiB messages count alike; plain least squares lets the largest ones decide alpha)."""
    x = np.array([[1.0 / t, b / t] for b, t in points])
    y = np.ones(len(points))
    (alpha, inv_beta), *_ = np.linalg.lstsq(x, y, rcond=None)
    return max(alpha, 0.0), 1.0 / inv_beta


def fit_hosts(rows):
    """Per link rate, ``(alpha, beta)`` of ``step = compute + alpha + B / beta`` fitted to the rows' variants
    (seconds, bytes/s; relative least squares), and per point ``(row, variant, predicted s, measured s)``."""
    points = {}
    for r in rows:
        compute = r["ms"].get("local_no_comm")
        for v, ms in r["ms"].items():
            if compute is None or v == "local_no_comm" or v not in r["link_MB"]:
                continue
            points.setdefault(r["rate"], []).append((r, v, compute / 1e3, max(r["link_MB"][v]) * 1e6, ms / 1e3))
    fits, out = {}, []
    for rate, pts in points.items():
        # (t - c) = alpha + B / beta, each equation divided by t (relative error)
        x = np.array([[1.0 / t, b / t] for _, _, c, b, t in pts])
        y = np.array([(t - c) / t for _, _, c, b, t in pts])
        (alpha, inv_beta), *_ = np.linalg.lstsq(x, y, rcond=None)
        if inv_beta <= 0:  # more bytes were not slower: the link is no limit at this rate, fit alpha alone
            inv_beta, (alpha,) = 0.0, np.linalg.lstsq(x[:, :1], y, rcond=None)[0]
        fits[rate] = (alpha, 1.0 / inv_beta if inv_beta > 0 else float("inf"))
        out += [(r, v, c + alpha + b * inv_beta, t) for r, v, c, b, t in pts]
    return fits, out


def print_hosts(paths):
    rows = [r for path in paths for r in json.loads(Path(path).read_text())["rows"]]
    fits, points = fit_hosts(rows)
    for rate, (alpha, beta) in fits.items():
        print(f"{rate}: alpha = {alpha * 1e3:.0f} ms, beta = {beta / 1e6:.0f} MB/s (fitted to "
              f"{sum(p[0]['rate'] == rate for p in points)} step times)")
    print("\n| layout | link | model | variant | link MB / step | predicted (ms) | measured (ms) | error | within 20 % |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r, v, predicted, measured in points:
        error = predicted / measured - 1
        print(f"| {r['layout']} | {r['rate']} | {r['model']} | {v.replace('dpsgd_', '')} | {max(r['link_MB'][v]):.1f} | "
              f"{1e3 * predicted:.0f} | {1e3 * measured:.0f} | {100 * error:+.0f} % | {'yes' if abs(error) <= 0.2 else 'NO'} |")
    inside = sum(abs(p / m - 1) <= 0.2 for _, _, p, m in points)
    print(f"\n{inside} of {len(points)} points within 20 %")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measured", nargs="*", default=[],
                        help="benchmarks/results/*.json files written by benchmarks/run.py")
    parser.add_argument("--alpha", type=float, default=None, help="latency per message, seconds")
    parser.add_argument("--beta", type=float, default=None, help="bandwidth per learner, bytes/s")
    parser.add_argument("--bytes", type=float, default=4 * 25.6e6, help="model size in bytes (default ResNet-50)")
    parser.add_argument("--sizes", default="2,4,8,16,32,64,128,256")
    parser.add_argument("--hosts", nargs="*", default=[],
                        help="benchmarks/results/hosts-*.json files: fit the host-aware model to them and stop")
    args = parser.parse_args()
    if args.hosts:
        return print_hosts(args.hosts)
    rows, curve = [], []
    for path in args.measured:
        measured = json.loads(Path(path).read_text())
        rows += [{**r, "cores": measured["meta"].get("cores")} for r in measured["rows"]]
        curve = curve or (measured.get("sendrecv_curve") or {}).get("2") or []
    alpha, beta = args.alpha, args.beta
    if alpha is None or beta is None:
        if len(curve) < 2:
            parser.error("give --alpha and --beta, or --measured with an n=2 Sendrecv curve")
        alpha, beta = fit(curve)
    print(f"alpha = {alpha * 1e6:.1f} us, beta = {beta / 1e9:.2f} GB/s\n")
    print(f"Predicted communication per step for a {args.bytes / 1e6:.0f} MB model (ms):")
    schemes = ("ring_allreduce", "random_peer", "ring", "random_graph", "exponential")
    print("| n | " + " | ".join(schemes) + " | random_peer / ring_allreduce |\n|" + "---|" * (len(schemes) + 2))
    for n in [int(s) for s in args.sizes.split(",")]:
        t = [predict(s, n, args.bytes, alpha, beta) for s in schemes]
        print(f"| {n} | " + " | ".join(f"{1e3 * v:.1f}" for v in t) + f" | {t[1] / t[0]:.2f} |")
    if rows:
        print("\nModel against measurement on this machine (ms; measured: the exchange without mixing; the model\n"
              "shares the machine's cores among the learners, beta * min(1, cores / n)):")
        print("| n | model | random peer: model | measured | ring: model | measured | allreduce: model | measured |\n"
              "|---|---|---|---|---|---|---|---|")
        for r in rows:
            if "hvd_allreduce_ms" not in r:
                continue
            nbytes = 4e6 * r["params_M"]
            cells = []
            for scheme, key in (("random_peer", "random_peer transfer_ms"), ("ring", "ring transfer_ms"),
                                ("ring_allreduce", "hvd_allreduce_ms")):
                measured = f"{r[key]:.1f}" if key in r else "-"
                cells += [f"{1e3 * predict(scheme, r['n'], nbytes, alpha, beta, r['cores']):.1f}", measured]
            print(f"| {r['n']} | {r['model']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
