"""Energy, forces and virial from one autograd pass over the edge vectors.

Every engine (training, ASE, the exported TorchScript file, LAMMPS, OpenMM) goes through
:func:`energy_forces_virial`, so the sign conventions live in one place:

* edge ``e = (i, j)`` with ``i = edge_index[0, e]`` the centre and ``j = edge_index[1, e]`` the
  neighbour; its vector is ``r_e = pos[j] - pos[i] + edge_shift[e]`` (Å).
* ``forces = -dE/dpos``: with ``g_e = dE/dr_e``, ``F_i += g_e`` and ``F_j -= g_e`` (eV/Å).
* ``virial = -sum_e r_e (x) g_e`` (eV), the LAMMPS convention (sum r.f, positive when repulsive).
  ASE stress is ``-virial / volume`` (eV/Å^3).

Only the edge vectors carry the geometry, so energies are translation-invariant by construction
and the virial is exact for periodic systems without differentiating the cell.
"""
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ..nn.scatter import scatter_sum


def edge_vectors(pos: Tensor, edge_index: Tensor, edge_shift: Tensor) -> Tensor:
    """Edge vectors ``pos[j] - pos[i] + shift`` [E, 3] (Å)."""
    return pos.index_select(0, edge_index[1]) - pos.index_select(0, edge_index[0]) + edge_shift


def forces_virial_from_edge_grad(
    edge_grad: Optional[Tensor],
    edge_vec: Tensor,
    edge_index: Tensor,
    n_atoms: int,
    edge_graph: Tensor,
    num_graphs: int,
) -> Tuple[Tensor, Tensor]:
    """Turn ``dE/dr_e`` [E, 3] into forces [N, 3] (eV/Å) and per-graph virials [B, 3, 3] (eV).

    ``edge_grad`` may be None (no edges, or energy independent of geometry): zeros are returned.
    ``edge_graph`` [E] is the graph index of each edge.

    Only these sums are physical: with a model's inference kernels on (reverse edges share their
    radial weights, :meth:`equiforce.model.network.EquiforceModel.use_fused_kernels`) the radial part of
    one edge's gradient is credited to its reverse edge, which leaves forces and per-graph virials
    unchanged but not per-edge gradients (a per-atom virial or heat flux built from them would need
    the PyTorch path).
    """
    if edge_grad is None:
        forces = torch.zeros((n_atoms, 3), dtype=edge_vec.dtype, device=edge_vec.device)
        virial = torch.zeros((num_graphs, 3, 3), dtype=edge_vec.dtype, device=edge_vec.device)
        return forces, virial
    forces = scatter_sum(edge_grad, edge_index[0], n_atoms) - scatter_sum(edge_grad, edge_index[1], n_atoms)
    per_edge = -(edge_vec.unsqueeze(2) * edge_grad.unsqueeze(1))  # [E, 3, 3]
    virial = scatter_sum(per_edge, edge_graph, num_graphs)
    return forces, virial


