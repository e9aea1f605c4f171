"""Training the heads and baselines end to end on a synthetic data set with known answers.

Reference: water-like molecules with harmonic bond energies (forces are the exact gradient) and
dipoles from fixed point charges ``q_O = -0.8 e, q_H = +0.4 e`` (``mu = sum q_i r_i``, e·Å), in
random orientations. A charge model can represent these dipoles exactly; an invariant model can
not represent any of them (its vector output is the same in every orientation).
"""
import json

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms

from helpers import random_rotation

from equiforce.cli import main as cli_main
from equiforce.training.config import TrainConfig
from equiforce.data.dataset import load_dataset
from equiforce.training.loop import evaluate_graphs, load_checkpoint, model_from_checkpoint, train

Q = {"O": -0.8, "H": 0.4}


def water_data(path, n=24, seed=0):
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        r1, r2 = rng.uniform(0.9, 1.05, size=2)
        theta = np.deg2rad(rng.uniform(95, 115))
        pos = np.array([[0, 0, 0], [r1, 0, 0], [r2 * np.cos(theta), r2 * np.sin(theta), 0.0]])
        pos = pos @ random_rotation(rng).T + rng.normal(size=3)
        energy, forces = 0.0, np.zeros((3, 3))
        for h in (1, 2):  # E = k (r - r0)^2 per O-H bond
            d = pos[h] - pos[0]
            r = np.linalg.norm(d)
            energy += 5.0 * (r - 0.97) ** 2
            g = 10.0 * (r - 0.97) * d / r
            forces[h] -= g
            forces[0] += g
        a = Atoms("OHH", positions=pos)
        a.info["energy"] = energy
        a.info["dipole"] = sum(Q[s] * p for s, p in zip(a.get_chemical_symbols(), pos))
        a.arrays["forces"] = forces
        frames.append(a)
    ase.io.write(path, frames, format="extxyz")
    return path


def run(tmp_path, name, data, **model):
    cfg = TrainConfig.from_dict({
        "data": data, "out": str(tmp_path / name), "epochs": 25, "batch_size": 4, "lr": 0.02,
        "val_fraction": 0.25, "dtype": "float64", "ema_decay": 0.0, "num_threads": 1, "seed": 0,
        "forces_weight": 1.0, "dipole_weight": 10.0, "scheduler": "none",
        "model": {"r_max": 2.5, "channels": 8, "lmax": 1, "num_layers": 1, "radial_hidden": 16, **model}})
    train(cfg, progress=False, log=lambda s: None)
    state = load_checkpoint(str(tmp_path / name / "best.pt"))
    model_, config = model_from_checkpoint(state)
    graphs, _ = load_dataset(data, config.model.r_max, state["species"])
    val = [graphs[k] for k in state["split"]["val"]]
    return model_, evaluate_graphs(model_, val, 8, torch.float64, torch.device("cpu")).metrics(), state


