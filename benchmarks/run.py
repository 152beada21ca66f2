"""Run the benchmark suite: ``python benchmarks/run.py`` (or ``make bench``).

Launches ``benchmarks/step_time.py`` under horovodrun for each world size, then prints the
step-time ratios to Horovod's SSGD, the exchange efficiency against raw mpi4py Sendrecv and
hvd.allreduce of the same bytes, the overlap and the diagnostics overhead, and checks the
targets. Writes everything to ``benchmarks/results/<name>.json``.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from horovod_dpsgd.launch import horovodrun_command, horovodrun_env  # noqa: E402
TARGETS = {  # figure (or the start of its name) -> (limit, "max" | "min")
    "dpsgd_random_peer / horovod_ssgd": (1.0, "max"),
    "dpsgd_random_peer / horovod_ssgd (25M model)": (0.8, "max"),
    "plugin_ssgd / horovod_ssgd": (1.02, "max"),
    "transfer efficiency vs raw Sendrecv": (0.8, "min"),
    "diagnostics every 50 steps overhead": (0.05, "max"),
}


DIAG_VARIANTS = {"dpsgd_diag50": "diagnostics every 50 steps overhead",
                 "dpsgd_diag50_reuse_grad": "diagnostics every 50 steps overhead (reuse_grad)"}


def launch(np_, args, out):
    cmd = horovodrun_command(np_, [str(HERE / "step_time.py"), "--out", str(out), *args])
    env = horovodrun_env(np_)
    print("$", " ".join(cmd), f"(OMPI_MCA_mpi_yield_when_idle={env.get('OMPI_MCA_mpi_yield_when_idle', '-')})",
          flush=True)
    subprocess.run(cmd, check=True, timeout=3600, cwd=HERE.parent, env=env)
    return json.loads(out.read_text())


def rows(result):
    n = result["size"]
    for name, m in result["models"].items():
        s = m["step_s"]
        base = s.get("horovod_ssgd")
        row = {"n": n, "model": name, "params_M": m["params"] / 1e6, "horovod_ssgd_ms": 1e3 * base}
        for v in ("plugin_ssgd", "dpsgd_random_peer", "dpsgd_ring", "dpsgd_random_peer_inline"):
            if v in s:
                row[f"{v} / horovod_ssgd"] = s[v] / base
        if "local_no_comm" in s and "dpsgd_random_peer" in s:
            row["dpsgd_random_peer / local_no_comm"] = s["dpsgd_random_peer"] / s["local_no_comm"]
        row.update(m.get("diagnostics", {}))
        e = m.get("exchange_s")
        if e:
            row["transfer efficiency vs raw Sendrecv"] = e["raw_sendrecv"] / e["plugin_transfer"]
            row["exchange efficiency vs raw Sendrecv"] = e["raw_sendrecv"] / e["plugin_mix"]
            row["exchange / hvd.allreduce"] = e["plugin_mix"] / e["hvd_allreduce"]
            row["exchange_ms"] = 1e3 * e["plugin_mix"]
        yield row


def check(row):
    out = []
    for key, (limit, kind) in TARGETS.items():
        prefix = key.replace(" (25M model)", "")
        if ("25M" in key) != (row["params_M"] > 20):
            continue
        for figure in (k for k in row if k.startswith(prefix)):
            value = row[figure]
            ok = value <= limit if kind == "max" else value >= limit
            out.append(f"{figure}: {value:.3f} ({'meets' if ok else 'MISSES'} {'<=' if kind == 'max' else '>='} {limit})")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="2,4")
    parser.add_argument("--name", default="latest")
    parser.add_argument("--diag-models", default="mlp1m,resnet18",
                        help="models for the diagnostics-overhead pass (50-step repetitions, so each holds one "
                             "diagnostic step at every=50); empty to skip")
    parser.add_argument("--diag-batch-sizes", default="8,64", help="per-learner batch sizes of the diagnostics pass")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to step_time.py after --")
    args = parser.parse_args()
    extra = [a for a in args.bench_args if a != "--"]
    (HERE / "results").mkdir(exist_ok=True)
    results = []
    for np_ in [int(x) for x in args.sizes.split(",")]:
        result = launch(np_, extra, HERE / "results" / f"{args.name}-np{np_}.json")
        for batch in (args.diag_batch_sizes.split(",") if args.diag_models else []):
            diag = launch(np_, ["--models", args.diag_models, "--variants", ",".join(DIAG_VARIANTS),
                                "--batch-size", batch, "--steps", "50", "--warmup", "3", "--reps", "5"],
                          HERE / "results" / f"{args.name}-diag-b{batch}-np{np_}.json")
            for model, entry in diag["models"].items():
                figures = result["models"][model].setdefault("diagnostics", {})
                for variant, name in DIAG_VARIANTS.items():
                    figures[f"{name}, batch {batch}"] = entry["diagnostics_overhead"][variant]
        results.append(result)
    table = [row for r in results for row in rows(r)]
    meta = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(), "command": " ".join(sys.argv)}
    curves = {r["size"]: r.get("sendrecv_curve") for r in results}
    (HERE / "results" / f"{args.name}.json").write_text(
        json.dumps({"meta": meta, "rows": table, "sendrecv_curve": curves}, indent=1))
    keys = ["n", "model", "params_M", "horovod_ssgd_ms", "plugin_ssgd / horovod_ssgd",
            "dpsgd_random_peer / horovod_ssgd", "dpsgd_ring / horovod_ssgd", "dpsgd_random_peer / local_no_comm",
            "exchange_ms", "transfer efficiency vs raw Sendrecv", "exchange efficiency vs raw Sendrecv",
            "exchange / hvd.allreduce"]
    keys = [k for k in keys if any(k in r for r in table)]
    keys += sorted({k for r in table for k in r if k.startswith("diagnostics")})
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in table:
        print("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys)
              + " |")
    print("\nTargets:")
    for r in table:
        for line in check(r):
            print(f"  n={r['n']} {r['model']}: {line}")


if __name__ == "__main__":
    main()
