"""On-disk graph store: a data set preprocessed once into memory-mapped arrays, read lazily.

``equiforce preprocess data.extxyz -o data.eqd --r-max 5`` streams the file (one structure at a
time, so it never holds the data set in memory), checks every structure exactly as
:func:`equiforce.data.dataset.load_dataset` does, and writes its graphs; ``equiforce train --data
data.eqd`` then reads them lazily with bounded memory.

Layout (format ``equiforce-graphstore``, version :data:`STORE_VERSION` = 1); a store is a directory::

    index.json     {"format": "equiforce-graphstore", "version": 1, "num_structures": S,
                    "num_atoms": N, "num_edges": E, "r_max": Å, "elements": [symbols, by atomic number],
                    "keys": {"energy": ..., "forces": ..., "stress": ..., "dipole": ..., "charge": ...,
                             "polarizability": ...},
                    "source": path, "source_sha256": hex, "equiforce_version": ...,
                    "arrays": {name: {"dtype": numpy dtype string, "shape": [...]}}}
    NAME.bin       one raw little-endian C-order array per name:
      per atom       numbers [N] uint8 (atomic number), pos [N, 3] f8 (Å), forces [N, 3] f8 (eV/Å)
      per edge       edge_index [E, 2] int32 (structure-local (i, j), the order of the neighbour list),
                     edge_shift [E, 3] f8 (Å)
      per structure  atom_ptr [S+1] int64 and edge_ptr [S+1] int64 (structure k owns atoms
                     atom_ptr[k]:atom_ptr[k+1] and edges edge_ptr[k]:edge_ptr[k+1]), cell [S, 3, 3] f8 (Å),
                     pbc [S, 3] bool, energy [S] f8 (eV), stress [S, 3, 3] f8 (eV/Å^3), has_stress [S] bool,
                     dipole [S, 3] f8 (e·Å), has_dipole [S] bool, total_charge [S] f8 (e),
                     polarizability [S, 3, 3] f8 (e·Å²/V), has_polarizability [S] bool

Readers refuse another format or version with a clear error. The store is written into
``OUT.tmp`` and renamed to ``OUT`` when complete, so an interrupted preprocessing leaves no
half-written store under the final name.

Bounded memory: :class:`GraphStore` maps the ``.bin`` files with ``numpy.memmap`` and copies each
structure out. Pages of a mapping that were read count in the process's resident memory until the
mapping is closed, and Linux maps the already-cached pages around a faulting page as well
(fault-around, whole large folios: measured here, reading 4 MiB of structures at random made
9 MiB of a 42 MiB store resident), so counting the bytes read does not bound it. After every
structure the store reads the process's resident file-backed memory (``/proc/self/statm``, a few
microseconds) and closes and reopens its mappings when it grew by more than ``max_resident_mb``
(default :data:`DEFAULT_MAX_RESIDENT_MB`) since the last reopen; elsewhere it counts bytes read.
The resident memory the data takes stays below that cap plus one structure, whatever the size of
the data set (the operating system's page cache keeps recently read pages, outside the process).
The two pointer arrays (16 bytes per structure) are held in memory.
"""
import json
import os
import shutil
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from ase.data import atomic_numbers, chemical_symbols

from ..errors import DataError
from .dataset import Graph

