"""Training throughput: structures/s of `equiforce train` with 1 and 2 processes (torch.distributed).

Aspirin-sized molecules: 21 atoms (C9H8O4), a fixed random geometry with no two atoms closer than
1.1 Å inside a 4 x 3 x 1.5 Å ellipsoid, rattled by 0.1 Å per structure, random energy and force
labels (throughput does not depend on the label values). Model: channels 32, lmax 1, 3 layers,
r_max 5 Å, float32 (the NequIP-size model of bench/lammps_speed.py). Every run: `torchrun
--standalone --nproc_per_node P -m equiforce train` with the same global batch, one torch thread
per process (CPU, gloo) or one GPU per process (``--device cuda``, NCCL). Also one process with 2
threads (the other way to use 2 cores).

structures/s = training structures x (epochs - 1) / (time_s of the last epoch - time_s of the
first) from metrics.csv (the first epoch is the warm-up; validation, 5 % of the structures, is
inside the epoch times); the cases alternate for ``--rounds`` rounds and the best rate of each
counts (the least disturbed by other load). speed-up = P-process rate / 1-process rate. Because a
shared machine's load distorts wall-clock rates, the CPU time is measured too (all processes of a
run, minus the CPU time of a 1-epoch run of the same case): CPU ms per structure, and the projected
speed-up P x (CPU per structure of 1 process) / (CPU per structure of P processes), which is what
P free cores would give if no process waited for another. Records the load average
before/after and the CPU's vector ISA. Prints a markdown table, writes bench/results/train_scaling.json.

    .venv/bin/python bench/train_scaling.py [--procs 1 2] [--structures 256] [--epochs 3] [--batch-size 16]
                                            [--device cpu|cuda] [--out PATH]
"""
import argparse
import csv
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SYMBOLS = "C" * 9 + "H" * 8 + "O" * 4


def aspirin_like(rng: np.random.Generator) -> np.ndarray:
    """21 positions [21, 3] (Å) in a 4 x 3 x 1.5 Å ellipsoid, no pair closer than 1.1 Å."""
    pos = []
    while len(pos) < 21:
        p = rng.uniform(-1, 1, 3) * [4.0, 3.0, 1.5]
        if (p / [4.0, 3.0, 1.5]) @ (p / [4.0, 3.0, 1.5]) <= 1 and all(np.linalg.norm(p - q) > 1.1 for q in pos):
            pos.append(p)
    return np.array(pos)


def write_data(path: str, n: int, seed: int = 0) -> None:
    import ase
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    base = aspirin_like(rng)
    frames = []
    for _ in range(n):
        a = ase.Atoms(SYMBOLS, positions=base + rng.normal(scale=0.1, size=base.shape))
        a.calc = SinglePointCalculator(a, energy=float(rng.normal()), forces=rng.normal(size=(21, 3)))
        frames.append(a)
    ase.io.write(path, frames, format="extxyz")


