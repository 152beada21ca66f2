"""Step time across emulated hosts: every DPSGD variant against ``hvd.DistributedOptimizer``, per host layout,
link rate and model. Needs root (network namespaces; see docs/cluster.md).

    python benchmarks/hosts.py --name across                 # the whole matrix (hours on 2 cores)
    python benchmarks/hosts.py --name across --layouts 2x2 --rates 1gbit --models resnet18

For each layout (``HxL``: H hosts of L processes) it brings up an emulated cluster, and for each link rate and
model it launches ``benchmarks/step_time.py`` across the hosts with ``horovodrun -H``: all variants in one job,
timed side by side in rotated order (paired ratios), the bytes per step through the busiest host's link from
the hosts' interface counters, and the default's and the random peer's exchanges alone against raw mpi4py
moving the same bytes between the same hosts. Each job writes ``benchmarks/results/hosts-<name>/<layout>-<rate>-
<model>.json``; the table of all of them goes to ``benchmarks/results/hosts-<name>.json`` and stdout, with the
targets met or missed. ``--reuse`` skips jobs whose file exists. ``--lock FILE[,FILE...]`` holds exclusive locks
on the files, taken in order, while each job runs (and only then), so that other users of the machine's cores can
take turns between jobs (e.g. ``--lock /tmp/turn.lock,/tmp/mpi.lock``: a turnstile, then the shared lock).

All emulated hosts share this machine's cores: absolute times are inflated; compare the ratios, which are
measured within one job.
"""

import argparse
import contextlib
import fcntl
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from horovod_dpsgd.experiments.cluster import EmulatedCluster  # noqa: E402

VARIANTS = ("horovod_ssgd", "dpsgd_default", "dpsgd_random_peer", "dpsgd_ring", "dpsgd_hierarchical",
            "dpsgd_hierarchical_every2",
            "dpsgd_hierarchical_leader", "dpsgd_one_peer_exponential", "dpsgd_periodic4", "dpsgd_default_fp16")
#: (model, layout, rate) -> the default's step time as a ratio of Horovod's, at most (issue 14)
TARGETS = {("resnet18", "2x2", "1gbit"): 1.0, ("resnet18", "4x1", "1gbit"): 0.75,
           ("resnet18", "4x2", "1gbit"): 0.75, ("resnet50", "4x2", "1gbit"): 0.6}
RATE_ORDER = {"1gbit": 0, "10gbit": 1, "none": 2}
PARAMS = {"mlp1m": 1.07e6, "resnet18": 11.2e6, "resnet50": 25.6e6}


@contextlib.contextmanager
def locked(paths):
    """Exclusive locks on the comma-separated files ``paths``, taken in order (e.g. a turnstile, then the lock
    that the machine's other users share) and held while the block runs."""
    with contextlib.ExitStack() as stack:
        for path in filter(None, (paths or "").split(",")):
            f = stack.enter_context(open(path, "a"))
            fcntl.flock(f, fcntl.LOCK_EX)
            stack.callback(fcntl.flock, f, fcntl.LOCK_UN)
        yield


def same_as_default(layout):
    """The variants that are the default's topology on ``layout`` (measured once, as the default): two hosts of
    several learners -> hierarchical:every=2; other layouts of several hosts -> the one-peer exponential graph."""
    hosts, per_host = (int(v) for v in layout.split("x"))
    return ("dpsgd_hierarchical_every2",) if hosts == 2 and per_host > 1 else ("dpsgd_one_peer_exponential",)


def jobs(layout, variants, group):
    """The variants to time on ``layout``, in jobs of at most ``group`` besides Horovod's (each job times
    Horovod's too: ratios are taken within a job)."""
    todo = [v for v in variants if v != "horovod_ssgd" and v not in same_as_default(layout)]
    return [["horovod_ssgd"] + todo[i:i + group] for i in range(0, len(todo), group)]


