"""Electrostatics of point charges: Ewald summation (periodic) and plain Coulomb (open boundaries).

Units: charges in e, lengths in Å, energies in eV; Coulomb constant ``K_E = 14.399645`` eV·Å/e².
Everything is TorchScript-able and differentiable with respect to positions, charges and the cell
(lattice vectors as rows), so a model whose charges depend on the geometry gets the
charge-response force ``-sum_i dE/dq_i dq_i/dr`` by autograd, and the virial comes from the strain
derivative (see :func:`equiforce.model.forces.strain_virial`).

Periodic systems (three non-zero lattice vectors), with splitting parameter ``alpha`` (1/Å)::

    E = K_E [ 1/2 sum'_{i,j,n} q_i q_j erfc(alpha r_ijn) / r_ijn           real space, r < r_c
            + (2 pi / V) sum_{k != 0, |k| < k_c} exp(-k^2 / 4 alpha^2) / k^2 |S(k)|^2   reciprocal
            - alpha / sqrt(pi) sum_i q_i^2                                   self
            - pi Q^2 / (2 V alpha^2) ]                                       neutralising background

with ``S(k) = sum_j q_j exp(i k.r_j)``, ``k = m B`` (``B = 2 pi cell^-T``, rows the reciprocal
vectors, ``m`` integer), ``Q = sum_i q_i``; the prime drops ``i = j`` at ``n = 0``. Only half of the
k-space is summed (``S(-k) = S(k)*``).

Accuracy (relative accuracy ``eps``, real-space cutoff ``r_c``; e.g. Kolafa & Perram, Mol. Sim.
9, 351 (1992), to leading order): the real-space terms dropped are ~``erfc(alpha r_c) / r_c`` and
the reciprocal terms dropped ~``exp(-k_c^2 / 4 alpha^2)``; both are set equal to ``eps`` by::

    s = sqrt(-ln eps),   alpha = s / r_c,   k_c = 2 alpha s

(for ``eps = 1e-6``, ``r_c = 10`` Å: ``alpha = 0.372`` /Å, ``k_c = 2.76`` /Å). An explicit
``alpha`` overrides the first choice (``k_c = 2 alpha s`` still; ``r_c`` then must satisfy
``alpha r_c >= s`` or a ValueError says so). The energy is independent of ``alpha`` up to ``eps``.

Open boundaries (cell all zeros): ``E = K_E sum_{i<j} q_i q_j / r_ij`` over all pairs (O(N^2)).

Optional damping width ``sigma > 0`` (Å): the pair kernel becomes ``erf(r / sigma) / r`` (finite at
r = 0, equal to 1/r beyond a few sigma), for every pair including periodic images. Periodic:
the Ewald energy minus ``1/2 sum q_i q_j erfc(r / sigma) / r`` over the real-space pairs, which is
exact when ``erfc(r_c / sigma) < eps`` (checked).

Per-atom energies: ``E_i = q_i phi_i / 2`` with ``phi_i`` the potential at atom ``i`` from all other
charges (images included) and the background; their sum is ``E``.

The set of pairs and k-vectors is chosen from the current geometry, so E is piecewise smooth with
jumps of relative size ~eps when a pair or k-vector crosses its cutoff.
"""
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..data.neighbors import neighbor_list
from ..units import COULOMB_CONSTANT
from .mesh_electrostatics import MESH_METHODS, MeshEwald

#: Coulomb constant e^2 / (4 pi eps0) in eV·Å / e^2.
K_E = COULOMB_CONSTANT


def _coulomb_constant() -> float:
    """:data:`K_E` (a function: TorchScript does not read module globals)."""
    return 14.399645


def ewald_parameters(accuracy: float, cutoff: float, alpha: float = 0.0) -> Tuple[float, float]:
    """``(alpha 1/Å, k_cut 1/Å)`` for relative ``accuracy`` and real-space ``cutoff`` (Å); see the
    module docstring. ``alpha > 0`` is used as given (checked against the cutoff)."""
    if not (0.0 < accuracy < 1.0):
        raise ValueError("Ewald accuracy must be in (0, 1) (relative energy error, e.g. 1e-6), got " + str(accuracy))
    if not cutoff > 0.0:
        raise ValueError("Ewald real-space cutoff must be > 0 Å (e.g. 10.0), got " + str(cutoff))
    s = math.sqrt(-math.log(accuracy))
    if alpha <= 0.0:
        alpha = s / cutoff
    elif alpha * cutoff < s * (1.0 - 1e-12):
        raise ValueError("Ewald alpha = " + str(alpha) + " /Å is too small for the real-space cutoff "
                         + str(cutoff) + " Å at accuracy " + str(accuracy)
                         + ": need alpha * cutoff >= sqrt(-ln accuracy) = " + str(s) + "; raise alpha or the cutoff")
    return alpha, 2.0 * alpha * s


