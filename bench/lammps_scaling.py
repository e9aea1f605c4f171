"""LAMMPS at scale: `pair_style equiforce` on 1 and 2 MPI ranks with the exchange, ghost-shell and
gather paths side by side, plus 2/4/8/64 ranks by counting.

Cu fcc crystal (bench/lammps_speed.py's `fcc`, jiggled 0.05 Å), the NequIP-size EquiforceModel of
bench/lammps_speed.py (channels 32, lmax 1, 3 layers, r_max 5 Å, random weights, fused CPU ops),
float32 and float64, one torch thread per rank (OMP_NUM_THREADS=1).

* measured: NVE steps/s from LAMMPS' "Loop time" of a timed `run` after a warm-up `run 2`
  (neighbour lists and communication included): 1 rank (serial-images path, the baseline) and
  2 ranks (2x1x1 grid... LAMMPS' own choice) on each of `path exchange`, `path ghost_shell`,
  `path gather`; speed-up = 2-rank steps/s / 1-rank steps/s; Nlocal/Nghost per rank as LAMMPS
  reports them.
* counted (no run): for P ranks on LAMMPS' processor grid (the factorisation with the least
  sub-domain surface), from the atom positions: local atoms per rank; per path the atoms a rank
  holds and the edges (pairs within r_max with a receiver the rank evaluates) it evaluates:
  exchange = local receivers, rows = local + ghosts within r_max of the sub-domain (the plugin
  evaluates the ghosts within r_max of a local atom); ghost shell = every atom LAMMPS holds with
  the ghost cutoff num_layers * r_max + skin (an upper bound of the num_layers-hop set);
  gather = all atoms. Bytes exchanged per step (exchange path, the busiest rank): (L-1) forward +
  (L-1) reverse blocks of d_k float64 per LAMMPS ghost atom (ghost cutoff r_max + skin). Projected parallel efficiency = mean edges per rank /
  max edges evaluated on a rank (per-edge work dominates a step: tensor product and radial MLP;
  communication and per-row transforms of ghost rows are not in it).

Also records the load average before/after and the CPU's vector ISA (lscpu flags). Prints a table
and writes bench/results/lammps_scaling.json (not committed).

    .venv/bin/python bench/lammps_scaling.py [--sizes 4096 32768] [--dtypes float32 float64]
                                             [--paths exchange ghost_shell gather] [--steps N]
"""
import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import lammps_speed  # noqa: E402  (fcc, write_data, export_bench_model)

lammps_speed.CELLS.setdefault(32768, (16, 16, 32))
VENV_BIN = os.path.dirname(sys.executable)
VENV_LIB = os.path.join(os.path.dirname(VENV_BIN), "lib")
R_MAX, SKIN, LAYERS = 5.0, 2.0, 3
DEFAULT_STEPS = {4096: 6, 32768: 2}


def machine() -> dict:
    flags = ""
    try:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        pass
    isa = [f for f in ("avx512f", "avx2", "fma") if re.search(rf"\b{f}\b", flags)]
    model = re.search(r"Model name:\s*(.*)", flags)
    return {"cpu": model.group(1).strip() if model else "?", "isa": isa, "cores": os.cpu_count(),
            "torch": torch.__version__}


def run_lmp(workdir: str, data: str, model: str, nprocs: int, steps: int, path: str, device: str = "cpu") -> dict:
    deck = f"""units metal
atom_style atomic
boundary p p p
read_data {data}
pair_style equiforce device {device} path {path}
pair_coeff * * {model} Cu
neighbor {SKIN} bin
velocity all create 300.0 4928459 mom yes rot yes loop geom
timestep 0.001
fix 1 all nve
thermo {steps}
run 2
run {steps}
"""
    with open(os.path.join(workdir, "in.scaling"), "w") as f:
        f.write(deck)
    cmd = [os.path.join(VENV_BIN, "lmp"), "-in", "in.scaling", "-log", "none", "-echo", "none"]
    if nprocs > 1:
        cmd = [os.path.join(VENV_BIN, "mpirun"), "-np", str(nprocs)] + cmd
    env = dict(os.environ, OMP_NUM_THREADS="1", LD_LIBRARY_PATH=VENV_LIB + ":" + os.environ.get("LD_LIBRARY_PATH", ""))
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=3000)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: " + (proc.stdout + proc.stderr)[-800:]}
    t, _, n = re.findall(r"Loop time of ([0-9.eE+-]+) on (\d+) procs for (\d+) steps", proc.stdout)[-1]
    out = {"steps_per_s": int(n) / float(t), "seconds_per_step": float(t) / int(n), "wall_s": time.time() - t0}
    for key in ("Nlocal", "Nghost"):
        m = re.findall(rf"{key}:\s+([0-9.eE+-]+) ave\s+([0-9.eE+-]+) max\s+([0-9.eE+-]+) min", proc.stdout)
        if m:
            out[key.lower()] = {"ave": float(m[-1][0]), "max": float(m[-1][1]), "min": float(m[-1][2])}
    return out