def job(cluster, out, model, variants, args):
    exchanges = ",".join(v for v in ("dpsgd_default", "dpsgd_random_peer") if v in variants)
    command = [sys.executable, str(HERE / "step_time.py"), "--models", model, "--variants", ",".join(variants),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--reps", str(args.reps),
               "--exchanges", exchanges, "--exchange-reps", str(args.exchange_reps if exchanges else 0),
               "--curve-reps", "0", "--link", "veth0", "--out", str(out)]
    with locked(args.lock):
        start = time.monotonic()
        proc = cluster.run(command, timeout=args.timeout, mpi_args=args.mpi_args)
        print(f"  {out.name}: exit {proc.returncode} in {time.monotonic() - start:.0f} s", flush=True)
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"{' '.join(command)} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")


def quartiles(values):
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return median, q1, q3


def row(layout, rate, model, results):
    """One table row from the jobs of a (layout, rate, model): ratios to the Horovod run of the same job."""
    r = {"layout": layout, "rate": rate, "model": model, "ratio": {}, "ms": {}, "link_MB": {}}
    horovod, e = [], {}
    for result in results:
        entry = result["models"][model]
        s, link = entry["step_s"], entry.get("link_bytes_per_step", {})
        r["params_M"] = entry["params"] / 1e6
        horovod.append(statistics.median(s["horovod_ssgd"]))
        e.update(entry.get("exchange_s", {}))
        for v, times in s.items():
            if v != "horovod_ssgd":
                r["ms"][v] = 1e3 * statistics.median(times)
                r["ratio"][v] = quartiles([a / b for a, b in zip(times, s["horovod_ssgd"])])
            if v in link:
                r["link_MB"][v] = [b / 1e6 for b in link[v]]
            if v in entry.get("in_step_s", {}):  # in opt.step(): waiting, mixing, updating; the rest is compute
                r.setdefault("in_step_ms", {})[v] = 1e3 * entry["in_step_s"][v]
    r["ms"]["horovod_ssgd"] = r["horovod_ms"] = 1e3 * statistics.median(horovod)
    for same in same_as_default(layout):
        if "dpsgd_default" in r["ratio"]:
            r["ratio"].setdefault(same, r["ratio"]["dpsgd_default"])
    for name in ("default", "random_peer"):
        if f"{name}_transfer" in e:
            r[f"{name} exchange efficiency"] = quartiles([a / b for a, b in zip(e[f"raw_{name}"],
                                                                                 e[f"{name}_transfer"])])
            r[f"{name} exchange_ms"] = 1e3 * statistics.median(e[f"{name}_transfer"])
            r[f"{name} raw_ms"] = 1e3 * statistics.median(e[f"raw_{name}"])
    r["hvd_allreduce_ms"] = 1e3 * statistics.median(e["hvd_allreduce"]) if "hvd_allreduce" in e else None
    return r


def fmt(stats):
    median, q1, q3 = stats
    return f"{median:.2f} [{q1:.2f}-{q3:.2f}]"


def table(rows, variants):
    out = ["| layout | link | model | Horovod (ms) | " + " | ".join(v.replace("dpsgd_", "") for v in variants) +
           " | link MB/step, Horovod / default |", "|" + "---|" * (len(variants) + 5)]
    for r in rows:
        link = r["link_MB"]
        cells = [fmt(r["ratio"][v]) if v in r["ratio"] else "-" for v in variants]
        moved = (f"{link['horovod_ssgd'][0]:.0f} / {link['dpsgd_default'][0]:.0f}"
                 if "horovod_ssgd" in link and "dpsgd_default" in link else "-")
        out.append(f"| {r['layout']} | {r['rate']} | {r['model']} | {r['horovod_ms']:.0f} | " + " | ".join(cells) +
                   f" | {moved} |")
    return "\n".join(out)


def check(rows):
    lines = []
    for r in rows:
        limit = TARGETS.get((r["model"], r["layout"], r["rate"]))
        if limit is None:
            continue
        for v in ("dpsgd_default", "dpsgd_default_fp16"):
            if v in r["ratio"] and (v == "dpsgd_default" or r["model"] == "resnet50"):
                value = r["ratio"][v][0]
                lines.append(f"{r['model']} {r['layout']} {r['rate']} {v}: {value:.2f} "
                             f"({'meets' if value <= limit else 'MISSES'} <= {limit})")
    return lines