def _periodicity(cell: Tensor) -> bool:
    """True for three non-zero lattice vectors, False for an all-zero cell; ValueError otherwise."""
    if cell.shape != (3, 3):
        raise ValueError("electrostatics: cell must be [3, 3] (lattice vectors as rows, Å), got "
                         + str(list(cell.shape)))
    nonzero = (cell.detach().abs().sum(dim=1) > 0.0)
    n = int(nonzero.sum())
    if n == 0:
        return False
    if n != 3:
        raise ValueError("electrostatics: the cell has only some non-zero lattice vectors; long-range "
                         "electrostatics supports fully periodic cells (three lattice vectors) or open "
                         "boundaries (all-zero cell), not slabs or wires")
    if float(torch.abs(torch.linalg.det(cell.detach()))) < 1e-9:
        raise ValueError("electrostatics: the periodic cell has zero volume; give three independent "
                         "lattice vectors as rows")
    return True


def _kvector_indices(cell: Tensor, k_cut: float) -> Tensor:
    """Integer vectors ``m`` [K, 3] of the half k-space with ``0 < |m B| < k_cut`` (no gradient)."""
    c = cell.detach().to(torch.float64)
    recip = 2.0 * math.pi * torch.linalg.inv(c).transpose(0, 1)  # rows b_i, a_i . b_j = 2 pi delta
    # |m_i| = |k . a_i| / 2 pi <= k_cut |a_i| / 2 pi
    bounds: List[int] = []
    for i in range(3):
        bounds.append(int(math.floor(k_cut * float(torch.linalg.norm(c[i])) / (2.0 * math.pi))))
    r0 = torch.arange(-bounds[0], bounds[0] + 1, device=cell.device)
    r1 = torch.arange(-bounds[1], bounds[1] + 1, device=cell.device)
    r2 = torch.arange(-bounds[2], bounds[2] + 1, device=cell.device)
    grid = torch.stack(torch.meshgrid([r0, r1, r2], indexing="ij"), dim=-1).reshape(-1, 3)
    half = (grid[:, 0] > 0) | ((grid[:, 0] == 0) & (grid[:, 1] > 0)) | \
           ((grid[:, 0] == 0) & (grid[:, 1] == 0) & (grid[:, 2] > 0))
    grid = grid[half]
    k = grid.to(torch.float64) @ recip
    keep = (k * k).sum(dim=1) < k_cut * k_cut
    return grid[keep]


def ewald_per_atom(pos: Tensor, charges: Tensor, cell: Tensor, accuracy: float, cutoff: float,
                   alpha: float = 0.0, damping: float = 0.0) -> Tensor:
    """Per-atom electrostatic energies [N] (eV) of point charges [N] (e) at ``pos`` [N, 3] (Å) in a
    periodic ``cell`` [3, 3] (rows, Å); their sum is the Ewald energy of the module docstring."""
    alpha, k_cut = ewald_parameters(accuracy, cutoff, alpha)
    s = math.sqrt(-math.log(accuracy))
    if damping > 0.0 and cutoff < damping * s:
        raise ValueError("electrostatics: damping width " + str(damping) + " Å needs a real-space cutoff >= "
                         + str(damping * s) + " Å at accuracy " + str(accuracy)
                         + "; raise the cutoff or lower the damping")
    n = pos.shape[0]
    dtype = pos.dtype
    pbc = torch.tensor([True, True, True], device=pos.device)
    # real space: pairs within the cutoff (images included), shifts rebuilt from the cell (strain)
    edge_index, _, cell_shift = neighbor_list(pos.detach(), cutoff, cell.detach(), pbc)
    i, j = edge_index[0], edge_index[1]
    vec = pos.index_select(0, j) - pos.index_select(0, i) + cell_shift.to(dtype) @ cell
    r = torch.sqrt((vec * vec).sum(dim=1))
    kernel = torch.erfc(alpha * r) / r
    if damping > 0.0:
        kernel = kernel - torch.erfc(r / damping) / r
    pair = 0.5 * charges.index_select(0, i) * charges.index_select(0, j) * kernel
    e_real = torch.zeros(n, dtype=dtype, device=pos.device).index_add(0, i, pair)
    # reciprocal space
    m = _kvector_indices(cell, k_cut).to(dtype)
    volume = torch.abs(torch.linalg.det(cell))
    recip = 2.0 * math.pi * torch.linalg.inv(cell).transpose(0, 1)
    k = m @ recip                                      # [K, 3]
    k2 = (k * k).sum(dim=1)
    weight = torch.exp(-k2 / (4.0 * alpha * alpha)) / k2   # [K]
    phase = pos @ k.transpose(0, 1)                    # [N, K]
    cos, sin = torch.cos(phase), torch.sin(phase)
    c_sum = charges @ cos                              # [K]
    s_sum = charges @ sin
    e_recip = charges * ((cos * (weight * c_sum)).sum(dim=1) + (sin * (weight * s_sum)).sum(dim=1)) \
        * (4.0 * math.pi / volume)
    # self and neutralising background (q_i Q sums to Q^2)
    total = charges.sum()
    e_self = -alpha / math.sqrt(math.pi) * charges * charges
    e_bg = -math.pi * total * charges / (2.0 * volume * alpha * alpha)
    return _coulomb_constant() * (e_real + e_recip + e_self + e_bg)


