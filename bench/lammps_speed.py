"""Speed of `pair_style equiforce` in `lmp` against the bare exported model called from Python.

For fcc Cu-like crystals of 64, 512 and 4096 atoms and a learned EquiforceModel of NequIP-like
size (channels 32, lmax 1, 3 layers, r_max 5 Å, random weights), float32 and float64:

* `lmp` NVE steps/s and atom-steps/s (LAMMPS' own "Loop time" of a timed `run` after a warm-up
  `run`; neighbour-list rebuilds and communication included) on 1 MPI rank (serial-images path)
  and 2 MPI ranks (ghost-shell path, every rank evaluates its atoms plus the ghost atoms within
  the receptive field 3 x 5 Å + skin) and 2 MPI ranks on the gather path (`path gather`: every
  rank evaluates the whole gathered system), and for 64 atoms 1 rank with `path ghost_shell` (the
  cost before the serial-images path existed);
* OpenMM (CPU platform, 1 thread) steps/s with the same file through `equiforce.openmm.create_force`
  (VerletIntegrator, 1 fs; the TorchForce module does unit conversion and its own Verlet-list
  neighbour search), in a subprocess;
* the Python exported module's energy+forces+virial call on the same structure (neighbour list
  built outside the timer; median of repeated calls after a warm-up).

`overhead np1` / `overhead omm` = Python time per evaluation x engine steps/s (1.0 = no overhead;
an engine step also integrates, searches neighbours and copies data, so 0.95 means the engine
boundary costs 5 %).

Every process runs one torch thread (OMP_NUM_THREADS=1): 1 rank uses 1 core, 2 ranks 2 cores.
All three run the file the same way: TorchScript graph optimiser off (as the C++ runtime) and
glibc malloc tuned (`equiforce.deploy.allocator.tune_malloc`, which the plugin applies itself).
Prints a table and writes bench/results/lammps_speed.json.

    .venv/bin/python bench/lammps_speed.py [--quick] [--sizes 64 512] [--dtypes float64]
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
VENV_BIN = os.path.dirname(sys.executable)
VENV_LIB = os.path.join(os.path.dirname(VENV_BIN), "lib")
CELLS = {64: (2, 2, 4), 512: (4, 4, 8), 4096: (8, 8, 16)}  # fcc conventional cells per axis
A_CU = 3.61  # Å


def fcc(n_atoms: int, seed: int = 0):
    """Cu-like fcc crystal with n_atoms atoms, positions jiggled by 0.05 Å. Returns (pos, cell)."""
    nx, ny, nz = CELLS[n_atoms]
    basis = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    grid = np.array([[i, j, k] for i in range(nx) for j in range(ny) for k in range(nz)], dtype=float)
    pos = ((grid[:, None, :] + basis[None, :, :]).reshape(-1, 3) + 0.25) * A_CU
    pos += np.random.default_rng(seed).normal(0.0, 0.05, pos.shape)
    cell = np.diag([nx * A_CU, ny * A_CU, nz * A_CU])
    return pos, cell


def export_bench_model(path: str, dtype: torch.dtype) -> None:
    from equiforce.deploy.export import export_model
    from equiforce.model.network import EquiforceModel, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(r_max=5.0, channels=32, lmax=1, num_layers=3, avg_num_neighbors=42.0)
    model = EquiforceModel(cfg, ["Cu"]).double()
    export_model(model.for_export(), path, dtype=dtype, symmetry="O3")


def write_data(path: str, pos: np.ndarray, cell: np.ndarray) -> None:
    with open(path, "w") as f:
        f.write(f"fcc Cu bench\n\n{len(pos)} atoms\n1 atom types\n\n")
        f.write(f"0 {float(cell[0, 0])!r} xlo xhi\n0 {float(cell[1, 1])!r} ylo yhi\n0 {float(cell[2, 2])!r} zlo zhi\n\n")
        f.write("Masses\n\n1 63.546\n\nAtoms # atomic\n\n")
        for k, p in enumerate(pos.tolist()):
            f.write(f"{k + 1} 1 {p[0]!r} {p[1]!r} {p[2]!r}\n")


def lmp_steps_per_s(workdir: str, data: str, model: str, nprocs: int, steps: int,
                    path: str = "auto") -> Dict[str, float]:
    """Time `steps` NVE steps; returns steps/s from the loop time of the second `run`. The first
    (2 steps) warms up the TorchScript module and the allocator's heap (the first steps after
    start-up fault in fresh memory: with a single short run a 4096-atom step looked 2x slower)."""
    extra = f" path {path}"
    deck = f"""units metal
