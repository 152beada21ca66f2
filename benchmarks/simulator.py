"""The simulator's speed and scale, measured side by side in one run: ``python benchmarks/simulator.py``.

Wrap it in ``flock /tmp/mpi.lock`` on a shared machine. Two parts:

1. **The Sec. 2.1 run** (n = 5 learners, nB = 2000, the 784-50-50-10 MLP on the bundled MNIST sample, full
   averaging, plain SGD): ``horovod-dpsgd train`` through ``horovodrun -np 5`` against ``train --engine sim
   --np 5`` (with 1 and with 2 torch threads), the same configuration. Each engine runs ``--steps`` steps and a
   short run of ``--short`` steps, one after the other, ``--repeat`` times; the ratios are of wall times (what a
   user waits for, start-up included) and of the time per step without start-up ((long - short) / (steps -
   short)), per repetition.
2. **Scale**: n learners of the same MLP at nB = 2000 (B = 2000 // n) in one process (``--scale-threads``
   torch threads), for each ``--sizes`` and topology: steps/s (training steps with real data, the plugin's optimizer, mixing), the share of mixing, the
   peak resident memory of the process and the bytes of the stacked parameters, gradients and momentum.

Writes everything to ``benchmarks/results/simulator.json`` (``--out``).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from horovod_dpsgd.experiments.launch import horovodrun_command, horovodrun_env  # noqa: E402

CLI = ["-m", "horovod_dpsgd.experiments.cli", "train"]


def sec21_command(engine: str, steps: int, lr: float, out: Path):
    """The command and environment of the Sec. 2.1 run on ``engine``: ``mpi`` (horovodrun -np 5) or ``sim:T`` (the
    simulator with T torch threads)."""
    args = [*CLI, "--batch-size", "400", "--lr", str(lr), "--topology", "full", "--algorithm", "dpsgd",
            "--max-steps", str(steps), "--epochs", "100000", "--log-every", "100", "--eval-every", "500", "--quiet",
            "--metrics-file", str(out)]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    if engine == "mpi":
        return horovodrun_command(5, args), horovodrun_env(5, env)
    return [sys.executable, *args, "--engine", "sim", "--np", "5"], {**env, "OMP_NUM_THREADS": engine.split(":")[1]}


def timed(engine: str, steps: int, lr: float, out: Path) -> float:
    cmd, env = sec21_command(engine, steps, lr, out)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=7200)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}")
    end = json.loads(out.read_text().splitlines()[-1])
    if end["kind"] != "end" or end["steps"] != steps or end["diverged"]:
        raise SystemExit(f"{engine}: the run did not complete {steps} steps: {end}")
    return elapsed


def sec21(args) -> dict:
    """Each repetition runs every engine, long and short, one after the other (the same noise for all)."""
    rows = []
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    engines = ["mpi"] + [f"sim:{t}" for t in args.sim_threads]
    for rep in range(args.repeat):
        row = {}
        for engine in engines:
            for steps in (args.short, args.steps):
                row[f"{engine} {steps}"] = t = timed(engine, steps, args.lr, tmp / f"{engine}-{steps}.jsonl")
                print(f"  repetition {rep + 1}: {engine} {steps} steps {t:.1f} s", flush=True)
            row[f"{engine} per step"] = (row[f"{engine} {args.steps}"] - row[f"{engine} {args.short}"]) / \
                (args.steps - args.short)
        rows.append(row)
    ratios = {}
    for engine in engines[1:]:
        wall = [r[f"mpi {args.steps}"] / r[f"{engine} {args.steps}"] for r in rows]
        per_step = [r["mpi per step"] / r[f"{engine} per step"] for r in rows]
        ratios[engine] = {"wall": wall, "wall_median": statistics.median(wall), "per_step": per_step,
                          "per_step_median": statistics.median(per_step)}
    return {"repetitions": rows, "ratios": ratios,
            "commands": {e: " ".join(sec21_command(e, args.steps, args.lr, Path("METRICS.jsonl"))[0])
                         for e in engines}}


SCALE_SCRIPT = r"""
import json, resource, sys, time
import torch, torch.nn.functional as F
from horovod_dpsgd import sim
from horovod_dpsgd.experiments.data import mnist_sample
from horovod_dpsgd.experiments.models import get_model
n, topology, steps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
B = max(1, 2000 // n)
train_set, _ = mnist_sample()
x_all, y_all = train_set.tensors
def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
rss_before = rss_mib()
torch.manual_seed(0)
learners = sim.Learners(get_model("mlp"), n)
opt = sim.DistributedOptimizer(torch.optim.SGD(learners.parameters(), lr=0.1, momentum=0.9), learners,
                               topology=topology, seed=0)
g = torch.Generator().manual_seed(0)
mixing = [0.0]
finish = sim.StackedAverager.finish
def timed_finish(self):
    t = time.perf_counter(); finish(self); mixing[0] += time.perf_counter() - t
sim.StackedAverager.finish = timed_finish
def step():
    idx = torch.randint(0, len(x_all), (n, B), generator=g)
    opt.zero_grad()
    learners.losses(F.cross_entropy, learners(x_all[idx]), y_all[idx]).sum().backward()
    opt.step()
for _ in range(3):
    step()
mixing[0] = 0.0
t = time.perf_counter()
for _ in range(steps):
    step()
elapsed = time.perf_counter() - t
stacked = sum(p.numel() * p.element_size() for p in learners.parameters())
print(json.dumps({"n": n, "batch": B, "topology": topology, "steps_per_s": steps / elapsed,
                  "mixing_share": mixing[0] / elapsed, "mixing_kind": opt._averager.matrix(0).kind,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_before_learners_mib": rss_before, "rss_growth_mib": rss_mib() - rss_before,
                  "stacked_params_mib": stacked / 2**20,
                  "params_grads_momentum_mib": 3 * stacked / 2**20, "threads": torch.get_num_threads()}))
"""


def scale(args) -> list:
    rows = []
    for n in args.sizes:
        for topology in args.topologies:
            steps = max(5, min(50, 4000 // n))
            env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": str(args.scale_threads)}
            proc = subprocess.run([sys.executable, "-c", SCALE_SCRIPT, str(n), topology, str(steps)], cwd=HERE.parent,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=3600)
            if proc.returncode != 0:
                raise SystemExit(f"n={n} {topology} failed:\n{proc.stdout[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  n={n:4d} B={r['batch']:4d} {topology:12s} {r['steps_per_s']:7.2f} steps/s  mixing "
                  f"{100 * r['mixing_share']:4.1f}% ({r['mixing_kind']})  RSS +{r['rss_growth_mib']:4.0f} MiB over "
                  f"{r['rss_before_learners_mib']:.0f} (peak {r['peak_rss_mib']:.0f})  "
                  f"params+grads+momentum {r['params_grads_momentum_mib']:6.1f} MiB", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="steps of the Sec. 2.1 run")
    parser.add_argument("--short", type=int, default=100, help="steps of the short run (start-up estimate)")
    parser.add_argument("--repeat", type=int, default=2, help="repetitions of the Sec. 2.1 pair")
    parser.add_argument("--lr", type=float, default=0.3, help="learning rate of the Sec. 2.1 run (see the docs)")
    parser.add_argument("--sim-threads", type=int, nargs="*", default=[1, 2], help="torch threads of the simulator")
    parser.add_argument("--sizes", type=int, nargs="*", default=[5, 16, 64, 256])
    parser.add_argument("--topologies", nargs="*", default=["full", "ring", "random_peer", "exponential"])
    parser.add_argument("--scale-threads", type=int, default=1, help="torch threads of the scale runs")
    parser.add_argument("--skip-sec21", action="store_true")
    parser.add_argument("--tmp", default="/tmp/horovod-dpsgd-simulator-bench")
    parser.add_argument("--out", default=str(HERE / "results" / "simulator.json"))
    args = parser.parse_args()
    import torch
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads(), "load_before": os.getloadavg()},
              "command": " ".join([sys.executable, *sys.argv])}
    if not args.skip_sec21:
        print(f"Sec. 2.1 run, {args.steps} and {args.short} steps, horovodrun -np 5 vs --engine sim --np 5:",
              flush=True)
        result["sec21"] = s = sec21(args)
        for engine, r in s["ratios"].items():
            print(f"horovodrun -np 5 / simulator ({engine.split(':')[1]} threads): wall time with start-up "
                  f"{r['wall_median']:.2f}x (per repetition {', '.join(f'{x:.2f}' for x in r['wall'])}); time per "
                  f"step without start-up {r['per_step_median']:.2f}x ({', '.join(f'{x:.2f}' for x in r['per_step'])})",
                  flush=True)
    print("Scale: n learners of the MLP at nB = 2000 in one process:", flush=True)
    result["scale"] = scale(args)
    result["machine"]["load_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
