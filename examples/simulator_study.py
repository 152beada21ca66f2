"""A study only the simulator makes cheap: DPSGD against the number of learners, the topology and the learning rate.

All runs train the paper's Sec. 2 MLP (784-50-50-10) on the bundled MNIST sample at a total batch nB = 2000
(B = 2000 // n per learner), with the noise diagnostics, through ``horovod-dpsgd train --engine sim``'s own code
(:func:`horovod_dpsgd.experiments.training.train` with ``engine="sim"``): the same run as through horovodrun,
without its n processes. Two sweeps, each over the topologies ring, ring:2, exponential, random peer and full
averaging, with SSGD as the reference:

* ``n``: 5, 8, 16, 32, 64 learners at ``--lr`` (default 0.3);
* learning rate: ``--lrs`` (default 0.1, 0.3, 1.0) at n = 16.

For every run: the final test error of the averaged model ``w_a``, the median ``alpha_e / alpha`` over the first
quarter of the diagnostic steps (Eq. 3, with ``g`` measured on ``train``'s probe of 2 batches of B samples, so that
its noise, and hence ``alpha_e / alpha``, also changes with n: compare runs at the same n), and the mean consensus
distance ``n^-1 sum_j |w_j - w_a|^2`` over the run (measured before each diagnostic step's mix). With ``--seeds``
every configuration runs once per seed and the study reports means over the seeds. Writes ``OUT/study.json``, a
Markdown table and the figure ``OUT/simulator_study.png``. Finished runs (an ``end`` record in their metrics file)
are not run again, so an interrupted study resumes::

    python examples/simulator_study.py --out runs/study            # 42 runs of 600 steps (docs/simulator.md)
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


def over_seeds(runs: list) -> dict:
    """One point of a sweep from its runs' summaries (one per seed): the mean of each quantity over the seeds whose
    run did not diverge, the standard deviation of the test error, and every seed's own summary."""
    kept = [r for r in runs if not r["diverged"]]
    point = {"seeds": [r["seed"] for r in runs], "diverged_seeds": len(runs) - len(kept), "diverged": not kept,
             "per_seed": runs}
    for key in ("test_error", "early_alpha_e_over_alpha", "consensus_distance"):
        values = [r[key] for r in kept if r.get(key) is not None and math.isfinite(r[key])]
        point[key] = statistics.mean(values) if values else None
        point[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
    return point


def sweep(out: Path, args, points, what: str) -> dict:
    """``{label: [one point per (n, lr) of points, over the seeds]}`` (see :func:`over_seeds`)."""
    runs = [(topology, "dpsgd") for topology in args.topologies] + [("-", "ssgd")]
    results = {label(t, a): [] for t, a in runs}
    for n, lr in points:
        for topology, algorithm in runs:
            per_seed = []
            for seed in args.seeds:
                metrics = run_one(Path(args.runs_from or out), n, lr, topology, algorithm, args.steps, args.diag_every,
                                  seed)
                per_seed.append({**summary(metrics), "seed": seed})
            results[label(topology, algorithm)].append({"n": n, "lr": lr, **over_seeds(per_seed)})
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
            error = f"{100 * r['test_error']:.1f}" + (f" ± {100 * r['test_error_std']:.1f}"
                                                       if r["test_error_std"] is not None else "") + "%"
            alpha, distance = r["early_alpha_e_over_alpha"], r["consensus_distance"]
            cells.append(error + (f" / {alpha:.2f}" if alpha is not None else " / -")
                         + (f" / {distance:.2g}" if distance is not None else "")
                         + (f" ({r['diverged_seeds']} of {len(r['seeds'])} diverged)" if r["diverged_seeds"] else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(study: dict, path: Path, lr_n: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter
    panels = (("test_error", "test error of w_a", True), ("early_alpha_e_over_alpha", "alpha_e / alpha, early", False),
              ("consensus_distance", "consensus distance", True))
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for row, (sweep_name, key, xlabel) in enumerate((("by_n", "n", "learners n (nB = 2000)"),
                                                     ("by_lr", "lr", f"learning rate (n = {lr_n})"))):
        for col, (metric, title, log) in enumerate(panels):
            ax = axes[row, col]
            diverged = []
            for name, rows in study[sweep_name].items():
                if metric == "consensus_distance" and name == "ssgd":
                    continue  # identical replicas: zero, nothing to show on a log axis
                shown = [r for r in rows if not r["diverged"] and r.get(metric) is not None]
                xs, ys = [r[key] for r in shown], [r[metric] for r in shown]
                spread = [r.get(f"{metric}_std") or 0.0 for r in shown]
                ax.errorbar(xs, ys, yerr=spread if any(spread) else None, fmt="o-", color=COLORS[name], label=name,
                            capsize=3)
                diverged += [(r[key], name) for r in rows if r["diverged"]]
            ax.set_xscale("log")
            if log:
                ax.set_yscale("log")
            top = ax.get_ylim()[1]
            for x, name in diverged:  # at the top edge, once every line is drawn: not a value
                ax.plot([x], [top], "x", color=COLORS[name], ms=10, mew=2, clip_on=False)
            points = sorted({r[key] for rows in study[sweep_name].values() for r in rows})
            ax.set_xticks(points)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            if metric == "test_error":
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g}%"))
                ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{100 * v:g}%"))
            ax.set_xlabel(xlabel)
            ax.set_title(title)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    seeds = study["settings"]["seeds"]
    fig.suptitle("DPSGD, simulated (horovod-dpsgd train --engine sim): MLP on MNIST, nB = 2000, "
                 f"{study['settings']['steps']} steps; " + (f"mean +/- std over {len(seeds)} seeds; " if len(seeds) > 1
                                                          else f"seed {seeds[0]}; ")
                 + "x at the top edge = diverged")
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
    parser.add_argument("--lr-n", type=int, help="learners of the learning-rate sweep (default 16)")
    parser.add_argument("--topologies", nargs="*", default=list(TOPOLOGIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds of every configuration; the study reports their mean (and the test error's std)")
    parser.add_argument("--runs-from", metavar="STUDY",
                        help="train (or find) the runs in STUDY/runs instead of OUT/runs: tabulates part of another "
                             "study, e.g. its points with more seeds, into OUT without running them again")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of the same code: 8 steps, n = 4 and 8, learning rates 0.1 and 0.3")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.diag_every = 8, 2
    args.ns = args.ns or ([4, 8] if args.quick else [5, 8, 16, 32, 64])
    args.lrs = args.lrs or ([0.1, 0.3] if args.quick else [0.1, 0.3, 1.0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    lr_n = args.lr_n = args.lr_n or (8 if args.quick else 16)
    study = {"settings": {k: v for k, v in vars(args).items()},
             "by_n": sweep(out, args, [(n, args.lr) for n in args.ns], "sweep over n"),
             "by_lr": sweep(out, args, [(lr_n, lr) for lr in args.lrs], "sweep over the learning rate")}
    study["seconds"] = time.time() - started
    (out / "study.json").write_text(json.dumps(study, indent=1))
    over = f"mean over seeds {', '.join(map(str, args.seeds))} (± the test error's std)" if len(args.seeds) > 1 else \
        f"seed {args.seeds[0]}"
    text = (f"Cells: test error of w_a / median alpha_e/alpha over the first quarter / mean consensus distance; "
            f"{args.steps} steps, {over}\n\n"
            f"By n (lr = {args.lr:g}):\n\n{table(study['by_n'], 'n')}\n\n"
            f"By learning rate (n = {lr_n}):\n\n{table(study['by_lr'], 'lr')}\n")
    (out / "study.md").write_text(text)
    print(text)
    plot(study, out / "simulator_study.png", lr_n)
    print(f"wrote {out / 'study.json'}, {out / 'study.md'}, {out / 'simulator_study.png'} "
          f"({study['seconds']:.0f} s for the runs not done before)")


if __name__ == "__main__":
    main()
