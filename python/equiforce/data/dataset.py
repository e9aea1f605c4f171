"""Training data: extxyz files -> graphs -> batches.

Where labels are looked up (``energy_key``, ``forces_key``, ``stress_key``; defaults
``"energy"``, ``"forces"``, ``"stress"``), in this order:

1. ``atoms.info[energy_key]`` / ``atoms.arrays[forces_key]`` / ``atoms.info[stress_key]``;
2. the results of the calculator attached to the structure, ``atoms.calc.results[key]``.
   ASE's extxyz reader moves the standard names (``energy``, ``forces``, ``stress``, ...) out of
   ``info``/``arrays`` into a ``SinglePointCalculator``; this step finds them there. Custom names
   such as ``REF_energy`` stay in ``info``/``arrays`` and are found in step 1.

Optional per-structure labels for the dipole head (:mod:`equiforce.nn.heads`): ``dipole_key``
(default ``"dipole"``, 3 numbers in e·Å, ASE's unit; structures without it are masked out of the
dipole loss) and ``charge_key`` (default ``"charge"``, the total charge in e; 0 when absent).
For the polarizability head: ``polarizability_key`` (default ``"polarizability"``), the static
polarizability tensor in e·Å²/V (= (e·Å) per (V/Å): dipole change per applied field), symmetric,
given as 3x3, 9 numbers (row-major) or 6 Voigt numbers (xx, yy, zz, yz, xz, xy); structures without
it are masked out of the polarizability loss. Polarizability volumes in Å^3 (the usual tabulated
unit) convert as ``alpha[e·Å²/V] = alpha[Å^3] / 14.399645`` (4 pi eps0 = 1 / 14.399645 e/(V·Å)),
atomic units as ``alpha[e·Å²/V] = alpha[bohr^3] * 0.148184711 / 14.399645``
(:data:`equiforce.units.POLARIZABILITY_VOLUME_A3`).

Energy and forces are required for every structure; stress is optional per structure (a mask
marks the structures that have it). Stress is in the ASE convention (eV/Å^3, ``stress =
(1/V) dE/dstrain``), given as 3x3, 9 numbers or 6 Voigt numbers (xx, yy, zz, yz, xz, xy).

A graph (one structure) is a dict of tensors, kept in float64 until :func:`collate` casts it::

    pos [n, 3] Å, species [n] int64 (index into the species list), edge_index [2, E] int64,
    edge_shift [E, 3] Å, cell [3, 3] Å (rows; zeros when not periodic), pbc [3] bool,
    energy [] eV, forces [n, 3] eV/Å, stress [3, 3] eV/Å^3 (zeros when absent),
    has_stress [] bool, natoms [] int64, dipole [3] e·Å (zeros when absent), has_dipole [] bool,
    total_charge [] e, polarizability [3, 3] e·Å²/V (zeros when absent), has_polarizability [] bool
"""
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from ase.data import atomic_numbers, chemical_symbols
from torch import Tensor

from ..errors import DataError
from ..units import MIN_DISTANCE

Graph = Dict[str, Tensor]


def read_structures(path: str) -> list:
    """All structures of an extxyz (or any ASE-readable) file, with clear errors."""
    import ase.io

    if os.path.isdir(path):
        raise DataError(f"data path '{path}' is a directory, not a data file; pass the extxyz file itself "
                        "(e.g. --data data/train.extxyz)")
    if not os.path.isfile(path):
        raise DataError(f"data file '{path}' does not exist; pass an extxyz file with --data")
    if os.path.getsize(path) == 0:
        raise DataError(f"data file '{path}' is empty; it must hold at least one structure (extxyz)")
    try:
        frames = ase.io.read(path, index=":")
    except KeyError as exc:  # ASE's reader looks every species symbol up in ase.data
        key = exc.args[0] if exc.args else None
        if isinstance(key, str) and key not in atomic_numbers:
            line = _first_line_with_symbol(path, key)
            where = f" (line {line})" if line else ""
            raise DataError(f"'{path}' contains the unknown element symbol '{key}'{where}; the species column "
                            "must hold chemical symbols (H, C, O, ...): fix or remove those atoms") from None
        raise DataError(f"cannot read '{path}' with ASE (missing {key!r}); it must be an extxyz file") from None
    except Exception as exc:  # ASE raises many kinds of errors on malformed files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot read '{path}' with ASE ({msg}); it must be an extxyz file") from None
    if not isinstance(frames, list):
        frames = [frames]
    if len(frames) == 0:
        raise DataError(f"data file '{path}' holds no structures; it must hold at least one (extxyz)")
    return frames


