"""The TorchScript module that openmm-torch's ``TorchForce`` calls.

openmm-torch calls ``forward(positions)`` (non-periodic) or ``forward(positions, box_vectors)``
(periodic, after ``setUsesPeriodicBoundaryConditions(True)``) with

* ``positions``   [N_total, 3] nm, every particle of the OpenMM ``System`` (float64 on the
  Reference and CPU platforms, not wrapped into the box);
* ``box_vectors`` [3, 3] nm, the periodic box vectors as rows (OpenMM's reduced triclinic form).

and :class:`OpenMMPotential` returns ``(energy, forces)`` with energy in kJ/mol and forces
[N_total, 3] in kJ/mol/nm (``TorchForce.setOutputsForces(True)``). The forces are the exported
model's own autograd forces (``-dE/dpos`` taken once inside the exported file): exact, and cheaper
than letting openmm-torch differentiate the whole wrapper a second time. Particles outside the ML
region get zero force.

Unit conversions (the package works in eV and Å)::

    1 nm = 10 Å                     positions_Å = 10 * positions_nm,  cell_Å = 10 * box_nm
    1 eV = 96.48533212331002 kJ/mol energy_kJ/mol = 96.48533212331002 * energy_eV
                                    forces_kJ/mol/nm = 964.8533212331002 * forces_eV/Å

Unit conversion and wrapping into the box are done in float64, on positions taken relative to the
first ML atom (a translation: energy and forces are unchanged, and a float32 model keeps its
precision however far from the origin the system sits); the result is then cast to the model's
dtype (float32 or float64, from the file's metadata), and energy and forces are cast back to the
dtype OpenMM passed on return.

Checks on every call (each a one-line error naming the fix): two ML atoms closer than the model's
``metadata["min_distance"]`` (default :data:`equiforce.units.MIN_DISTANCE`, 0.5 Å) raise a
RuntimeError naming the two particles and their distance; a periodic force that receives OpenMM's
default box (a 2 nm cube, what a ``System`` has when its box vectors were never set) raises a
ValueError unless the module was created with ``allow_default_box=True``.

Neighbours: a Verlet list on top of vesin's TorchScript build (``vesin.torch.NeighborList``, O(N),
periodic and triclinic boxes, boxes thinner than the cutoff; 16-20x faster than the pure-torch cell
list of :mod:`equiforce.data.neighbors` at 4096 atoms, bench/neighbors.py). That cell list still
runs for the geometries where vesin 0.6.2 must not be called (``neighbors._vesin_box``). A module
holding vesin needs ``import vesin.torch`` (done by importing this module) in the process that
loads it, as the compiled equiforce ops need theirs. Candidate pairs within ``r_max + skin`` are
kept in module buffers and reused until an atom has moved ``skin / 2`` since the last search or the
box vectors change; on every call exactly the pairs with ``|r| < r_max`` are passed to the model
(the contract of :mod:`equiforce.deploy.export`), so results do not depend on the skin.
"""
import json
from typing import Any, Dict, List, Optional, Tuple

import torch
import vesin.torch
from torch import Tensor, nn

from ..data.neighbors import _vesin_box  # vesin's box, or None where vesin 0.6.2 must not run
from ..data.neighbors import neighbor_list
from ..units import EV_TO_KJ_PER_MOL, MIN_DISTANCE, NM_TO_ANGSTROM, dtype_from_name

# box vectors (nm) of an openmm.System whose periodic box was never set
OPENMM_DEFAULT_BOX_NM = 2.0


