"""Peak resident memory of training from a graph store (equiforce preprocess) against its size.

Synthetic stores of N aspirin-sized molecules (21 atoms C9H8O4, bench/train_scaling.py's geometry
rattled by 0.1 Å, edges within r_max = 5 Å from the positions, random labels), written with
:class:`equiforce.data.graphstore.GraphStoreWriter`. For each size, in fresh processes:

* loader: one epoch of shuffled batches of 16 (``GraphSubset`` + ``collate``, the trainer's path)
  with the default cap (256 MiB) and a 64 MiB cap; peak RSS growth = VmHWM - RSS before the epoch
  (VmHWM reset through /proc/self/clear_refs), and microseconds per structure read;
* trainer: `equiforce train --data STORE --epochs 1 --max-minutes M` (setup statistics over every
  training structure, then training until the time limit; channels 16, lmax 1, 2 layers, float32);
  peak RSS = the process's ru_maxrss; for ``--in-memory-sizes`` also the same structures from an
  extxyz file (read into memory, the route without a store).

Prints a markdown table with the load average and the CPU's vector ISA, writes
bench/results/graphstore_rss.json. The stores are written to a temporary directory (about 1.1 GB
for 100 000 structures) and removed afterwards.

    .venv/bin/python bench/graphstore_rss.py [--sizes 10000 100000] [--train-minutes 0.3]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from train_scaling import SYMBOLS, aspirin_like, machine, write_data  # noqa: E402

LOADER = r"""
import json, os, sys, time
import numpy as np
from equiforce.data.dataset import collate
from equiforce.data.graphstore import GraphStore, GraphSubset

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

path, cap = sys.argv[1], float(sys.argv[2])
store = GraphStore(path, max_resident_mb=cap)
sub = GraphSubset(store, np.random.default_rng(0).permutation(len(store)))
collate([sub[i] for i in range(16)]); store.release()
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
base = status("VmRSS")
t0 = time.perf_counter()
for s in range(0, len(sub), 16):
    collate([sub[i] for i in range(s, min(s + 16, len(sub)))])
dt = time.perf_counter() - t0
print(json.dumps({"peak_growth_bytes": status("VmHWM") - base, "us_per_structure": 1e6 * dt / len(sub),
                  "base_rss_bytes": base}))