def _first_line_with_symbol(path: str, symbol: str) -> Optional[int]:
    """1-based number of the first line whose first field is ``symbol`` (None if there is none)."""
    try:
        with open(path, errors="replace") as fh:
            for number, line in enumerate(fh, start=1):
                fields = line.split()
                if fields and fields[0] == symbol:
                    return number
    except OSError:
        return None
    return None


def _calc_results(atoms) -> dict:
    calc = getattr(atoms, "calc", None)
    return dict(getattr(calc, "results", {}) or {}) if calc is not None else {}


def _available_keys(atoms) -> str:
    keys = sorted(set(atoms.info) | (set(atoms.arrays) - {"numbers", "positions"}) | set(_calc_results(atoms)))
    return ", ".join(keys) if keys else "(none)"


def _lookup(atoms, key: str, per_atom: bool, where: str = "a structure") -> Optional[np.ndarray]:
    store = atoms.arrays if per_atom else atoms.info
    results = _calc_results(atoms)
    if key in store:
        value = store[key]
    elif key in results and results[key] is not None:
        value = results[key]
    else:
        return None
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: label '{key}' holds {value!r}, not numbers; fix the value in the file "
                        "or name another label with the matching --...-key option") from None


def _stress_3x3(value: np.ndarray, where: str) -> np.ndarray:
    v = np.asarray(value, dtype=np.float64).reshape(-1)
    if v.size == 9:
        return v.reshape(3, 3)
    if v.size == 6:
        xx, yy, zz, yz, xz, xy = v
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    raise DataError(f"{where}: stress must have 6 (Voigt) or 9 components, got {v.size}")


def extract_labels(atoms, index: int, path: str, energy_key: str = "energy", forces_key: str = "forces",
                   stress_key: str = "stress") -> Tuple[float, np.ndarray, Optional[np.ndarray]]:
    """``(energy eV, forces [n, 3] eV/Å, stress [3, 3] eV/Å^3 or None)`` of one structure."""
    where = f"'{path}' structure {index}"
    energy = _lookup(atoms, energy_key, per_atom=False, where=where)
    if energy is None:
        raise DataError(f"{where} has no energy under key '{energy_key}' (keys found: {_available_keys(atoms)}); "
                        "set energy_key (--energy-key) to the right name")
    forces = _lookup(atoms, forces_key, per_atom=True, where=where)
    if forces is None:
        raise DataError(f"{where} has no forces under key '{forces_key}' (keys found: {_available_keys(atoms)}); "
                        "set forces_key (--forces-key) to the right name")
    if energy.size != 1:
        raise DataError(f"{where}: energy '{energy_key}' must be one number, got shape {energy.shape}")
    if forces.shape != (len(atoms), 3):
        raise DataError(f"{where}: forces '{forces_key}' must have shape ({len(atoms)}, 3), got {forces.shape}")
    stress_raw = _lookup(atoms, stress_key, per_atom=False, where=where)
    stress = None if stress_raw is None else _stress_3x3(stress_raw, where)
    for name, value in (("energy", energy), ("forces", forces), ("stress", stress),
                        ("positions", atoms.positions), ("cell", atoms.cell.array)):
        if value is not None and not np.all(np.isfinite(value)):
            raise DataError(f"{where}: {name} contains non-finite values (NaN or inf); fix or remove the structure")
    return float(energy.reshape(())), forces, stress


def extract_dipole(atoms, index: int, path: str, dipole_key: str = "dipole") -> Optional[np.ndarray]:
    """Dipole label [3] (e·Å) of one structure, or None when it has none."""
    value = _lookup(atoms, dipole_key, per_atom=False, where=f"'{path}' structure {index}")
    if value is None:
        return None
    if value.size != 3 or not np.all(np.isfinite(value)):
        raise DataError(f"'{path}' structure {index}: dipole '{dipole_key}' must be 3 finite numbers (e·Å), "
                        f"got {value.tolist()}")
    return value.reshape(3)


