"""Summaries, tables and plots of training runs (the metrics files of ``horovod-dpsgd train``)."""

import json
import math
import statistics
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Sequence

__all__ = ["read_metrics", "summarize", "one_line", "table", "seed_table", "steps_table", "windows_table", "collect", "plot", "plot_diagnostics",
           "algorithm_color", "plot_figure2"]


def read_metrics(path) -> List[dict]:
    """The JSON-lines records of one run, as one run even if it was resumed.

    A resumed run appends to the file, beginning with a ``start`` record with ``"resumed": true`` at the
    step of its checkpoint: the records the interrupted run wrote after that step (redone by the resumed
    run) and its ``end`` are left out. A line cut short by a kill is skipped with a warning.
    """
    records: List[dict] = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                warnings.warn(f"{path}:{number}: skipped a malformed record (cut short?): {line[:80]!r}")
                continue
            if record.get("kind") == "start" and record.get("resumed"):
                records = [r for r in records if r["step"] <= record["step"] and r["kind"] != "end"]
            records.append(record)
    return records


def summarize(name: str, seed: int, records: Sequence[dict], target_accuracy: float) -> dict:
    """Final loss, test error, divergence and steps to ``target_accuracy`` of one run."""
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    end = next((r for r in records if r["kind"] == "end"), {})
    diags = [r for r in records if r["kind"] == "diag" and "alpha_e_over_alpha" in r]
    quarter = max(1, len(diags) // 4)  # early / late training: the first / last quarter of the diagnostic steps
    early = [r["alpha_e_over_alpha"] for r in diags[:quarter] if math.isfinite(r["alpha_e_over_alpha"])]
    late = [r["alpha_e_over_alpha"] for r in diags[-quarter:] if math.isfinite(r["alpha_e_over_alpha"])]
    return {
        "name": name, "seed": seed,
        "steps": end.get("steps", steps[-1]["step"] if steps else 0),
        "diverged": bool(end.get("diverged", False)),
        "final_train_loss": steps[-1]["loss"] if steps else math.nan,
        "test_error": 1.0 - epochs[-1]["accuracy"] if epochs else math.nan,
        "best_test_error": 1.0 - max(r["accuracy"] for r in epochs) if epochs else math.nan,
        "steps_to_target": next((r["step"] for r in epochs if r["accuracy"] >= target_accuracy), None),
        "early_alpha_e_over_alpha": statistics.median(early) if early else None,
        "late_alpha_e_over_alpha": statistics.median(late) if late else None,
    }


def one_line(s: dict) -> str:
    if s["diverged"]:
        return f"diverged at step {s['steps']}"
    return (f"{s['steps']} steps, final train loss {s['final_train_loss']:.4f}, test error {100 * s['test_error']:.2f}%"
            + (f", median alpha_e/alpha in the first quarter {s['early_alpha_e_over_alpha']:.2f}" if s["early_alpha_e_over_alpha"] else ""))


def _mean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} +/- {statistics.stdev(values):.2g}"


