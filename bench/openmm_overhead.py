"""OpenMM overhead: one force evaluation through openmm-torch's TorchForce vs the bare exported call.

Same file, same structure (fcc Cu, a = 3.61 Å, 0.05 Å noise, periodic; the NequIP-size bench model
of ``bench/lammps_speed.py``: 32 channels, lmax 1, 3 layers, r_max 5 Å, compiled ops), one torch
thread, OpenMM's CPU platform with one thread:

* ``openmm``  ``context.getState(getEnergy=True, getForces=True)`` after a position change (so the
  force is evaluated; the Verlet list of the module is reused, as in MD between rebuilds);
* ``bare``    the exported module called from Python (energy, forces, virial), neighbour list given,
  graph optimiser off (``torch.jit.optimized_execution(False)``, as the runner and LAMMPS run it).

overhead = openmm / bare (1.00 = free; target <= 1.10). Each (size, dtype, strategy) runs in its own
process (TorchScript settings are process-wide), alternating the two calls; figures are the minimum
CPU time (``time.process_time``: robust on a shared machine) and the minimum wall time over
``--repeat`` calls after two warm-up calls. ``--strategies simple,dynamic20`` also times the earlier
TorchScript setting (``[("DYNAMIC", 20)]``) for comparison; ``simple`` is what ``create_force``
sets (``equiforce.openmm.tune_torchscript_for_md``). Prints a Markdown table; writes JSON with the
load average before and after each cell, the CPU model and vector ISA, and the ISA of the compiled
ops to ``bench/results/openmm_overhead_<time>.json``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/openmm_overhead.py [--sizes 64 512 4096] [--repeat 5]
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

STRATEGIES = {"simple": None, "dynamic20": [("DYNAMIC", 20)]}  # None: what create_force sets


def worker(model: str, n: int, dtype_name: str, strategy: str, repeat: int) -> dict:
    import numpy as np
    import openmm
    import torch

    from equiforce.data.neighbors import neighbor_list
    from equiforce.deploy.export import load_exported
    from equiforce.openmm import create_force
    from lammps_speed import fcc

    torch.set_num_threads(1)
    pos, cell = fcc(n)
    system = openmm.System()
    for _ in range(n):
        system.addParticle(63.546)
    system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*(row / 10.0)) for row in cell])  # nm
    system.addForce(create_force(model, elements=["Cu"] * n, periodic=True))
    if STRATEGIES[strategy] is not None:
        torch.jit.set_fusion_strategy(STRATEGIES[strategy])
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"),
                             {"Threads": "1"})
    rng = np.random.default_rng(1)

    def openmm_call():
        # a small move (well inside the 1 Å skin): OpenMM evaluates the force again
        context.setPositions((pos + rng.normal(0.0, 0.01, pos.shape)) / 10.0)
        context.getState(getEnergy=True, getForces=True)

    module, meta = load_exported(model)
    dt = getattr(torch, dtype_name)
    p = torch.tensor(pos, dtype=dt)
    c = torch.tensor(cell, dtype=dt)
    edge_index, shift, _ = neighbor_list(p, float(meta["r_max"]), c, torch.tensor([True, True, True]))
    species = torch.zeros(n, dtype=torch.long)

    def bare_call():
        with torch.jit.optimized_execution(False):
            module(p, species, edge_index, shift, c, n)

    cpu = {"openmm": [], "bare": []}
    wall = {"openmm": [], "bare": []}
    for k in range(repeat + 2):
        for name, call in (("openmm", openmm_call), ("bare", bare_call)):
            t0, w0 = time.process_time(), time.perf_counter()
            call()
            if k >= 2:
                cpu[name].append(time.process_time() - t0)
                wall[name].append(time.perf_counter() - w0)
    return {"cpu_s": {k: min(v) for k, v in cpu.items()}, "wall_s": {k: min(v) for k, v in wall.items()},
            "ops_isa": torch.ops.equiforce.cpu_isa()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 512, 4096])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    ap.add_argument("--strategies", default="simple", help="comma-separated: simple, dynamic20")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        model, n, dtype_name, strategy = args.worker
        print(json.dumps(worker(model, int(n), dtype_name, strategy, args.repeat)), flush=True)
        return 0

    import torch

    from lammps_speed import export_bench_model
    from neighbors import cpu_info

    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    rows = []
    for dtype_name in args.dtypes:
        model = str(out_dir / f"openmm_overhead_model_{dtype_name}.pt")
        export_bench_model(model, getattr(torch, dtype_name))
        for n in args.sizes:
            for strategy in args.strategies.split(","):
                load_before = os.getloadavg()
                env = dict(os.environ, OMP_NUM_THREADS="1")
                proc = subprocess.run([sys.executable, __file__, "--repeat", str(args.repeat), "--worker", model,
                                       str(n), dtype_name, strategy], capture_output=True, text=True, env=env,
                                      timeout=3600)
                if proc.returncode != 0:
                    raise SystemExit(f"worker {n} {dtype_name} {strategy} failed:\n{proc.stderr[-2000:]}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                res.update(atoms=n, dtype=dtype_name, strategy=strategy, load_before=load_before,
                           load_after=os.getloadavg())
                res["overhead_cpu"] = res["cpu_s"]["openmm"] / res["cpu_s"]["bare"]
                res["overhead_wall"] = res["wall_s"]["openmm"] / res["wall_s"]["bare"]
                rows.append(res)
                print(f"{n} {dtype_name} {strategy}: overhead {res['overhead_cpu']:.3f} (CPU), "
                      f"{res['overhead_wall']:.3f} (wall)", flush=True)
    info = {"cpu": cpu_info(), "rows": rows, "repeat": args.repeat, "time": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                          time.gmtime())}
    path = out_dir / time.strftime("openmm_overhead_%Y%m%d_%H%M%S.json", time.gmtime())
    path.write_text(json.dumps(info, indent=1))
    print(f"\nCPU {info['cpu']['model']} ({info['cpu']['isa']}; compiled ops: {rows[0]['ops_isa']}), "
          f"1 torch thread, OpenMM CPU platform 1 thread, {info['time']}\n")
    print("| atoms | dtype | TorchScript strategy | bare call ms (CPU) | OpenMM ms (CPU) | overhead CPU | "
          "overhead wall | load before → after |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['atoms']} | {r['dtype']} | {r['strategy']} | {r['cpu_s']['bare'] * 1e3:.1f} | "
              f"{r['cpu_s']['openmm'] * 1e3:.1f} | {r['overhead_cpu']:.3f} | {r['overhead_wall']:.3f} | "
              f"{r['load_before'][0]:.2f} → {r['load_after'][0]:.2f} |")
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