def plot_ratios(rows, variants, path):
    """One link rate: per (model, layout), each variant's step time as a ratio of Horovod's (median, quartiles as
    error bars), the issue's target for the default as a dash."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = [r for r in rows]
    shown = [v for v in variants if any(v in r["ratio"] for r in cells)]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 + 0.35 * len(cells) * len(shown)), 4.2))
    width = 0.8 / max(1, len(shown))
    for i, v in enumerate(shown):
        xs = [k + (i - (len(shown) - 1) / 2) * width for k, r in enumerate(cells) if v in r["ratio"]]
        stats = [r["ratio"][v] for r in cells if v in r["ratio"]]
        ax.bar(xs, [m for m, _, _ in stats], width, yerr=[[m - lo for m, lo, _ in stats], [hi - m for m, _, hi in stats]],
               label=v.replace("dpsgd_", ""), edgecolor="black" if v == "dpsgd_default" else None,
               linewidth=1.5 if v == "dpsgd_default" else 0, capsize=2)
    for k, r in enumerate(cells):
        limit = TARGETS.get((r["model"], r["layout"], r["rate"]))
        if limit is not None:
            ax.hlines(limit, k - 0.45, k + 0.45, colors="red", linestyles="dashed")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(cells)), [f"{r['model']}\n{r['layout']}, {r['rate']}" for r in cells])
    ax.set_ylabel("step time / Horovod's (median, quartiles)")
    ax.set_title("Across emulated hosts sharing 2 cores; red dash: the target for the default", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(rows, variants, path):
    """Step time against link bandwidth, one line per variant (Horovod's included), one panel per model and
    layout measured at several link rates. Without any such panel: :func:`plot_ratios`."""
    rates = sorted({r["rate"] for r in rows}, key=lambda rate: RATE_ORDER.get(rate, 9))
    panels = sorted(p for p in {(r["model"], r["layout"]) for r in rows}
                    if len({r["rate"] for r in rows if (r["model"], r["layout"]) == p}) > 1)
    if not panels:
        return plot_ratios(rows, variants, path)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.4), squeeze=False)
    for ax, (model, layout) in zip(axes[0], panels):
        cells = {r["rate"]: r for r in rows if (r["model"], r["layout"]) == (model, layout)}
        xs = [i for i, rate in enumerate(rates) if rate in cells]
        for v in ["horovod_ssgd"] + variants:
            ys = [cells[rates[i]]["ms"].get(v) for i in xs]
            if any(y is not None for y in ys):
                ax.plot([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], marker="o",
                        label=v.replace("dpsgd_", ""), linewidth=2.5 if v in ("horovod_ssgd", "dpsgd_default") else 1,
                        color="black" if v == "horovod_ssgd" else None)
        ax.set_xticks(range(len(rates)), [{"none": "unshaped"}.get(r, r) for r in rates])
        ax.set_xlabel("link rate (each host, each direction)")
        ax.set_ylabel("step time (ms, median of repetitions)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{model}, {layout} (hosts x processes)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Step time against link bandwidth, emulated hosts sharing 2 cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="latest",
                        help="the run: its jobs go to benchmarks/results/hosts-NAME/; NAME,OTHER,... also reads the "
                             "jobs of earlier runs OTHER into the table and plots (no new jobs for them)")
    parser.add_argument("--layouts", default="2x2,4x1,4x2", help="HxL: H hosts of L processes")
    parser.add_argument("--rates", default="1gbit,10gbit,none", help="link rates (tc notation; none: unshaped)")
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=3, help="steps per timed repetition")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--exchange-reps", type=int, default=5)
    parser.add_argument("--memory-gb", type=float, default=10,
                        help="memory the processes of a job may take: every variant holds a model, its gradients, "
                             "momentum and exchange buffers (about 5 model sizes) in every process, so the variants "
                             "are split into jobs that fit")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per job")
    parser.add_argument("--mpi-args", default="", help="added to horovodrun's --mpi-args")
    parser.add_argument("--lock", default=None, help="hold exclusive locks on these comma-separated files, taken in order, while each job runs")
    parser.add_argument("--reuse", action="store_true", help="skip jobs whose result file exists")
    parser.add_argument("--plot", default=None, help="write the step time / bandwidth plot here (PNG)")
    parser.add_argument("--plot-ratios", default=None, metavar="RATE:PATH",
                        help="write the ratios to Horovod's step at link rate RATE (e.g. 1gbit:ratios.png) here")
    args = parser.parse_args()
    name, *others = args.name.split(",")
    directory = HERE / "results" / f"hosts-{name}"
    directory.mkdir(parents=True, exist_ok=True)
    variants = args.variants.split(",")
    for layout in args.layouts.split(","):
        hosts, slots = (int(v) for v in layout.split("x"))
        todo = [(rate, model) for rate in args.rates.split(",") for model in args.models.split(",")
                if not (args.reuse and list(directory.glob(f"{layout}-{rate}-{model}-*.json")))]
        if not todo:
            continue
        with EmulatedCluster(hosts=hosts, slots=slots, prefix="bench") as cluster:
            for rate, model in todo:
                cluster.shape(rate)
                print(f"{layout}, links {rate}, {model}", flush=True)
                group = max(1, int(args.memory_gb * 1e9 // (hosts * slots * 5 * 4 * PARAMS[model])) - 1)
                for i, chunk in enumerate(jobs(layout, variants, group)):
                    job(cluster, directory / f"{layout}-{rate}-{model}-{i}.json", model, chunk, args)
    cells = {}
    for path in sorted(p for d in [name, *others] for p in (HERE / "results" / f"hosts-{d}").glob("*.json")):
        layout, rate, model, _ = path.stem.split("-")
        cells.setdefault((layout, rate, model), []).append(json.loads(path.read_text()))
    rows = [row(*key, results) for key, results in cells.items()]
    rows.sort(key=lambda r: (r["model"], r["layout"], RATE_ORDER.get(r["rate"], 9)))
    meta = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores", "command": " ".join(sys.argv)}
    if not others:  # the table of one run; a table read from several runs is printed only
        (HERE / "results" / f"hosts-{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("\nStep time / Horovod's, median of the per-repetition ratios [quartiles]:\n")
    print(table(rows, [v for v in variants if v != "horovod_ssgd"]))
    print("\nExchange alone against raw mpi4py moving the same bytes between the same hosts (raw / plugin):\n")
    print("| layout | link | model | default: plugin ms | raw ms | efficiency | random peer: plugin ms | raw ms | "
          "efficiency |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = []
        for name in ("default", "random_peer"):
            if f"{name} exchange_ms" not in r:
                cells += ["-"] * 3
            elif r[f"{name} raw_ms"] < 1:  # the timed step sends nothing across hosts (hierarchical:every=2)
                cells += [f"{r[f'{name} exchange_ms']:.0f}", "0", "- (nothing crossed at the timed step)"]
            else:
                cells += [f"{r[f'{name} exchange_ms']:.0f}", f"{r[f'{name} raw_ms']:.0f}",
                          fmt(r[f"{name} exchange efficiency"])]
        print(f"| {r['layout']} | {r['rate']} | {r['model']} | " + " | ".join(cells) + " |")
    print("\nTargets:")
    for line in check(rows):
        print("  " + line)
    if args.plot:
        plot(rows, [v for v in variants if v != "horovod_ssgd"], args.plot)
        print(f"\nplot: {args.plot}")
    if args.plot_ratios:
        rate, path = args.plot_ratios.split(":", 1)
        plot_ratios([r for r in rows if r["rate"] == rate], [v for v in variants if v != "horovod_ssgd"], path)
        print(f"plot: {path}")


if __name__ == "__main__":
    main()