STORE_FORMAT = "equiforce-graphstore"
STORE_VERSION = 1
#: file inside ``OUT.tmp`` while a store is being written (the only mark that lets a later
#: preprocessing remove an interrupted one)
PARTIAL_MARKER = ".equiforce-graphstore-partial"
DEFAULT_MAX_RESIDENT_MB = 256.0
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _resident_file_bytes() -> Optional[int]:
    """Resident file-backed (shared) memory of this process in bytes (Linux ``/proc/self/statm``),
    None where that is not available."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[2]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None

ATOM_ARRAYS = {"numbers": ("|u1", ()), "pos": ("<f8", (3,)), "forces": ("<f8", (3,))}
EDGE_ARRAYS = {"edge_index": ("<i4", (2,)), "edge_shift": ("<f8", (3,))}
STRUCTURE_ARRAYS = {"cell": ("<f8", (3, 3)), "pbc": ("|b1", (3,)), "energy": ("<f8", ()),
                    "stress": ("<f8", (3, 3)), "has_stress": ("|b1", ()), "dipole": ("<f8", (3,)),
                    "has_dipole": ("|b1", ()), "total_charge": ("<f8", ()),
                    "polarizability": ("<f8", (3, 3)), "has_polarizability": ("|b1", ())}

#: per-structure labels a graph may lack (written as zeros, with their has_* flag False)
OPTIONAL_LABELS = ("dipole", "has_dipole", "polarizability", "has_polarizability")


def is_graph_store(path: str) -> bool:
    """True when ``path`` is a directory holding a graph store's ``index.json``."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "index.json"))


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
class GraphStoreWriter:
    """Appends graphs to a new store; :meth:`close` writes ``index.json`` and renames ``OUT.tmp`` to
    ``OUT``. Graphs carry ``numbers`` [n] (atomic numbers) in place of ``species``; buffers are
    flushed every ``flush_every`` structures, so memory stays bounded."""

    def __init__(self, out: str, r_max: float, keys: Dict[str, str], source: str = "", source_sha256: str = "",
                 flush_every: int = 1024):
        if os.path.exists(out):
            raise DataError(f"'{out}' already exists; remove it or choose another output (-o) for the graph store")
        self.out, self.tmp = out, out.rstrip("/") + ".tmp"
        if os.path.exists(self.tmp):  # an interrupted earlier preprocessing: remove it, but nothing else
            ours = os.path.isdir(self.tmp) and not os.path.islink(self.tmp) and \
                os.path.isfile(os.path.join(self.tmp, PARTIAL_MARKER)) and \
                all(f.endswith((".bin", ".json")) or f == PARTIAL_MARKER for f in os.listdir(self.tmp))
            if not ours:
                raise DataError(f"'{self.tmp}' exists and is not a partial graph store written by equiforce "
                                "preprocess; remove it or choose another output (-o)")
            shutil.rmtree(self.tmp)
        os.makedirs(self.tmp)
        # written first: only a directory carrying it is ever removed as "an interrupted preprocessing"
        with open(os.path.join(self.tmp, PARTIAL_MARKER), "w") as fh:
            fh.write(f"{STORE_FORMAT} {STORE_VERSION} partial, pid {os.getpid()}\n")
        self.meta = {"format": STORE_FORMAT, "version": STORE_VERSION, "r_max": float(r_max), "keys": dict(keys),
                     "source": source, "source_sha256": source_sha256}
        self.files = {name: open(os.path.join(self.tmp, f"{name}.bin"), "wb")
                      for name in list(ATOM_ARRAYS) + list(EDGE_ARRAYS) + list(STRUCTURE_ARRAYS)}
        self.buffers: Dict[str, list] = {name: [] for name in self.files}
        self.natoms: List[int] = []
        self.nedges: List[int] = []
        self.elements = set()
        self.flush_every = flush_every

    def add(self, g: Graph, numbers: np.ndarray) -> None:
        """Append one graph (the keys of a :mod:`equiforce.data.dataset` graph; ``numbers`` [n] the
        atomic numbers of its atoms)."""
        n, e = int(g["pos"].shape[0]), int(g["edge_index"].shape[1])
        numbers = np.asarray(numbers)
        if numbers.shape != (n,):
            raise ValueError(f"numbers has shape {numbers.shape}, expected ({n},)")
        self.elements.update(int(z) for z in np.unique(numbers))
        b = self.buffers
        b["numbers"].append(numbers.astype(np.uint8))
        b["pos"].append(_np(g["pos"], "<f8"))
        b["forces"].append(_np(g["forces"], "<f8"))
        b["edge_index"].append(_np(g["edge_index"], "<i4").T.reshape(e, 2))
        b["edge_shift"].append(_np(g["edge_shift"], "<f8").reshape(e, 3))
        for name, (dtype, shape) in STRUCTURE_ARRAYS.items():
            # optional labels absent from a graph are stored as zeros with their flag False
            value = g[name] if name in g or name not in OPTIONAL_LABELS else np.zeros(shape)
            b[name].append(_np(value, dtype))
        self.natoms.append(n)
        self.nedges.append(e)
        if len(b["pos"]) >= self.flush_every:
            self._flush()

    def _flush(self) -> None:
        for name, parts in self.buffers.items():
            if parts:
                self.files[name].write(np.ascontiguousarray(np.stack(parts) if name in STRUCTURE_ARRAYS
                                                            else np.concatenate(parts)).tobytes())
            parts.clear()

    def close(self) -> dict:
        """Finish the store; returns its index (also written as ``index.json``)."""
        from .. import __version__

        if not self.natoms:
            self.abort()
            raise DataError("no structures to write; the graph store would be empty")
        self._flush()
        for fh in self.files.values():
            fh.close()
        s, n, e = len(self.natoms), int(sum(self.natoms)), int(sum(self.nedges))
        ptrs = {"atom_ptr": np.concatenate([[0], np.cumsum(self.natoms)]).astype("<i8"),
                "edge_ptr": np.concatenate([[0], np.cumsum(self.nedges)]).astype("<i8")}
        for name, arr in ptrs.items():
            arr.tofile(os.path.join(self.tmp, f"{name}.bin"))
        arrays = {}
        for group, rows in ((ATOM_ARRAYS, n), (EDGE_ARRAYS, e), (STRUCTURE_ARRAYS, s)):
            for name, (dtype, shape) in group.items():
                arrays[name] = {"dtype": dtype, "shape": [rows, *shape]}
        for name in ptrs:
            arrays[name] = {"dtype": "<i8", "shape": [s + 1]}
        self.meta.update({"num_structures": s, "num_atoms": n, "num_edges": e, "equiforce_version": __version__,
                          "elements": [chemical_symbols[z] for z in sorted(self.elements)], "arrays": arrays})
        with open(os.path.join(self.tmp, "index.json"), "w") as fh:
            json.dump(self.meta, fh, indent=1)
        for name in os.listdir(self.tmp):  # on disk before the rename makes the store visible
            if name != PARTIAL_MARKER:
                with open(os.path.join(self.tmp, name), "rb") as fh:
                    os.fsync(fh.fileno())
        os.remove(os.path.join(self.tmp, PARTIAL_MARKER))
        os.replace(self.tmp, self.out)
        return self.meta

    def abort(self) -> None:
        """Remove the partial store (after an error)."""
        for fh in self.files.values():
            fh.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _np(t, dtype: str) -> np.ndarray:
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return np.ascontiguousarray(a.astype(np.dtype(dtype)))