"""


def write_store(path: str, n: int, seed: int = 0) -> None:
    from ase.data import atomic_numbers

    from equiforce.data.graphstore import GraphStoreWriter

    rng = np.random.default_rng(seed)
    base = aspirin_like(rng)
    numbers = np.array([atomic_numbers[s] for s in SYMBOLS])
    keys = {k: k for k in ("energy", "forces", "stress", "dipole", "charge")}
    w = GraphStoreWriter(path, 5.0, keys)
    for _ in range(n):
        pos = base + rng.normal(scale=0.1, size=base.shape)
        d = np.linalg.norm(pos[None] - pos[:, None], axis=-1)
        i, j = np.nonzero((d < 5.0) & ~np.eye(21, dtype=bool))
        w.add({"pos": pos, "forces": rng.normal(size=(21, 3)), "edge_index": np.stack([i, j]),
               "edge_shift": np.zeros((len(i), 3)), "cell": np.zeros((3, 3)), "pbc": np.zeros(3, bool),
               "energy": float(rng.normal()), "stress": np.zeros((3, 3)), "has_stress": False, "dipole": np.zeros(3),
               "has_dipole": False, "total_charge": 0.0}, numbers)
    w.close()


def store_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def trainer_peak(store: str, out: str, minutes: float, cap: float) -> dict:
    wrapper = ("import resource, sys; from equiforce.cli import main; rc = main(sys.argv[1:]); "
               "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")
    cmd = [sys.executable, "-c", wrapper, "train", "--data", store, "--out", out, "--epochs", "1",
           "--max-minutes", str(minutes), "--r-max", "5", "--channels", "16", "--lmax", "1", "--layers", "2",
           "--batch-size", "16", "--threads", "1", "--val-fraction", "0.001", "--max-data-mb", str(cap),
           "--no-progress"]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if res.returncode != 0:
        raise SystemExit(f"graphstore_rss: training failed:\n{res.stderr[-3000:]}")
    peak = int(res.stderr.split("PEAK_KB")[-1].split()[0]) * 1024
    steps = res.stdout.count("epoch ")
    return {"peak_rss_bytes": peak, "wall_s": time.monotonic() - t0, "log": res.stdout[-500:], "epochs_logged": steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    p.add_argument("--caps", type=float, nargs="+", default=[256.0, 64.0])
    p.add_argument("--train-minutes", type=float, default=0.3)
    p.add_argument("--in-memory-sizes", type=int, nargs="*", default=[10000],
                   help="also train from an extxyz file of these sizes (the whole data set in memory)")
    p.add_argument("--tmp", default=None, help="directory for the stores (default: the system's temporary one)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "graphstore_rss.json"))
    args = p.parse_args()
    info = {"machine": machine(), "loadavg_before": os.getloadavg(), "settings": vars(args), "rows": []}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for n in args.sizes:
            path = os.path.join(tmp, f"aspirin_{n}.eqd")
            t0 = time.monotonic()
            write_store(path, n)
            row = {"structures": n, "store_bytes": store_bytes(path), "write_s": time.monotonic() - t0, "loader": {}}
            for cap in args.caps:
                res = subprocess.run([sys.executable, "-c", LOADER, path, str(cap)], capture_output=True, text=True,
                                     env=dict(os.environ, OMP_NUM_THREADS="1"))
                if res.returncode != 0:
                    raise SystemExit(f"graphstore_rss: loader failed:\n{res.stderr[-3000:]}")
                row["loader"][str(cap)] = json.loads(res.stdout.strip().splitlines()[-1])
            row["trainer"] = trainer_peak(path, os.path.join(tmp, f"run_{n}"), args.train_minutes, args.caps[0])
            if n in args.in_memory_sizes:
                xyz = os.path.join(tmp, f"aspirin_{n}.extxyz")
                write_data(xyz, n)  # the same structures as write_store (same random stream)
                row["extxyz_bytes"] = os.path.getsize(xyz)
                row["trainer_in_memory"] = trainer_peak(xyz, os.path.join(tmp, f"run_mem_{n}"), args.train_minutes,
                                                        args.caps[0])
                os.remove(xyz)
            info["rows"].append(row)
            print(f"  {n} structures: {row['store_bytes'] / 2**20:.0f} MiB written in {row['write_s']:.0f} s", flush=True)
            import shutil
            shutil.rmtree(path)
    info["loadavg_after"] = os.getloadavg()
    m, mib = info["machine"], 2 ** 20
    print(f"\nload {info['loadavg_before'][0]:.2f} -> {info['loadavg_after'][0]:.2f} on {m['cores']} cores; "
          f"ISA {m['isa']}\n")
    caps = [str(c) for c in args.caps]
    print("| structures | store on disk (MiB) | " + " | ".join(f"epoch peak RSS growth, cap {float(c):g} MiB" for c in caps)
          + " | read µs/structure | trainer peak RSS, store (MiB) | trainer peak RSS, extxyz in memory (MiB) |")
    print("|---|---|" + "---|" * len(caps) + "---|---|---|")
    for r in info["rows"]:
        print(f"| {r['structures']} | {r['store_bytes'] / mib:.0f} | "
              + " | ".join(f"{r['loader'][c]['peak_growth_bytes'] / mib:.1f}" for c in caps)
              + f" | {r['loader'][caps[0]]['us_per_structure']:.0f} | {r['trainer']['peak_rss_bytes'] / mib:.0f} | "
              + (f"{r['trainer_in_memory']['peak_rss_bytes'] / mib:.0f} |" if "trainer_in_memory" in r else "- |"))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(info, fh, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
