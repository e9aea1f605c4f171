"""Periodic electrostatics with the reciprocal part on a mesh (PME, O(N log N)) via torch-pme.

Units as in :mod:`equiforce.nn.electrostatics`: charges in e, lengths in Å, energies in eV.

The Coulomb sum of a periodic cell is split with a Gaussian of width ``sigma`` (Å; torch-pme's
``smearing``, ``sigma = 1 / (sqrt(2) alpha)`` with the Ewald ``alpha`` of
:mod:`equiforce.nn.electrostatics`)::

    E = K_E [ 1/2 sum'_{i,j,n} q_i q_j erfc(r_ijn / (sqrt(2) sigma)) / r_ijn     real space, r < r_c
            + reciprocal part on a mesh (charges spread onto the mesh, FFT, Green's function, back)
            - self term - neutralising background ]

The real-space pairs are ours (:func:`equiforce.data.neighbors.neighbor_list` at ``r_c``, images by
shifts rebuilt from the cell, so the strain derivative is exact); the mesh part, self term and
background are torch-pme's (``PMECalculator``: charges spread onto the mesh with Lagrange
interpolation, FFT, Green's function of the smeared Coulomb kernel, back to the atoms).
Everything is differentiable with respect to positions, charges and the cell, so forces include the
charge-response term and the virial comes from the same autograd pass.

Parameters from a requested relative force accuracy ``eps`` (:func:`mesh_parameters`; closed form,
deterministic, recorded in the exported metadata). Relative means: the RMS force error divided by
the Coulomb force scale ``K_E q_rms^2 / d^2`` of the system, ``d = (V / N)^(1/3)``::

    sigma = r_c / sqrt(2 ln(4 / eps))       real-space error ~ 2 sqrt(d / r_c) exp(-r_c^2 / 2 sigma^2)
                                            (Kolafa-Perram for uncorrelated charges, measured within
                                            45 %; up to 2x more for the alternating charges of a
                                            learned ionic model) <= 0.3 eps
    a     = sigma (eps / (2 C))^(1 / (p - 1))   mesh spacing for a mesh force error <= eps / 2

``p = 6`` interpolation nodes (Lagrange, torch-pme's PME). The mesh force error was measured against
a tight Ewald sum (rattled rock salt, a random ionic system in a triclinic cell; sigma 1.1-1.8 Å,
16-64 mesh points per side) as ``C (a / sigma)^(p - 1)`` with ``C`` <= 0.17 (p = 6; 0.26 for p = 4:
forces of Lagrange PME converge one order below its energy). :data:`MESH_ERROR_CONSTANT` takes twice
that. torch-pme's own error bound (``PMEErrorBounds``) underestimates this force error 10-100x, so it
is not used. The mesh has, along lattice vector ``a_i``, the smallest FFT-friendly number of points
``2^u 3^v 5^w >= |a_i| / a`` (:func:`mesh_points`; torch-pme's own rule, the power of two at or above
``2 |a_i| / h + 1``, would give up to 8x more points in 3D). It is derived from the cell at every
call, so a box that changes (NPT) keeps the accuracy. The mesh changes in steps when the box
crosses a mesh size (force jumps of relative size ~eps, like a pair crossing the real-space cutoff).

Checked on random ionic systems of 100 atoms (tests/ and a sweep): number densities 0.03-0.2 Å^-3
with r_c = 5 or 10 Å and 0.01 Å^-3 with r_c >= 8 Å give 0.17-0.78 of the requested accuracy
(1e-4 and 1e-5); a dilute system (0.01 Å^-3, d = 4.6 Å) with r_c = 5 Å gives 1.13x: keep r_c >= 2 d.

Why not P3M: torch-pme 0.5.0's ``P3MCalculator`` is excellent in orthorhombic cells (2e-5 at 32
mesh points per side where this PME needs 64) but in a triclinic cell its force error falls only as
``a^2`` (5.9e-3, 1.5e-3, 3.7e-4 at 32, 64, 128 points per side; measured on the random ionic system
against Ewald), so ``long_range`` offers ``pme`` only.
"""
import math
from typing import List, Optional, Tuple

import torch
import torchpme
from torch import Tensor, nn

from ..data.neighbors import neighbor_list

#: methods computed on a mesh
MESH_METHODS = ("pme",)
#: interpolation nodes (points per axis a charge is spread onto; Lagrange polynomials of degree p - 1)
INTERPOLATION_NODES = 6
#: C in the mesh force error C (a / sigma)^(p - 1) (twice the largest value measured; module docstring)
MESH_ERROR_CONSTANT = 0.35


def _coulomb_constant() -> float:
    """Coulomb constant in eV·Å/e² (:data:`equiforce.units.COULOMB_CONSTANT`)."""
    return 14.399645


def mesh_parameters(method: str, accuracy: float, cutoff: float) -> Tuple[float, float, int]:
    """``(smearing sigma Å, largest mesh spacing a Å, interpolation_nodes)`` for ``method`` ("pme"),
    relative force ``accuracy`` and real-space ``cutoff`` (Å); see the module docstring."""
    if method not in MESH_METHODS:
        raise ValueError("mesh electrostatics: method must be one of " + str(MESH_METHODS) + ", got " + repr(method))
    if not (0.0 < accuracy < 1.0):
        raise ValueError("mesh electrostatics: accuracy must be a relative force accuracy in (0, 1) (e.g. 1e-4), got "
                         + str(accuracy))
    if not cutoff > 0.0:
        raise ValueError("mesh electrostatics: the real-space cutoff must be > 0 Å (e.g. 10.0), got " + str(cutoff))
    nodes = INTERPOLATION_NODES
    sigma = cutoff / math.sqrt(2.0 * math.log(4.0 / accuracy))
    spacing = sigma * (accuracy / (2.0 * MESH_ERROR_CONSTANT)) ** (1.0 / (nodes - 1))
    return sigma, spacing, nodes


