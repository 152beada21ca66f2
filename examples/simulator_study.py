"""A study only the simulator makes cheap: DPSGD against the number of learners, the topology and the learning rate.

All runs train the paper's Sec. 2 MLP (784-50-50-10) on the bundled MNIST sample at a total batch nB = 2000
(B = 2000 // n per learner), with the noise diagnostics, through ``horovod-dpsgd train --engine sim``'s own code
(:func:`horovod_dpsgd.experiments.training.train` with ``engine="sim"``): the same run as through horovodrun,
without its n processes. Two sweeps, each over the topologies ring, ring:2, exponential, random peer and full
averaging, with SSGD as the reference:

* ``n``: 5, 8, 16, 32, 64 learners at ``--lr`` (default 0.3);
* learning rate: ``--lrs`` (default 0.1, 0.3, 1.0) at n = 16.

For every run: the final test error of the averaged model ``w_a``, the median ``alpha_e / alpha`` over the first
quarter of the diagnostic steps (Eq. 3; SSGD's is about 1, DPSGD's lower when its landscape-dependent noise is
large), and the mean consensus distance ``n^-1 sum_j |w_j - w_a|^2`` over the run. Writes ``OUT/study.json``, a
Markdown table and the figure ``OUT/simulator_study.png``. Finished runs (an ``end`` record in their metrics file)
are not run again, so an interrupted study resumes::

    python examples/simulator_study.py --out runs/study            # 48 runs of 600 steps (docs/simulator.md)
    python examples/simulator_study.py --out runs/quick --quick    # a smoke run of the same code
"""

import argparse
import json
import math
import statistics
import time
from pathlib import Path

TOPOLOGIES = ("ring", "ring:2", "exponential", "random_peer", "full")
COLORS = {"ring": "tab:green", "ring:2": "tab:olive", "exponential": "tab:purple", "random_peer": "tab:cyan",
          "full": "tab:blue", "ssgd": "tab:red"}


def label(topology: str, algorithm: str) -> str:
    return "ssgd" if algorithm == "ssgd" else topology