def extract_polarizability(atoms, index: int, path: str,
                           polarizability_key: str = "polarizability") -> Optional[np.ndarray]:
    """Polarizability label [3, 3] (e·Å²/V, symmetric) of one structure, or None when it has none.
    Accepts 3x3, 9 numbers (row-major) or 6 Voigt numbers (xx, yy, zz, yz, xz, xy)."""
    where = f"'{path}' structure {index}"
    value = _lookup(atoms, polarizability_key, per_atom=False, where=where)
    if value is None:
        return None
    v = value.reshape(-1)
    if v.size not in (6, 9):
        raise DataError(f"{where}: polarizability '{polarizability_key}' must have 9 (3x3) or 6 (Voigt xx yy zz yz "
                        f"xz xy) numbers in e·Å²/V, got {v.size}")
    if not np.all(np.isfinite(v)):
        raise DataError(f"{where}: polarizability '{polarizability_key}' contains non-finite values (NaN or inf); "
                        "fix or remove the label")
    if v.size == 6:
        xx, yy, zz, yz, xz, xy = v
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    a = v.reshape(3, 3)
    asym = float(np.abs(a - a.T).max())
    if asym > 1e-6 * max(1.0, float(np.abs(a).max())):
        raise DataError(f"{where}: polarizability '{polarizability_key}' is not symmetric (|a - a^T| up to {asym:.3g}); "
                        "a static polarizability is a symmetric tensor: give (a + a^T) / 2 or the 6 Voigt numbers")
    return 0.5 * (a + a.T)


def extract_total_charge(atoms, index: int, path: str, charge_key: str = "charge") -> float:
    """Total charge (e) of one structure from ``atoms.info[charge_key]``; 0 when absent."""
    value = atoms.info.get(charge_key)
    if value is None:
        return 0.0
    try:
        q = float(value)
    except (TypeError, ValueError):
        raise DataError(f"'{path}' structure {index}: total charge '{charge_key}' must be a number, "
                        f"got {value!r}") from None
    if not math.isfinite(q):
        raise DataError(f"'{path}' structure {index}: total charge '{charge_key}' is not finite")
    return q


def species_from_structures(frames: Sequence) -> List[str]:
    """Chemical symbols present in the data, sorted by atomic number."""
    numbers = sorted({int(z) for atoms in frames for z in atoms.numbers})
    return [chemical_symbols[z] for z in numbers]


def species_indices(symbols: Sequence[str], species_names: Sequence[str], where: str) -> Tensor:
    """Index of each symbol in ``species_names`` [n] int64; error naming any element the model lacks."""
    lookup = {s: i for i, s in enumerate(species_names)}
    missing = sorted({s for s in symbols if s not in lookup}, key=lambda s: atomic_numbers.get(s, 0))
    if missing:
        raise DataError(f"{where} contains element(s) {missing} that the model does not know; "
                        f"the model's species are {list(species_names)}")
    return torch.tensor([lookup[s] for s in symbols], dtype=torch.long)


def atoms_to_graph(atoms, species_names: Sequence[str], r_max: float, where: str = "structure",
                   labels: Optional[Tuple[float, np.ndarray, Optional[np.ndarray]]] = None) -> Graph:
    """Graph of one ASE structure with all pairs closer than ``r_max`` (Å), see the module docstring."""
    from .neighbors import neighbor_list

    if not (r_max > 0 and math.isfinite(r_max)):
        raise DataError(f"cutoff r_max must be a positive number of Å, got {r_max!r}")
    pos = torch.tensor(atoms.positions, dtype=torch.float64)
    pbc = torch.tensor([bool(p) for p in atoms.pbc], dtype=torch.bool)
    cell = torch.tensor(atoms.cell.array, dtype=torch.float64)
    periodic = cell[pbc]
    if periodic.shape[0] and int(torch.linalg.matrix_rank(periodic)) < periodic.shape[0]:
        raise DataError(f"{where} is periodic along {[k for k in range(3) if bool(pbc[k])]} but those lattice vectors "
                        "are zero or linearly dependent; give a proper cell or set pbc=F")
    species = species_indices(atoms.get_chemical_symbols(), species_names, where)
    edge_index, edge_shift, _ = neighbor_list(pos, float(r_max), cell, pbc)
    n = len(atoms)
    graph: Graph = {
        "pos": pos, "species": species, "edge_index": edge_index.to(torch.long),
        "edge_shift": edge_shift.to(torch.float64), "cell": cell, "pbc": pbc,
        "natoms": torch.tensor(n, dtype=torch.long),
        "energy": torch.tensor(0.0, dtype=torch.float64), "forces": torch.zeros((n, 3), dtype=torch.float64),
        "stress": torch.zeros((3, 3), dtype=torch.float64), "has_stress": torch.tensor(False),
        "dipole": torch.zeros(3, dtype=torch.float64), "has_dipole": torch.tensor(False),
        "total_charge": torch.tensor(0.0, dtype=torch.float64),
        "polarizability": torch.zeros((3, 3), dtype=torch.float64), "has_polarizability": torch.tensor(False),
    }
    if labels is not None:
        energy, forces, stress = labels
        graph["energy"] = torch.tensor(energy, dtype=torch.float64)
        graph["forces"] = torch.tensor(forces, dtype=torch.float64)
        if stress is not None:
            if not bool(pbc.all()):
                raise DataError(f"{where} has a stress label but is not periodic in all directions; "
                                "stress needs a 3D-periodic cell")
            graph["stress"] = torch.tensor(stress, dtype=torch.float64)
            graph["has_stress"] = torch.tensor(True)
    return graph