def _fft_friendly(n: int) -> bool:
    """True when ``n`` has no prime factor other than 2, 3 and 5."""
    for p in [2, 3, 5]:
        while n % p == 0:
            n = n // p
    return n == 1


def mesh_points(cell: Tensor, spacing: float, minimum: int) -> Tensor:
    """Mesh points [3] (int64) along each lattice vector (rows of ``cell``, Å): the smallest
    ``2^u 3^v 5^w`` that is ``>= |a_i| / spacing`` and ``>= minimum``."""
    norms = torch.linalg.norm(cell.detach(), dim=1)
    points: List[int] = []
    for k in range(3):
        n = max(int(math.ceil(float(norms[k]) / spacing - 1e-9)), minimum)
        while not _fft_friendly(n):
            n += 1
        points.append(n)
    return torch.tensor(points, dtype=torch.long, device=cell.device)


class _PMECalculator(torchpme.PMECalculator):
    """torch-pme's PME with :func:`mesh_points` for the mesh size (its ``mesh_spacing`` is the
    largest spacing ``a``); fully periodic cells only. The reciprocal part is torch-pme's: charges
    to the mesh, the k-space filter (smeared Coulomb Green's function), back to the atoms, then its
    self term and neutralising background."""

    def _compute_kspace(self, charges: Tensor, cell: Tensor, positions: Tensor, periodic: Optional[Tensor] = None,
                        node_mask: Optional[Tensor] = None, kvectors: Optional[Tensor] = None) -> Tensor:
        ns = mesh_points(cell, self.mesh_spacing, self.interpolation_nodes)
        self.mesh_interpolator.update(cell, ns)
        self.kspace_filter.update(cell, ns)
        self.mesh_interpolator.compute_weights(positions)
        mesh = self.kspace_filter.forward(self.mesh_interpolator.points_to_mesh(particle_weights=charges))
        inverse_volume = 1.0 / torch.abs(torch.linalg.det(cell))
        phi = self.mesh_interpolator.mesh_to_points(mesh) * inverse_volume
        phi = phi - charges * self.potential.self_contribution()
        phi = phi - 2.0 * self.potential.background_correction() * charges.sum(dim=0) * inverse_volume
        return 0.5 * phi  # torch-pme's convention: E = sum_i q_i phi_i


class MeshEwald(nn.Module):
    """Per-atom electrostatic energies [N] (eV) of point charges in a periodic cell, reciprocal part
    on a mesh: ``forward(pos [N, 3] Å, charges [N] e, cell [3, 3] Å rows) -> [N] eV``, summing to
    the energy of the module docstring; ``E_i = K_E q_i phi_i / 2`` with ``phi_i`` the potential of
    all other charges, images and the background at atom ``i``.

    Args: ``method`` "pme", ``accuracy`` relative force accuracy, ``cutoff`` real-space
    cutoff (Å), ``damping`` kernel width (Å; 0 = 1/r; else ``erf(r / damping) / r``, corrected in
    real space as in :func:`equiforce.nn.electrostatics.ewald_per_atom`).
    """

    def __init__(self, method: str, accuracy: float = 1e-4, cutoff: float = 10.0, damping: float = 0.0):
        super().__init__()
        sigma, h, nodes = mesh_parameters(method, accuracy, cutoff)
        if damping > 0.0 and math.erfc(cutoff / damping) >= accuracy:
            raise ValueError("mesh electrostatics: damping width " + str(damping)
                             + " Å needs erfc(cutoff / damping) < " + str(accuracy)
                             + "; raise the cutoff or lower the damping")
        self.method = method
        self.accuracy = float(accuracy)
        self.cutoff = float(cutoff)
        self.damping = float(damping)
        self.smearing = float(sigma)
        self.mesh_spacing = float(h)
        self.interpolation_nodes = int(nodes)
        potential = torchpme.CoulombPotential(smearing=sigma)
        self.calculator = _PMECalculator(potential, mesh_spacing=h, interpolation_nodes=nodes, full_neighbor_list=True)

    def forward(self, pos: Tensor, charges: Tensor, cell: Tensor) -> Tensor:
        n = pos.shape[0]
        dtype = pos.dtype
        pbc = torch.tensor([True, True, True], device=pos.device)
        edge_index, _, cell_shift = neighbor_list(pos.detach(), self.cutoff, cell.detach(), pbc)
        i, j = edge_index[0], edge_index[1]
        vec = pos.index_select(0, j) - pos.index_select(0, i) + cell_shift.to(dtype) @ cell
        r = torch.sqrt((vec * vec).sum(dim=1))
        potential = self.calculator(charges.unsqueeze(1), cell, pos, edge_index.transpose(0, 1), r)[:, 0]
        energy = charges * potential
        if self.damping > 0.0:
            pair = 0.5 * charges.index_select(0, i) * charges.index_select(0, j) * torch.erfc(r / self.damping) / r
            energy = energy - torch.zeros(n, dtype=dtype, device=pos.device).index_add(0, i, pair)
        if not torch.jit.is_scripting():
            _release_mesh_state(self.calculator)
        return _coulomb_constant() * energy


def _release_mesh_state(calculator: nn.Module) -> None:
    """torch-pme keeps the last cell's mesh and weights as module attributes; in eager mode they
    are replaced by detached copies after each call (the autograd graph keeps its own references),
    so the model can be deep-copied (checkpoints, export) after a forward pass."""
    for module in calculator.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, Tensor) and value.requires_grad and not isinstance(value, nn.Parameter):
                setattr(module, name, value.detach())