def coulomb_per_atom(pos: Tensor, charges: Tensor, damping: float = 0.0) -> Tensor:
    """Per-atom Coulomb energies [N] (eV), open boundaries, all pairs: ``E_i = q_i/2 sum_j q_j K(r_ij)``
    with ``K = 1/r`` (or ``erf(r / damping) / r``)."""
    n = pos.shape[0]
    if n < 2:
        return torch.zeros(n, dtype=pos.dtype, device=pos.device)
    diff = pos.unsqueeze(0) - pos.unsqueeze(1)                     # [N, N, 3]
    eye = torch.eye(n, dtype=torch.bool, device=pos.device)
    # add 1 on the diagonal before the sqrt: finite value and gradient there (masked out below)
    r = torch.sqrt((diff * diff).sum(dim=2) + eye.to(pos.dtype))
    kernel = 1.0 / r
    if damping > 0.0:
        kernel = torch.erf(r / damping) / r
    kernel = kernel.masked_fill(eye, 0.0)
    return _coulomb_constant() * 0.5 * charges * (kernel @ charges)


def electrostatic_per_atom(pos: Tensor, charges: Tensor, cell: Tensor, accuracy: float, cutoff: float,
                           alpha: float = 0.0, damping: float = 0.0) -> Tensor:
    """Ewald (periodic cell) or plain Coulomb (all-zero cell) per-atom energies [N] (eV)."""
    if charges.shape[0] != pos.shape[0]:
        raise ValueError("electrostatics: need one charge per atom, got " + str(charges.shape[0])
                         + " charges for " + str(pos.shape[0]) + " atoms")
    if _periodicity(cell):
        return ewald_per_atom(pos, charges, cell, accuracy, cutoff, alpha, damping)
    return coulomb_per_atom(pos, charges, damping)


class Electrostatics(nn.Module):
    """Per-atom electrostatic energies of a batch: ``forward(pos [N, 3] Å, charges [N] e,
    cell [B, 3, 3] Å (zeros: open boundaries), batch [N], num_graphs) -> [N] eV``.

    Args: ``accuracy`` relative accuracy (Ewald: energy terms dropped; mesh: forces, see
    :mod:`equiforce.nn.mesh_electrostatics`), ``cutoff`` real-space cutoff (Å), ``alpha`` Ewald
    splitting parameter (1/Å; 0 = from accuracy and cutoff), ``damping`` kernel width (Å; 0 = 1/r),
    ``method`` "ewald" (k-vector sum, O(N^2)-ish) or "pme" (mesh, O(N log N)). Open
    boundaries are plain Coulomb whatever the method.
    """

    def __init__(self, accuracy: float = 1e-6, cutoff: float = 10.0, alpha: float = 0.0, damping: float = 0.0,
                 method: str = "ewald"):
        super().__init__()
        if not damping >= 0.0:
            raise ValueError("electrostatics damping width must be >= 0 Å, got " + str(damping))
        if method == "ewald":
            ewald_parameters(accuracy, cutoff, alpha)  # validates
            self.mesh: Optional[MeshEwald] = None
        elif method in MESH_METHODS:
            self.mesh = MeshEwald(method, accuracy, cutoff, damping)
        else:
            raise ValueError("electrostatics method must be 'ewald' or 'pme', got " + repr(method))
        self.method = str(method)
        self.accuracy = float(accuracy)
        self.cutoff = float(cutoff)
        self.alpha = float(alpha)
        self.damping = float(damping)

    def _one(self, pos: Tensor, charges: Tensor, cell: Tensor) -> Tensor:
        mesh = self.mesh
        if mesh is not None:
            if charges.shape[0] != pos.shape[0]:
                raise ValueError("electrostatics: need one charge per atom, got " + str(charges.shape[0])
                                 + " charges for " + str(pos.shape[0]) + " atoms")
            if _periodicity(cell):
                return mesh(pos, charges, cell)
            return coulomb_per_atom(pos, charges, self.damping)
        return electrostatic_per_atom(pos, charges, cell, self.accuracy, self.cutoff, self.alpha, self.damping)

    def forward(self, pos: Tensor, charges: Tensor, cell: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        if cell.dim() != 3 or cell.shape[0] != num_graphs:
            raise ValueError("electrostatics: cell must be [num_graphs, 3, 3], got " + str(list(cell.shape)))
        if num_graphs == 1:
            return self._one(pos, charges, cell[0])
        out = torch.zeros_like(charges)
        for b in range(num_graphs):
            idx = torch.nonzero(batch == b).reshape(-1)
            e = self._one(pos.index_select(0, idx), charges.index_select(0, idx), cell[b])
            out = out.index_add(0, idx, e)
        return out
