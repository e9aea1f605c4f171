"""Reference data from GFN2-xTB: Langevin MD of a small molecule, labelled frames in extxyz.

The quantum-chemical reference is GFN2-xTB through tblite's ASE calculator
(``tblite.ase.TBLite(method="GFN2-xTB")``). A molecule (by default ethanol, built with
``ase.build.molecule("CH3CH2OH")``) is run with Langevin dynamics at ``temperature_K`` using the
xTB forces themselves; after an equilibration stretch, every ``stride``-th step is kept as one
frame. Each frame stores the xTB energy and forces of exactly its positions:

* ``atoms.info["energy"]``  -- total energy (eV)
* ``atoms.arrays["forces"]`` -- forces (eV/Å), ``-dE/dpos``
* ``atoms.info["stress"]``  -- only with ``box_A`` (periodic): stress (eV/Å^3, ASE convention)
* ``atoms.info["dipole"]``  -- only with ``dipole``: GFN2-xTB dipole (e·Å)
* ``atoms.info["polarizability"]`` -- only with ``polarizability`` (molecules): the GFN2-xTB static
  polarizability [3, 3] in e·Å²/V by finite fields (:func:`finite_field_polarizability`)

ASE's extxyz reader moves these standard names into a ``SinglePointCalculator``
(``atoms.get_potential_energy()``, ``atoms.get_forces()``); :mod:`equiforce.data.dataset` finds them there.

Labels: every kept frame is recomputed from scratch with a fresh calculator and a tight SCF
(``LABEL_ACCURACY``), so its energy and forces depend on its positions only (not on the SCF history of
the trajectory) and the forces are the exact gradient of the stored energy.

Determinism: the initial velocities and the Langevin noise come from ``numpy.random.default_rng(seed)``,
and tblite runs single-threaded (``OMP_NUM_THREADS=1`` is set before tblite is first imported, unless
the caller set it), so the same arguments give the same file on the same machine.

Caching: a data set is written once to ``out`` (default ``data_cache/<name>.extxyz`` under the current
directory) together with ``<out>.json`` holding the generating parameters; a later call with the same
parameters returns the path at once. Files are written to a temporary name and renamed, so parallel
callers never see a half-written file. An existing file at ``out`` that this command did not write
(no ``<out>.json`` record) is never replaced without ``--force``, and a directory, device, pipe or
link there is always refused.

Command line (also reachable as ``equiforce datagen``)::

    python -m equiforce.data.datagen --molecule CH3CH2OH --frames 300 --temperature 800 --seed 0 -o data.extxyz
"""
import argparse
import hashlib
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from ..errors import DatagenError

DEFAULT_CACHE_DIR = "data_cache"
# Parameters the cached file depends on; a change in any of them regenerates it.
_CACHE_VERSION = 2
# tblite SCF accuracy of the labels (1.0 is tblite's default; 0.01 converges the SCF ~100x tighter,
# measured: forces then equal central finite differences of the energy to ~2e-7 relative, h = 1e-4 Å)
LABEL_ACCURACY = 0.01
# heaviest element GFN2-xTB has parameters for (Rn)
MAX_Z = 86


def _tblite_calculator(accuracy: float = 1.0):
    """GFN2-xTB ASE calculator, quiet and (unless the caller chose otherwise) single-threaded."""
    # libgomp reads OMP_NUM_THREADS when tblite's library is first loaded
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        from tblite.ase import TBLite
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DatagenError(
            f"tblite is not importable ({exc}); install it with `pip install tblite==0.8.0` "
            "(it is in requirements.txt; `make venv` installs it)") from None
    return TBLite(method="GFN2-xTB", verbosity=0, accuracy=accuracy)


