"""Langevin MD of a molecule with an exported equiforce model in OpenMM; prints steps/s.

    PYTHONPATH=python python examples/openmm/run_md.py --model model.pt [--pdb mol.pdb]
        [--structure frames.extxyz] [--steps 2000] [--platform CPU] [--temperature 300]

Without ``--pdb`` or ``--structure`` the demo C2H6O cluster is used; without ``--model`` the analytic test model.
Units: OpenMM's (nm, ps, kJ/mol) outside, the model's (Å, eV) inside the TorchForce module.
"""
import argparse
import time

import openmm
from openmm import app, unit

from demo_systems import DEMO_POS, DEMO_SYMBOLS, demo_model_path, make_topology
from equiforce.openmm import create_system


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="exported equiforce model (model.pt)")
    p.add_argument("--pdb", help="molecule as PDB (all atoms must be model species)")
    p.add_argument("--structure", help="molecule from any file ASE reads (first frame; e.g. a test extxyz)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--timestep-fs", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=300.0)
    p.add_argument("--platform", default="CPU", help="Reference, CPU, CUDA, ...")
    p.add_argument("--report-every", type=int, default=500)
    args = p.parse_args()

    model = demo_model_path(args.model)
    if args.pdb:
        pdb = app.PDBFile(args.pdb)
        topology, positions = pdb.topology, pdb.positions
    elif args.structure:
        from ase.io import read
        atoms = read(args.structure, index=0)
        topology = make_topology(atoms.get_chemical_symbols())
        positions = atoms.positions / 10.0 * unit.nanometer
    else:
        topology, positions = make_topology(DEMO_SYMBOLS), DEMO_POS / 10.0 * unit.nanometer
    system = create_system(model, topology)
    integrator = openmm.LangevinMiddleIntegrator(args.temperature * unit.kelvin, 1.0 / unit.picosecond,
                                                 args.timestep_fs * unit.femtosecond)
    sim = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName(args.platform))
    # minimise in a throwaway Context without the minimum-distance check: OpenMM's minimiser tries
    # trial steps that can overlap two atoms of a small molecule for one evaluation
    unchecked = openmm.Context(create_system(model, topology, check_min_distance=False),
                               openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(args.platform))
    unchecked.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(unchecked)
    sim.context.setPositions(unchecked.getState(getPositions=True).getPositions())
    del unchecked
    sim.context.setVelocitiesToTemperature(args.temperature * unit.kelvin, 1)
    sim.step(10)  # warm-up (TorchScript profiling runs)
    print(f"{topology.getNumAtoms()} atoms, platform {args.platform}, dt {args.timestep_fs} fs")
    print(f"{'step':>8} {'E_pot (kJ/mol)':>16} {'T (K)':>8}")
    n_dof = 3 * system.getNumParticles() - 3  # CMMotionRemover
    done, t0 = 0, time.perf_counter()
    while done < args.steps:
        n = min(args.report_every, args.steps - done)
        sim.step(n)
        done += n
        st = sim.context.getState(getEnergy=True)
        temp = 2 * st.getKineticEnergy() / (n_dof * unit.MOLAR_GAS_CONSTANT_R)
        print(f"{done:>8d} {st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole):>16.4f} "
              f"{temp.value_in_unit(unit.kelvin):>8.1f}")
    elapsed = time.perf_counter() - t0
    ns_per_day = args.steps * args.timestep_fs * 1e-6 / (elapsed / 86400.0)
    print(f"{args.steps / elapsed:.1f} steps/s ({ns_per_day:.2f} ns/day)")


if __name__ == "__main__":
    main()
