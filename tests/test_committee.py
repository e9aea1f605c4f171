"""Committee files (equiforce.deploy.committee) in Python / ASE: the mean against the members' own
files, the uncertainty against its definition evaluated on the members' files, rotation invariance,
zero spread for identical members, refusals, and `equiforce export RUN_A RUN_B -o committee.pt`.

Reference for "mean" and "spread": each member exported to its OWN file and run through ASE
separately (an independent path: another TorchScript module, another call), float64.
Tolerances: 1e-12 (eV, eV/Å, eV/Å³ absolute) for the mean and the spread; 1e-10 for rotations.
"""
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError

from equiforce.ase import EquiforceCalculator
from equiforce.deploy.committee import committee_uncertainty, export_committee
from equiforce.deploy.export import export_model, load_exported
from equiforce.deploy.runner import ExportedRunner
from equiforce.errors import DataError, ModelFileError

from helpers import make_model, periodic_structure, random_rotation

SPECIES = ["Si", "C"]
SMALL = dict(r_max=3.5, channels=6, lmax=1, num_layers=2, num_bessel=6, radial_hidden=12, avg_num_neighbors=8.0)
TOL = 1e-12


def member(seed: int, **kw):
    return make_model(SPECIES, seed, scale=[1.5, 0.7], shift=[-3.0, -1.0], **{**SMALL, **kw})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three members (seeds 1, 2, 3): each in its own file, and the committee of the three."""
    d = tmp_path_factory.mktemp("committee")
    models = [member(s).for_export() for s in (1, 2, 3)]
    paths = []
    for k, m in enumerate(models):
        p = str(d / f"member{k}.pt")
        export_model(m, p, torch.float64, symmetry="O3")
        paths.append(p)
    committee = str(d / "committee.pt")
    export_committee(models, committee, torch.float64, symmetries=["O3"] * 3, sources=paths)
    return {"members": paths, "committee": committee, "dir": d}


def molecule():
    rng = np.random.default_rng(3)
    pos = rng.normal(scale=1.3, size=(7, 3))
    while True:  # no pair closer than 1.2 Å
        d = np.linalg.norm(pos[:, None] - pos[None], axis=-1) + 10 * np.eye(7)
        if d.min() > 1.2:
            break
        pos = rng.normal(scale=1.4, size=(7, 3))
    return Atoms("SiCCSiCCC", positions=pos)


def structures():
    return [molecule(), periodic_structure(np.random.default_rng(4), ["Si", "C"] * 5, length=6.0)]


def evaluate(path, atoms):
    a = atoms.copy()
    a.calc = EquiforceCalculator(path)
    out = {"energy": a.get_potential_energy(), "forces": a.get_forces(), "energies": a.get_potential_energies()}
    if a.pbc.all():
        out["stress"] = a.get_stress()
    out["results"] = dict(a.calc.results)
    return out


@pytest.mark.parametrize("case", [0, 1], ids=["molecule", "periodic"])
def test_mean_and_spread_equal_the_member_files(files, case):
    atoms = structures()[case]
    ref = [evaluate(p, atoms) for p in files["members"]]
    got = evaluate(files["committee"], atoms)
    for key in ("energy", "forces", "energies", "stress"):
        if key not in got:
            continue
        mean = np.mean([r[key] for r in ref], axis=0)
        assert np.abs(got[key] - mean).max() <= TOL, (key, np.abs(got[key] - mean).max())
    # the spread, from its definition on the members' own files
    e = np.array([r["energy"] for r in ref])
    f = np.array([r["forces"] for r in ref])
    res = got["results"]
    assert abs(res["energy_uncertainty"] - np.sqrt(np.mean((e - e.mean()) ** 2))) <= TOL
    f_ref = np.sqrt(np.mean(np.sum((f - f.mean(axis=0)) ** 2, axis=2), axis=0))
    assert res["force_uncertainty"].shape == (len(atoms),)
    assert np.abs(res["force_uncertainty"] - f_ref).max() <= TOL
    assert res["max_force_uncertainty"] == pytest.approx(f_ref.max(), abs=TOL)
    np.testing.assert_allclose(res["committee_energies"], e, rtol=0, atol=TOL)
    np.testing.assert_allclose(res["committee_forces"], f, rtol=0, atol=TOL)
    # distinct members disagree: the spread is not trivially zero
    assert res["energy_uncertainty"] > 1e-3 and f_ref.min() > 1e-4


def test_uncertainty_is_rotation_invariant(files):
    rng = np.random.default_rng(11)
    for atoms in structures():
        base = evaluate(files["committee"], atoms)["results"]
        for _ in range(2):
            rot = random_rotation(rng)
            a = atoms.copy()
            a.positions = atoms.positions @ rot.T + rng.normal(size=3)
            if a.pbc.all():
                a.cell = atoms.cell.array @ rot.T
            got = evaluate(files["committee"], a)["results"]
            assert abs(got["energy_uncertainty"] - base["energy_uncertainty"]) < 1e-10
            assert np.abs(got["force_uncertainty"] - base["force_uncertainty"]).max() < 1e-10
            # the member forces rotate with the structure
            np.testing.assert_allclose(got["committee_forces"], base["committee_forces"] @ rot.T, rtol=0, atol=1e-10)


def test_identical_members_report_zero(files):
    m = member(5).for_export()
    path = str(files["dir"] / "same.pt")
    export_committee([m, m, m], path, torch.float64)
    single = str(files["dir"] / "single.pt")
    export_model(m, single, torch.float64)
    for atoms in structures():
        got = evaluate(path, atoms)
        ref = evaluate(single, atoms)
        assert got["results"]["energy_uncertainty"] == 0.0
        assert np.abs(got["results"]["force_uncertainty"]).max() <= 1e-15
        assert abs(got["energy"] - ref["energy"]) <= TOL
        assert np.abs(got["forces"] - ref["forces"]).max() <= TOL


def test_metadata_lists_the_members(files):
    module, meta = load_exported(files["committee"])
    c = meta["committee"]
    assert c["size"] == 3 and [m["source"] for m in c["members"]] == files["members"]
    assert meta["exchange"] is False and "committee" in meta["methods"]
    assert meta["species"] == SPECIES and meta["r_max"] == SMALL["r_max"]
    assert "energy_uncertainty" in meta["outputs"] and "force_uncertainty" in meta["outputs"]
    for entry, path in zip(c["members"], files["members"]):  # each member's weights, as in its own file
        _, own = load_exported(path)
        assert entry["weights_digest"] == own["weights_digest"]
    assert len({m["weights_digest"] for m in c["members"]}) == 3  # three different members, each its own


def test_committee_uncertainty_definition():
    e = np.array([1.0, 2.0, 4.0])
    f = np.zeros((3, 2, 3))
    f[:, 0, 0] = [1.0, -1.0, 0.0]
    f[:, 1, 2] = [3.0, 3.0, 3.0]
    eu, fu = committee_uncertainty(e, f)
    assert eu == pytest.approx(np.std(e), abs=1e-15)
    assert fu[0] == pytest.approx(np.sqrt(2.0 / 3.0), abs=1e-15) and fu[1] == 0.0
    with pytest.raises(ValueError, match=r"energies \[M\] and forces \[M, N, 3\]"):
        committee_uncertainty(e, f[:2])


def test_refusals(files, tmp_path):
    out = str(tmp_path / "c.pt")
    a = member(1).for_export()
    with pytest.raises(ModelFileError, match="at least 2"):
        export_committee([a], out)
    other_species = make_model(["Si", "O"], 2, **SMALL).for_export()
    with pytest.raises(ModelFileError, match=r"member 2 \(b\) has species \['Si', 'O'\].*same species"):
        export_committee([a, other_species], out, sources=["a", "b"])
    other_cut = member(2, r_max=4.0).for_export()
    with pytest.raises(ModelFileError, match="r_max 4 Å.*same --r-max"):
        export_committee([a, other_cut], out)
    # a single-model file has no uncertainty: ASE does not offer it, the runner says why
    calc = EquiforceCalculator(files["members"][0])
    atoms = molecule()
    atoms.calc = calc
    with pytest.raises(PropertyNotImplementedError):
        calc.get_property("force_uncertainty", atoms)
    runner = ExportedRunner(files["members"][0])
    with pytest.raises(DataError, match="single model, not a committee.*equiforce export RUN_A RUN_B"):
        runner.run_committee(runner.inputs(atoms.positions, atoms.get_chemical_symbols()))


@pytest.mark.slow
def test_cli_exports_a_committee(tmp_path, capsys):
    from equiforce.cli import main

    from helpers import write_dataset

    data = write_dataset(tmp_path / "d.extxyz", n=6, seed=2)
    runs = []
    for seed in (1, 2):
        run = tmp_path / f"run{seed}"
        assert main(["train", "--data", data, "--out", str(run), "--epochs", "1", "--dtype", "float64", "--seed",
                     str(seed), "--no-progress", "--r-max", "4.0", "--channels", "4", "--lmax", "1", "--layers", "1",
                     "--threads", "1"]) == 0
        runs.append(str(run))
    out = str(tmp_path / "committee.pt")
    capsys.readouterr()
    assert main(["export", *runs, "-o", out]) == 0
    assert "committee of 2 models" in capsys.readouterr().out
    _, meta = load_exported(out)
    assert meta["committee"]["size"] == 2 and [m["source"] for m in meta["committee"]["members"]] == runs
    # the same two runs exported one by one: the committee is their mean
    singles = []
    for k, run in enumerate(runs):
        p = str(tmp_path / f"single{k}.pt")
        assert main(["export", run, "-o", p]) == 0
        singles.append(p)
    atoms = Atoms("OHHOH", positions=[[0, 0, 0], [0.96, 0, 0], [0, 0.96, 0], [2.5, 0.3, 0.1], [3.3, 0.2, 0.5]])
    ref = [evaluate(p, atoms) for p in singles]
    got = evaluate(out, atoms)
    assert abs(got["energy"] - np.mean([r["energy"] for r in ref])) <= TOL
    assert np.abs(got["forces"] - np.mean([r["forces"] for r in ref], axis=0)).max() <= TOL