def iter_structures(path: str) -> Iterator:
    """The structures of an extxyz (ASE-readable) file one by one, with the errors of
    :func:`equiforce.data.dataset.read_structures`."""
    import ase.io

    if os.path.isdir(path):
        raise DataError(f"data path '{path}' is a directory, not a data file; pass the extxyz file itself")
    if not os.path.isfile(path):
        raise DataError(f"data file '{path}' does not exist; pass an extxyz file")
    if os.path.getsize(path) == 0:
        raise DataError(f"data file '{path}' is empty; it must hold at least one structure (extxyz)")
    it = ase.io.iread(path, index=":")
    k = 0
    while True:
        try:
            atoms = next(it)
        except StopIteration:
            return
        except Exception as exc:  # ASE raises many kinds of errors on malformed files
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"cannot read structure {k} of '{path}' with ASE ({msg}); it must be an extxyz "
                            "file") from None
        yield atoms
        k += 1


def preprocess(path: str, out: str, r_max: float, energy_key: str = "energy", forces_key: str = "forces",
               stress_key: str = "stress", dipole_key: str = "dipole", charge_key: str = "charge",
               polarizability_key: str = "polarizability") -> dict:
    """Write the graphs of the structures in ``path`` (cutoff ``r_max`` Å) to the store ``out``,
    streaming; returns the store's index. Every structure is checked as for training in memory."""
    from ..training.checkpoints import data_digest
    from .dataset import frame_to_graph

    if not (r_max > 0 and np.isfinite(r_max)):
        raise DataError(f"cutoff r_max must be a positive number of Å, got {r_max!r}")
    frames = iter_structures(path)
    keys = {"energy": energy_key, "forces": forces_key, "stress": stress_key, "dipole": dipole_key,
            "charge": charge_key, "polarizability": polarizability_key}
    writer = GraphStoreWriter(out, r_max, keys, source=os.path.abspath(path), source_sha256=data_digest(path))
    try:
        for k, atoms in enumerate(frames):
            g = frame_to_graph(atoms, k, path, chemical_symbols, r_max, energy_key, forces_key, stress_key,
                               dipole_key, charge_key, polarizability_key)
            writer.add(g, atoms.numbers)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def read_index(path: str) -> dict:
    """The ``index.json`` of the store ``path``, checked (format, version, files)."""
    index_path = os.path.join(path, "index.json")
    if not os.path.isfile(index_path):
        raise DataError(f"'{path}' is not a graph store (no index.json); make one with `equiforce preprocess "
                        "DATA.extxyz -o DATA.eqd --r-max R`")
    try:
        with open(index_path) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise DataError(f"'{index_path}' is unreadable or not JSON ({exc}); preprocess the data again") from None
    if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
        raise DataError(f"'{path}' is not an equiforce graph store (format {meta.get('format')!r} in index.json)")
    if meta.get("version") != STORE_VERSION:
        raise DataError(f"graph store '{path}' has version {meta.get('version')}; this equiforce reads version "
                        f"{STORE_VERSION}: preprocess the data again with this version (`equiforce preprocess`)")
    for name, spec in meta["arrays"].items():
        f = os.path.join(path, f"{name}.bin")
        want = int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize
        if not os.path.isfile(f) or os.path.getsize(f) != want:
            raise DataError(f"graph store '{path}' is incomplete or damaged ({name}.bin missing or of the wrong size); "
                            "preprocess the data again")
    return meta


