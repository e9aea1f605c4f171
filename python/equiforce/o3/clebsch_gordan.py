"""Wigner D matrices and real Clebsch-Gordan coefficients in the basis of
:mod:`equiforce.o3.spherical_harmonics`.

Both are derived from the harmonics themselves, so they are consistent with them by construction:

* ``wigner_D(l, R)``: the matrix with ``Y_l(R u) = D_l(R) Y_l(u)`` for every unit vector ``u``,
  found by least squares over a fixed set of well-spread directions (exact to rounding).
* ``clebsch_gordan(l1, l2, l3)``: the real tensor ``C[i, j, k]`` [2l1+1, 2l2+1, 2l3+1] invariant under
  ``D_l1 (x) D_l2 (x) D_l3`` for all rotations, i.e. the null vector of ``D1(x)D2(x)D3 - 1`` for two
  generic rotations (which generate SO(3)). Normalised to unit Frobenius norm (as e3nn's
  ``wigner_3j``); the overall sign, which a null space leaves free, is fixed so that the
  largest-magnitude entry (first in flattened order among ties) is positive. e3nn fixes it
  otherwise, so the tensors agree with ``e3nn.o3.wigner_3j`` up to that one sign per (l1, l2, l3) —
  a convention that the learnable path weights absorb.

Computed in float64 with numpy once per (l1, l2, l3) and cached.
"""
import functools

import numpy as np
import torch

from .spherical_harmonics import spherical_harmonics
from .rotations import random_rotations


def _sample_directions(n: int) -> np.ndarray:
    """Fibonacci-sphere directions [n, 3]: well-conditioned for the least-squares fit."""
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = np.pi * (1.0 + 5.0 ** 0.5) * i
    s = np.sqrt(1.0 - z * z)
    return np.stack([s * np.cos(phi), s * np.sin(phi), z], axis=1)


def _sh_np(l: int, u: np.ndarray) -> np.ndarray:
    y = spherical_harmonics(l, torch.from_numpy(u).to(torch.float64)).numpy()
    return y[:, l * l:(l + 1) ** 2]


def wigner_D(l: int, R: np.ndarray) -> np.ndarray:
    """Real Wigner D [2l+1, 2l+1] of rotation matrix ``R`` [3, 3] in our harmonic basis.

    For an improper ``R`` (det -1) the result is ``D_l(proper part) * (-1)^l``, i.e. how the
    harmonics transform; the irrep parity factor of a feature is applied by the caller.
    """
    u = _sample_directions(4 * (2 * l + 1) + 8)
    a = _sh_np(l, u)                  # [n, 2l+1]
    b = _sh_np(l, u @ np.asarray(R, dtype=np.float64).T)  # Y(R u)
    # b = a D^T  ->  D^T = lstsq(a, b)
    dt, *_ = np.linalg.lstsq(a, b, rcond=None)
    return dt.T


def _fixed_rotations() -> list:
    """Two fixed rotations (seeded; the same matrices on every machine) for the CG null-space solve."""
    return list(random_rotations(2, np.random.default_rng(12345)))


@functools.lru_cache(maxsize=None)
def clebsch_gordan(l1: int, l2: int, l3: int) -> np.ndarray:
    """Real CG tensor [2l1+1, 2l2+1, 2l3+1] (float64, unit Frobenius norm); zeros if not a triangle."""
    if l3 < abs(l1 - l2) or l3 > l1 + l2:
        return np.zeros((2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1))
    blocks = []
    for R in _fixed_rotations():
        d = np.kron(np.kron(wigner_D(l1, R), wigner_D(l2, R)), wigner_D(l3, R))
        blocks.append(d - np.eye(d.shape[0]))
    _, s, vt = np.linalg.svd(np.concatenate(blocks, axis=0))
    null = vt[-1]
    if s[-1] > 1e-8 or (len(s) > 1 and s[-2] < 1e-6):
        raise RuntimeError(f"CG null space for ({l1},{l2},{l3}) is not one-dimensional: {s[-2:]}")
    null[np.abs(null) < 1e-14] = 0.0
    k = int(np.argmax(np.abs(null) > np.abs(null).max() - 1e-9))
    c = null / np.linalg.norm(null) * np.sign(null[k])
    return c.reshape(2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1)
