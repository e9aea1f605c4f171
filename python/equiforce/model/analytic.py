"""Analytic reference potentials with the interface of the learned model.

They let every engine boundary (export, LAMMPS, OpenMM, ASE) be tested on its own, without a
network: their energies are known in closed form and cheap to recompute independently.

Interface shared with :class:`equiforce.model.network.EquiforceModel` (the "energy model" contract)::

    per_atom_energy = model(species, edge_index, edge_vec, batch, num_graphs)
    # species [N] int64, edge_index [2, E] int64, edge_vec [E, 3] (Å), batch [N] int64 -> [N] (eV)

plus the attributes ``r_max`` (float, Å), ``num_layers`` (int), ``species_names`` (List[str]).
"""
from typing import List

import torch
from torch import Tensor, nn

from ..nn.radial import polynomial_cutoff
from ..nn.scatter import scatter_sum


class AnalyticMessageModel(nn.Module):
    """A Morse pair potential plus ``num_layers - 1`` rounds of coordination messages.

    ``E_i = 1/2 sum_j D_ij [(1 - exp(-a (r_ij - r0)))^2 - 1] fc(r_ij) + c * (h_i^L)^2`` where
    ``h^0_i = w[s_i]`` and ``h^{t+1}_i = sum_j fc(r_ij) h^t_j``. The message term makes the
    receptive field ``num_layers * r_max``, so it exercises ghost-atom handling like the network.
    """

    def __init__(self, species_names: List[str], r_max: float = 4.0, num_layers: int = 2,
                 depth: float = 0.3, a: float = 1.6, r0: float = 2.2, coupling: float = 1e-3):
        super().__init__()
        self.species_names = list(species_names)
        self.r_max = float(r_max)
        self.num_layers = int(num_layers)
        n = len(species_names)
        self.register_buffer("depth", depth * (1.0 + 0.25 * torch.arange(n, dtype=torch.float64)))
        self.register_buffer("weight", 1.0 + 0.5 * torch.arange(n, dtype=torch.float64))
        self.a = float(a)
        self.r0 = float(r0)
        self.coupling = float(coupling)

    def forward(self, species: Tensor, edge_index: Tensor, edge_vec: Tensor, batch: Tensor,
                num_graphs: int) -> Tensor:
        n = species.shape[0]
        r = torch.sqrt((edge_vec * edge_vec).sum(1))
        fc = polynomial_cutoff(r, self.r_max)
        i, j = edge_index[0], edge_index[1]
        d = torch.sqrt(self.depth[species[i]] * self.depth[species[j]]).to(edge_vec.dtype)
        morse = d * ((1.0 - torch.exp(-self.a * (r - self.r0))) ** 2 - 1.0) * fc
        e = 0.5 * scatter_sum(morse, i, n)
        h = self.weight.to(edge_vec.dtype)[species]
        for _ in range(self.num_layers - 1):
            h = scatter_sum(fc * h[j], i, n)
        return e + self.coupling * h * h