def energy_forces_virial(
    model: torch.nn.Module,
    pos: Tensor,
    species: Tensor,
    edge_index: Tensor,
    edge_shift: Tensor,
    batch: Tensor,
    num_graphs: int,
    create_graph: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Evaluate an energy model on a batch of graphs.

    Args: ``pos`` [N, 3] (Å), ``species`` [N], ``edge_index`` [2, E], ``edge_shift`` [E, 3] (Å),
    ``batch`` [N] graph index of each atom, ``num_graphs`` B. ``create_graph=True`` keeps the graph
    of the force computation (needed to train on forces).

    Returns ``(energy [B] eV, per_atom_energy [N] eV, forces [N, 3] eV/Å, virial [B, 3, 3] eV)``.
    """
    edge_vec = _edge_leaf(pos, edge_index, edge_shift)
    atom_energy = model(species, edge_index, edge_vec, batch, num_graphs)
    energy, forces, virial = _energy_forces_from_edges(atom_energy, edge_vec, edge_index, batch, num_graphs,
                                                       create_graph)
    return energy, atom_energy, forces, virial


def _edge_leaf(pos: Tensor, edge_index: Tensor, edge_shift: Tensor) -> Tensor:
    """Edge vectors [E, 3] that require grad: the geometry the energy is differentiated against."""
    edge_vec = edge_vectors(pos, edge_index, edge_shift)
    return edge_vec if edge_vec.requires_grad else edge_vec.requires_grad_(True)


def _energy_forces_from_edges(atom_energy: Tensor, edge_vec: Tensor, edge_index: Tensor, batch: Tensor,
                              num_graphs: int, create_graph: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-graph energy [B], forces [N, 3] and virial [B, 3, 3] from per-atom energies that depend on
    the geometry through ``edge_vec`` only."""
    energy = scatter_sum(atom_energy, batch, num_graphs)
    grads = torch.autograd.grad([energy.sum()], [edge_vec], create_graph=create_graph, allow_unused=True)
    edge_graph = batch.index_select(0, edge_index[0])
    forces, virial = forces_virial_from_edge_grad(grads[0], edge_vec, edge_index, batch.shape[0], edge_graph,
                                                  num_graphs)
    return energy, forces, virial


def model_outputs(
    model: torch.nn.Module,
    pos: Tensor,
    species: Tensor,
    edge_index: Tensor,
    edge_shift: Tensor,
    batch: Tensor,
    num_graphs: int,
    create_graph: bool = False,
    total_charge: Optional[Tensor] = None,
    cell: Optional[Tensor] = None,
) -> Dict[str, Tensor]:
    """Every output of a model with heads (:meth:`equiforce.model.network.EquiforceModel.predict`) in one pass.

    Returns ``energy`` [B], ``per_atom_energy`` [N], ``forces`` [N, 3], ``virial`` [B, 3, 3] as
    :func:`energy_forces_virial`, plus ``dipole`` [B, 3] (e·Å) and ``charges`` [N] (e) when the model
    has those heads. For a direct-force model (``model.direct_forces``) ``forces`` are the head's
    output, ``conservative_forces`` the gradient forces of its energy head, and ``virial`` comes from
    the energy head (a direct-force head has no virial of its own). Models without ``predict``
    (energy models such as :class:`equiforce.model.analytic.AnalyticMessageModel`) fall back to
    :func:`energy_forces_virial`.

    Long-range models (``model.has_long_range``) also need ``cell`` [B, 3, 3] (Å, lattice rows; zeros
    for open boundaries). Their energy depends on the edge vectors (short-range part and charges)
    and directly on ``pos`` and ``cell`` (electrostatics), all three taken as independent leaves:
    ``forces = -dE/dpos`` adds the direct term to the edge forces (so the charge-response term
    ``-dE/dq dq/dpos`` is included), and the virial adds the strain derivative of the direct part,
    ``-(sum_i pos_i (x) dE/dpos_i + cell^T dE/dcell)`` per structure.
    """
    if not hasattr(model, "predict"):
        energy, atom_energy, forces, virial = energy_forces_virial(
            model, pos, species, edge_index, edge_shift, batch, num_graphs, create_graph)
        return {"energy": energy, "per_atom_energy": atom_energy, "forces": forces, "virial": virial}
    if bool(getattr(model, "has_long_range", False)):
        return _long_range_outputs(model, pos, species, edge_index, edge_shift, batch, num_graphs, create_graph,
                                   total_charge, cell)
    edge_vec = _edge_leaf(pos, edge_index, edge_shift)
    out = dict(model.predict(species, edge_index, edge_vec, batch, num_graphs, pos, total_charge))
    energy, forces, virial = _energy_forces_from_edges(out["per_atom_energy"], edge_vec, edge_index, batch,
                                                       num_graphs, create_graph)
    out["energy"] = energy
    out["virial"] = virial
    if "forces" in out:
        out["conservative_forces"] = forces
    else:
        out["forces"] = forces
    return out


def strain_virial(pos: Tensor, cell: Tensor, grad_pos: Optional[Tensor], grad_cell: Optional[Tensor],
                  batch: Tensor, num_graphs: int) -> Tensor:
    """Virial [B, 3, 3] (eV) of the part of an energy that depends on ``pos`` [N, 3] and ``cell``
    [B, 3, 3] (Å) directly (long-range terms), from its gradients: the strain derivative
    ``W_b = -(sum_{i in b} pos_i (x) dE/dpos_i + cell_b^T dE/dcell_b)`` (positions and lattice rows
    strained together; the same convention as :func:`forces_virial_from_edge_grad`, ``-sum r (x) dE/dr``).
    A gradient that is None (the energy does not depend on it) contributes nothing."""
    virial = torch.zeros((num_graphs, 3, 3), dtype=pos.dtype, device=pos.device)
    if grad_pos is not None:
        virial = virial - scatter_sum(pos.unsqueeze(2) * grad_pos.unsqueeze(1), batch, num_graphs)
    if grad_cell is not None:
        virial = virial - torch.einsum("bki,bkj->bij", cell, grad_cell)
    return virial


def _long_range_outputs(model: torch.nn.Module, pos: Tensor, species: Tensor, edge_index: Tensor,
                        edge_shift: Tensor, batch: Tensor, num_graphs: int, create_graph: bool,
                        total_charge: Optional[Tensor], cell: Optional[Tensor]) -> Dict[str, Tensor]:
    """:func:`model_outputs` for a long-range model (edge vectors, positions and cell as leaves)."""
    if cell is None:
        raise ValueError("a long-range model needs the cell: pass cell= [B, 3, 3] (Å, lattice vectors as rows; "
                         "zeros for molecules) to model_outputs")
    if cell.dim() == 2:
        cell = cell.unsqueeze(0)
    edge_vec = edge_vectors(pos.detach(), edge_index, edge_shift).requires_grad_(True)
    pos_leaf = pos.detach().clone().requires_grad_(True)
    cell_leaf = cell.detach().to(pos.dtype).clone().requires_grad_(True)
    out = dict(model.predict(species, edge_index, edge_vec, batch, num_graphs, pos_leaf, total_charge, cell_leaf))
    energy = scatter_sum(out["per_atom_energy"], batch, num_graphs)
    grads = torch.autograd.grad([energy.sum()], [edge_vec, pos_leaf, cell_leaf], create_graph=create_graph,
                                allow_unused=True)
    edge_graph = batch.index_select(0, edge_index[0])
    forces, virial = forces_virial_from_edge_grad(grads[0], edge_vec, edge_index, pos.shape[0], edge_graph, num_graphs)
    grad_pos, grad_cell = grads[1], grads[2]
    if grad_pos is not None:
        forces = forces - grad_pos
    virial = virial + strain_virial(pos_leaf.detach(), cell_leaf.detach(), grad_pos, grad_cell, batch, num_graphs)
    out["energy"] = energy
    out["virial"] = virial
    if "forces" in out:
        out["conservative_forces"] = forces
    else:
        out["forces"] = forces
    return out
