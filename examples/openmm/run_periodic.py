"""Langevin MD of a periodic system (cubic or triclinic box) with an exported equiforce model.

    PYTHONPATH=python python examples/openmm/run_periodic.py --model model.pt [--n-side 8]
        [--triclinic] [--steps 500] [--platform CPU]

Builds ``n_side**3`` atoms of the model's species H, C, O on a jittered lattice (2.2 Å spacing)
in a periodic box, runs Langevin dynamics and prints steps/s. The TorchForce module receives the
box vectors (nm) from OpenMM and finds neighbours with a cell list, so any box shape OpenMM
accepts works, including boxes smaller than twice the cutoff.
"""
import argparse
import time

import openmm
from openmm import app, unit

from demo_systems import demo_model_path, make_topology, periodic_lattice
from equiforce.openmm import create_system


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="exported equiforce model (model.pt) with species H, C, O")
    p.add_argument("--n-side", type=int, default=8, help="atoms per box edge (n_side**3 atoms)")
    p.add_argument("--triclinic", action="store_true")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--timestep-fs", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=300.0)
    p.add_argument("--platform", default="CPU")
    args = p.parse_args()

    model = demo_model_path(args.model)
    symbols, pos, cell = periodic_lattice(args.n_side, triclinic=args.triclinic)
    topology = make_topology(symbols, cell)
    system = create_system(model, topology)  # periodic: the topology has box vectors
    integrator = openmm.LangevinMiddleIntegrator(args.temperature * unit.kelvin, 1.0 / unit.picosecond,
                                                 args.timestep_fs * unit.femtosecond)
    sim = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName(args.platform))
    sim.context.setPositions(pos / 10.0 * unit.nanometer)
    sim.minimizeEnergy(maxIterations=100)
    sim.context.setVelocitiesToTemperature(args.temperature * unit.kelvin, 1)
    sim.step(5)  # warm-up
    t0 = time.perf_counter()
    sim.step(args.steps)
    elapsed = time.perf_counter() - t0
    st = sim.context.getState(getEnergy=True)
    box = "triclinic" if args.triclinic else "cubic"
    print(f"{len(symbols)} atoms, {box} box {cell.diagonal().round(2)} Å, platform {args.platform}")
    print(f"E_pot after {args.steps} steps: {st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole):.3f} kJ/mol")
    print(f"{args.steps / elapsed:.1f} steps/s")


if __name__ == "__main__":
    main()