def table(results: Sequence[dict], target_accuracy: float) -> str:
    """A Markdown table, one row per configuration (mean +/- std over seeds)."""
    by_name: Dict[str, List[dict]] = defaultdict(list)
    for r in results:
        by_name[r["name"]].append(r)
    lines = [f"| run | seeds | diverged | final train loss | test error % | best test error % | "
             f"steps to {100 * target_accuracy:g}% acc. | alpha_e/alpha, first quarter (median) | last quarter |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, rs in by_name.items():
        ok = [r for r in rs if not r["diverged"]]
        reached = [r["steps_to_target"] for r in ok if r["steps_to_target"] is not None]
        lines.append(
            f"| {name} | {len(rs)} | {'yes' if all(r['diverged'] for r in rs) else 'no' if not any(r['diverged'] for r in rs) else f'{len(rs) - len(ok)}/{len(rs)}'} | "
            f"{_mean([r['final_train_loss'] for r in ok])} | {_mean([100 * r['test_error'] for r in ok])} | "
            f"{_mean([100 * r['best_test_error'] for r in ok])} | "
            f"{_mean(reached) if reached else 'never'}{f' ({len(reached)}/{len(rs)})' if 0 < len(reached) < len(rs) else ''} | "
            f"{_mean([r['early_alpha_e_over_alpha'] for r in ok])} | "
            f"{_mean([r.get('late_alpha_e_over_alpha') for r in ok])} |")
    return "\n".join(lines)


def seed_table(results: Sequence[dict]) -> str:
    """A Markdown table of the test error (%) of each run in each seed ("diverged" where it did), and the mean."""
    seeds = sorted({r["seed"] for r in results})
    by_name: Dict[str, Dict[int, dict]] = defaultdict(dict)
    for r in results:
        by_name[r["name"]][r["seed"]] = r
    lines = ["| run | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|---" * (len(seeds) + 2) + "|"]
    for name, runs in by_name.items():
        cells = ["-" if s not in runs else "diverged" if runs[s]["diverged"] else f"{100 * runs[s]['test_error']:.1f}"
                 for s in seeds]
        ok = [100 * r["test_error"] for r in runs.values() if not r["diverged"]]
        mean = f"{statistics.mean(ok):.1f}" if ok else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def steps_table(out_dir, steps: Sequence[int]) -> str:
    """A Markdown table of each run's test error (%) at the evaluations of ``steps`` (the last evaluation at or
    before each step), one row per run and seed under ``out_dir``: how the result depends on the training length."""
    lines = ["| run | seed | " + " | ".join(f"step {t}" for t in steps) + " |", "|---" * (len(steps) + 2) + "|"]
    for path in sorted(Path(out_dir).glob("*-seed*/metrics.jsonl")):
        name, _, seed = path.parent.name.rpartition("-seed")
        epochs = [r for r in read_metrics(path) if r["kind"] == "epoch"]
        cells = []
        for t in steps:
            before = [r for r in epochs if r["step"] <= t]
            cells.append(f"{100 * (1 - before[-1]['accuracy']):.1f}" if before and epochs[-1]["step"] >= t else "-")
        lines.append(f"| {name} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def windows_table(out_dir, key: str, edges: Sequence[int], kind: str = "diag") -> str:
    """A Markdown table of the median of ``key`` in the ``kind`` records (a diagnostic such as
    ``alpha_e_over_alpha`` or ``delta``; or, with ``kind="step"``, the training ``loss``) over the step windows
    ``(edges[i], edges[i + 1]]``, one row per run and seed under ``out_dir``."""
    windows = list(zip(edges[:-1], edges[1:]))
    lines = ["| run | seed | " + " | ".join(f"steps {lo}-{hi}" for lo, hi in windows) + " |",
             "|---" * (len(windows) + 2) + "|"]
    for path in sorted(Path(out_dir).glob("*-seed*/metrics.jsonl")):
        name, _, seed = path.parent.name.rpartition("-seed")
        diags = [r for r in read_metrics(path) if r["kind"] == kind and math.isfinite(r.get(key, math.nan))]
        cells = []
        for lo, hi in windows:
            values = [r[key] for r in diags if lo < r["step"] <= hi]
            cells.append(f"{statistics.median(values):.3g}" if values else "-")
        lines.append(f"| {name} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def collect(out_dir, target_accuracy: float = 0.9) -> List[dict]:
    """:func:`summarize` of every run under ``out_dir`` (``NAME-seedS/metrics.jsonl``, as ``compare`` writes them),
    sorted by name and seed; runs without an ``end`` record (unfinished) are left out."""
    results = []
    for path in sorted(Path(out_dir).glob("*-seed*/metrics.jsonl")):
        name, _, seed = path.parent.name.rpartition("-seed")
        records = read_metrics(path)
        if seed.isdigit() and any(r["kind"] == "end" for r in records):
            results.append(summarize(name, int(seed), records, target_accuracy))
    return sorted(results, key=lambda r: (r["name"], r["seed"]))


def plot(out_dir, names: Sequence[str], seeds: Sequence[int]) -> List[Path]:
    """PNG plots of training loss, test accuracy and alpha_e/alpha against step, one line per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    panels = [("loss.png", "step", "loss", "training loss", True),
              ("accuracy.png", "epoch", "accuracy", "test accuracy (averaged model)", False),
              ("alpha_e.png", "diag", "alpha_e_over_alpha", "effective learning rate alpha_e / alpha", False)]
    colors = {}
    written = []
    for filename, kind, key, title, log in panels:
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = False
        for name, seed in zip(names, seeds):
            path = out_dir / f"{name}-seed{seed}" / "metrics.jsonl"
            recs = [r for r in read_metrics(path) if r["kind"] == kind and key in r]
            if not recs:
                continue
            color = colors.setdefault(name, f"C{len(colors)}")
            ax.plot([r["step"] for r in recs], [r[key] for r in recs], color=color, alpha=0.8, lw=1,
                    label=name if seed == min(s for n, s in zip(names, seeds) if n == name) else None)
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("step")
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / filename, dpi=110)
        plt.close(fig)
        written.append(out_dir / filename)
    return written


def plot_diagnostics(out_dir, names: Sequence[str], seed: int = 0, target=None) -> Path:
    """One figure of the noise diagnostics of ``seed``'s run of each configuration:
    alpha_e / alpha, Delta, Delta^(2) and the consensus distance against step. Written to ``target``
    (default ``out_dir/diagnostics.png``); each run in the paper's colour (:func:`algorithm_color`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    panels = [("alpha_e_over_alpha", "alpha_e / alpha (Eq. 3)", False), ("delta", "Delta: noise strength (Eq. 3)", True),
              ("delta2", "Delta^(2): DPSGD's extra noise (Eq. 4)", True),
              ("consensus_distance", "consensus distance n^-1 sum |w_j - w_a|^2", True)]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    names = list(dict.fromkeys(names))
    # the paper's colours if they tell the runs apart (one run per algorithm), else matplotlib's cycle
    paper = set(names) if len({algorithm_color(n) for n in names}) == len(names) else set()
    for i, name in enumerate(names):
        path = out_dir / f"{name}-seed{seed}" / "metrics.jsonl"
        if not path.exists():
            continue
        recs = [r for r in read_metrics(path) if r["kind"] == "diag"]
        for ax, (key, title, log) in zip(axes.flat, panels):
            points = [(r["step"], r[key]) for r in recs if key in r and (not log or r[key] > 0)]
            if points:
                ax.plot(*zip(*points), color=algorithm_color(name) if name in paper else f"C{i}", lw=1, label=name)
            ax.set_title(title, fontsize=10)
            if log:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    axes.flat[0].legend()
    fig.tight_layout()
    target = Path(target) if target is not None else out_dir / "diagnostics.png"
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


#: The paper's colours (Fig. 2): SSGD red, DPSGD green, SSGD* blue.
_PAPER_COLORS = (("ssgd*", "tab:blue"), ("dpsgd", "tab:green"), ("ssgd", "tab:red"))


def algorithm_color(name: str) -> str:
    """The paper's colour of a run called ``name`` (by its prefix: ``ssgd*...``, ``dpsgd...``, ``ssgd...``)."""
    return next((color for prefix, color in _PAPER_COLORS if name.startswith(prefix)), "tab:gray")


def _fig2_column(axes, out_dir: Path, names: Sequence[str], seed: int, lower_key: str, lower_label: str) -> None:
    for name in names:
        path = out_dir / f"{name}-seed{seed}" / "metrics.jsonl"
        if not path.exists():
            continue
        records = read_metrics(path)
        color = algorithm_color(name)
        steps = [r for r in records if r["kind"] == "step" and "loss" in r and math.isfinite(r["loss"])]
        axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], color=color, lw=0.8, label=name)
        diags = [r for r in records if r["kind"] == "diag" and math.isfinite(r.get(lower_key, math.nan))
                 and (lower_key != "delta" or r[lower_key] > 0)]
        axes[1].plot([r["step"] for r in diags], [r[lower_key] for r in diags], color=color, lw=0.8, label=name)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("training loss L")
    axes[1].set_ylabel(lower_label)
    axes[1].set_xlabel("step t (batches)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)


def plot_figure2(sec21_dir, sec22_dir, out, names21: Sequence[str], names22: Sequence[str], seed: int = 0) -> Path:
    """The paper's Fig. 2 from two ``compare`` outputs, one seed: (a) Sec. 2.1, training loss and
    alpha_e / alpha (Eq. 3) against step; (b) Sec. 2.2, training loss and Delta (Eq. 3). SSGD red, DPSGD green,
    SSGD* blue. The loss is the learners' mean minibatch loss of the step (the ``step`` records)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex="col")
    _fig2_column(axes[:, 0], Path(sec21_dir), names21, seed, "alpha_e_over_alpha", "alpha_e / alpha")
    _fig2_column(axes[:, 1], Path(sec22_dir), names22, seed, "delta", "noise strength Delta")
    axes[1, 1].set_yscale("log")
    axes[0, 0].set_title(f"(a) Sec. 2.1: alpha = 1 (seed {seed})", fontsize=10)
    axes[0, 1].set_title(f"(b) Sec. 2.2: alpha = 0.2 (seed {seed})", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
