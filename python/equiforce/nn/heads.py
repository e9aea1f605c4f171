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
* :class:`PolarizabilityHead` -- per-atom contributions to a symmetric 3x3 polarizability
  (e·Å²/V): an isotropic part ``a0_i`` (a small MLP of the scalars, plus a per-species atomic
  polarizability) and an anisotropic part from the ``C x 2e`` block (an equivariant linear map to
  ``1 x 2e``), assembled by :func:`equiforce.o3.cartesian.symmetric_from_irreps` and summed over
  the atoms of each structure (:func:`polarizability_sum`). Equivariant models: ``alpha`` turns as
  ``R alpha R^T`` and is unchanged by inversion (``0e + 2e``: a true tensor). Invariant models
  (``lmax = 0``): the five l=2 numbers are a plain linear map of the scalars, so the tensor is
  rotation-INVARIANT (the baseline's limitation, as for :class:`VectorHead`).
"""
from typing import List, Tuple

import torch
from torch import Tensor, nn

from .activations import NormalizedSiLU
from ..o3.cartesian import l2_basis, symmetric_from_irreps
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


class PolarizabilityHead(nn.Module):
    """``x`` [N, dim] -> per-atom isotropic parts [N] and l=2 components [N, 5] (network units;
    the model multiplies by its ``polarizability_scale`` and adds per-species shifts).

    ``l2_start``: column of the ``C x 2e`` block in ``x`` (equivariant models; ignored otherwise)."""

    def __init__(self, channels: int, l2_start: int, equivariant: bool):
        super().__init__()
        self.channels = int(channels)
        self.l2_start = int(l2_start)
        self.equivariant = bool(equivariant)
        width = max(channels // 2, 1)
        self.isotropic = nn.Sequential(nn.Linear(channels, width), NormalizedSiLU(), nn.Linear(width, 1))
        self.linear_eq = Linear(Irreps([(channels, (2, 1))]), Irreps([(1, (2, 1))])) if self.equivariant \
            else nn.Identity()
        self.linear_inv = nn.Linear(channels, 5) if not self.equivariant else nn.Identity()

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        c = self.channels
        a0 = self.isotropic(x[:, :c]).squeeze(-1)                          # [N]
        if self.equivariant:
            l2 = self.linear_eq(x[:, self.l2_start:self.l2_start + 5 * c])  # [N, 5]
        else:
            l2 = self.linear_inv(x[:, :c])                                 # [N, 5]: invariant numbers
        return a0, l2


def polarizability_sum(a0: Tensor, l2: Tensor, batch: Tensor, num_graphs: int, basis: Tensor) -> Tensor:
    """``alpha_b = sum_{i in b} (a0_i I + sum_m l2_im B_m)`` [B, 3, 3] from per-atom isotropic parts
    ``a0`` [N] and l=2 components ``l2`` [N, 5] (``basis`` [5, 3, 3], :func:`l2_basis`)."""
    return symmetric_from_irreps(scatter_sum(a0, batch, num_graphs), scatter_sum(l2, batch, num_graphs), basis)


def polarizability_basis(dtype: torch.dtype = torch.float64) -> Tensor:
    """The l=2 basis [5, 3, 3] the head assembles with (:func:`equiforce.o3.cartesian.l2_basis`)."""
    return l2_basis(dtype)