def closest_pair(pos: Tensor, edge_index: Tensor, edge_shift: Tensor) -> Optional[Tuple[int, int, float]]:
    """``(i, j, distance in Å)`` of the closest edge (``|pos[j] - pos[i] + edge_shift|``, computed in
    float64), or None without edges. ``i == j`` means an atom and its own periodic image."""
    if edge_index.shape[1] == 0:
        return None
    p = pos.to(torch.float64)
    d = torch.linalg.norm(p[edge_index[1]] - p[edge_index[0]] + edge_shift.to(torch.float64), dim=1)
    k = int(torch.argmin(d))
    return int(edge_index[0, k]), int(edge_index[1, k]), float(d[k])


def min_distance_message(pair: Tuple[int, int, float], min_distance: float) -> str:
    """``"atoms 2 and 6 are 0.3 Å apart, closer than the minimum distance 0.5 Å"`` for ``closest_pair``."""
    i, j, d = pair
    what = f"atoms {i} and {j} are" if i != j else f"atom {i} and its own periodic image are"
    return f"{what} {d:.4g} Å apart, closer than the minimum distance {min_distance:g} Å"


def load_dataset(path: str, r_max: float, species_names: Optional[Sequence[str]] = None,
                 energy_key: str = "energy", forces_key: str = "forces",
                 stress_key: str = "stress", dipole_key: str = "dipole",
                 charge_key: str = "charge",
                 polarizability_key: str = "polarizability") -> Tuple[List[Graph], List[str]]:
    """Read ``path`` and build labelled graphs. ``species_names`` defaults to the elements in the data
    (sorted by atomic number). Returns ``(graphs, species_names)``. A structure with two atoms closer
    than :data:`equiforce.units.MIN_DISTANCE` (within ``r_max``) is refused (DataError naming the
    file, the structure and the atoms)."""
    frames = read_structures(path)
    names = species_from_structures(frames) if species_names is None else list(species_names)
    graphs = [frame_to_graph(atoms, k, path, names, r_max, energy_key, forces_key, stress_key, dipole_key, charge_key,
                             polarizability_key)
              for k, atoms in enumerate(frames)]
    return graphs, names


def frame_to_graph(atoms, k: int, path: str, species_names: Sequence[str], r_max: float,
                   energy_key: str = "energy", forces_key: str = "forces", stress_key: str = "stress",
                   dipole_key: str = "dipole", charge_key: str = "charge",
                   polarizability_key: str = "polarizability") -> Graph:
    """The labelled graph of structure ``k`` of the file ``path`` (every check of :func:`load_dataset`;
    also used by the graph store's preprocessing, so both give identical graphs)."""
    labels = extract_labels(atoms, k, path, energy_key, forces_key, stress_key)
    g = atoms_to_graph(atoms, species_names, r_max, where=f"'{path}' structure {k}", labels=labels)
    pair = closest_pair(g["pos"], g["edge_index"], g["edge_shift"])
    if pair is not None and pair[2] < MIN_DISTANCE:
        raise DataError(f"'{path}' structure {k}: {min_distance_message(pair, MIN_DISTANCE)} "
                        "(equiforce.units.MIN_DISTANCE): no model is valid there; remove the structure or fix "
                        "its positions")
    dipole = extract_dipole(atoms, k, path, dipole_key)
    if dipole is not None:
        g["dipole"] = torch.tensor(dipole, dtype=torch.float64)
        g["has_dipole"] = torch.tensor(True)
    g["total_charge"] = torch.tensor(extract_total_charge(atoms, k, path, charge_key), dtype=torch.float64)
    alpha = extract_polarizability(atoms, k, path, polarizability_key)
    if alpha is not None:
        g["polarizability"] = torch.tensor(alpha, dtype=torch.float64)
        g["has_polarizability"] = torch.tensor(True)
    return g


