"""Output heads beyond the per-atom energy: vectors per atom (dipole contributions, direct forces)
and atomic charges with exact charge conservation.

Shapes: ``N`` atoms, ``B`` structures, ``C`` channels. Features ``x`` [N, dim] are the output of the
last interaction layer, laid out ``C x 0e`` (scalars) first, then, when the model was built with a
vector output, ``C x 1`` (``1o`` in O(3) mode: a polar vector that flips under inversion; ``1e`` in
SE(3) mode, where parity is not tracked). The l=1 components are Cartesian ``(x, y, z)`` (see
:mod:`equiforce.o3.spherical_harmonics`).

* :class:`VectorHead` -- ``k`` vectors per atom [N, k, 3]. Equivariant models: an equivariant
  linear map of the ``C x 1`` block (rotates with the structure). Invariant models (``lmax = 0``,
  the SchNet-like baseline): a plain ``nn.Linear(C, 3k)`` of the invariant scalars. The latter is
  exactly rotation-INVARIANT -- a rotated molecule gets the same vector -- which is the limitation
  the baseline exists to show: an invariant network cannot output a vector that turns with the
  molecule (on randomly oriented data its best guess is the average vector, ~0).
* :class:`ChargeHead` -- one charge per atom (e) from the scalars, shifted per structure so that
  the total charge equals ``Q`` exactly: ``q_i <- q_i - (sum_{j in b} q_j - Q_b) / n_b``.
  :func:`charge_dipole` turns charges into ``mu_b = sum_i q_i (r_i - c_b)`` (e·Å) with ``c_b`` the
  geometric centroid of structure ``b`` (for a neutral structure the origin does not matter; for
  a charged one the centroid is the reference point). Charges need absolute positions, so the
  charge dipole is defined for molecules (non-periodic structures) only.
"""
from typing import List

import torch
from torch import Tensor, nn

from .activations import NormalizedSiLU
from ..o3.irreps import Irreps
from .linear import Linear
from .scatter import scatter_sum


class VectorHead(nn.Module):
    """``x`` [N, dim] -> ``k`` vectors per atom [N, k, 3] (see the module docstring)."""

    def __init__(self, channels: int, num_vectors: int, vector_irrep: List[int], equivariant: bool):
        super().__init__()
        self.channels = int(channels)
        self.num_vectors = int(num_vectors)
        self.equivariant = bool(equivariant)
        l, p = int(vector_irrep[0]), int(vector_irrep[1])
        if self.equivariant and l != 1:
            raise ValueError(f"VectorHead needs an l=1 input block, got l={l}")
        # equivariant: the C x 1 block; invariant: the C scalars
        self.linear_eq = Linear(Irreps([(channels, (1, p))]), Irreps([(num_vectors, (1, p))])) if self.equivariant \
            else nn.Identity()
        self.linear_inv = nn.Linear(channels, 3 * num_vectors) if not self.equivariant else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        c = self.channels
        if self.equivariant:
            v = self.linear_eq(x[:, c:4 * c])          # [N, k * 3], mul-major
        else:
            v = self.linear_inv(x[:, :c])              # [N, 3k]: invariant numbers, not a vector
        return v.view(n, self.num_vectors, 3)


class ChargeHead(nn.Module):
    """Scalars [N, C] -> raw atomic charges [N] (e), before conservation."""

    def __init__(self, channels: int):
        super().__init__()
        width = max(channels // 2, 1)
        self.mlp = nn.Sequential(nn.Linear(channels, width), NormalizedSiLU(), nn.Linear(width, 1))
        self.channels = int(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x[:, :self.channels]).squeeze(-1)


def conserve_charge(q: Tensor, batch: Tensor, num_graphs: int, total_charge: Tensor) -> Tensor:
    """Shift charges ``q`` [N] per structure so that ``sum_b q = total_charge[b]`` [B] exactly."""
    ones = torch.ones_like(q)
    n = scatter_sum(ones, batch, num_graphs)
    excess = (scatter_sum(q, batch, num_graphs) - total_charge.to(q.dtype)) / n.clamp(min=1.0)
    return q - excess.index_select(0, batch)


def charge_dipole(q: Tensor, pos: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """``mu_b = sum_i q_i (r_i - centroid_b)`` [B, 3] (e·Å) from charges [N] (e) and positions [N, 3] (Å)."""
    n = scatter_sum(torch.ones_like(q), batch, num_graphs).clamp(min=1.0)
    centroid = scatter_sum(pos, batch, num_graphs) / n.unsqueeze(-1)
    rel = pos - centroid.index_select(0, batch)
    return scatter_sum(q.unsqueeze(-1) * rel, batch, num_graphs)
