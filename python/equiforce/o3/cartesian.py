"""Symmetric rank-2 Cartesian tensors <-> the irreps ``0e + 2e`` (polarizabilities, and any other
symmetric 3x3 tensor that is true under inversion).

A symmetric 3x3 tensor ``A`` splits into its isotropic part and a symmetric traceless part::

    A = a0 * I + sum_m c_m B_m        a0 = tr(A) / 3,   c_m = <B_m, A> (Frobenius)

``B_m`` [5, 3, 3] (m = -2..2) is the basis of symmetric traceless matrices that matches the l=2
real harmonics of :mod:`equiforce.o3.spherical_harmonics`: ``B_m`` is the matrix of the quadratic
form ``Y_2m(v) = v^T B_m v`` (a homogeneous quadratic polynomial), normalised to unit Frobenius
norm. It is derived from the project's own harmonics (polarisation identity on the basis vectors),
so it inherits their convention. Why it is equivariant: ``Y_2(R v) = D_2(R) Y_2(v)`` for all ``v``
gives ``R^T B_m R = sum_k D_mk B_k``, and with ``D_2`` orthogonal this is
``sum_m D_mk B_m = R B_k R^T``, hence::

    T(D_2(R) c) = R T(c) R^T,        T(c) = sum_m c_m B_m

for every rotation ``R`` (tested to 1e-12 against the project's Wigner D and against e3nn's).
``a0 * I`` is invariant. Under inversion both parts are unchanged: ``0e + 2e`` is a true (not
pseudo) tensor, as a polarizability must be.
"""
import functools

import numpy as np
import torch
from torch import Tensor

from .spherical_harmonics import spherical_harmonics


def _y2_quadratic(v: np.ndarray) -> np.ndarray:
    """The 5 l=2 harmonics of NON-normalised vectors ``v`` [n, 3]: homogeneous quadratics [n, 5]."""
    y = spherical_harmonics(2, torch.from_numpy(np.asarray(v, dtype=np.float64)))
    return y[:, 4:9].numpy()


@functools.lru_cache(maxsize=None)
def _basis_np() -> np.ndarray:
    eye = np.eye(3)
    q_single = _y2_quadratic(eye)                                      # Q(e_i)       [3, 5]
    b = np.zeros((5, 3, 3))
    for i in range(3):
        b[:, i, i] = q_single[i]
        for j in range(i + 1, 3):
            q_pair = _y2_quadratic((eye[i] + eye[j])[None])[0]         # Q(e_i + e_j) [5]
            b[:, i, j] = b[:, j, i] = 0.5 * (q_pair - q_single[i] - q_single[j])
    norms = np.sqrt((b * b).sum(axis=(1, 2)))
    return b / norms[:, None, None]


def l2_basis(dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """``B_m`` [5, 3, 3]: orthonormal symmetric traceless matrices matching the l=2 harmonics."""
    return torch.tensor(_basis_np(), dtype=dtype, device=device)


def symmetric_from_irreps(a0: Tensor, c: Tensor, basis: Tensor) -> Tensor:
    """``a0 * I + sum_m c_m B_m``: isotropic part ``a0`` [...] and l=2 components ``c`` [..., 5]
    -> symmetric tensors [..., 3, 3]; ``basis`` from :func:`l2_basis` (TorchScript-able)."""
    eye = torch.eye(3, dtype=c.dtype, device=c.device)
    return a0.unsqueeze(-1).unsqueeze(-1) * eye + torch.einsum("...m,mij->...ij", c, basis.to(c.dtype))


def irreps_from_symmetric(a: Tensor, basis: Tensor):
    """Inverse of :func:`symmetric_from_irreps` for symmetric ``a`` [..., 3, 3]:
    ``(tr(a) / 3 [...], c [..., 5])``."""
    sym = 0.5 * (a + a.transpose(-1, -2))
    a0 = torch.diagonal(sym, dim1=-2, dim2=-1).sum(-1) / 3.0
    c = torch.einsum("...ij,mij->...m", sym, basis.to(a.dtype))
    return a0, c
