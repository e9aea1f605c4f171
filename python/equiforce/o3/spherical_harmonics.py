"""Real spherical harmonics of any order, as homogeneous polynomials (TorchScript-able).

Convention (matches e3nn 0.5+ exactly, tested): the standard real harmonics without the
Condon-Shortley phase, components ordered m = -l..l, evaluated with the polar axis along **y**:
``Y_l(x, y, z) = Y_l^std(X=z, Y=x, Z=y)``. In this basis the l=1 harmonics are ``sqrt(3)*(x, y, z)``,
so l=1 features are ordinary Cartesian vectors.

Normalisation "component": for a unit vector ``sum_m Y_lm^2 = 2l+1`` (each component has unit
mean square over the sphere); Y_0 = 1.

Inputs are normalised with a safe division: a zero vector gives Y_0 = 1 and Y_l = 0 for l > 0,
never NaN, and its gradient is finite.
"""
import math
from typing import List

import torch
from torch import Tensor, nn


def safe_norm(vec: Tensor) -> Tensor:
    """|vec| along the last axis [..., 3] -> [...]; gradient 0 (not NaN) at the zero vector."""
    r2 = (vec * vec).sum(-1)
    nonzero = r2 > 0
    return torch.where(nonzero, torch.sqrt(torch.where(nonzero, r2, torch.ones_like(r2))), torch.zeros_like(r2))


def safe_normalize(vec: Tensor, norm: Tensor) -> Tensor:
    """``vec / norm`` with 0 (not NaN) where ``norm == 0``."""
    nonzero = norm > 0
    return vec / torch.where(nonzero, norm, torch.ones_like(norm)).unsqueeze(-1)


def _legendre_factor(l: int, m: int) -> float:
    """Component-normalisation factor of the (l, m) real harmonic."""
    f = math.sqrt((2 * l + 1) * math.factorial(l - m) / math.factorial(l + m))
    return f * math.sqrt(2.0) if m > 0 else f


def spherical_harmonics(lmax: int, unit: Tensor) -> Tensor:
    """Y_0..Y_lmax of ``unit`` [E, 3] (already normalised) -> [E, (lmax+1)^2], blocks l = 0..lmax."""
    # standard polar-z frame (see module docstring)
    X = unit[:, 2]
    Y = unit[:, 0]
    Z = unit[:, 1]
    r2 = X * X + Y * Y + Z * Z
    one = torch.ones_like(X)
    # sectoral parts: C_m + i S_m = (X + i Y)^m
    cos_m: List[Tensor] = [one]
    sin_m: List[Tensor] = [torch.zeros_like(X)]
    for m in range(1, lmax + 1):
        c, s = cos_m[m - 1], sin_m[m - 1]
        cos_m.append(X * c - Y * s)
        sin_m.append(X * s + Y * c)
    # Q[l][m]: associated Legendre polynomial with the sin^m factor removed, homogeneous in (X, Y, Z)
    q: List[List[Tensor]] = []
    for l in range(lmax + 1):
        row: List[Tensor] = []
        for m in range(l + 1):
            if m == l:
                row.append(one * float(_double_factorial(2 * m - 1)))
            elif m == l - 1:
                row.append(float(2 * m + 1) * Z * q[l - 1][m])
            else:
                row.append((float(2 * l - 1) * Z * q[l - 1][m] - float(l + m - 1) * r2 * q[l - 2][m]) / float(l - m))
        q.append(row)
    out: List[Tensor] = []
    for l in range(lmax + 1):
        for m in range(-l, l + 1):
            am = abs(m)
            ang = sin_m[am] if m < 0 else cos_m[am]
            out.append(_legendre_factor(l, am) * q[l][am] * ang)
    return torch.stack(out, dim=-1)


def _double_factorial(n: int) -> int:
    out = 1
    while n > 1:
        out *= n
        n -= 2
    return out


class SphericalHarmonics(nn.Module):
    """Edge vectors [E, 3] (any length) -> Y_0..Y_lmax of their directions [E, (lmax+1)^2]."""

    def __init__(self, lmax: int):
        super().__init__()
        if lmax < 0:
            raise ValueError(f"lmax must be >= 0, got {lmax}")
        self.lmax = int(lmax)

    def forward(self, vec: Tensor) -> Tensor:
        unit = safe_normalize(vec, safe_norm(vec))
        return spherical_harmonics(self.lmax, unit)
