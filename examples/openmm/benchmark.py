"""OpenMM steps/s with an exported model beside the Python model's energy+forces time.

    PYTHONPATH=python python examples/openmm/benchmark.py [--model model.pt] [--platform CPU]

Systems: the demo C2H6O cluster (9 atoms, isolated) and periodic jittered lattices of 512 and
4096 atoms (2.2 Å spacing). "python ms" is one call of the exported TorchScript module with the
edges precomputed ("Python model E+F"), and one fresh neighbour search (equiforce.data.neighbors,
scripted). "OpenMM ms/step" is the wall time per VerletIntegrator step: TorchForce call, unit
conversion, Verlet-list filter (full cell-list search every few steps), integration. OpenMM minus
model time is the wrapper's overhead. On a shared machine compare the CPU column (process time).
"""
import argparse
import time

import numpy as np
import openmm
import torch

from demo_systems import DEMO_POS, DEMO_SYMBOLS, demo_model_path, make_topology, periodic_lattice
from equiforce.deploy.export import load_exported
from equiforce.data.neighbors import neighbor_list
from equiforce.openmm import create_system
from equiforce.units import dtype_from_name


def python_time(path: str, symbols, pos: np.ndarray, cell, repeats: int):
    """(model-only seconds with precomputed edges, neighbour-list seconds) per call."""
    module, meta = load_exported(path)
    dtype = dtype_from_name(meta["dtype"])
    species = torch.tensor([meta["species"].index(s) for s in symbols])
    p = torch.tensor(pos, dtype=dtype)
    c = torch.tensor(cell if cell is not None else np.zeros((3, 3)), dtype=dtype)
    pbc = torch.tensor([cell is not None] * 3)
    nl = torch.jit.script(neighbor_list)
    for _ in range(3):  # TorchScript profiles and optimises during the first calls
        edge_index, shift, _ = nl(p, float(meta["r_max"]), c, pbc)
        module(p, species, edge_index, shift, c, len(symbols))
    t0 = time.perf_counter()
    for _ in range(repeats):
        module(p, species, edge_index, shift, c, len(symbols))
    t_model = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        nl(p, float(meta["r_max"]), c, pbc)
    return t_model, (time.perf_counter() - t0) / repeats


def openmm_time(path: str, symbols, pos: np.ndarray, cell, steps: int, platform: str):
    """(wall seconds, CPU seconds of this process, all threads) per MD step."""
    system = create_system(path, make_topology(symbols, cell))
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.0005), openmm.Platform.getPlatformByName(platform))
    ctx.setPositions(pos / 10.0)
    ctx.setVelocitiesToTemperature(300.0, 1)
    integrator = ctx.getIntegrator()
    integrator.step(5)  # warm-up: TorchScript optimisation, first neighbour search
    t0, c0 = time.perf_counter(), time.process_time()
    integrator.step(steps)
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="exported equiforce model; default: the analytic model")
    p.add_argument("--platform", default="CPU")
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16], help="lattice edges (n**3 atoms)")
    args = p.parse_args()
    model = demo_model_path(args.model)
    cases = [("demo molecule", DEMO_SYMBOLS, DEMO_POS, None, 500)]
    for n_side in args.sizes:
        symbols, pos, cell = periodic_lattice(n_side)
        cases.append((f"periodic {n_side**3}", symbols, pos, cell, max(20, 40000 // n_side**3)))
    print(f"platform {args.platform}, torch threads {torch.get_num_threads()}")
    print("| system | atoms | OpenMM steps/s | OpenMM ms/step (wall) | OpenMM CPU ms/step | Python model E+F ms | Python neighbour list ms |")
    print("|---|---|---|---|---|---|---|")
    for name, symbols, pos, cell, steps in cases:
        t_model, t_nl = python_time(model, symbols, pos, cell, max(3, steps // 5))
        t_mm, cpu_mm = openmm_time(model, symbols, pos, cell, steps, args.platform)
        print(f"| {name} | {len(symbols)} | {1 / t_mm:.1f} | {1e3 * t_mm:.2f} | {1e3 * cpu_mm:.2f} | {1e3 * t_model:.2f} | "
              f"{1e3 * t_nl:.2f} |", flush=True)


if __name__ == "__main__":
    main()