def machine() -> dict:
    import torch

    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if os.path.exists("/usr/bin/lscpu") else ""
    model = re.search(r"Model name:\s*(.*)", flags)
    out = {"cpu": model.group(1).strip() if model else "?", "cores": os.cpu_count(), "torch": torch.__version__,
           "isa": [f for f in ("avx512f", "avx2", "fma") if re.search(rf"\b{f}\b", flags)]}
    if torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(k) for k in range(torch.cuda.device_count())]
    return out


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(data: str, out: str, procs: int, threads: int, args, epochs: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node",
           str(procs), "-m", "equiforce", "train", "--data", data, "--out", out, "--epochs", str(epochs),
           "--batch-size", str(args.batch_size), "--val-fraction", "0.05", "--r-max", "5", "--channels", "32",
           "--lmax", "1", "--layers", "3", "--dtype", "float32", "--device", args.device, "--threads", str(threads),
           "--early-stopping-patience", "0", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0, c0 = time.monotonic(), _children_cpu()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    wall, cpu = time.monotonic() - t0, _children_cpu() - c0
    if res.returncode != 0:
        raise SystemExit(f"train_scaling: {procs} process(es) failed:\n{res.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.csv"), newline="") as fh:
        times = [float(r["time_s"]) for r in csv.DictReader(fh)]
    n_train = int(re.search(r"(\d+) train /", res.stdout).group(1))
    rate = n_train * (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None
    return {"processes": procs, "threads_per_process": threads, "train_structures": n_train,
            "epoch_times_s": times, "structures_per_s": rate, "wall_s": wall, "cpu_s": cpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--structures", type=int, default=256)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="each case this many times, alternating; the best counts")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", default=os.path.join(HERE, "results", "train_scaling.json"))
    args = p.parse_args()
    info = {"machine": machine(), "loadavg_before": os.getloadavg(), "settings": vars(args)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "aspirin_like.extxyz")
        write_data(data, args.structures)
        cases = [(n, 1) for n in args.procs]
        if args.device == "cpu" and 1 in args.procs and (os.cpu_count() or 1) >= 2:
            cases.append((1, 2))
        tries = {case: [] for case in cases}
        # CPU seconds of a 1-epoch run (start-up, first epoch): subtracted to get the CPU per structure
        one_epoch = {case: run(data, os.path.join(tmp, f"run_{case[0]}x{case[1]}_e1"), case[0], case[1], args, 1)
                     for case in cases}
        for k in range(args.rounds):
            for procs, threads in cases:
                r = run(data, os.path.join(tmp, f"run_{procs}x{threads}_{k}"), procs, threads, args, args.epochs)
                r["cpu_ms_per_structure"] = 1e3 * (r["cpu_s"] - one_epoch[(procs, threads)]["cpu_s"]) / (
                    r["train_structures"] * (args.epochs - 1))
                tries[(procs, threads)].append(r)
                print(f"  round {k + 1}: {procs} process(es) x {threads} thread(s): {r['structures_per_s']:.1f} "
                      f"structures/s, {r['cpu_ms_per_structure']:.1f} CPU ms/structure", flush=True)
        for case, runs in tries.items():
            best = max(runs, key=lambda r: r["structures_per_s"])
            rows.append({**best, "all_structures_per_s": [r["structures_per_s"] for r in runs],
                         "cpu_ms_per_structure": min(r["cpu_ms_per_structure"] for r in runs)})
    info["loadavg_after"] = os.getloadavg()
    ref = next((r for r in rows if r["processes"] == 1 and r["threads_per_process"] == 1), None)
    for r in rows:
        r["speedup_vs_1x1"] = r["structures_per_s"] / ref["structures_per_s"] if ref else None
        # if every process had a core of its own and never waited: P x (CPU per structure of 1 process /
        # CPU per structure of P processes together)
        r["projected_speedup"] = (r["processes"] * r["threads_per_process"] * ref["cpu_ms_per_structure"]
                                  / r["cpu_ms_per_structure"]) if ref else None
    info["runs"] = rows
    m = info["machine"]
    print(f"\n{args.structures} aspirin-sized structures (21 atoms), batch {args.batch_size}, channels 32 lmax 1 "
          f"3 layers r_max 5 float32, device {args.device}; load {info['loadavg_before'][0]:.2f} -> "
          f"{info['loadavg_after'][0]:.2f} on {m['cores']} cores; ISA {m['isa']}\n")
    print("| processes x threads | structures/s (best) | all rounds | speed-up vs 1x1 | CPU ms/structure "
          "| projected speed-up on free cores |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['processes']} x {r['threads_per_process']} | {r['structures_per_s']:.1f} | "
              + ", ".join(f"{v:.1f}" for v in r["all_structures_per_s"]) + f" | {r['speedup_vs_1x1']:.2f} | "
              f"{r['cpu_ms_per_structure']:.1f} | {r['projected_speedup']:.2f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(info, fh, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