class GraphStore:
    """Lazy, memory-mapped graphs of a store (see the module docstring); ``store[k]`` is the graph
    of structure ``k`` exactly as :func:`equiforce.data.dataset.load_dataset` builds it, with
    ``species`` indices into ``species_names`` (default: the store's elements by atomic number)."""

    def __init__(self, path: str, species_names: Optional[Sequence[str]] = None,
                 max_resident_mb: float = DEFAULT_MAX_RESIDENT_MB):
        self.path = path
        self.meta = read_index(path)
        self.elements: List[str] = list(self.meta["elements"])
        self.species = list(species_names) if species_names is not None else list(self.elements)
        missing = [e for e in self.elements if e not in self.species]
        if missing:
            raise DataError(f"graph store '{path}' contains element(s) {missing} that the model does not know; "
                            f"the model's species are {self.species}")
        self._z_to_species = np.full(256, -1, dtype=np.int64)
        for i, name in enumerate(self.species):
            self._z_to_species[atomic_numbers[name]] = i
        self.max_resident_bytes = float(max_resident_mb) * 2 ** 20
        self._maps: Dict[str, np.ndarray] = {}
        self.release()
        # the small per-structure pointers stay in memory (16 bytes per structure)
        self.atom_ptr = np.fromfile(os.path.join(path, "atom_ptr.bin"), dtype="<i8")
        self.edge_ptr = np.fromfile(os.path.join(path, "edge_ptr.bin"), dtype="<i8")

    @property
    def r_max(self) -> float:
        return float(self.meta["r_max"])

    @property
    def keys(self) -> Dict[str, str]:
        return dict(self.meta["keys"])

    def __len__(self) -> int:
        return int(self.meta["num_structures"])

    def _array(self, name: str) -> np.ndarray:
        m = self._maps.get(name)
        if m is None:
            spec = self.meta["arrays"][name]
            m = np.memmap(os.path.join(self.path, f"{name}.bin"), dtype=np.dtype(spec["dtype"]), mode="r",
                          shape=tuple(spec["shape"]))
            self._maps[name] = m
        return m

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        """A copy of rows ``start:stop`` of an array; reopens the mappings past the resident cap."""
        out = np.array(self._array(name)[start:stop])
        self._read_bytes += out.nbytes
        return out

    def _check_resident(self) -> None:
        """Close the mappings when the file pages resident since the last reopen exceed the cap."""
        shared = _resident_file_bytes()
        grown = self._read_bytes if shared is None else shared - self._resident_base
        if grown > self.max_resident_bytes:
            self.release()

    def release(self) -> None:
        """Close every mapping (their pages leave this process's resident memory)."""
        self._maps = {}
        self._read_bytes = 0.0
        self._resident_base = _resident_file_bytes() or 0

    def __getitem__(self, k: int) -> Graph:
        k = int(k)
        if not 0 <= k < len(self):
            raise IndexError(f"structure {k} of a graph store with {len(self)}")
        a0, a1 = int(self.atom_ptr[k]), int(self.atom_ptr[k + 1])
        e0, e1 = int(self.edge_ptr[k]), int(self.edge_ptr[k + 1])
        t = torch.from_numpy
        g: Graph = {
            "pos": t(self._read("pos", a0, a1)),
            "species": t(self._z_to_species[self._read("numbers", a0, a1)]),
            "edge_index": t(self._read("edge_index", e0, e1).astype(np.int64).T.copy()),
            "edge_shift": t(self._read("edge_shift", e0, e1)),
            "forces": t(self._read("forces", a0, a1)),
            "natoms": torch.tensor(a1 - a0, dtype=torch.long),
        }
        for name in STRUCTURE_ARRAYS:
            g[name] = t(np.array(self._read(name, k, k + 1)[0]))
        self._check_resident()
        return g

    # ---- whole-data-set statistics, read in chunks (bounded memory) --------------------------
    def natoms(self) -> np.ndarray:
        """Atoms per structure [S]."""
        return np.diff(self.atom_ptr)

    def structure_array(self, name: str) -> np.ndarray:
        """A per-structure array ([S, ...], a copy)."""
        return self._read(name, 0, len(self))

    def species_counts(self, indices: Sequence[int], chunk: int = 4096) -> np.ndarray:
        """Atoms of each species per structure [len(indices), num_species]."""
        idx = np.asarray(indices, dtype=np.int64)
        out = np.zeros((len(idx), len(self.species)))
        for c in range(0, len(idx), chunk):
            part = idx[c:c + chunk]
            for row, k in enumerate(part, start=c):
                sp = self._z_to_species[self._read("numbers", int(self.atom_ptr[k]), int(self.atom_ptr[k + 1]))]
                out[row] = np.bincount(sp, minlength=len(self.species))
                self._check_resident()
        return out

    def force_rms(self, indices: Sequence[int]) -> float:
        """RMS of the force components (eV/Å) of the structures ``indices``."""
        total, count = 0.0, 0
        for k in indices:
            f = self._read("forces", int(self.atom_ptr[k]), int(self.atom_ptr[k + 1]))
            total += float((f * f).sum())
            count += f.size
            self._check_resident()
        return float(np.sqrt(total / count)) if count else 0.0

    def label_flags(self, indices: Sequence[int]) -> Tuple[List[int], List[bool], List[bool], List[bool]]:
        """Atom counts and stress/dipole/polarizability label flags of the structures ``indices``."""
        idx = np.asarray(indices, dtype=np.int64)
        if not hasattr(self, "_flags"):
            self._flags = (self.natoms(), self.structure_array("has_stress"), self.structure_array("has_dipole"),
                           self.structure_array("has_polarizability"))
        return tuple(a[idx].tolist() for a in self._flags)