atom_style atomic
boundary p p p
read_data {data}
pair_style equiforce device cpu{extra}
pair_coeff * * {model} Cu
velocity all create 300.0 4928459 mom yes rot yes loop geom
timestep 0.001
fix 1 all nve
thermo {steps}
run 2
run {steps}
"""
    with open(os.path.join(workdir, "in.bench"), "w") as f:
        f.write(deck)
    cmd = [os.path.join(VENV_BIN, "lmp"), "-in", "in.bench", "-log", "none", "-echo", "none"]
    if nprocs > 1:
        cmd = [os.path.join(VENV_BIN, "mpirun"), "-np", str(nprocs)] + cmd
    env = dict(os.environ, OMP_NUM_THREADS="1",
               LD_LIBRARY_PATH=VENV_LIB + ":" + os.environ.get("LD_LIBRARY_PATH", ""))
    env.pop("EQUIFORCE_DUMP_EDGES", None)
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"lmp failed with exit status {proc.returncode} ({' '.join(cmd)}):\n"
                           f"{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
    loops = re.findall(r"Loop time of ([0-9.eE+-]+) on (\d+) procs for (\d+) steps", proc.stdout)
    t, _, n = loops[-1]
    ghosts = re.findall(r"Nghost:\s+([0-9.eE+-]+) ave", proc.stdout)
    return {"steps_per_s": int(n) / float(t), "seconds_per_step": float(t) / int(n),
            "ghosts_per_rank": float(ghosts[-1]) if ghosts else float("nan")}


def openmm_worker(model: str, n: int, steps: int) -> None:
    """(subprocess) OpenMM CPU platform, one thread: VerletIntegrator steps/s with the model as the
    only force on the fcc crystal of n atoms; prints one JSON line."""
    import openmm

    from equiforce.deploy.allocator import tune_malloc
    from equiforce.openmm import create_force

    tune_malloc()  # as the LAMMPS plugin does, so all three columns run with the same allocator

    pos, cell = fcc(n)
    system = openmm.System()
    for _ in range(n):
        system.addParticle(63.546)
    system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*(row / 10.0)) for row in cell])  # nm
    system.addForce(create_force(model, elements=["Cu"] * n, periodic=True))
    integrator = openmm.VerletIntegrator(0.001)  # ps
    platform = openmm.Platform.getPlatformByName("CPU")
    context = openmm.Context(system, integrator, platform, {"Threads": "1"})
    context.setPositions(pos / 10.0)
    context.setVelocitiesToTemperature(300.0)
    integrator.step(2)  # warm-up: TorchScript profiling runs and the first neighbour search
    t0 = time.perf_counter()
    integrator.step(steps)
    dt = time.perf_counter() - t0
    print(json.dumps({"steps_per_s": steps / dt, "seconds_per_step": dt / steps}), flush=True)


def openmm_steps_per_s(model: str, n: int, steps: int) -> Dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--openmm-worker", model, str(n), str(steps)],
                          env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"OpenMM worker failed with exit status {proc.returncode}:\n{proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def python_seconds(model_path: str, pos: np.ndarray, cell: np.ndarray, repeats: int) -> float:
    """Median seconds of one exported-module call (energy, forces, virial); neighbour list outside."""
    from equiforce.deploy.export import load_exported
    from equiforce.units import dtype_from_name

    module, meta = load_exported(model_path)
    dt = dtype_from_name(meta["dtype"])
    with torch.jit.optimized_execution(False):  # as the C++ runtime runs the file
        return _python_seconds(module, meta, pos, cell, repeats, dt)


def _python_seconds(module, meta, pos, cell, repeats, dt) -> float:
    from equiforce.data.neighbors import neighbor_list

    p = torch.tensor(pos, dtype=dt)
    c = torch.tensor(cell, dtype=dt)
    ei, shift, _ = neighbor_list(p, float(meta["r_max"]), c, torch.tensor([True, True, True]))
    species = torch.zeros(len(pos), dtype=torch.long)
    args = (p, species, ei, shift, c, len(pos))
    module(*args)  # warm-up (the first TorchScript calls profile and optimise)
    if len(pos) < 4096:
        module(*args)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        module(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 and 512 atoms, float64, few steps (~2 min)")
    ap.add_argument("--sizes", type=int, nargs="+", choices=sorted(CELLS), default=None)
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "float64"], default=None)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--allow-big", action="store_true",
                    help="also run 4096 atoms float64 on several ranks (ghost shell: > 10 GB per rank)")
    ap.add_argument("--no-ghost-shell-serial", action="store_true",
                    help="skip the 1-rank `path ghost_shell` comparison")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "lammps_speed.json"))
    ap.add_argument("--no-openmm", action="store_true", help="skip the OpenMM column")
    ap.add_argument("--openmm-worker", nargs=3, metavar=("MODEL", "N", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.openmm_worker:
        openmm_worker(args.openmm_worker[0], int(args.openmm_worker[1]), int(args.openmm_worker[2]))
        return 0
    sizes = args.sizes or ([64, 512] if args.quick else [64, 512, 4096])
    dtypes = args.dtypes or (["float64"] if args.quick else ["float32", "float64"])
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    from equiforce.deploy.allocator import tune_malloc

    tune_malloc()  # the LAMMPS plugin tunes glibc malloc itself: compare like with like

    # steps per timed run (~5-30 s each on one busy core). The ghost-shell runs (2 ranks, or 1 rank
    # with path ghost_shell) evaluate the model on the local atoms plus every ghost atom within the
    # receptive field + skin (17 Å here): thousands of atoms even for 64 local ones.
    if args.quick:
        steps = {64: 10, 512: 3, 4096: 1}
        steps_ghost = {64: 1, 512: 1, 4096: 1}
        repeats = {64: 5, 512: 3, 4096: 1}
    else:
        steps = {64: 30, 512: 5, 4096: 2}
        steps_ghost = {64: 2, 512: 1, 4096: 1}
        repeats = {64: 10, 512: 5, 4096: 2}

    load_before = os.getloadavg()
    t_start = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="eqf_bench_") as tmp:
        for dtype_name in dtypes:
            model = os.path.join(tmp, f"model_{dtype_name}.pt")
            export_bench_model(model, getattr(torch, dtype_name))
            for n in sizes:
                pos, cell = fcc(n)
                data = os.path.join(tmp, f"fcc{n}.data")
                write_data(data, pos, cell)
                row = {"atoms": n, "dtype": dtype_name}
                row["python_s"] = python_seconds(model, pos, cell, repeats[n])
                for nprocs in args.ranks:
                    k = steps[n] if nprocs == 1 else steps_ghost[n]
                    if nprocs > 1 and n >= 4096 and dtype_name == "float64" and not args.allow_big:
                        # measured: ~21k atoms per rank (2048 local + ghosts within 17 Å), the
                        # float64 autograd graph outgrows this 23 GB machine and the ranks are killed
                        row[f"lmp_np{nprocs}"] = {"skipped": "ghost-shell float64 needs > 10 GB per rank "
                                                             "here; --allow-big runs it"}
                        row[f"lmp_np{nprocs}_gather"] = {"skipped": "gather float64 needs ~9 GB per rank; "
                                                                    "--allow-big runs it"}
                        continue
                    try:
                        row[f"lmp_np{nprocs}"] = lmp_steps_per_s(tmp, data, model, nprocs, k,
                                                                 path="auto" if nprocs == 1 else "ghost_shell")
                    except RuntimeError as e:
                        row[f"lmp_np{nprocs}"] = {"error": str(e).splitlines()[0]}
                        print(f"  {n} atoms {dtype_name} np{nprocs}: {str(e).splitlines()[0]}", flush=True)
                    if nprocs > 1:
                        try:
                            row[f"lmp_np{nprocs}_gather"] = lmp_steps_per_s(tmp, data, model, nprocs, steps[n],
                                                                            path="gather")
                        except RuntimeError as e:
                            row[f"lmp_np{nprocs}_gather"] = {"error": str(e).splitlines()[0]}
                if not args.no_openmm:
                    try:
                        row["openmm"] = openmm_steps_per_s(model, n, steps[n])
                        row["openmm_overhead"] = row["python_s"] * row["openmm"]["steps_per_s"]
                    except RuntimeError as e:
                        row["openmm"] = {"error": str(e).splitlines()[0]}
                if not args.no_ghost_shell_serial and n == 64:
                    row["lmp_np1_ghost_shell"] = lmp_steps_per_s(tmp, data, model, 1, steps_ghost[n],
                                                                 path="ghost_shell")
                rows.append(row)
                print(f"  done {n} atoms {dtype_name} ({time.time() - t_start:.0f} s)", flush=True)
    load_after = os.getloadavg()

    header = (f"{'atoms':>6} {'dtype':>8} {'python ms':>10} {'py atom-st/s':>12} "
              + " ".join(f"{'np' + str(k) + ' st/s':>10} {'np' + str(k) + ' at-st/s':>11}" for k in args.ranks)
              + "".join(f" {'np' + str(k) + ' gather st/s':>16}" for k in args.ranks if k > 1)
              + f" {'np1 ghost-shell st/s':>21} {'overhead np1':>12} {'openmm st/s':>11} {'overhead omm':>12}")
    print(header)
    for row in rows:
        n = row["atoms"]
        line = f"{n:>6} {row['dtype']:>8} {1e3 * row['python_s']:>10.2f} {n / row['python_s']:>12.0f} "
        cells = []
        for k in args.ranks:
            r = row[f"lmp_np{k}"]
            if "steps_per_s" in r:
                cells.append(f"{r['steps_per_s']:>10.3f} {n * r['steps_per_s']:>11.0f}")
            else:
                cells.append(f"{'skipped' if 'skipped' in r else 'failed':>10} {'-':>11}")
        line += " ".join(cells)
        for k in args.ranks:
            if k > 1:
                r = row.get(f"lmp_np{k}_gather", {})
                line += f" {r['steps_per_s']:>16.3f}" if "steps_per_s" in r else \
                    f" {'skipped' if 'skipped' in r else 'failed':>16}"
        gs = row.get("lmp_np1_ghost_shell")
        line += f" {gs['steps_per_s']:>21.3f}" if gs else f" {'-':>21}"
        if 1 in args.ranks:
            row["overhead_np1"] = row["python_s"] * row["lmp_np1"]["steps_per_s"]
            line += f" {row['overhead_np1']:>12.2f}"
        else:
            line += f" {'-':>12}"
        om = row.get("openmm", {})
        if "steps_per_s" in om:
            line += f" {om['steps_per_s']:>11.3f} {row['openmm_overhead']:>12.2f}"
        else:
            line += f" {'-':>11} {'-':>12}"
        print(line)
    noisy = max(load_before[0], load_after[0]) > 1.5
    note = (f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} cores"
            + (" -- shared machine under load: timings are NOISY" if noisy else ""))
    print(note)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "model": {"channels": 32, "lmax": 1, "num_layers": 3, "r_max": 5.0},
                   "threads_per_process": 1, "load_before": load_before, "load_after": load_after,
                   "noisy": noisy, "machine": platform.platform(), "cpus": os.cpu_count(),
                   "torch": torch.__version__, "wall_s": time.time() - t_start}, f, indent=1)
    print(f"wrote {args.out} ({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
