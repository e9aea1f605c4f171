"""equiforce.deploy.runner.ExportedRunner: the one Python path that runs an exported file.

Checked against independent references: the float64 file at the origin (float32 far from the
origin, relative force error < 1e-4 at a 1e6 Å offset), the ASE calculator and `equiforce eval`
on the same structures (bitwise: they share the runner), and the bad inputs of issue 18 (empty
structure, atoms closer than MIN_DISTANCE), each with its message.
"""
import os
import subprocess
import sys

import ase
import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator

from equiforce.ase import EquiforceCalculator
from equiforce.deploy.evaluate import evaluate_exported
from equiforce.deploy.export import export_model
from equiforce.deploy.runner import ExportedRunner
from equiforce.errors import DataError
from equiforce.model.network import EquiforceModel, ModelConfig
from equiforce.units import MIN_DISTANCE
from helpers import periodic_structure, rel_err

SPECIES = ["H", "C", "O"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same random-weight network exported in float64 and float32."""
    torch.manual_seed(0)
    model = EquiforceModel(ModelConfig(r_max=3.0, channels=6, lmax=2, num_layers=2, radial_hidden=12,
                                       avg_num_neighbors=3.0), SPECIES)
    out = {}
    for name, dtype in (("f64", torch.float64), ("f32", torch.float32)):
        path = str(tmp_path_factory.mktemp("runner") / f"{name}.pt")
        export_model(model.to(dtype).for_export(), path, dtype, symmetry="O3")
        out[name] = path
    return out


def molecule(seed=1, n=9):
    rng = np.random.default_rng(seed)
    pos = [np.zeros(3)]
    while len(pos) < n:  # connected cluster, no pair closer than 0.9 Å
        cand = pos[rng.integers(len(pos))] + rng.normal(size=3)
        if min(np.linalg.norm(cand - p) for p in pos) > 0.9 and min(np.linalg.norm(cand - p) for p in pos) < 1.8:
            pos.append(cand)
    return ase.Atoms([SPECIES[k % 3] for k in range(n)], positions=np.array(pos))


@pytest.mark.parametrize("periodic", [False, True])
def test_float32_far_from_the_origin(files, periodic):
    atoms = (periodic_structure(np.random.default_rng(2), [SPECIES[k % 3] for k in range(8)], length=5.0,
                                min_dist=1.0) if periodic else molecule())
    ref = ExportedRunner(files["f64"]).run_atoms(atoms)
    near = ExportedRunner(files["f32"]).run_atoms(atoms)
    far_atoms = atoms.copy()
    far_atoms.positions += np.array([1.0e6, -1.0e6, 0.5e6])
    far = ExportedRunner(files["f32"]).run_atoms(far_atoms)
    assert rel_err(near.forces, ref.forces) < 1e-4
    assert rel_err(far.forces, ref.forces) < 1e-4
    assert abs(far.energy - ref.energy) < 1e-4 * max(1.0, abs(ref.energy))
    assert rel_err(far.virial, ref.virial) < 1e-4
    # the same call without the reference point shows what the test guards against (float32
    # spacing at 1e6 Å is 0.06 Å): forces wrong by far more than the tolerance
    raw = ExportedRunner(files["f32"], centre=False).run_atoms(far_atoms)
    assert rel_err(raw.forces, ref.forces) > 1e-2


def test_ase_and_eval_share_the_runner(files, tmp_path):
    atoms = molecule(seed=3)
    res = ExportedRunner(files["f64"]).run_atoms(atoms)
    atoms.calc = EquiforceCalculator(files["f64"])
    assert atoms.get_potential_energy() == res.energy
    np.testing.assert_array_equal(atoms.get_forces(), res.forces)
    frame = atoms.copy()
    frame.calc = SinglePointCalculator(frame, energy=res.energy + 0.009, forces=res.forces + 0.002)
    path = str(tmp_path / "one.extxyz")
    ase.io.write(path, frame, format="extxyz")
    m = evaluate_exported(files["f64"], path)
    assert abs(m["energy_mae_mev_per_atom"] - 9.0 / len(atoms)) < 1e-6
    assert abs(m["force_mae_mev_per_a"] - 2.0) < 1e-6 and abs(m["force_rmse_mev_per_a"] - 2.0) < 1e-6
    assert m["stress_mae_mev_per_a3"] is None and m["n_structures"] == 1


def test_empty_structure_is_refused(files):
    atoms = ase.Atoms()
    atoms.calc = EquiforceCalculator(files["f64"])
    with pytest.raises(ValueError, match="EquiforceCalculator: this structure has no atoms; give a structure"):
        atoms.get_potential_energy()
    with pytest.raises(DataError, match="has no atoms"):
        ExportedRunner(files["f32"]).run(np.zeros((0, 3)), [])


@pytest.mark.parametrize("gap", [0.0, 0.3, MIN_DISTANCE - 1e-6])
def test_atoms_closer_than_min_distance_are_named(files, gap, tmp_path):
    atoms = molecule(seed=4)
    atoms.positions[6] = atoms.positions[2] + np.array([0.0, gap, 0.0])
    atoms.calc = EquiforceCalculator(files["f64"])
    with pytest.raises(ValueError, match=rf"atoms 2 and 6 are {gap:.4g} Å apart, closer than the minimum distance "
                                         r"0.5 Å .*move the atoms apart"):
        atoms.get_potential_energy()
    # `equiforce eval` names the file and the structure
    frame = atoms.copy()
    frame.calc = SinglePointCalculator(frame, energy=0.0, forces=np.zeros((len(frame), 3)))
    path = str(tmp_path / "close.extxyz")
    first = molecule(seed=5)
    first.calc = SinglePointCalculator(first, energy=0.0, forces=np.zeros((len(first), 3)))
    ase.io.write(path, [first, frame], format="extxyz")
    with pytest.raises(DataError, match=r"equiforce eval: in '.*close.extxyz' structure 1, atoms 2 and 6 are"):
        evaluate_exported(files["f64"], path)


def test_min_distance_boundary_and_self_image(files):
    atoms = molecule(seed=4)
    atoms.positions[6] = atoms.positions[2] + np.array([0.0, MIN_DISTANCE + 1e-6, 0.0])
    res = ExportedRunner(files["f64"]).run_atoms(atoms)  # just above the limit: evaluated
    assert np.isfinite(res.forces).all()
    tiny = ase.Atoms("H", positions=[[0.1, 0.1, 0.1]], cell=np.diag([0.4, 3.0, 3.0]), pbc=True)
    with pytest.raises(DataError, match="atom 0 and its own periodic image are 0.4 Å apart"):
        ExportedRunner(files["f64"]).run_atoms(tiny)


@pytest.mark.parametrize("env,expected", [({}, "True"), ({"EQUIFORCE_MALLOC_TUNING": "0"}, "False")])
def test_runner_tunes_malloc_with_the_plugin_opt_out(files, env, expected):
    code = f"from equiforce.deploy.runner import ExportedRunner; print(ExportedRunner({files['f64']!r}).malloc_tuned)"
    base = {k: v for k, v in os.environ.items()
            if k not in ("EQUIFORCE_MALLOC_TUNING", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    out = subprocess.run([sys.executable, "-c", code], env=dict(base, **env), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == expected
