"""Long-range electrostatics at scale: time per energy + forces vs N for the mesh sum (long_range: pme),
the Ewald sum (long_range: ewald) and the short-range model alone (issue 14).

    python bench/longrange.py                         # 1000, 8000, 64000 atoms; LAMMPS 1 vs 2 ranks at 8000
    python bench/longrange.py --sizes 1000,8000 --no-lammps
    python bench/longrange.py --lammps-only --lammps-size 8000

System: rattled rock salt (NaCl, a = 5.64 Å, 8 atoms per cubic cell, N = 8 n^3), float64, one
thread (``--threads``). Models: the default ``ModelConfig`` (channels 32, lmax 2, 3 layers, r_max 5 Å)
with random weights, exported (``equiforce export`` path, fused kernels) as

* ``short-range``: long_range none;
* ``pme model``: long_range pme (accuracy 1e-4, real-space cutoff ``--cutoff`` Å): short range +
  learned charges + mesh electrostatics, forces with the charge-response term;
* ``pme alone`` / ``ewald alone``: the electrostatics of fixed charges ±1 e (energy + autograd
  forces), scripted: :class:`equiforce.nn.mesh_electrostatics.MeshEwald` and
  :func:`equiforce.nn.electrostatics.ewald_per_atom` (accuracy 1e-6, its default). Ewald is skipped
  where its [N, K] phase matrix would exceed ``--ewald-max-entries`` (memory), and says so.

Each figure is the median of ``--repeats`` calls after two warm-up calls. The log-log slope between
consecutive sizes is printed. LAMMPS: the pme model file on 1 rank (serial images path) and 2 ranks
(gather path: every rank evaluates the whole system), seconds per MD step from LAMMPS' loop time.
Writes ``bench/results/longrange.json`` and prints markdown tables with the load average and ISA.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def rocksalt(n_atoms: int, a: float = 5.64, rattle: float = 0.1, seed: int = 0):
    nrep = max(1, round((n_atoms / 8) ** (1 / 3)))
    base = np.array([[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0]])
    cellpos = np.vstack([base, base + [.5, 0, 0]])
    grid = np.array(np.meshgrid(*[range(nrep)] * 3, indexing="ij")).reshape(3, -1).T
    pos = (cellpos[None] + grid[:, None]).reshape(-1, 3) * a
    pos = pos + np.random.default_rng(seed).normal(size=pos.shape) * rattle
    species = np.tile([0] * 4 + [1] * 4, len(grid))
    cell = np.eye(3) * a * nrep
    frac = pos @ np.linalg.inv(cell)
    return (frac - np.floor(frac)) @ cell, species, cell


def machine_info():
    sys.path.insert(0, str(HERE))
    from neighbors import cpu_info

    return {"load_average": os.getloadavg(), "isa": cpu_info()["isa"], "cpus": os.cpu_count(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def timed(fn, repeats):
    for _ in range(2):  # warm-up: TorchScript's profiling executor optimises the graph after two runs
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def export(long_range, path, cutoff):
    from equiforce.deploy.export import export_model
    from equiforce.model.network import EquiforceModel, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(long_range=long_range, long_range_cutoff=cutoff) if long_range != "none" else ModelConfig()
    model = EquiforceModel(cfg, ["Na", "Cl"]).to(torch.float64)
    export_model(model.for_export(), path, dtype=torch.float64, symmetry="O3")
    return path


def run_python(args, results, workdir):
    from equiforce.data.neighbors import neighbor_list
    from equiforce.deploy.export import load_exported
    from equiforce.nn.electrostatics import _kvector_indices, ewald_parameters, ewald_per_atom
    from equiforce.nn.mesh_electrostatics import MeshEwald

    files = {name: export(lr, os.path.join(workdir, name + ".pt"), args.cutoff)
             for name, lr in (("short-range", "none"), ("pme model", "pme")) if name in args.only}
    modules = {name: load_exported(p)[0] for name, p in files.items()}
    mesh = torch.jit.script(MeshEwald("pme", args.accuracy, args.cutoff))
    ewald_acc = 1e-6
    for n in args.sizes:
        pos, species, cell = rocksalt(n)
        n = len(pos)
        p, c = torch.tensor(pos), torch.tensor(cell)
        ei, es, _ = neighbor_list(p, 5.0, c, torch.tensor([True] * 3))
        sp = torch.tensor(species)
        q = torch.tensor(np.where(species == 0, 1.0, -1.0))
        row = {"atoms": n}
        for name, module in modules.items():
            row[name] = timed(lambda: module(p, sp, ei, es, c, n), args.repeats)
            print(f"  {n} atoms {name}: {row[name]:.3f} s", flush=True)

        def electrostatics(fn):
            x = p.clone().requires_grad_(True)
            e = fn(x, q, c).sum()
            return torch.autograd.grad(e, x)[0]

        if "pme alone" in args.only:
            row["pme alone"] = timed(lambda: electrostatics(mesh), args.repeats)
            print(f"  {n} atoms pme alone: {row['pme alone']:.3f} s", flush=True)
        _, k_cut = ewald_parameters(ewald_acc, args.cutoff)
        k = int(_kvector_indices(c, k_cut).shape[0])
        if "ewald alone" not in args.only:
            pass
        elif n * k <= args.ewald_max_entries:
            row["ewald alone"] = timed(lambda: electrostatics(
                lambda x, qq, cc: ewald_per_atom(x, qq, cc, ewald_acc, args.cutoff)), args.repeats)
            print(f"  {n} atoms ewald alone ({k} k-vectors): {row['ewald alone']:.3f} s", flush=True)
        else:
            row["ewald alone"] = None
            row["ewald skipped"] = f"N x K = {n} x {k} phase entries > {args.ewald_max_entries:.0e} (memory)"
            print(f"  {n} atoms ewald alone: skipped ({row['ewald skipped']})", flush=True)
        results["python"].append(row)


def run_lammps(args, results, workdir):
    sys.path.insert(0, str(REPO / "tests"))
    from lammps_util import Structure, write_data

    path = export("pme", os.path.join(workdir, "lmp_pme.pt"), args.cutoff)
    pos, species, cell = rocksalt(args.lammps_size)
    s = Structure(positions=pos, symbols=[["Na", "Cl"][k] for k in species], cell=cell, pbc=True)
    data = os.path.join(workdir, "lmp.data")
    write_data(data, s, ["Na", "Cl"])
    deck = "\n".join([
        "units metal", "atom_style atomic", "atom_modify map hash", "boundary p p p", f"read_data {data}",
        "pair_style equiforce device cpu", f"pair_coeff * * {path} Na Cl",
        "velocity all create 300.0 4928459 loop geom", "timestep 0.001", "fix nve all nve",
        "thermo 1", f"run {args.lammps_steps}"]) + "\n"
    deck_path = os.path.join(workdir, "in.bench")
    with open(deck_path, "w") as f:
        f.write(deck)
    venv = Path(sys.executable).parent
    env = dict(os.environ, OMP_NUM_THREADS="1",
               LD_LIBRARY_PATH=str(venv.parent / "lib") + ":" + os.environ.get("LD_LIBRARY_PATH", ""))
    for ranks in (1, 2):
        cmd = [str(venv / "lmp"), "-in", deck_path, "-log", "none"]
        if ranks > 1:
            cmd = [str(venv / "mpirun"), "-np", str(ranks)] + cmd
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=3000)
        loop = [line for line in proc.stdout.splitlines() if line.startswith("Loop time")]
        if proc.returncode != 0 or not loop:
            results["lammps"][str(ranks)] = {"error": (proc.stdout + proc.stderr)[-1500:]}
            print(f"  LAMMPS {ranks} rank(s): failed\n{(proc.stdout + proc.stderr)[-1500:]}", flush=True)
            continue
        seconds = float(loop[-1].split()[3]) / args.lammps_steps
        results["lammps"][str(ranks)] = {"seconds_per_step": seconds, "atoms": len(pos)}
        print(f"  LAMMPS {ranks} rank(s), {len(pos)} atoms: {seconds:.2f} s/step", flush=True)


def slope(rows, key):
    out = []
    for a, b in zip(rows, rows[1:]):
        if a.get(key) and b.get(key):
            out.append(f"{math.log(b[key] / a[key]) / math.log(b['atoms'] / a['atoms']):.2f}")
        else:
            out.append("-")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,8000,64000")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cutoff", type=float, default=8.0, help="real-space cutoff of the electrostatics (Å)")
    ap.add_argument("--accuracy", type=float, default=1e-4)
    ap.add_argument("--ewald-max-entries", type=float, default=5e7)
    ap.add_argument("--only", default="short-range,pme model,pme alone,ewald alone",
                    help="comma-separated subset of the timings (the 64000-atom short-range model needs > 12 GB)")
    ap.add_argument("--no-lammps", action="store_true")
    ap.add_argument("--lammps-only", action="store_true")
    ap.add_argument("--lammps-size", type=int, default=8000)
    ap.add_argument("--lammps-steps", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "longrange.json"))
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.only = [s.strip() for s in args.only.split(",")]
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    results = {"machine_start": machine_info(), "settings": {k: v for k, v in vars(args).items()},
               "python": [], "lammps": {}}
    with tempfile.TemporaryDirectory() as workdir:
        if not args.lammps_only:
            run_python(args, results, workdir)
        if not args.no_lammps:
            run_lammps(args, results, workdir)
    results["machine_end"] = machine_info()
    m0, m1 = results["machine_start"], results["machine_end"]
    print(f"\nload average {m0['load_average'][0]:.2f} -> {m1['load_average'][0]:.2f} (1 min), ISA {m0['isa']}, "
          f"{args.threads} thread(s), float64, torch {m0['torch']}")
    rows = results["python"]
    if rows:
        keys = ["short-range", "pme model", "pme alone", "ewald alone"]
        print("\n| atoms | " + " | ".join(k + " (s)" for k in keys) + " | pme model - short-range (s) |")
        print("|---" * (len(keys) + 2) + "|")
        for r in rows:
            cells = [f"{r[k]:.3f}" if r.get(k) else "-" for k in keys]
            diff = f"{r['pme model'] - r['short-range']:.3f}" if r.get("pme model") and r.get("short-range") else "-"
            print(f"| {r['atoms']} | " + " | ".join(cells) + f" | {diff} |")
        print("\nlog-log slope between consecutive sizes:")
        for k in keys:
            print(f"  {k}: {', '.join(slope(rows, k))}")
    if results["lammps"]:
        one, two = results["lammps"].get("1", {}), results["lammps"].get("2", {})
        if "seconds_per_step" in one and "seconds_per_step" in two:
            print(f"\nLAMMPS pme model, {one['atoms']} atoms: 1 rank {one['seconds_per_step']:.2f} s/step, "
                  f"2 ranks (gather) {two['seconds_per_step']:.2f} s/step, "
                  f"speed-up {one['seconds_per_step'] / two['seconds_per_step']:.2f}x")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
