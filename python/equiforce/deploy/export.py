"""The exported TorchScript file: one file per model, the contract with every engine.

Signature of the scripted module (all engines call exactly this)::

    energy, per_atom_energy, forces, virial = module(pos, species, edge_index, edge_shift, cell, n_local)

=================  ==========  =============================================================
argument           shape        meaning
=================  ==========  =============================================================
pos                [N, 3]       positions (Å), model dtype; the first ``n_local`` atoms are the
                                ones whose energy counts (LAMMPS local atoms), the rest ghosts
species            [N] int64    index into ``metadata["species"]``
edge_index         [2, E] int64 (centre i, neighbour j); every pair within r_max, both directions
edge_shift         [E, 3]       Cartesian shift (Å): ``r_ij = pos[j] - pos[i] + edge_shift``
                                (zeros when ghosts carry their own image positions)
cell               [3, 3]       lattice vectors as rows (Å); zeros for a non-periodic system
n_local            int          number of leading atoms whose energies are summed
=================  ==========  =============================================================

Returns ``energy`` [] (eV, sum over local atoms), ``per_atom_energy`` [N] (eV; ghosts included),
``forces`` [N, 3] (eV/Å, ``-d energy / d pos`` on every atom given, ghosts included) and
``virial`` [3, 3] (eV, ``-sum_e r_e (x) dE/dr_e``; stress = -virial / volume).

Run the module with TorchScript's graph optimiser off (``torch.jit.optimized_execution(False)``
in Python, ``torch::jit::setGraphExecutorOptimize(false)`` in C++): the model has nothing for the
fuser to gain, and with it on, every new atom or edge count triggers a slow re-profiling pass
(measured: 0.1-0.4 s on each of the first calls, against 3 ms per call for a small molecule).

Models with output heads (:mod:`equiforce.nn.heads`) are exported by :class:`ExportedHeadsPotential`
with the same signature. A direct-force model returns its head's forces as ``forces`` (ghost
atoms get zero: each local atom's force is complete on its own), so LAMMPS and OpenMM run it
unchanged, and its metadata says ``"conservative": false`` (energy and virial come from its energy
head). A dipole model has one more method::

    dipole = module.dipole(pos, species, edge_index, edge_shift, cell, total_charge)   # [3] e·Å

(``total_charge`` in e, a float; all atoms given count). A polarizability model has::

    alpha = module.polarizability(pos, species, edge_index, edge_shift, cell)   # [3, 3] e·Å²/V

(symmetric; all atoms given count; ``metadata["units"]["polarizability"]`` = "e*Angstrom^2/V", times
14.399645 for the polarizability volume in Å^3). ``metadata["outputs"]`` lists what the file
provides, ``metadata["methods"]`` the extra methods and their signatures.

Files of conservative short-range EquiforceModels also carry per-layer entry points
(:class:`LayerEntryPoints`: ``embed``, ``layer``, ``readout``; ``metadata["exchange"]`` true,
``metadata["layer_dims"]``), which LAMMPS' ``path exchange`` steps layer by layer with ghost features
refreshed between layers; the one-call ``forward`` is unchanged.

Long-range models (``model.long_range = "ewald" | "pme"``, :mod:`equiforce.nn.electrostatics`,
:mod:`equiforce.nn.mesh_electrostatics`) are exported by
:class:`ExportedHeadsPotential` too. Their energy is not a sum of local terms: the module needs
ALL atoms of the system, once each (``n_local == N``, no ghost atoms; a RuntimeError says so
otherwise), and the ``cell`` (lattice rows, Å: Ewald summation; all zeros: open-boundary Coulomb).
``edge_index``/``edge_shift`` are still the short-range pairs within ``r_max``; the Ewald
real-space pairs are found inside the module (the mesh of pme is derived there from the cell
at every call, so a changing box keeps its accuracy). The total charge (e) is fixed at export
(``total_charge``, default 0: a neutral system) and recorded in ``metadata["long_range"]``.
``metadata["long_range"]`` holds the settings. OpenMM passes every position and the box, so it
runs such files unchanged; LAMMPS only through its serial path (one MPI rank, images by shifts).

Metadata lives in the file as the extra file ``equiforce_metadata.json`` (see
:func:`build_metadata`); engines read it with ``torch.jit.load(..., _extra_files=...)`` in Python
and ``torch::jit::load(path, device, extra_files)`` in C++. :func:`export_model` adds
``"min_distance"`` (Å, :data:`equiforce.units.MIN_DISTANCE`: engines stop when two atoms are closer)
and ``"weights_digest"`` to it.

Tamper check (the contract every loader implements). The extra file is plain text inside the zip
archive, so anyone can edit it (permute ``species``, change ``r_max``) and the model would then
run with settings it was not trained for. Two guards are written at export:

* the top-level module carries a str attribute ``equiforce_metadata`` whose value is EXACTLY the
  text of ``equiforce_metadata.json`` (the attribute lives in the pickled module, ``data.pkl``);
  a loader compares the two and refuses a mismatch with "metadata of FILE was changed after export
  (species / r_max / ... no longer match the model); re-export it with `equiforce export`";
* ``metadata["weights_digest"]`` = sha256 (hex) over the scripted module's ``state_dict()`` (as
  ``torch.jit.load`` returns it: every parameter and buffer of the file): for each key in
  sorted order, the key's UTF-8 bytes, then the tensor's values as contiguous little-endian bytes,
  floating-point tensors converted to float64 and every other tensor to int64
  (:func:`weights_digest`). The Python loader recomputes it.

Files exported before this check (no ``equiforce_metadata`` attribute) still load unchecked.

Writing is atomic: the file is serialised in memory, written to a temporary file beside ``path``
and renamed over it, so a failed write (disk full, file-size limit) leaves an existing file intact
and ends in a one-line :class:`~equiforce.errors.ModelFileError`, never a native abort.
"""
import errno
import hashlib
import io
import json
import os
import stat
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import FORMAT_VERSION, __version__
from ..model.forces import edge_vectors, forces_virial_from_edge_grad, strain_virial
from ..errors import ModelFileError
from ..units import DTYPES, MIN_DISTANCE, dtype_name
from .ops import load_ops