def _build_structure(molecule: str, box_A: Optional[float]):
    """``ase.Atoms`` from a name known to ``ase.build.molecule`` or a structure file path."""
    from ase.build import molecule as ase_molecule
    from ase.collections import g2

    if os.path.isfile(molecule):
        from ase.io import read
        try:
            atoms = read(molecule, index=0)
        except Exception as exc:  # ASE raises many kinds of errors on malformed files
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DatagenError(f"cannot read the structure file '{molecule}' with ASE ({msg}); give a file "
                               "ASE can read (xyz, extxyz, pdb, ...)") from None
    elif molecule in g2.names:
        atoms = ase_molecule(molecule)
    else:
        raise DatagenError(
            f"unknown molecule '{molecule}': give a name from ase.build.molecule (e.g. CH3CH2OH, H2O, "
            "CH4, C6H6) or the path of a structure file ASE can read")
    check_structure(atoms, f"molecule '{molecule}'")
    if box_A is not None:
        extent = atoms.positions.max(axis=0) - atoms.positions.min(axis=0)
        if box_A <= 0:
            raise DatagenError(f"box_A must be positive (got {box_A}); omit it for an isolated molecule")
        if box_A < float(extent.max()) + 1.0:
            raise DatagenError(
                f"box_A={box_A} Å is smaller than the molecule ({float(extent.max()):.2f} Å across) plus 1 Å; "
                "use a larger box")
        atoms.set_cell([box_A, box_A, box_A])
        atoms.set_pbc(True)
        atoms.center()
    else:
        atoms.set_cell(None)
        atoms.set_pbc(False)
    return atoms


def dataset_parameters(molecule: str = "CH3CH2OH", n_frames: int = 300, temperature_K: float = 800.0,
                       seed: int = 0, timestep_fs: float = 0.5, stride: int = 40,
                       equilibration_steps: int = 400, friction_per_fs: float = 0.01,
                       box_A: Optional[float] = None, isolated_atoms: bool = False,
                       dipole: bool = False, polarizability: bool = False) -> Dict[str, Any]:
    """The validated parameter set that identifies one data set (stored next to the file)."""
    checks = [
        (isinstance(n_frames, int) and n_frames >= 1, f"n_frames must be an integer >= 1 (got {n_frames!r})"),
        (temperature_K > 0, f"temperature_K must be positive (got {temperature_K})"),
        (timestep_fs > 0, f"timestep_fs must be positive (got {timestep_fs})"),
        (isinstance(stride, int) and stride >= 1, f"stride must be an integer >= 1 (got {stride!r})"),
        (isinstance(equilibration_steps, int) and equilibration_steps >= 0,
         f"equilibration_steps must be an integer >= 0 (got {equilibration_steps!r})"),
        (friction_per_fs > 0, f"friction_per_fs must be positive (got {friction_per_fs})"),
        (not (polarizability and box_A is not None),
         "polarizability labels need an isolated molecule (a uniform field in a periodic box is not a "
         "finite-field polarizability); drop --box or --polarizability"),
    ]
    for ok, message in checks:
        if not ok:
            raise DatagenError(message)
    from importlib.metadata import PackageNotFoundError, version

    try:  # versions are part of the identity: another xTB or integrator gives other numbers
        tblite_version, ase_version = version("tblite"), version("ase")
    except PackageNotFoundError as exc:
        raise DatagenError(f"{exc.name} is not installed; run `make venv` (or pip install -r requirements.txt)") from None
    mol_id = molecule
    if os.path.isfile(molecule):
        with open(molecule, "rb") as fh:
            mol_id = "file:" + hashlib.sha256(fh.read()).hexdigest()[:16]
    params = {
        "cache_version": _CACHE_VERSION,
        "method": "GFN2-xTB",
        "label_accuracy": LABEL_ACCURACY,
        "tblite_version": tblite_version,
        "ase_version": ase_version,
        "molecule": mol_id,
        "n_frames": int(n_frames),
        "temperature_K": float(temperature_K),
        "seed": int(seed),
        "timestep_fs": float(timestep_fs),
        "stride": int(stride),
        "equilibration_steps": int(equilibration_steps),
        "friction_per_fs": float(friction_per_fs),
        "box_A": None if box_A is None else float(box_A),
        "isolated_atoms": bool(isolated_atoms),
    }
    if dipole:  # only when asked, so the identity (and cache) of existing data sets is unchanged
        params["dipole"] = True
    if polarizability:
        params["polarizability"] = True
        params["polarizability_field_step"] = FIELD_STEP
    return params