def run_one(out: Path, n: int, lr: float, topology: str, algorithm: str, steps: int, diag_every: int,
            seed: int) -> Path:
    """Train one configuration (unless its metrics file says it finished); returns the metrics file."""
    from horovod_dpsgd.experiments import training
    from horovod_dpsgd.experiments.config import TrainConfig
    name = f"n{n}-lr{lr:g}-{label(topology, algorithm).replace(':', '')}-seed{seed}"
    metrics = out / "runs" / f"{name}.jsonl"
    if metrics.exists() and any(json.loads(line)["kind"] == "end" for line in metrics.read_text().splitlines()
                                if line.strip()):
        return metrics
    steps_per_epoch = 4000 // n // (2000 // n)  # the bundled sample: 4000 training digits
    cfg = TrainConfig(engine="sim", np=n, algorithm=algorithm, topology="ring" if algorithm == "ssgd" else topology,
                      batch_size=2000 // n, lr=lr, max_steps=steps, epochs=steps, diag_every=diag_every,
                      log_every=diag_every, eval_every=max(1, steps // 4 // max(1, steps_per_epoch)), seed=seed,
                      metrics_file=str(metrics), quiet=True)
    started = time.time()
    training.train(cfg)
    print(f"  {name}: {time.time() - started:.0f} s", flush=True)
    return metrics


def summary(metrics: Path) -> dict:
    from horovod_dpsgd.experiments import reports
    records = reports.read_metrics(metrics)
    s = reports.summarize(metrics.stem, 0, records, 0.9)
    diags = [r for r in records if r["kind"] == "diag"]
    distances = [r["consensus_distance"] for r in diags if math.isfinite(r.get("consensus_distance", math.nan))]
    s["consensus_distance"] = statistics.mean(distances) if distances and not s["diverged"] else None
    return s


def sweep(out: Path, args, points, what: str) -> dict:
    """``{label: [summary per point]}`` for the runs at ``points`` (``(n, lr)`` pairs)."""
    runs = [(topology, "dpsgd") for topology in args.topologies] + [("-", "ssgd")]
    results = {label(t, a): [] for t, a in runs}
    for n, lr in points:
        for topology, algorithm in runs:
            metrics = run_one(out, n, lr, topology, algorithm, args.steps, args.diag_every, args.seed)
            results[label(topology, algorithm)].append({"n": n, "lr": lr, **summary(metrics)})
    print(f"{what}: done", flush=True)
    return results


def table(results: dict, key: str) -> str:
    points = [r[key] for r in next(iter(results.values()))]
    lines = [f"| run | " + " | ".join(f"{key} = {p:g}" for p in points) + " |",
             "|---|" + "---|" * len(points)]
    for name, rows in results.items():
        cells = []
        for r in rows:
            if r["diverged"]:
                cells.append("diverged")
                continue
            alpha = r["early_alpha_e_over_alpha"]
            cells.append(f"{100 * r['test_error']:.1f}% / {alpha:.2f} / {r['consensus_distance']:.2g}"
                         if alpha is not None and r["consensus_distance"] is not None else
                         f"{100 * r['test_error']:.1f}%")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(study: dict, path: Path, lr_n: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = (("test_error", "test error of w_a", True), ("early_alpha_e_over_alpha", "alpha_e / alpha, early", False),
              ("consensus_distance", "consensus distance", True))
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for row, (sweep_name, key, xlabel) in enumerate((("by_n", "n", "learners n (nB = 2000)"),
                                                     ("by_lr", "lr", f"learning rate (n = {lr_n})"))):
        for col, (metric, title, log) in enumerate(panels):
            ax = axes[row, col]
            for name, rows in study[sweep_name].items():
                if metric == "consensus_distance" and name in ("ssgd", "full"):
                    continue  # zero before every step: nothing to show on a log axis
                xs = [r[key] for r in rows if not r["diverged"] and r.get(metric) is not None]
                ys = [r[metric] for r in rows if not r["diverged"] and r.get(metric) is not None]
                ax.plot(xs, ys, "o-", color=COLORS[name], label=name)
                for r in rows:
                    if r["diverged"]:
                        ax.plot([r[key]], [ax.get_ylim()[1] if ys else 1], "x", color=COLORS[name], ms=9)
            ax.set_xscale("log")
            if log:
                ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_title(title)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("DPSGD, simulated (horovod-dpsgd train --engine sim): MLP on MNIST, nB = 2000; x = diverged")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/simulator_study")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--diag-every", type=int, default=25)
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--ns", type=int, nargs="*", help="learners of the n sweep (default 5 8 16 32 64)")
    parser.add_argument("--lrs", type=float, nargs="*", help="learning rates of the lr sweep (default 0.1 0.3 1.0)")
    parser.add_argument("--lr-n", type=int, default=16, help="learners of the learning-rate sweep")
    parser.add_argument("--topologies", nargs="*", default=list(TOPOLOGIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of the same code: 8 steps, n = 4 and 8, learning rates 0.1 and 0.3")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.diag_every, args.lr_n = 8, 2, 8
    args.ns = args.ns or ([4, 8] if args.quick else [5, 8, 16, 32, 64])
    args.lrs = args.lrs or ([0.1, 0.3] if args.quick else [0.1, 0.3, 1.0])
    out = Path(args.out)
    started = time.time()
    lr_n = args.lr_n
    study = {"settings": {k: v for k, v in vars(args).items()},
             "by_n": sweep(out, args, [(n, args.lr) for n in args.ns], "sweep over n"),
             "by_lr": sweep(out, args, [(lr_n, lr) for lr in args.lrs], "sweep over the learning rate")}
    study["seconds"] = time.time() - started
    (out / "study.json").write_text(json.dumps(study, indent=1))
    text = (f"Cells: test error of w_a / median alpha_e/alpha over the first quarter / mean consensus distance\n\n"
            f"By n (lr = {args.lr:g}):\n\n{table(study['by_n'], 'n')}\n\n"
            f"By learning rate (n = {lr_n}):\n\n{table(study['by_lr'], 'lr')}\n")
    (out / "study.md").write_text(text)
    print(text)
    plot(study, out / "simulator_study.png", lr_n)
    print(f"wrote {out / 'study.json'}, {out / 'study.md'}, {out / 'simulator_study.png'} "
          f"({study['seconds']:.0f} s for the runs not done before)")


if __name__ == "__main__":
    main()
