"""Committee files in OpenMM: the TorchForce of a committee file against the TorchForces of its
members' own files (same positions, Reference platform), and CommitteeReporter's uncertainty
against the definition evaluated on the members' OpenMM forces; threshold warn / stop / frames.

Tolerances (float64): energy |dE| <= 1e-12 * |E| and forces max |dF| <= 1e-12 * max |F| against the
average of the member files (kJ/mol, kJ/mol/nm); reporter uncertainty 1e-10 eV/Å (the reporter
evaluates through Python's neighbour list, the reference through OpenMM's module).
"""
import ase.io
import numpy as np
import pytest
import torch
import openmm
from openmm import unit

from equiforce.deploy.committee import export_committee
from equiforce.deploy.export import export_model
from equiforce.openmm import (EV_TO_KJ_PER_MOL, NM_TO_ANGSTROM, CommitteeReporter, UncertaintyThresholdExceeded,
                              UncertaintyWarning, create_force)

from helpers import make_model

pytestmark = pytest.mark.openmm
SPECIES = ["H", "C", "O"]
SMALL = dict(r_max=3.5, channels=6, lmax=1, num_layers=2, num_bessel=6, radial_hidden=12, avg_num_neighbors=6.0)
SYMBOLS = ["C", "C", "O", "H", "H", "H", "H", "H", "H"]
POS = np.array([[0.0, 0.0, 0.0], [1.52, 0.0, 0.0], [2.0, 1.35, 0.0], [-0.4, -1.0, 0.2], [-0.4, 0.5, 0.9],
                [-0.4, 0.5, -0.9], [1.9, -0.5, 0.9], [1.9, -0.5, -0.9], [2.95, 1.3, 0.1]])  # Å, ethanol-like


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("openmm_committee")
    models = [make_model(SPECIES, s, scale=[1.0, 1.2, 0.9], shift=[-13.6, -1030.0, -2040.0], **SMALL).for_export()
              for s in (1, 2, 3)]
    members = []
    for k, m in enumerate(models):
        members.append(str(d / f"member{k}.pt"))
        export_model(m, members[-1], torch.float64, symmetry="O3")
    committee = str(d / "committee.pt")
    export_committee(models, committee, torch.float64, symmetries=["O3"] * 3)
    return {"dir": d, "members": members, "committee": committee}


def system_for(path):
    system = openmm.System()
    for s in SYMBOLS:
        system.addParticle({"H": 1.008, "C": 12.011, "O": 15.999}[s])
    system.addForce(create_force(path, elements=SYMBOLS))
    return system


def context(path):
    ctx = openmm.Context(system_for(path), openmm.VerletIntegrator(0.0005),
                         openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(POS / NM_TO_ANGSTROM)
    return ctx


def simulation_for(path):
    simulation = openmm.app.Simulation(openmm.app.Topology(), system_for(path), openmm.VerletIntegrator(0.0005),
                                       openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(POS / NM_TO_ANGSTROM)
    return simulation


def energy_forces(ctx):
    st = ctx.getState(getEnergy=True, getForces=True)
    return (st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            np.asarray(st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)))


def test_committee_force_is_the_members_mean(files):
    ref = [energy_forces(context(p)) for p in files["members"]]
    e, f = energy_forces(context(files["committee"]))
    e_mean = np.mean([r[0] for r in ref])
    f_mean = np.mean([r[1] for r in ref], axis=0)
    assert abs(e - e_mean) <= 1e-12 * abs(e_mean), (e, e_mean)
    assert np.abs(f - f_mean).max() <= 1e-12 * np.abs(f_mean).max()


def test_reporter_logs_the_members_spread(files, tmp_path):
    simulation = simulation_for(files["committee"])
    simulation.context.setVelocitiesToTemperature(300.0, 1)
    log = str(tmp_path / "unc.csv")
    reporter = CommitteeReporter(log, 5, files["committee"], elements=SYMBOLS)
    simulation.reporters.append(reporter)
    simulation.step(20)
    reporter.close()
    rows = np.genfromtxt(log, delimiter=",", names=True)
    assert list(rows["step"]) == [5, 10, 15, 20]
    # independent reference at the last state: the members' own TorchForces at the same positions
    pos_nm = simulation.context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    forces, energies = [], []
    for p in files["members"]:
        c = context(p)
        c.setPositions(pos_nm)
        e, f = energy_forces(c)
        energies.append(e / EV_TO_KJ_PER_MOL)
        forces.append(f / (EV_TO_KJ_PER_MOL * NM_TO_ANGSTROM))
    forces = np.array(forces)
    unc = np.sqrt(np.mean(np.sum((forces - forces.mean(axis=0)) ** 2, axis=2), axis=0))
    last = reporter.last
    assert np.abs(last["force_uncertainty"] - unc).max() < 1e-10
    assert abs(rows["max_force_uncertainty_eV_per_A"][-1] - unc.max()) < 1e-10
    assert abs(rows["energy_uncertainty_eV"][-1] - np.std(energies)) < 1e-10
    assert abs(rows["energy_eV"][-1] - np.mean(energies)) < 1e-9
    assert rows["worst_atom"][-1] == int(np.argmax(unc)) and unc.max() > 1e-6
    # a restarted simulation continues the same log with append=True (one header, earlier rows kept)
    again = CommitteeReporter(log, 5, files["committee"], elements=SYMBOLS, append=True)
    simulation.reporters[:] = [again]
    simulation.step(10)
    again.close()
    text = open(log).read()
    assert text.count("step,") == 1
    assert list(np.genfromtxt(log, delimiter=",", names=True)["step"]) == [5, 10, 15, 20, 25, 30]


def test_reporter_threshold(files, tmp_path):
    simulation = simulation_for(files["committee"])
    frames = str(tmp_path / "over.xyz")
    warn = CommitteeReporter(str(tmp_path / "w.csv"), 2, files["committee"], elements=SYMBOLS, threshold=1e-9,
                             frames=frames)
    simulation.reporters.append(warn)
    with pytest.warns(UncertaintyWarning, match="exceeds the threshold 1e-09 eV/Å"):
        simulation.step(4)
    got = ase.io.read(frames, index=":")
    assert len(got) == 2 and got[-1].info["step"] == 4
    np.testing.assert_allclose(got[-1].arrays["force_uncertainty"], warn.last["force_uncertainty"], rtol=0, atol=1e-7)  # ASE writes 8 decimals
    simulation.reporters[:] = [CommitteeReporter(str(tmp_path / "s.csv"), 3, files["committee"], elements=SYMBOLS,
                                                 threshold=1e-9, on_exceed="stop")]
    with pytest.raises(UncertaintyThresholdExceeded, match="at step 6 exceeds the threshold.*on_exceed='stop'"):
        simulation.step(10)
    assert simulation.currentStep == 6
    with pytest.raises(ValueError, match="single model, not a committee"):
        CommitteeReporter(str(tmp_path / "x.csv"), 1, files["members"][0], elements=SYMBOLS)
    with pytest.raises(ValueError, match="need a threshold"):
        CommitteeReporter(str(tmp_path / "x.csv"), 1, files["committee"], elements=SYMBOLS, on_exceed="stop")