def split_indices(n: int, val_fraction: float, test_fraction: float = 0.0,
                  seed: int = 0) -> Tuple[List[int], List[int], List[int]]:
    """Random train/val/test split of ``range(n)``, reproducible for a given seed.

    Sizes are ``round(fraction * n)``, at least one structure each when the fraction is > 0, and
    the training set keeps at least one structure.
    """
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise DataError(f"{name} must be in [0, 1), got {f}")
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    n_test = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise DataError(f"{n} structure(s) are too few for val_fraction={val_fraction} and "
                        f"test_fraction={test_fraction}; the training set would be empty")
    perm = np.random.default_rng(seed).permutation(n).tolist()
    test = sorted(perm[:n_test])
    val = sorted(perm[n_test:n_test + n_val])
    train = sorted(perm[n_test + n_val:])
    return train, val, test


def collate(graphs: Sequence[Graph], dtype: torch.dtype = torch.float64,
            device: torch.device = torch.device("cpu")) -> Dict[str, object]:
    """Concatenate graphs into one batch (a disjoint union).

    Atom-level tensors are concatenated; ``edge_index`` is offset by each graph's first atom;
    ``batch`` [N] is the graph index of every atom; graph-level tensors are stacked ([B], [B, 3, 3]).
    Floating tensors are cast to ``dtype``; ``num_graphs`` is a Python int.
    """
    if len(graphs) == 0:
        raise ValueError("collate needs at least one graph")
    counts = [int(g["natoms"]) for g in graphs]
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    out: Dict[str, object] = {
        "pos": torch.cat([g["pos"] for g in graphs]),
        "species": torch.cat([g["species"] for g in graphs]),
        "edge_index": torch.cat([g["edge_index"] + off for g, off in zip(graphs, offsets)], dim=1),
        "edge_shift": torch.cat([g["edge_shift"] for g in graphs]),
        "forces": torch.cat([g["forces"] for g in graphs]),
        "batch": torch.cat([torch.full((c,), b, dtype=torch.long) for b, c in enumerate(counts)]),
        "cell": torch.stack([g["cell"] for g in graphs]),
        "pbc": torch.stack([g["pbc"] for g in graphs]),
        "energy": torch.stack([g["energy"] for g in graphs]),
        "stress": torch.stack([g["stress"] for g in graphs]),
        "has_stress": torch.stack([g["has_stress"] for g in graphs]),
        "natoms": torch.stack([g["natoms"] for g in graphs]),
        # optional labels (graphs built elsewhere may lack them)
        "dipole": torch.stack([g.get("dipole", torch.zeros(3, dtype=torch.float64)) for g in graphs]),
        "has_dipole": torch.stack([g.get("has_dipole", torch.tensor(False)) for g in graphs]),
        "total_charge": torch.stack([g.get("total_charge", torch.tensor(0.0, dtype=torch.float64)) for g in graphs]),
        "polarizability": torch.stack([g.get("polarizability", torch.zeros((3, 3), dtype=torch.float64))
                                       for g in graphs]),
        "has_polarizability": torch.stack([g.get("has_polarizability", torch.tensor(False)) for g in graphs]),
    }
    for k, v in list(out.items()):
        assert isinstance(v, Tensor)
        out[k] = v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
    out["num_graphs"] = len(graphs)
    return out


def average_num_neighbors(graphs: Sequence[Graph]) -> float:
    """Mean number of neighbours per atom within the cutoff over ``graphs`` (1.0 when there are none)."""
    atoms = sum(int(g["natoms"]) for g in graphs)
    edges = sum(int(g["edge_index"].shape[1]) for g in graphs)
    return edges / atoms if atoms and edges else 1.0