class GraphSubset:
    """The structures ``indices`` of a :class:`GraphStore` (a training or validation split), indexed
    from 0; ``statistics`` for the scale/shift fit without building every graph."""

    def __init__(self, store: GraphStore, indices: Sequence[int]):
        self.store = store
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Graph:
        return self.store[int(self.indices[int(i)])]

    def label_flags(self, positions: Sequence[int]):
        return self.store.label_flags(self.indices[np.asarray(positions, dtype=np.int64)])

    def statistics(self) -> dict:
        """``counts`` [B, S] species counts, ``energies`` [B] (eV), ``force_rms`` (eV/Å),
        ``num_atoms``, ``num_edges``, ``dipole_rms`` (e·Å or None) of the subset
        (:func:`equiforce.training.loop.training_statistics`)."""
        natoms = self.store.natoms()[self.indices]
        nedges = np.diff(self.store.edge_ptr)[self.indices]
        labelled = self.store.structure_array("has_dipole")[self.indices]
        dipoles = self.store.structure_array("dipole")[self.indices][labelled]
        return {"dipole_rms": float(np.sqrt((dipoles ** 2).mean())) if len(dipoles) else None,
                "counts": self.store.species_counts(self.indices),
                "energies": self.store.structure_array("energy")[self.indices],
                "force_rms": self.store.force_rms(self.indices),
                "num_atoms": int(natoms.sum()), "num_edges": int(nedges.sum())}