# ---- counting -----------------------------------------------------------------------------------

def proc_grid(p: int, box: np.ndarray) -> tuple:
    """LAMMPS' default grid: px*py*pz = p with the least sub-domain surface area."""
    best, grid = None, None
    for px in range(1, p + 1):
        if p % px:
            continue
        for py in range(1, p // px + 1):
            if (p // px) % py:
                continue
            pz = p // px // py
            a, b, c = box / np.array([px, py, pz])
            area = a * b + b * c + a * c
            if best is None or area < best - 1e-9:
                best, grid = area, (px, py, pz)
    return grid


def counts(pos: np.ndarray, box: np.ndarray, p: int, layer_dims: List[int]) -> dict:
    """Per-rank atom and edge counts of the three paths (see the module docstring)."""
    from scipy.spatial import cKDTree

    grid = np.array(proc_grid(p, box))
    sub = box / grid
    n = len(pos)
    tree = cKDTree(pos % box, boxsize=box)
    nn = np.array([len(x) - 1 for x in tree.query_ball_point(pos % box, R_MAX)])  # neighbours within r_max
    cell = np.floor((pos % box) / sub).astype(int)
    cell = np.minimum(cell, grid - 1)
    rank = (cell[:, 0] * grid[1] + cell[:, 1]) * grid[2] + cell[:, 2]

    def within(lo, width, euclid=False):
        """atoms (periodic images counted) in the box [lo - width, lo + sub + width) (the region of
        LAMMPS' ghost atoms for a ghost cutoff `width`)"""
        d = (pos % box) - lo
        d = d - np.floor(d / box) * box  # in [0, box)
        # distance outside the interval [0, sub) along each axis, periodic
        out = np.where(d < sub, 0.0, np.minimum(d - sub, box - d))
        if np.any(box < sub + 2 * width):  # a shell wider than the box holds images: count copies
            reps = np.ceil((sub + 2 * width) / box).astype(int)
            tot = 0
            for sh in itertools.product(*[range(-r, r + 1) for r in reps]):
                q = (pos % box) + np.array(sh) * box - lo
                o = np.maximum(np.maximum(-q, q - sub), 0.0)
                dist = np.linalg.norm(o, axis=1) if euclid else np.max(o, axis=1)
                tot += int(np.count_nonzero(dist < width))
            return tot, None
        # LAMMPS' ghost region: the sub-domain widened along each axis; euclid: atoms within
        # `width` of the sub-domain (approximately: of one of its atoms)
        dist = np.linalg.norm(out, axis=1) if euclid else np.max(out, axis=1)
        return int(np.count_nonzero(dist < width)), dist < width

    rows = {"exchange": [], "ghost_shell": [], "gather": []}
    edges = {"exchange": [], "ghost_shell": [], "gather": []}
    local, held = [], []
    for r in range(p):
        c = np.array(np.unravel_index(r, grid))
        lo = c * sub
        mine = rank == r
        local.append(int(mine.sum()))
        ex, _ = within(lo, R_MAX, euclid=True)  # the plugin evaluates ghosts within r_max of a local atom
        held.append(within(lo, R_MAX + SKIN)[0] - int(mine.sum()))  # LAMMPS' ghosts: what the comms move
        gs, mask = within(lo, LAYERS * R_MAX + SKIN)
        rows["exchange"].append(ex)
        edges["exchange"].append(int(nn[mine].sum()))
        rows["ghost_shell"].append(gs)  # periodic images are explicit ghost atoms on this path
        edges["ghost_shell"].append(int(nn[mask].sum()) if mask is not None else int(gs * nn.mean()))
        rows["gather"].append(n)
        edges["gather"].append(int(nn.sum()))
    local = np.array(local)
    total_edges = nn.sum()
    ghosts_ex = np.array(held)
    per_ghost = 2 * sum(layer_dims[1:-1]) * 8  # (L-1) forward + (L-1) reverse, float64
    out = {"grid": [int(g) for g in grid], "local_mean": float(local.mean()), "local_max": int(local.max()),
           "bytes_exchanged_per_step_max": int(ghosts_ex.max() * per_ghost)}
    for path in rows:
        rws, eds = np.array(rows[path]), np.array(edges[path])
        out[path] = {"rows_mean": float(rws.mean()), "rows_per_local": float(rws.mean() / local.mean()),
                     "edges_mean": float(eds.mean()), "edges_per_local_edge": float(eds.mean() / (total_edges / p)),
                     "projected_efficiency": float((total_edges / p) / eds.max())}
    out["exchange"]["updated_per_local"] = 1.0  # receivers are the local atoms
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    ap.add_argument("--paths", nargs="+", default=["exchange", "ghost_shell", "gather"])
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 6 at 4096, 2 at 32768 atoms)")
    ap.add_argument("--count-ranks", type=int, nargs="+", default=[2, 4, 8, 64])
    ap.add_argument("--no-runs", action="store_true", help="counting only")
    ap.add_argument("--device", default="cpu", help="pair_style equiforce device (cuda: every rank on the node's GPUs)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "lammps_scaling.json"))
    args = ap.parse_args(argv)
    info = machine()
    info["device"] = args.device
    info["loadavg_before"] = os.getloadavg()
    results = {"machine": info, "runs": {}, "counts": {}}
    print(f"[scaling] {info}", flush=True)
    tmp = tempfile.mkdtemp(prefix="eqf_scaling_")
    dims = None
    for dtype in args.dtypes:
        model = os.path.join(tmp, f"cu_{dtype}.pt")
        lammps_speed.export_bench_model(model, getattr(torch, dtype))
        if dims is None:
            from equiforce.deploy.export import read_metadata
            dims = read_metadata(model)["layer_dims"]
        if args.no_runs:
            continue
        for n in args.sizes:
            pos, cell = lammps_speed.fcc(n)
            data = os.path.join(tmp, f"cu_{n}.data")
            lammps_speed.write_data(data, pos, cell)
            steps = args.steps or DEFAULT_STEPS.get(n, 4)
            rec = {"1": run_lmp(tmp, data, model, 1, steps, "images", args.device)}
            print(f"[scaling] {dtype} {n} atoms 1 rank images: {rec['1']}", flush=True)
            if "exchange" in args.paths:  # the exchange machinery's own cost, without a second rank
                rec["1 exchange"] = run_lmp(tmp, data, model, 1, steps, "exchange", args.device)
                print(f"[scaling] {dtype} {n} atoms 1 rank exchange: {rec['1 exchange']}", flush=True)
            for path in args.paths:
                rec[f"2 {path}"] = run_lmp(tmp, data, model, 2, steps, path, args.device)
                print(f"[scaling] {dtype} {n} atoms 2 ranks {path}: {rec[f'2 {path}']}", flush=True)
            results["runs"][f"{dtype} {n}"] = rec
    for n in args.sizes:
        pos, cell = lammps_speed.fcc(n)
        for p in args.count_ranks:
            results["counts"][f"{n} {p}"] = counts(pos, np.diag(cell), p, dims)
    info["loadavg_after"] = os.getloadavg()

    print(f"\nLAMMPS scaling, Cu fcc, NequIP-size model, 1 torch thread per rank; load average "
          f"{info['loadavg_before'][0]:.2f} -> {info['loadavg_after'][0]:.2f} on {info['cores']} cores; ISA {info['isa']}")
    if results["runs"]:
        print(f"{'dtype':8} {'atoms':>6} {'1 rank':>9} {'1r exchange':>12} "
              + " ".join(f"{'2r ' + p:>16} {'x':>5}" for p in args.paths))
        for key, rec in results["runs"].items():
            dtype, n = key.split()
            base = rec["1"].get("steps_per_s")
            line = f"{dtype:8} {n:>6} {base if base is None else f'{base:9.3f}'} "
            e1 = rec.get("1 exchange", {}).get("steps_per_s")
            line += f"{'-' if e1 is None else f'{e1:12.3f}'} "
            for p in args.paths:
                r = rec[f"2 {p}"].get("steps_per_s")
                line += f" {'error' if r is None else f'{r:16.3f}'} {'' if r is None or not base else f'{r / base:5.2f}'}"
            print(line)
    print(f"\n{'atoms':>6} {'ranks':>5} {'grid':>9} {'local':>7} " + " ".join(
        f"{p + ' rows/local':>22} {'edges/local':>11} {'eff':>5}" for p in ("exchange", "ghost_shell", "gather"))
        + f" {'MB/step':>8}")
    for key, c in results["counts"].items():
        n, p = key.split()
        line = f"{n:>6} {p:>5} {'x'.join(map(str, c['grid'])):>9} {c['local_mean']:7.0f} "
        for path in ("exchange", "ghost_shell", "gather"):
            d = c[path]
            line += f" {d['rows_per_local']:22.2f} {d['edges_per_local_edge']:11.2f} {d['projected_efficiency']:5.2f}"
        print(line + f" {c['bytes_exchanged_per_step_max'] / 1e6:8.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