def _fixed(x: float, digits: int) -> str:
    """``x >= 0`` with ``digits`` decimals (TorchScript has no "%.3f")."""
    scale = 1
    for _ in range(digits):
        scale = scale * 10
    m = int(round(x * scale))
    return str(m // scale) + "." + str(scale + m % scale)[1:]


class OpenMMPotential(nn.Module):
    """An exported equiforce model as a ``TorchForce`` module (nm, kJ/mol in; kJ/mol, kJ/mol/nm out).

    Args:
        model: the exported TorchScript module (``equiforce.deploy.export.load_exported``), signature
            ``(pos Å, species, edge_index, edge_shift Å, cell Å, n_local) -> (E eV, e_i, F eV/Å, virial)``.
        metadata: its metadata dict (``species``, ``r_max``, ``dtype`` are used).
        species: [M] int64 model species index of each ML atom.
        atoms: indices of the M ML atoms in the OpenMM ``System``; ``None`` means the system is
            exactly the M ML atoms in order.
        periodic: whether ``forward`` receives box vectors and applies periodic images.
        skin: Verlet-list skin (Å). Candidate pairs within ``r_max + skin`` come from
            ``vesin.torch.NeighborList`` and are reused until an atom has moved
            ``skin / 2`` or the box changes; every call keeps exactly the pairs with ``|r| < r_max``,
            so results equal a fresh neighbour search. ``skin = 0`` searches on every call.
        allow_default_box: accept OpenMM's default box (2 nm cube) with ``periodic``; by default it
            is refused, since a System has it exactly when its box vectors were never set.
        check_min_distance: raise when two ML atoms are closer than ``metadata["min_distance"]``
            (default True). OpenMM's ``LocalEnergyMinimizer`` (``Simulation.minimizeEnergy``) tries
            trial steps of up to 1 nm in total, which can put two atoms of a small molecule on top of
            each other; a force meant for minimising such a structure can turn the check off.
    """

    def __init__(self, model: torch.jit.ScriptModule, metadata: Dict[str, Any], species: Tensor,
                 atoms: Optional[List[int]] = None, periodic: bool = False, skin: float = 1.0,
                 allow_default_box: bool = False, check_min_distance: bool = True):
        super().__init__()
        self.min_distance = float(metadata.get("min_distance", MIN_DISTANCE))  # Å
        self.check_min_distance = bool(check_min_distance)
        self.allow_default_box = bool(allow_default_box)
        self.default_box_nm = OPENMM_DEFAULT_BOX_NM
        dtype = dtype_from_name(metadata["dtype"])
        self.model = model
        self.register_buffer("species", species.to(torch.long).clone())
        self.register_buffer("atoms", torch.tensor(atoms if atoms is not None else [], dtype=torch.long))
        # zero-size tensor that carries the model dtype (TorchScript-friendly way to store a dtype)
        self.register_buffer("dtype_probe", torch.zeros(0, dtype=dtype))
        self.use_subset = atoms is not None
        self.n_ml = int(species.shape[0])
        self.max_index = int(max(atoms)) if atoms else -1
        self.r_max = float(metadata["r_max"])
        self.periodic = bool(periodic)
        self.species_names: List[str] = list(metadata["species"])
        self.metadata_json = json.dumps(metadata)
        self.energy_scale = EV_TO_KJ_PER_MOL
        self.force_scale = EV_TO_KJ_PER_MOL * NM_TO_ANGSTROM
        self.length_scale = NM_TO_ANGSTROM
        # Verlet list: candidates within r_max + skin, rebuilt when an atom moved more than skin / 2
        self.skin = float(skin)
        self.rebuilds = 0
        self.search = vesin.torch.NeighborList(cutoff=self.r_max + max(self.skin, 0.0), full_list=True)
        self.register_buffer("ref_pos", torch.zeros((0, 3), dtype=torch.float64))
        self.register_buffer("ref_cell", torch.zeros((3, 3), dtype=torch.float64))
        self.register_buffer("wrap", torch.zeros((0, 3), dtype=torch.float64))
        self.register_buffer("cand_index", torch.zeros((2, 0), dtype=torch.long))
        self.register_buffer("cand_shift", torch.zeros((0, 3), dtype=dtype))

    def _frame(self, cell: Tensor) -> Tensor:
        """The box rows vesin starts from: the box when periodic, unit vectors otherwise (float64)."""
        if self.periodic:
            return cell
        return torch.eye(3, dtype=torch.float64, device=cell.device)

    def _update_candidates(self, pos: Tensor, cell: Tensor, pbc: Tensor) -> None:
        """Rebuild the candidate pairs (vesin, cutoff r_max + skin) when needed.

        Needed on the first call, when the box changed (barostat), or when some atom moved by
        skin / 2 or more since the last build: then no pair now closer than r_max can be missing.
        ``pos`` and ``cell`` are unwrapped positions and box (Å, float64)."""
        rebuild = self.skin <= 0.0 or self.ref_pos.shape[0] != pos.shape[0] or not torch.equal(cell, self.ref_cell)
        if not rebuild:
            d = pos - self.ref_pos
            rebuild = bool((d * d).sum(1).max() * 4.0 >= 0.99 * self.skin * self.skin)
        if rebuild:
            if self.periodic:
                if bool(torch.abs(torch.linalg.det(cell)) < 1e-9):
                    raise ValueError("equiforce OpenMMPotential: the periodic box vectors have zero volume")
                frac = torch.linalg.solve(cell.transpose(0, 1), pos.transpose(0, 1)).transpose(0, 1)
                wrap = torch.floor(frac)
            else:
                wrap = torch.zeros_like(pos)
            dtype = self.dtype_probe.dtype
            pos_w = pos - wrap @ cell
            cutoff = self.r_max + max(self.skin, 0.0)
            # vesin in float64 on the wrapped positions, always with a fully periodic box (non-periodic
            # directions padded beyond the cutoff; None where vesin 0.6.2 would crash or crawl, see
            # equiforce.data.neighbors._vesin_box). The exact |r| < r_max test of forward() runs in the
            # model dtype, so a float64 candidate set (a superset by the skin) changes nothing.
            box = _vesin_box(pos_w, cutoff, self._frame(cell), pbc) if pos.shape[0] > 0 else None
            if box is not None:
                i, j, image = self.search.compute(pos_w, box, torch.ones(3, dtype=torch.bool), "ijS", True)
                image = image.to(torch.long)
                keep = torch.nonzero(~(image[:, ~pbc] != 0).any(dim=1)).reshape(-1)  # no padded images
                index = torch.stack([i.to(torch.long), j.to(torch.long)], dim=0).index_select(1, keep)
                shift = image.index_select(0, keep).to(dtype) @ cell.to(dtype)  # edge_shift = cell_shift @ cell
            else:
                index, shift, _ = neighbor_list(pos_w.to(dtype), cutoff, cell.to(dtype), pbc)
            self.ref_pos = pos.clone()
            self.ref_cell = cell.clone()
            self.wrap = wrap
            self.cand_index = index
            self.cand_shift = shift
            self.rebuilds += 1

    def _check_box(self, box_vectors: Tensor) -> None:
        """ValueError for OpenMM's default box (a never-set System box) unless allowed."""
        if self.allow_default_box:
            return
        default = torch.eye(3, dtype=torch.float64, device=box_vectors.device) * self.default_box_nm
        if torch.equal(box_vectors.detach().to(torch.float64), default):
            raise ValueError("equiforce OpenMMPotential: periodic=True but the box is OpenMM's default 2 nm cube, "
                             "which a System has when its periodic box vectors were never set; set them "
                             "(system.setDefaultPeriodicBoxVectors or context.setPeriodicBoxVectors), or create "
                             "the force with periodic=False; if a 2 nm cubic box is intended, pass "
                             "allow_default_box=True to create_force")

    def _particle(self, k: int) -> int:
        """OpenMM particle index of ML atom ``k``."""
        return int(self.atoms[k]) if self.use_subset else k

    def _check_min_distance(self, pos: Tensor, edge_index: Tensor, edge_shift: Tensor) -> None:
        """RuntimeError naming the closest pair when two atoms are nearer than ``min_distance`` (Å)."""
        if not self.check_min_distance or edge_index.shape[1] == 0:
            return
        vec = pos.index_select(0, edge_index[1]) - pos.index_select(0, edge_index[0]) + edge_shift
        d2 = (vec * vec).sum(1)
        k = int(torch.argmin(d2))
        d = float(torch.sqrt(d2[k]))
        if d < self.min_distance:
            i = self._particle(int(edge_index[0, k]))
            j = self._particle(int(edge_index[1, k]))
            raise RuntimeError("equiforce OpenMMPotential: particles " + str(min(i, j)) + " and " + str(max(i, j))
                               + " are " + _fixed(d / self.length_scale, 4) + " nm (" + _fixed(d, 3)
                               + " Å) apart, closer than the model's minimum distance "
                               + _fixed(self.min_distance, 3) + " Å (atoms on top of each other give a meaningless energy); fix the positions "
                               "(duplicated atoms, a bad starting structure, or a time step too large)")

    def forward(self, positions: Tensor, box_vectors: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        positions = positions.detach()
        n_total = positions.shape[0]
        if self.use_subset:
            if n_total <= self.max_index:
                raise ValueError("equiforce OpenMMPotential: the System has fewer particles than the "
                                 "largest ML atom index; pass atoms= indices that exist in the System")
            pos_nm = positions.index_select(0, self.atoms)
        else:
            if n_total != self.n_ml:
                raise ValueError("equiforce OpenMMPotential: the System's particle count differs from the "
                                 "number of elements the force was created with; pass atoms= to select "
                                 "the ML region")
            pos_nm = positions
        pos = pos_nm.to(torch.float64) * self.length_scale  # Å, float64 whatever OpenMM passes
        pos = pos - pos[:1]  # relative to the first ML atom, in float64 (see the module docstring)
        dtype = self.dtype_probe.dtype
        if self.periodic:
            if box_vectors is None:
                raise ValueError("equiforce OpenMMPotential was created with periodic=True but OpenMM passed "
                                 "no box vectors; call setUsesPeriodicBoundaryConditions(True) on the force")
            self._check_box(box_vectors)
            cell = box_vectors.detach().to(torch.float64) * self.length_scale  # rows a, b, c (Å)
            pbc = torch.tensor([True, True, True], device=pos.device)
        else:
            cell = torch.zeros((3, 3), dtype=torch.float64, device=pos.device)
            pbc = torch.tensor([False, False, False], device=pos.device)
        self._update_candidates(pos, cell, pbc)
        # the wrap fixed at the last rebuild (OpenMM does not wrap): whole lattice vectors, in float64,
        # which also keeps float32 models accurate for atoms that diffused many boxes away
        pos = (pos - self.wrap @ cell).to(dtype)
        cell = cell.to(dtype)
        # exact pair set |r| < r_max, the same test and arithmetic as equiforce.data.neighbors.neighbor_list
        i, j = self.cand_index[0], self.cand_index[1]
        vec = pos.index_select(0, j) - pos.index_select(0, i) + self.cand_shift
        keep = torch.nonzero((vec * vec).sum(1) < self.r_max * self.r_max).reshape(-1)
        edge_index = self.cand_index.index_select(1, keep)
        edge_shift = self.cand_shift.index_select(0, keep)
        self._check_min_distance(pos, edge_index, edge_shift)
        energy, _, forces, _ = self.model(pos, self.species, edge_index, edge_shift, cell, self.n_ml)
        energy = energy.to(positions.dtype) * self.energy_scale
        forces = forces.to(positions.dtype) * self.force_scale
        if self.use_subset:
            full = torch.zeros((n_total, 3), dtype=positions.dtype, device=positions.device)
            full.index_copy_(0, self.atoms, forces)
            forces = full
        return energy, forces