def default_path(params: Dict[str, Any], cache_dir: str = DEFAULT_CACHE_DIR) -> str:
    """``cache_dir/<molecule>_<frames>f_<T>K_s<seed>_<hash>.extxyz`` for a parameter set."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    name = "".join(c if c.isalnum() else "_" for c in str(params["molecule"]))[:32]
    return os.path.join(cache_dir, f"{name}_{params['n_frames']}f_{params['temperature_K']:g}K_"
                                   f"s{params['seed']}_{digest}.extxyz")


def _sidecar_parameters(out: str) -> Optional[Dict[str, Any]]:
    """The parameters recorded in ``<out>.json`` when it is this command's sidecar, else None."""
    side = out + ".json"
    if not os.path.isfile(side):
        return None
    try:
        with open(side) as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return None
    params = record.get("parameters") if isinstance(record, dict) else None
    return params if isinstance(params, dict) and params.get("method") == "GFN2-xTB" else None


def _cached(out: str, params: Dict[str, Any]) -> bool:
    return os.path.isfile(out) and _sidecar_parameters(out) == params


def check_output(out: str, force: bool = False) -> None:
    """DatagenError unless ``out`` may be (re)written: nothing there yet, or this command's own output
    (``<out>.json`` sidecar present), or ``force`` for an ordinary file; never a directory, device,
    pipe or symbolic link, and the parent must be (or become) a directory."""
    for path in (out, out + ".json"):
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isfile(path)):
            raise DatagenError(f"-o '{out}': '{path}' exists and is not a regular file (a directory, device, pipe "
                               "or link); give the path of a new .extxyz file")
    ours = _sidecar_parameters(out) is not None
    if not force and not ours:
        for path in (out, out + ".json"):
            if os.path.exists(path):
                raise DatagenError(f"-o '{out}': '{path}' already exists and was not written by `equiforce "
                                   "datagen` (no parameter record beside it); choose another -o, or pass --force "
                                   "to replace it")
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise DatagenError(f"-o '{out}': cannot create its directory ({exc.strerror}: "
                           f"'{exc.filename or parent}'); give a path inside a writable directory") from None


