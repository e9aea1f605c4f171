"""Shared helpers of the physics demonstrations (examples/physics/*.py).

Data: GFN2-xTB Langevin MD through :func:`equiforce.data.datagen.make_md_dataset` (cached under
``data_cache/``). Training: :func:`equiforce.training.loop.train` with small models on CPU. Evaluation:
the EXPORTED file (:func:`equiforce.deploy.evaluate.evaluate_exported`, ``module.dipole``), as users run it.
Results (PNG + JSON) go to ``examples/physics/results/``; run directories and models to
``demo_out/physics/`` (git-ignored).
"""
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "python"))  # runs from a clean checkout before `pip install`
os.environ.setdefault("OMP_NUM_THREADS", "1")

from equiforce.o3.rotations import random_rotation  # noqa: E402,F401  (re-exported for the scripts)

RESULTS = os.path.join(REPO, "examples", "physics", "results")
WORK = os.path.join(REPO, "demo_out", "physics")


def make_data(molecule: str, **kwargs: Any) -> str:
    """:func:`equiforce.data.datagen.make_md_dataset` with the cache in ``<repo>/data_cache`` whatever the cwd."""
    from equiforce.data.datagen import make_md_dataset

    return make_md_dataset(molecule, cache_dir=os.path.join(REPO, "data_cache"), progress=True, **kwargs)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def transform_frame(atoms, matrix: np.ndarray):
    """A copy of a labelled frame with positions, forces, dipole and polarizability mapped by ``matrix`` [3, 3]
    (a rotation, or a reflection for a mirror image); the energy is unchanged."""
    out = atoms.copy()
    out.positions = atoms.positions @ matrix.T
    out.arrays["forces"] = atoms.arrays["forces"] @ matrix.T
    if "dipole" in atoms.info:
        out.info["dipole"] = np.asarray(atoms.info["dipole"]) @ matrix.T
    if "polarizability" in atoms.info:  # a true rank-2 tensor: M alpha M^T
        out.info["polarizability"] = matrix @ np.asarray(atoms.info["polarizability"]).reshape(3, 3) @ matrix.T
    return out


def read_frames(path: str) -> list:
    """Frames with labels as plain info/arrays (ASE's reader moves energy/forces/dipole into a calculator)."""
    import ase.io

    frames = []
    for a in ase.io.read(path, index=":"):
        res = dict(a.calc.results) if a.calc is not None else {}
        a.calc = None
        for key in ("energy", "dipole"):
            if key in res:
                a.info[key] = res[key]
        if "forces" in res:
            a.arrays["forces"] = res["forces"]
        frames.append(a)
    return frames


def write_frames(path: str, frames: Sequence) -> str:
    import ase.io

    os.makedirs(os.path.dirname(path), exist_ok=True)
    ase.io.write(path, list(frames), format="extxyz")
    return path


def train_model(name: str, data: str, model: Dict[str, Any], epochs: int, max_minutes: Optional[float] = None,
                **settings: Any) -> str:
    """Train a fresh run ``demo_out/physics/<name>`` and export ``<name>.pt`` (float64); returns the model path."""
    import shutil

    from equiforce.cli import main as cli_main
    from equiforce.training.config import TrainConfig
    from equiforce.training.loop import train

    out = os.path.join(WORK, name)
    shutil.rmtree(out, ignore_errors=True)
    cfg = {"data": data, "out": out, "epochs": epochs, "max_minutes": max_minutes, "dtype": "float32",
           "num_threads": 1, "val_fraction": 0.1, "ema_decay": 0.99, "early_stopping_patience": 0,
           "lr": 0.01, "batch_size": 4, "plateau_patience": 5, **settings, "model": model}
    t0 = time.perf_counter()
    summary = train(TrainConfig.from_dict(cfg), progress=False, log=lambda s: None)
    path = os.path.join(WORK, f"{name}.pt")
    with open(os.devnull, "w") as devnull:
        stdout, sys.stdout = sys.stdout, devnull
        try:
            code = cli_main(["export", out, "-o", path, "--dtype", "float64"])
        finally:
            sys.stdout = stdout
    if code != 0:
        raise RuntimeError(f"export of {out} failed")
    log(f"trained {name}: {summary['epoch']} epochs in {time.perf_counter() - t0:.0f} s")
    return path


class Exported:
    """An exported model file evaluated structure by structure (energy, forces, dipole), through
    :class:`equiforce.deploy.runner.ExportedRunner` (the same path as the ASE calculator and eval)."""

    def __init__(self, path: str):
        from equiforce.deploy.runner import ExportedRunner

        self.runner = ExportedRunner(path, owner="examples/physics")
        self.module, self.meta, self.dtype = self.runner.module, self.runner.metadata, self.runner.dtype

    def energy_forces(self, atoms):
        res = self.runner.run_atoms(atoms)
        return res.energy, res.forces

    def dipole(self, atoms) -> np.ndarray:
        return self.runner.dipole(atoms.positions, atoms.get_chemical_symbols(), atoms.cell.array, atoms.pbc, 0.0)

    def polarizability(self, atoms) -> np.ndarray:
        return self.runner.polarizability(atoms.positions, atoms.get_chemical_symbols(), atoms.cell.array, atoms.pbc)


def errors(model: Exported, frames: Sequence, dipole: bool = False) -> Dict[str, float]:
    """MAEs of an exported model on labelled frames: energy (meV/atom), forces (meV/Å), dipole (e·Å)."""
    e_err, f_err, d_err = [], [], []
    for a in frames:
        e, f = model.energy_forces(a)
        e_err.append(abs(e - a.info["energy"]) / len(a))
        f_err.append(np.abs(f - a.arrays["forces"]).ravel())
        if dipole:
            d_err.append(np.abs(model.dipole(a) - np.asarray(a.info["dipole"])))
    out = {"energy_mae_mev_per_atom": 1000 * float(np.mean(e_err)),
           "force_mae_mev_per_a": 1000 * float(np.mean(np.concatenate(f_err)))}
    if dipole:
        out["dipole_mae_e_a"] = float(np.mean(np.concatenate(d_err)))
    return out


def save_json(name: str, payload: Dict[str, Any]) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1)
    log(f"wrote {path}")
    return path


def figure_path(name: str) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    return os.path.join(RESULTS, f"{name}.png")


def openmm_topology(symbols: List[str]):
    from openmm import app

    top = app.Topology()
    chain = top.addChain()
    res = top.addResidue("MOL", chain)
    for k, s in enumerate(symbols):
        top.addAtom(f"{s}{k}", app.Element.getBySymbol(s), res)
    return top