@pytest.mark.slow
def test_dipole_training_learns_and_eval_reports_it(tmp_path, capsys):
    data = water_data(str(tmp_path / "water.extxyz"))
    graphs, species = load_dataset(data, 2.5)
    baseline = float(np.mean([g["dipole"].abs().mean() for g in graphs]))  # MAE of predicting 0
    _, charges, state = run(tmp_path, "charges", data, dipole="charges")
    assert charges["dipole_mae_e_a"] < 0.2 * baseline, (charges, baseline)
    _, inv, _ = run(tmp_path, "invariant", data, dipole="direct", lmax=0)
    # the invariant model's vector is the same in every orientation: no better than ~ predicting 0
    assert inv["dipole_mae_e_a"] > 0.6 * baseline, (inv, baseline)
    # `equiforce eval` runs the exported file and reports the same dipole MAE on the same structures
    model_path = str(tmp_path / "charges.pt")
    assert cli_main(["export", str(tmp_path / "charges"), "-o", model_path]) == 0
    val_frames = [ase.io.read(data, index=k) for k in state["split"]["val"]]
    val_path = str(tmp_path / "val.extxyz")
    ase.io.write(val_path, val_frames, format="extxyz")
    capsys.readouterr()
    assert cli_main(["eval", model_path, val_path, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert abs(metrics["dipole_mae_e_a"] - charges["dipole_mae_e_a"]) < 1e-9
    assert cli_main(["eval", model_path, val_path]) == 0
    assert "dipole MAE" in capsys.readouterr().out


def test_direct_force_training_fits_forces_with_the_head(tmp_path):
    data = water_data(str(tmp_path / "water.extxyz"))
    untrained_cfg = TrainConfig.from_dict({"model": {"r_max": 2.5, "channels": 8, "lmax": 1, "num_layers": 1,
                                                     "radial_hidden": 16, "direct_forces": True}})
    assert untrained_cfg.model.direct_forces is True
    model, metrics, state = run(tmp_path, "direct", data, direct_forces=True)
    graphs, _ = load_dataset(data, 2.5, state["species"])
    rms = float(torch.sqrt(torch.cat([g["forces"] for g in graphs]).pow(2).mean())) * 1000.0
    assert metrics["force_mae_mev_per_a"] < 0.25 * rms, (metrics, rms)
    assert model.direct_forces and model.force_head is not None


def test_cli_flags_select_the_baselines(tmp_path):
    from equiforce.cli import build_parser
    from equiforce.training.config import build_config

    args = build_parser().parse_args(["train", "--data", "x.extxyz", "--direct-forces", "--dipole", "both",
                                      "--rotation-augmentation", "--lmax", "0"])
    overrides = {"model.direct_forces": args.model__direct_forces, "model.dipole": args.model__dipole,
                 "rotation_augmentation": args.rotation_augmentation, "model.lmax": args.model__lmax}
    cfg = build_config(None, overrides)
    assert cfg.model.direct_forces and cfg.model.dipole == "both" and cfg.rotation_augmentation
    assert cfg.model.lmax == 0
    from equiforce.training.config import ConfigError

    with pytest.raises(ConfigError, match="dipole must be one of"):
        build_config(None, {"model.dipole": "quadrupole"})


@pytest.mark.lammps
@pytest.mark.parametrize("ghost_shell", [False, True])
def test_direct_force_model_runs_unchanged_in_lammps(tmp_path, ghost_shell):
    """LAMMPS (serial-images and ghost-shell paths) returns the direct-force head's forces and the
    energy head's energy and virial, equal to the exported module run from Python."""
    from lammps_util import deck, parse_result, python_reference, read_dump, run_lmp, small_bulk, write_data

    from equiforce.deploy.export import export_model
    from equiforce.model.network import EquiforceModel, ModelConfig

    torch.manual_seed(0)
    model = EquiforceModel(ModelConfig(r_max=3.0, channels=4, lmax=1, num_layers=2, radial_hidden=8,
                                       avg_num_neighbors=6.0, direct_forces=True, dipole="direct"), ["C", "Si"])
    path = str(tmp_path / "direct.pt")
    export_model(model.double().for_export(), path, torch.float64, symmetry="O3")
    s = small_bulk()
    data = str(tmp_path / "bulk.data")
    write_data(data, s, ["C", "Si"])
    ref = python_reference(path, s)
    style = "pair_style equiforce device cpu" + (" path ghost_shell" if ghost_shell else "")
    proc = run_lmp(deck(data, path, ["C", "Si"], True, pair_style=style), str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    energy, press6 = parse_result(proc.stdout)
    fr = read_dump(str(tmp_path / "dump.out"))[0]
    order = np.argsort(s.tags)
    forces = np.stack([fr["fx"], fr["fy"], fr["fz"]], 1)[np.argsort(fr["id"].astype(int))]
    assert abs(energy - ref["energy"]) < 1e-9
    assert np.abs(forces - ref["forces"][order]).max() < 1e-9
    assert np.abs(press6 - ref["pressure6"]).max() < 1e-8 * max(1.0, np.abs(ref["pressure6"]).max())
    # and they are not the conservative forces: the sum of direct forces is not zero
    assert np.abs(ref["forces"].sum(0)).max() > 1e-4


def test_datagen_dipole_labels_are_e_angstrom_and_rotate():
    """GFN2-xTB dipoles stored by datagen: e·Å (water ~2.3 D = 0.48 e·Å; were the number Debye it
    would be 0.48 D, far outside any water model), rotating with the molecule, origin-independent."""
    from ase.build import molecule as ase_molecule
    from ase.units import Debye

    from equiforce.data.datagen import dataset_parameters, label_structure

    water = ase_molecule("H2O")
    mu = np.asarray(label_structure(water, periodic=False, dipole=True).info["dipole"])
    assert 1.8 < np.linalg.norm(mu) / Debye < 2.6, np.linalg.norm(mu) / Debye
    rot = random_rotation(np.random.default_rng(0))
    moved = water.copy()
    moved.positions = water.positions @ rot.T + np.array([3.0, -1.0, 2.0])
    mu_moved = np.asarray(label_structure(moved, periodic=False, dipole=True).info["dipole"])
    assert np.abs(mu_moved - rot @ mu).max() < 1e-4
    assert "dipole" not in label_structure(water, periodic=False).info  # off by default
    # the default parameter set (and so the cache identity of existing data sets) is unchanged
    assert "dipole" not in dataset_parameters("H2O") and dataset_parameters("H2O", dipole=True)["dipole"] is True