# files exported with fused kernels call torch.ops.equiforce.*: register them before any load
load_ops()

METADATA_FILE = "equiforce_metadata.json"
# str attribute of the top-level scripted module: the exact metadata text (see the module docstring)
METADATA_ATTRIBUTE = "equiforce_metadata"


def local_energy_forces(atom_energy: Tensor, edge_vec: Tensor, edge_index: Tensor,
                        n_local: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The one code path of both exported forwards: energy of the first ``n_local`` atoms [],
    forces ``-dE/dpos`` [N, 3] on every atom and virial ``-sum_e r_e (x) dE/dr_e`` [3, 3] from
    per-atom energies [N] built on the leaf ``edge_vec`` [E, 3]."""
    n = atom_energy.shape[0]
    local = (torch.arange(n, device=atom_energy.device) < n_local).to(atom_energy.dtype)
    energy = (atom_energy * local).sum()
    grads = torch.autograd.grad([energy], [edge_vec], allow_unused=True)
    edge_graph = torch.zeros(edge_index.shape[1], dtype=torch.long, device=edge_vec.device)
    forces, virial = forces_virial_from_edge_grad(grads[0], edge_vec, edge_index, n, edge_graph, 1)
    return energy, forces, virial[0]


class LayerEntryPoints:
    """Per-layer methods of an exported :class:`equiforce.model.network.EquiforceModel` (mixed into
    the exported module; ``metadata["exchange"]`` is true): an engine that refreshes ghost atoms'
    features between layers (LAMMPS ``path exchange``) steps the model with them::

        x = module.embed(species)                                       # [N, d0]
        x = module.layer(k, x, species, edge_index, edge_vec, n_update)   # [n_update, d_{k+1}], k = 0..L-1
        e = module.readout(x, species)                                  # [N] eV per atom

    ``edge_vec`` [E, 3] (Å) = r_j - r_i for the edges (receiver i = ``edge_index[0]``, neighbour j);
    widths ``metadata["layer_dims"]`` = [d0, ..., dL]. Forces come from autograd through these
    calls (the engine keeps each layer's input as a leaf). Chaining them over all atoms with every
    edge reproduces ``forward`` exactly."""

    @torch.jit.export
    def embed(self, species: Tensor) -> Tensor:
        """Input features of layer 0 [N, d0] for species [N]."""
        return self.energy_model.embed_species(species)

    @torch.jit.export
    def layer(self, k: int, x: Tensor, species: Tensor, edge_index: Tensor, edge_vec: Tensor,
              n_update: int) -> Tensor:
        """Layer ``k``: features [N, d_k] -> [n_update, d_{k+1}] (every receiver edge_index[0] <
        n_update; rows exact for atoms whose every incoming edge is given)."""
        return self.energy_model.layer_step(k, x, species, edge_index, edge_vec, n_update)

    @torch.jit.export
    def readout(self, x: Tensor, species: Tensor) -> Tensor:
        """Per-atom energies [N] (eV) from the last layer's features [N, d_L]."""
        return self.energy_model.readout_energy(x, species)


class ExportedPotential(nn.Module):
    """Wraps an energy model (see :mod:`equiforce.model.analytic` for the contract) with autograd forces."""

    def __init__(self, energy_model: nn.Module):
        super().__init__()
        self.energy_model = energy_model

    def forward(self, pos: Tensor, species: Tensor, edge_index: Tensor, edge_shift: Tensor,
                cell: Tensor, n_local: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        n = pos.shape[0]
        edge_vec = edge_vectors(pos, edge_index, edge_shift).detach().requires_grad_(True)
        batch = torch.zeros(n, dtype=torch.long, device=pos.device)
        atom_energy = self.energy_model(species, edge_index, edge_vec, batch, 1)
        energy, forces, virial = local_energy_forces(atom_energy, edge_vec, edge_index, n_local)
        return energy.detach(), atom_energy.detach(), forces.detach(), virial.detach()


class ExportedLayeredPotential(LayerEntryPoints, ExportedPotential):
    """:class:`ExportedPotential` of an EquiforceModel, with the per-layer entry points."""


class ExportedHeadsPotential(nn.Module):
    """Like :class:`ExportedPotential` for an :class:`equiforce.model.network.EquiforceModel` with heads:
    the same ``forward`` signature (direct-force models return the head's forces), plus
    :meth:`dipole` and :meth:`polarizability`."""

    def __init__(self, model: nn.Module, total_charge: float = 0.0):
        super().__init__()
        self.energy_model = model
        self.direct_forces = bool(getattr(model, "direct_forces", False))
        self.has_dipole = bool(getattr(model, "has_dipole", False))
        self.has_polarizability = bool(getattr(model, "has_polarizability", False))
        self.has_long_range = bool(getattr(model, "has_long_range", False))
        self.total_charge = float(total_charge)  # e, the charge the long-range model's charges add up to

    def forward(self, pos: Tensor, species: Tensor, edge_index: Tensor, edge_shift: Tensor,
                cell: Tensor, n_local: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        n = pos.shape[0]
        if self.has_long_range:
            return self._long_range_forward(pos, species, edge_index, edge_shift, cell, n_local)
        edge_vec = edge_vectors(pos, edge_index, edge_shift).detach().requires_grad_(True)
        batch = torch.zeros(n, dtype=torch.long, device=pos.device)
        out = self.energy_model.predict(species, edge_index, edge_vec, batch, 1, pos.detach(), None)
        atom_energy = out["per_atom_energy"]
        energy, forces, virial = local_energy_forces(atom_energy, edge_vec, edge_index, n_local)
        if self.direct_forces:
            local = (torch.arange(n, device=pos.device) < n_local).to(atom_energy.dtype)
            forces = out["forces"] * local.unsqueeze(-1)
        return energy.detach(), atom_energy.detach(), forces.detach(), virial.detach()

    def _long_range_forward(self, pos: Tensor, species: Tensor, edge_index: Tensor, edge_shift: Tensor,
                            cell: Tensor, n_local: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        n = pos.shape[0]
        if n_local != n:
            raise RuntimeError("equiforce: this model has long-range electrostatics, which need every atom of the "
                               "system exactly once (n_local == number of atoms, no ghost atoms); got n_local = "
                               + str(n_local) + " of " + str(n) + " atoms. In LAMMPS use 'path auto' or "
                               "'path gather'; in Python/OpenMM pass all atoms and the cell")
        # three independent leaves; clone() keeps them apart even when torch.jit.freeze (which
        # openmm-torch applies) drops the detach() calls
        edge_vec = edge_vectors(pos, edge_index, edge_shift).detach().requires_grad_(True)
        pos_leaf = pos.detach().clone().requires_grad_(True)
        cell_leaf = cell.detach().clone().requires_grad_(True)
        batch = torch.zeros(n, dtype=torch.long, device=pos.device)
        q_total = torch.full((1,), self.total_charge, dtype=pos.dtype, device=pos.device)
        out = self.energy_model.predict(species, edge_index, edge_vec, batch, 1, pos_leaf, q_total,
                                        cell_leaf.unsqueeze(0))
        atom_energy = out["per_atom_energy"]
        energy = atom_energy.sum()
        grads = torch.autograd.grad([energy], [edge_vec, pos_leaf, cell_leaf], allow_unused=True)
        edge_graph = torch.zeros(edge_index.shape[1], dtype=torch.long, device=pos.device)
        forces, virial = forces_virial_from_edge_grad(grads[0], edge_vec, edge_index, n, edge_graph, 1)
        virial = virial[0]
        grad_pos = grads[1]
        if grad_pos is not None:
            forces = forces - grad_pos
        grad_cell = grads[2]
        grad_cells: Optional[Tensor] = None
        if grad_cell is not None:
            grad_cells = grad_cell.unsqueeze(0)
        virial = virial + strain_virial(pos.detach(), cell.detach().unsqueeze(0), grad_pos, grad_cells, batch, 1)[0]
        if self.direct_forces:
            forces = out["forces"]
        return energy.detach(), atom_energy.detach(), forces.detach(), virial.detach()

    @torch.jit.export
    def dipole(self, pos: Tensor, species: Tensor, edge_index: Tensor, edge_shift: Tensor, cell: Tensor,
               total_charge: float = 0.0) -> Tensor:
        """Dipole moment [3] (e·Å) of the structure (all atoms given)."""
        if not self.has_dipole:
            raise RuntimeError("this model has no dipole head (it was trained with model.dipole = 'none')")
        return self._heads(pos, species, edge_index, edge_shift, cell, total_charge)["dipole"][0]

    @torch.jit.export
    def polarizability(self, pos: Tensor, species: Tensor, edge_index: Tensor, edge_shift: Tensor,
                       cell: Tensor) -> Tensor:
        """Polarizability [3, 3] (e·Å²/V, symmetric) of the structure (all atoms given)."""
        if not self.has_polarizability:
            raise RuntimeError("this model has no polarizability head (it was trained with "
                               "model.polarizability = false)")
        return self._heads(pos, species, edge_index, edge_shift, cell, 0.0)["polarizability"][0]

    def _heads(self, pos: Tensor, species: Tensor, edge_index: Tensor, edge_shift: Tensor, cell: Tensor,
               total_charge: float) -> Dict[str, Tensor]:
        """The model's outputs (``predict``, no gradients) for the structure, all atoms given, as one
        graph with total charge ``total_charge`` (e): what :meth:`dipole` and :meth:`polarizability` read."""
        n = pos.shape[0]
        edge_vec = edge_vectors(pos, edge_index, edge_shift)
        batch = torch.zeros(n, dtype=torch.long, device=pos.device)
        q = torch.full((1,), total_charge, dtype=pos.dtype, device=pos.device)
        with torch.no_grad():
            return self.energy_model.predict(species, edge_index, edge_vec, batch, 1, pos, q, cell.unsqueeze(0))


class ExportedLayeredHeadsPotential(LayerEntryPoints, ExportedHeadsPotential):
    """:class:`ExportedHeadsPotential` of a conservative short-range model with heads (a dipole
    head), with the per-layer entry points."""


def has_layer_entry_points(model: nn.Module) -> bool:
    """True for a model exported with :class:`LayerEntryPoints`: an EquiforceModel whose energy is a
    sum of local terms with conservative forces (not direct-force, not long-range)."""
    return callable(getattr(model, "layer_step", None)) and not bool(getattr(model, "direct_forces", False)) \
        and not bool(getattr(model, "has_long_range", False))


def species_masses(species: List[str]) -> Optional[List[float]]:
    """Standard atomic masses (amu, ASE's table) of the species, None when a species is not a
    chemical symbol (analytic test models may use other names)."""
    from ase.data import atomic_masses, atomic_numbers

    if not all(s in atomic_numbers for s in species):
        return None
    return [float(atomic_masses[atomic_numbers[s]]) for s in species]


def exported_wrapper(model: nn.Module, total_charge: float = 0.0) -> nn.Module:
    """The exported module class for ``model`` (before scripting)."""
    layered = has_layer_entry_points(model)
    if has_heads(model):
        cls = ExportedLayeredHeadsPotential if layered else ExportedHeadsPotential
        return cls(model, total_charge)
    return ExportedLayeredPotential(model) if layered else ExportedPotential(model)


def has_heads(model: nn.Module) -> bool:
    """True for a model whose export needs :class:`ExportedHeadsPotential`."""
    return bool(getattr(model, "direct_forces", False)) or bool(getattr(model, "has_dipole", False)) \
        or bool(getattr(model, "has_long_range", False)) or bool(getattr(model, "has_polarizability", False))


def _torchpme_version() -> str:
    import torchpme

    return str(torchpme.__version__)


def build_metadata(energy_model: nn.Module, dtype: torch.dtype, symmetry: str = "none",
                   model_type: str = "equiforce", extra: Optional[Dict[str, Any]] = None,
                   total_charge: float = 0.0) -> Dict[str, Any]:
    """The metadata every engine checks. ``symmetry`` is "O3", "SE3" or "none" (analytic models)."""
    meta: Dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "equiforce_version": __version__,
        "model_type": model_type,
        "species": list(energy_model.species_names),
        "r_max": float(energy_model.r_max),
        "num_layers": int(energy_model.num_layers),
        # distance over which an atom's energy depends on others: the ghost shell LAMMPS needs
        "receptive_field": float(energy_model.r_max) * int(energy_model.num_layers),
        "dtype": dtype_name(dtype),
        "symmetry": symmetry,
        "units": {"energy": "eV", "length": "Angstrom", "forces": "eV/Angstrom", "virial": "eV"},
        "signature": "(pos, species, edge_index, edge_shift, cell, n_local) -> (energy, per_atom_energy, forces, virial)",
    }
    direct = bool(getattr(energy_model, "direct_forces", False))
    meta["conservative"] = not direct
    meta["outputs"] = ["energy", "per_atom_energy", "forces", "virial"]
    if direct:
        meta["forces_from"] = "direct-force head (not -dE/dpos; energy and virial from the energy head)"
    if bool(getattr(energy_model, "has_dipole", False)):
        meta["outputs"].append("dipole")
        meta["dipole_mode"] = str(energy_model.dipole_mode)
        meta["units"]["dipole"] = "e*Angstrom"
        meta.setdefault("methods", {})["dipole"] = \
            "(pos, species, edge_index, edge_shift, cell, total_charge: float) -> dipole[3]"
    if bool(getattr(energy_model, "has_polarizability", False)):
        meta["outputs"].append("polarizability")
        meta["units"]["polarizability"] = "e*Angstrom^2/V"
        meta.setdefault("methods", {})["polarizability"] = \
            "(pos, species, edge_index, edge_shift, cell) -> polarizability[3, 3]"
    if bool(getattr(energy_model, "has_long_range", False)):
        from ..nn.electrostatics import K_E, ewald_parameters
        el = energy_model.electrostatics
        meta["long_range"] = {
            "method": str(energy_model.long_range),
            "accuracy": float(el.accuracy),
            "real_space_cutoff": float(el.cutoff),
        }
        mesh = el.mesh
        if mesh is None:
            alpha, k_cut = ewald_parameters(el.accuracy, el.cutoff, el.alpha)
            meta["long_range"].update({"alpha": float(alpha), "k_cut": float(k_cut)})
        else:
            meta["long_range"].update({
                "accuracy_of": "RMS force error / (K_E q_rms^2 / d^2), d = 0.1^(-1/3) Angstrom",
                "smearing": float(mesh.smearing),
                "mesh_spacing": float(mesh.mesh_spacing),
                "interpolation_nodes": int(mesh.interpolation_nodes),
                "mesh": "torch-pme " + _torchpme_version() + " PME; points along lattice vector a_i: the smallest "
                        "2^u 3^v 5^w >= |a_i| / mesh_spacing, derived from the cell at every call",
            })
        meta["long_range"].update({
            "damping": float(el.damping),
            "coulomb_constant": K_E,
            "total_charge": float(total_charge),
            "requires": "all atoms of the system once each (n_local == N, no ghosts) and the cell "
                        "(lattice rows in Angstrom; all zeros for open boundaries)",
        })
    meta["exchange"] = has_layer_entry_points(energy_model)
    if meta["exchange"]:
        # per-layer entry points (LayerEntryPoints): LAMMPS `path exchange`
        meta["layer_dims"] = list(energy_model.layer_dims())
        meta.setdefault("methods", {}).update({
            "embed": "(species[N]) -> x0[N, d0]",
            "layer": "(k: int, x[N, d_k], species[N], edge_index[2, E], edge_vec[E, 3], n_update: int) "
                     "-> x[n_update, d_{k+1}]",
            "readout": "(x[N, d_L], species[N]) -> per_atom_energy[N]",
        })
    fused = bool(getattr(energy_model, "fused_kernels", False))
    # compiled ops the file calls (on the CPU): whatever loads it must have libequiforce_ops.so loaded
    meta["custom_ops"] = ["equiforce::tp_scatter", "equiforce::radial_pairs"] if fused else []
    if extra:
        meta.update(extra)
    return meta


def weights_digest(state: Dict[str, Tensor]) -> str:
    """sha256 hex of a state_dict: for each key in sorted order, the key's UTF-8 bytes and then the
    tensor's contiguous little-endian bytes as float64 (floating tensors) or int64 (all others)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu")
        t = t.to(torch.float64) if t.is_floating_point() else t.to(torch.int64)
        data = t.contiguous().numpy()
        h.update(key.encode("utf-8"))
        h.update(data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()


def check_output_path(path: str) -> None:
    """ModelFileError unless ``path`` can take a new file: not a directory, device or other special
    file, and its parent is a directory (created if missing)."""
    if os.path.isdir(path):
        raise ModelFileError(f"-o '{path}' is a directory; give the path of the file to write, "
                             f"e.g. {os.path.join(path, 'model.pt')}")
    if os.path.lexists(path) and not os.path.isfile(path):  # isfile follows links
        raise ModelFileError(f"-o '{path}' exists and is not a regular file (a device, pipe, socket or broken "
                             "link); give the path of an ordinary file to write, e.g. model.pt")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise ModelFileError(f"cannot create the directory of -o '{path}' ({exc.strerror}: "
                             f"'{exc.filename or parent}' is not a directory or not writable); "
                             "give a path inside a writable directory") from None


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it and ``os.replace``.

    On any write failure the temporary file is removed, an existing ``path`` stays as it was, and a
    :class:`ModelFileError` names the reason (e.g. no space left, file too large)."""
    check_output_path(path)
    target = os.path.realpath(path)  # a symbolic link keeps pointing at the new file
    directory, name = os.path.split(target)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if os.path.exists(target):  # keep the permissions of the file being replaced
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(tmp, target)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        kept = f"; the existing '{path}' is unchanged" if os.path.exists(target) else ""
        raise ModelFileError(f"cannot write the model to '{path}' ({reason}){kept}; free disk space, raise the "
                             "file-size limit or give another -o") from None


def export_model(energy_model: nn.Module, path: str, dtype: torch.dtype = torch.float64,
                 symmetry: str = "none", model_type: str = "equiforce",
                 extra_metadata: Optional[Dict[str, Any]] = None,
                 check_structure: Optional[Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = None,
                 total_charge: float = 0.0) -> Dict[str, Any]:
    """Script ``energy_model`` inside :class:`ExportedPotential`, store metadata, save to ``path``.

    ``total_charge`` (e): what the learned charges of a long-range model add up to in every call
    (an ion, a charged defect); only long-range models take a value other than 0.

    When ``check_structure = (pos, species, edge_index, edge_shift, cell)`` is given, the scripted
    module is re-run against the eager one before saving and the export fails if they differ.
    The file is written atomically (:func:`write_atomic`): an existing ``path`` is replaced only by a
    complete file. Returns the metadata written.
    """
    energy_model = energy_model.to(dtype).eval()
    long_range = bool(getattr(energy_model, "has_long_range", False))
    if total_charge != total_charge or abs(total_charge) == float("inf"):
        raise ValueError(f"total_charge must be a finite number of elementary charges, got {total_charge}")
    if total_charge != 0.0 and not long_range:
        raise ValueError(f"total_charge {total_charge} e: only a long-range model "
                         "(model.long_range = 'ewald' or 'pme') "
                         "uses a total charge in its energy; export this model with total_charge 0")
    check_output_path(path)  # before the slow scripting: a bad -o fails at once
    wrapper = exported_wrapper(energy_model, total_charge)
    meta = build_metadata(energy_model, dtype, symmetry, model_type, extra_metadata, total_charge)
    meta["min_distance"] = float(MIN_DISTANCE)
    masses = species_masses(meta["species"])
    if masses is not None:
        meta["masses"] = masses  # amu: LAMMPS checks the type masses against them (type order)
    setattr(wrapper, METADATA_ATTRIBUTE, "")  # a str attribute of the scripted top-level module
    scripted = torch.jit.script(wrapper)
    # the scripted module's state_dict: what the file holds (it includes buffers that are
    # non-persistent in the eager module) and what a loader sees
    meta["weights_digest"] = weights_digest(scripted.state_dict())
    text = json.dumps(meta, indent=1)
    setattr(scripted, METADATA_ATTRIBUTE, text)
    if check_structure is not None:
        pos, species, edge_index, edge_shift, cell = check_structure
        args = (pos.to(dtype), species, edge_index, edge_shift.to(dtype), cell.to(dtype), int(pos.shape[0]))
        ref = wrapper(*args)
        got = scripted(*args)
        for name, a, b in zip(("energy", "per_atom_energy", "forces", "virial"), ref, got):
            tol = 1e-10 if dtype == torch.float64 else 1e-4
            scale = max(1.0, float(a.abs().max()) if a.numel() else 1.0)
            if a.shape != b.shape or (a.numel() and float((a - b).abs().max()) > tol * scale):
                raise RuntimeError(f"export check failed: scripted and eager {name} differ")
        if isinstance(wrapper, ExportedHeadsPotential) and wrapper.has_dipole:
            a, b = wrapper.dipole(*args[:5]), scripted.dipole(*args[:5])
            if float((a - b).abs().max()) > tol * max(1.0, float(a.abs().max())):
                raise RuntimeError("export check failed: scripted and eager dipole differ")
        if isinstance(wrapper, ExportedHeadsPotential) and wrapper.has_polarizability:
            a, b = wrapper.polarizability(*args[:5]), scripted.polarizability(*args[:5])
            if float((a - b).abs().max()) > tol * max(1.0, float(a.abs().max())):
                raise RuntimeError("export check failed: scripted and eager polarizability differ")
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer, _extra_files={METADATA_FILE: text})
    write_atomic(path, buffer.getvalue())
    return meta


def read_metadata(path: str) -> Dict[str, Any]:
    """Metadata of an exported file, with clear errors for files that are not equiforce exports."""
    _, meta = load_exported(path, map_location="cpu")
    return meta


def load_exported(path: str, map_location: str = "cpu") -> Tuple[torch.jit.ScriptModule, Dict[str, Any]]:
    """Load an exported file and its metadata: format version, the keys engines need, and the
    tamper check of the module docstring (metadata text and weights digest as written at export)."""
    if os.path.isdir(path):
        raise ModelFileError(f"'{path}' is a directory, not a model file; give the exported file "
                             "(`equiforce export RUN_DIR -o model.pt` writes one)")
    if not os.path.isfile(path):
        raise ModelFileError(f"model file '{path}' does not exist")
    extra = {METADATA_FILE: ""}
    try:
        module = torch.jit.load(path, map_location=map_location, _extra_files=extra)
    except Exception as exc:  # torch raises RuntimeError with long C++ traces
        raise ModelFileError(
            f"'{path}' is not a TorchScript file ({str(exc).splitlines()[0]}); "
            "export a trained run with `equiforce export RUN_DIR -o model.pt`") from None
    text = extra[METADATA_FILE]
    if not text:
        raise ModelFileError(
            f"'{path}' is a TorchScript file but not an equiforce export (no {METADATA_FILE}); "
            "export it with `equiforce export`")
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if hasattr(module, METADATA_ATTRIBUTE) and getattr(module, METADATA_ATTRIBUTE) != text:
        raise ModelFileError(_changed_message(path))
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise ModelFileError(f"the metadata ({METADATA_FILE}) of '{path}' is not valid JSON ({exc}); "
                             "re-export the model with `equiforce export`") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"the metadata ({METADATA_FILE}) of '{path}' is not a JSON object; "
                             "re-export the model with `equiforce export`")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"'{path}' has format_version {version}, this equiforce ({__version__}) reads "
            f"format_version {FORMAT_VERSION}; re-export the model with this version")
    _check_required(path, meta)
    digest = meta.get("weights_digest")
    if digest is not None and hasattr(module, METADATA_ATTRIBUTE) and weights_digest(module.state_dict()) != digest:
        raise ModelFileError(f"the weights of '{path}' were changed after export (they no longer match the "
                             "weights_digest in its metadata); re-export it with `equiforce export`")
    return module, meta


def _changed_message(path: str) -> str:
    return (f"metadata of '{path}' was changed after export (species / r_max / ... no longer match the model); "
            "re-export it with `equiforce export`")


def _check_required(path: str, meta: Dict[str, Any]) -> None:
    """ModelFileError naming the first metadata key that engines need and that is missing or malformed."""
    def bad(key: str, what: str) -> ModelFileError:
        found = "missing" if key not in meta else f"{meta[key]!r}"
        return ModelFileError(f"the metadata of '{path}' has no valid '{key}' ({found}; expected {what}); "
                              "re-export the model with `equiforce export`")

    species = meta.get("species")
    if not (isinstance(species, list) and species and all(isinstance(x, str) for x in species)
            and len(set(species)) == len(species)):
        raise bad("species", "a list of distinct element symbols")
    r_max = meta.get("r_max")
    if not (isinstance(r_max, (int, float)) and not isinstance(r_max, bool) and 0 < r_max < float("inf")):
        raise bad("r_max", "a positive cutoff in Å")
    if meta.get("dtype") not in DTYPES:
        raise bad("dtype", " or ".join(sorted(DTYPES)))
    layers = meta.get("num_layers")
    if not (isinstance(layers, int) and not isinstance(layers, bool) and layers >= 0):
        raise bad("num_layers", "a number of interaction layers")