def check_structure(atoms, where: str) -> None:
    """DatagenError for a structure GFN2-xTB cannot label: elements beyond Rn (Z > 86), or two atoms
    closer than :data:`equiforce.units.MIN_DISTANCE`."""
    import numpy as np
    from ase.data import chemical_symbols

    from ..units import MIN_DISTANCE

    if len(atoms) == 0:
        raise DatagenError(f"{where} has no atoms; give a structure with at least one atom")
    heavy = sorted({int(z) for z in atoms.numbers if int(z) > MAX_Z or int(z) < 1})
    if heavy:
        names = [chemical_symbols[z] if 0 <= z < len(chemical_symbols) else str(z) for z in heavy]
        raise DatagenError(f"{where} contains element(s) {names} (Z {heavy}); GFN2-xTB is parametrised for "
                           f"Z = 1..{MAX_Z} (H to Rn) only: remove or replace those atoms")
    if len(atoms) > 1:
        from ase.geometry import get_distances
        _, d = get_distances(atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        d = d + np.diag(np.full(len(atoms), np.inf))
        i, j = np.unravel_index(int(np.argmin(d)), d.shape)
        if d[i, j] < MIN_DISTANCE:
            i, j = sorted((int(i), int(j)))
            raise DatagenError(f"{where}: atoms {i} ({atoms[i].symbol}) and {j} ({atoms[j].symbol}) are "
                               f"{d[i, j]:.3g} Å apart, closer than the minimum distance {MIN_DISTANCE} Å "
                               "(overlapping atoms); fix the structure file")


# finite-field step (V/Å) of the polarizability labels: 0.02 V/Å = 3.9e-4 atomic units. Measured on
# H2O and H2CO (GFN2-xTB, LABEL_ACCURACY): every component changes by < 2e-5 relative between steps
# 0.005 and 0.04 V/Å (central differences: O(h^2) hyperpolarisability error); ~40 ms per tensor.
FIELD_STEP = 0.02


def dipole_in_field(atoms, field_V_per_A, accuracy: float = LABEL_ACCURACY) -> "np.ndarray":
    """GFN2-xTB dipole [3] (e·Å) of a neutral molecule in a uniform electric field [3] (V/Å)
    (:func:`singlepoint_in_field`)."""
    return singlepoint_in_field(atoms, field_V_per_A, accuracy)[1]


def singlepoint_in_field(atoms, field_V_per_A, accuracy: float = LABEL_ACCURACY):
    """``(energy eV, dipole [3] e·Å)`` of a neutral molecule in a uniform electric field [3] (V/Å)
    with GFN2-xTB.

    Through tblite's API calculator (``tblite.interface.Calculator``, positions in bohr, settings
    as its ASE calculator: ``accuracy``, 300 K electronic temperature). The field is handed over as
    a C array: tblite 0.8.0's ASE ``electric_field`` keyword passes a numpy array to cffi and fails
    ("initializer for ctype 'double *' must be a cdata pointer")."""
    import numpy as np
    from ase.units import Bohr, Hartree, kB

    _tblite_calculator()  # the import check and the thread setting
    from tblite.interface import Calculator
    from tblite.library import ffi

    calc = Calculator("GFN2-xTB", atoms.numbers, atoms.positions / Bohr)
    calc.set("accuracy", accuracy)
    calc.set("temperature", 300.0 * kB / Hartree)
    calc.set("verbosity", 0)
    field_au = np.asarray(field_V_per_A, dtype=np.float64) * Bohr / Hartree  # Hartree/(e·bohr)
    field_c = ffi.new("double[3]", [float(x) for x in field_au])
    calc.add("electric-field", field_c)
    res = calc.singlepoint()
    return float(res.get("energy")) * Hartree, np.asarray(res.get("dipole"), dtype=np.float64) * Bohr


def finite_field_polarizability(atoms, field_step: float = FIELD_STEP) -> "np.ndarray":
    """GFN2-xTB static polarizability [3, 3] (e·Å²/V, symmetrised) of a molecule by central
    differences of the dipole in a uniform field (:func:`dipole_in_field`):
    ``alpha_ij = (mu_i(+h e_j) - mu_i(-h e_j)) / 2h``, ``h = field_step`` V/Å. Six SCF runs."""
    import numpy as np

    alpha = np.zeros((3, 3))
    for j in range(3):
        field = np.zeros(3)
        field[j] = field_step
        alpha[:, j] = (dipole_in_field(atoms, field) - dipole_in_field(atoms, -field)) / (2.0 * field_step)
    return 0.5 * (alpha + alpha.T)


def label_structure(atoms, periodic: bool, dipole: bool = False, polarizability: bool = False):
    """A copy of ``atoms`` carrying GFN2-xTB energy/forces (and stress) as plain info/arrays.

    ``dipole=True`` also stores ``info["dipole"]``: the GFN2-xTB dipole moment [3] in e·Å (tblite's
    ASE calculator converts its atomic-unit dipole with ``* Bohr``, i.e. to e·Å, ASE's unit --
    its docstring says Debye, the code says e·Å; checked against water, 0.38 e·Å = 1.8 D). The
    origin does not matter for a neutral molecule.

    A fresh calculator per structure with a tight SCF (``accuracy=LABEL_ACCURACY``): the label is a
    function of the positions alone, not of the SCF guess left by earlier steps (a reused calculator
    starts from the previous wavefunction, which moves forces by ~1e-4 eV/Å at the default accuracy).
    """
    frame = atoms.copy()
    frame.set_constraint()
    frame.calc = _tblite_calculator(accuracy=LABEL_ACCURACY)
    energy = float(frame.get_potential_energy())
    forces = frame.get_forces().copy()
    stress = frame.get_stress(voigt=False).copy() if periodic else None
    mu = frame.calc.results["dipole"].copy() if dipole else None
    frame.calc = None
    for key in ("momenta", "masses"):
        if key in frame.arrays:
            del frame.arrays[key]
    frame.info = {"energy": energy}
    if polarizability:
        frame.info["polarizability"] = finite_field_polarizability(frame)
    if stress is not None:
        frame.info["stress"] = stress
    if mu is not None:
        frame.info["dipole"] = mu
    frame.arrays["forces"] = forces
    return frame


ISOLATED_ATOM = "IsolatedAtom"  # atoms.info["config_type"] of reference single-atom frames (as MACE)


def isolated_atom_frames(symbols: Sequence[str]) -> List[Any]:
    """One GFN2-xTB-labelled single-atom frame per element, marked ``info["config_type"] =
    "IsolatedAtom"``: `equiforce train` uses their energies as the species shifts, so an isolated
    atom's energy is its reference energy in the labelling method.

    tblite's default (no fixed multiplicity, fractional occupations at 300 K) is used: GFN2-xTB has
    no spin-polarisation term by default, and fixing a Hund's-rule multiplicity raises the energy
    (measured for O: -102.52 eV as a triplet against -102.57 eV by default)."""
    import numpy as np
    from ase import Atoms
    from ase.data import atomic_numbers

    frames = []
    for sym in sorted(set(symbols), key=lambda s: atomic_numbers[s]):
        atoms = Atoms(sym, positions=[[0.0, 0.0, 0.0]])
        atoms.calc = _tblite_calculator(accuracy=LABEL_ACCURACY)
        energy = float(atoms.get_potential_energy())
        atoms.calc = None
        atoms.info = {"energy": energy, "config_type": ISOLATED_ATOM}
        atoms.arrays["forces"] = np.zeros((1, 3))
        frames.append(atoms)
    return frames


def run_md_frames(params: Dict[str, Any], molecule: str, box_A: Optional[float],
                  progress: bool = False) -> List[Any]:
    """Run the Langevin MD described by ``params`` and return the labelled frames."""
    import numpy as np
    from ase import units
    from ase.md.langevin import Langevin
    from ase.constraints import FixCom
    from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta

    atoms = _build_structure(molecule, box_A)
    periodic = box_A is not None
    atoms.calc = _tblite_calculator()  # default accuracy for the dynamics; labels are recomputed
    rng = np.random.default_rng(params["seed"])
    thermalize_momenta(atoms, temperature_K=params["temperature_K"], rng=rng)
    Stationary(atoms)
    if not periodic:
        ZeroRotation(atoms)
    atoms.set_constraint(FixCom())  # no drift of the centre of mass under the Langevin noise
    dyn = Langevin(atoms, timestep=params["timestep_fs"] * units.fs, temperature_K=params["temperature_K"],
                   friction=params["friction_per_fs"] / units.fs, fixcm=False, rng=rng)
    if params["equilibration_steps"]:
        dyn.run(params["equilibration_steps"])
    frames = []
    t0 = time.perf_counter()
    for k in range(params["n_frames"]):
        dyn.run(params["stride"])
        frames.append(label_structure(atoms, periodic, dipole=bool(params.get("dipole", False)),
                                      polarizability=bool(params.get("polarizability", False))))
        if progress and (k + 1) % max(1, params["n_frames"] // 10) == 0:
            print(f"  datagen: {k + 1}/{params['n_frames']} frames ({time.perf_counter() - t0:.1f} s)",
                  file=sys.stderr, flush=True)
    return frames


def make_md_dataset(molecule: str = "CH3CH2OH", n_frames: int = 300, temperature_K: float = 800.0,
                    seed: int = 0, out: Optional[str] = None, *, timestep_fs: float = 0.5, stride: int = 40,
                    equilibration_steps: int = 400, friction_per_fs: float = 0.01,
                    box_A: Optional[float] = None, isolated_atoms: bool = False, dipole: bool = False,
                    polarizability: bool = False, cache_dir: str = DEFAULT_CACHE_DIR, force: bool = False, progress: bool = False) -> str:
    """Generate (or reuse) an xTB-labelled MD data set and return the extxyz path.

    molecule: name for ``ase.build.molecule`` or a structure file. n_frames: frames kept, one every
    ``stride`` MD steps of ``timestep_fs`` after ``equilibration_steps``. temperature_K: Langevin
    temperature (K), friction ``friction_per_fs`` (1/fs). box_A: edge (Å) of a cubic periodic box
    around the molecule (adds stress labels), None for an isolated molecule. isolated_atoms: append
    one labelled single-atom frame per element (:func:`isolated_atom_frames`). dipole: also store the
    GFN2-xTB dipole (``info["dipole"]``, e·Å). polarizability: also store the GFN2-xTB finite-field
    polarizability (``info["polarizability"]``, e·Å²/V; molecules only). out: destination
    (default under ``cache_dir``); reused when its ``.json`` sidecar records the same parameters,
    unless ``force``. An existing ``out`` that this command did not write (no sidecar) is refused
    unless ``force``; a directory, device, pipe or link at ``out`` is always refused
    (:func:`check_output`), and so is a structure GFN2-xTB cannot label (:func:`check_structure`).
    """
    params = dataset_parameters(molecule, n_frames, temperature_K, seed, timestep_fs, stride,
                                equilibration_steps, friction_per_fs, box_A, isolated_atoms, dipole, polarizability)
    out = out or default_path(params, cache_dir)
    check_output(out, force)  # before the MD: never replace a user's file, fail fast on a bad -o
    if not force and _cached(out, params):
        return out
    from ase.io import write

    t0 = time.perf_counter()
    frames = run_md_frames(params, molecule, box_A, progress=progress)
    if isolated_atoms:
        references = isolated_atom_frames(frames[0].get_chemical_symbols())
        if dipole:
            for ref in references:
                ref.info["dipole"] = [0.0, 0.0, 0.0]
        if polarizability:
            for ref in references:
                ref.info["polarizability"] = finite_field_polarizability(ref)
        frames += references
    seconds = time.perf_counter() - t0
    check_output(out, force)  # again: the MD took a while, something may have appeared at out
    tmp = f"{out}.tmp{os.getpid()}"
    write(tmp, frames, format="extxyz")
    with open(tmp + ".json", "w") as fh:
        json.dump({"parameters": params, "n_atoms": len(frames[0]), "seconds": round(seconds, 2),
                   "units": {"energy": "eV", "forces": "eV/Angstrom", "stress": "eV/Angstrom^3"}},
                  fh, indent=1)
    # the record first: whenever ``out`` is this command's file, its record is already beside it
    os.replace(tmp + ".json", out + ".json")
    os.replace(tmp, out)
    return out


def split_dataset(path: str, test_fraction: float, seed: int = 0, out_dir: Optional[str] = None) -> Sequence[str]:
    """Split an extxyz file into ``(train_path, test_path)`` with a seeded shuffle.

    Used by the demo to keep a held-out test set that training never sees; isolated-atom reference
    frames all go to the training file. Files are written next to
    ``path`` (or into ``out_dir``) as ``<stem>.train.extxyz`` / ``<stem>.test.extxyz``.
    """
    import numpy as np
    from ase.io import read, write

    if not 0.0 < test_fraction < 1.0:
        raise DatagenError(f"test_fraction must be between 0 and 1 (got {test_fraction})")
    every = read(path, index=":")
    references = [a for a in every if a.info.get("config_type") == ISOLATED_ATOM]  # always train
    frames = [a for a in every if a.info.get("config_type") != ISOLATED_ATOM]
    n_test = max(1, int(round(test_fraction * len(frames))))
    if n_test >= len(frames):
        raise DatagenError(f"'{path}' has {len(frames)} frames: too few to hold out {n_test} for testing")
    order = np.random.default_rng(seed).permutation(len(frames))
    stem = os.path.splitext(os.path.basename(path))[0]
    out_dir = out_dir or os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for tag, idx in (("train", order[n_test:]), ("test", order[:n_test])):
        p = os.path.join(out_dir, f"{stem}.{tag}.extxyz")
        write(p, [frames[i] for i in sorted(idx)] + (references if tag == "train" else []), format="extxyz")
        paths.append(p)
    return tuple(paths)


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """Arguments of ``equiforce datagen`` (pass a subparser to attach them to a CLI)."""
    p = parser or argparse.ArgumentParser(
        prog="equiforce datagen",
        description="Make a GFN2-xTB reference data set (extxyz: energy eV, forces eV/Å) by Langevin MD.")
    p.add_argument("--molecule", default="CH3CH2OH",
                   help="ase.build.molecule name or structure file (default CH3CH2OH, ethanol)")
    p.add_argument("--frames", type=int, default=300, help="number of frames to keep (default 300)")
    p.add_argument("--temperature", type=float, default=800.0, help="Langevin temperature in K (default 800)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--timestep", type=float, default=0.5, help="MD time step in fs (default 0.5)")
    p.add_argument("--stride", type=int, default=40, help="MD steps between kept frames (default 40)")
    p.add_argument("--equilibration", type=int, default=400, help="MD steps before the first frame (default 400)")
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction in 1/fs (default 0.01)")
    p.add_argument("--box", type=float, default=None,
                   help="cubic periodic box edge in Å (adds stress labels); default: isolated molecule")
    p.add_argument("--isolated-atoms", action="store_true",
                   help="append one labelled isolated-atom frame per element (config_type=IsolatedAtom); "
                        "`equiforce train` takes their energies as the species reference energies")
    p.add_argument("--dipole", action="store_true", help="also store the GFN2-xTB dipole moment (info 'dipole', e·Å)")
    p.add_argument("--polarizability", action="store_true",
                   help="also store the GFN2-xTB static polarizability by finite fields (info 'polarizability', "
                        "3x3 e·Å²/V; 6 extra SCF runs per frame; molecules only)")
    p.add_argument("-o", "--out", default=None, help=f"output extxyz (default: under {DEFAULT_CACHE_DIR}/)")
    p.add_argument("--force", action="store_true",
                   help="regenerate even when a cached file matches, and replace an existing -o file that "
                        "datagen did not write")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def run_from_args(args: argparse.Namespace) -> str:
    """Run ``equiforce datagen`` for parsed arguments; prints the output path and returns it."""
    t0 = time.perf_counter()
    path = make_md_dataset(args.molecule, args.frames, args.temperature, args.seed, args.out,
                           timestep_fs=args.timestep, stride=args.stride, equilibration_steps=args.equilibration,
                           friction_per_fs=args.friction, box_A=args.box, isolated_atoms=args.isolated_atoms,
                           dipole=bool(getattr(args, "dipole", False)),
                           polarizability=bool(getattr(args, "polarizability", False)), force=args.force,
                           progress=not args.quiet)
    if not args.quiet:
        print(f"datagen: {path} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    print(path)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: ``python -m equiforce.data.datagen [options]``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        run_from_args(args)
    except DatagenError as exc:
        print(f"equiforce datagen: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
