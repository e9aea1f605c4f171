"""Demo 3: NVE energy conservation -- conservative forces (-dE/dr) vs a direct-force head.

    python examples/physics/nve_drift.py [--quick]

Data: GFN2-xTB Langevin MD of ethanol (800 K). Two models with the same architecture and training
(energies + forces): conservative (forces = -dE/dr) and direct-force (``direct_forces: true``: an
equivariant per-atom l=1 output trained on the forces; its energy head gives the energy). Both are
exported and run in OpenMM (equiforce.openmm.create_system -> openmm-torch TorchForce) with a
VerletIntegrator from the same start (a held-out frame, 300 K velocities, same seed), no thermostat
and no centre-of-mass motion remover, for the same number of steps.

Reported: test force MAE of both (comparable accuracy), the total energy E_kin + E_pot along each
trajectory (E_pot from each model's own energy), its drift (slope of a least-squares line,
meV/atom/ps) and largest excursion, the total momentum at the start and the end (OpenMM's random
velocities carry some; conservative forces sum to zero and keep it, direct forces do not sum to
zero -- Newton's third law is not built in) and the mean |sum_i F_i| on the test frames.
"""
import argparse
import time

import numpy as np

import common

KJ_PER_MOL_PER_EV = 96.48533212331002


def run_nve(model_path: str, atoms, n_steps: int, dt_fs: float, seed: int, every: int = 10):
    import openmm
    from openmm import unit

    from equiforce.openmm import create_system

    system = create_system(model_path, common.openmm_topology(atoms.get_chemical_symbols()), remove_cm_motion=False)
    integrator = openmm.VerletIntegrator(dt_fs * 1e-3)
    ctx = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(atoms.positions / 10.0)
    ctx.setVelocitiesToTemperature(300.0, seed)
    masses = np.array([system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(len(atoms))])
    times, total, momentum = [], [], []
    t0 = time.perf_counter()
    for k in range(n_steps // every + 1):
        if k:
            integrator.step(every)
        st = ctx.getState(getEnergy=True, getVelocities=True)
        e = (st.getPotentialEnergy() + st.getKineticEnergy()).value_in_unit(unit.kilojoule_per_mole)
        v = st.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond)
        times.append(k * every * dt_fs * 1e-3)
        total.append(e / KJ_PER_MOL_PER_EV * 1000.0 / len(atoms))  # meV/atom
        momentum.append(float(np.linalg.norm((masses[:, None] * v).sum(0))))  # dalton nm/ps
        if not np.isfinite(e):
            break
    return np.array(times), np.array(total), np.array(momentum), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer frames, epochs and steps")
    args = p.parse_args()
    t_start = time.perf_counter()
    n_frames, epochs, n_steps = (200, 25, 2000) if args.quick else (400, 60, 10000)
    dt_fs = 0.5
    raw = common.make_data("CH3CH2OH", n_frames=n_frames, temperature_K=800.0, seed=3, stride=20)
    frames = common.read_frames(raw)
    n_test = n_frames // 5
    test, train = frames[:n_test], frames[n_test:]
    train_path = common.write_frames(f"{common.WORK}/nve/train.extxyz", train)
    model = {"r_max": 4.0, "channels": 16, "lmax": 1, "num_layers": 2, "radial_hidden": 16, "num_bessel": 6}
    results = {}
    paths = {}
    for name, direct in (("conservative", False), ("direct_forces", True)):
        paths[name] = common.train_model(f"nve_{name}", train_path, {**model, "direct_forces": direct}, epochs,
                                         forces_weight=10.0)
        exported = common.Exported(paths[name])
        results[name] = {"test": common.errors(exported, test),
                         "mean_net_force_norm_on_test_frames_ev_per_a": float(np.mean(
                             [np.linalg.norm(exported.energy_forces(a)[1].sum(0)) for a in test]))}
        common.log(f"{name}: {results[name]['test']}")
    curves = {}
    for name, path in paths.items():
        t, e, mom, secs = run_nve(path, test[0], n_steps, dt_fs, seed=7)
        finite = np.isfinite(e)
        slope = float(np.polyfit(t[finite], e[finite], 1)[0]) if finite.sum() > 2 else float("nan")
        results[name]["nve"] = {
            "steps": int(n_steps), "dt_fs": dt_fs, "length_ps": n_steps * dt_fs * 1e-3,
            "completed": bool(finite.all()),
            "drift_mev_per_atom_per_ps": slope,
            "max_abs_deviation_mev_per_atom": float(np.abs(e[finite] - e[0]).max()),
            "initial_total_momentum_dalton_nm_per_ps": float(mom[0]),
            "final_total_momentum_dalton_nm_per_ps": float(mom[finite][-1]),
            "seconds": round(secs, 1),
        }
        curves[name] = (t, e)
        common.log(f"{name} NVE: {results[name]['nve']}")
    payload = {"molecule": "CH3CH2OH", "method": "GFN2-xTB", "engine": "OpenMM (Reference platform) via TorchForce",
               "quick": args.quick, "epochs": epochs, "model": model, "results": results,
               "seconds": round(time.perf_counter() - t_start, 1)}
    common.save_json("nve_drift", payload)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, (t, e) in curves.items():
        f = results[name]["test"]["force_mae_mev_per_a"]
        axes[0].plot(t, e - e[0], label=f"{name} (test force MAE {f:.0f} meV/Å)")
    axes[0].set(xlabel="time (ps)", ylabel="E_total - E_total(0) (meV/atom)",
                title=f"NVE in OpenMM, ethanol, dt = {dt_fs} fs")
    axes[0].legend(fontsize=8)
    t, e = curves["conservative"]
    axes[1].plot(t, e - e[0], color="C0")
    axes[1].set(xlabel="time (ps)", ylabel="E_total - E_total(0) (meV/atom)",
                title="conservative model alone (Verlet oscillation, no drift)")
    fig.tight_layout()
    fig.savefig(common.figure_path("nve_drift"), dpi=120)
    common.log(f"wrote {common.figure_path('nve_drift')} ({payload['seconds']} s)")


if __name__ == "__main__":
    main()
