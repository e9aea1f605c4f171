"""Clebsch-Gordan tensor product of neighbour features with edge harmonics, weighted per edge.

For each edge, a feature block ``x`` (``mul`` copies of irrep ``l1``) is combined with the edge
harmonic ``Y_l2`` into every allowed output irrep ``l3``::

    out[u, k] = w[u] * sqrt(2 l3 + 1) * sum_ij C[i, j, k] x[u, i] Y[j]

(``C`` the unit-norm real Clebsch-Gordan tensor of :mod:`equiforce.clebsch_gordan`, the
``sqrt(2l3+1)`` keeping component-normalised inputs component-normalised). Channels are not mixed
("uvu" / depthwise); ``w`` [E, mul] per path comes from the radial MLP, so it depends only on the
interatomic distance and the product stays equivariant.

Allowed paths: ``|l1 - l2| <= l3 <= l1 + l2`` and, in O(3) mode, ``p3 = p1 * p2``; in SE(3) mode every
irrep is marked even, so parity never forbids a path (pseudoscalars such as triple products appear
among the "scalars" and mirror images can differ).

Layout. :meth:`EdgeTensorProduct.forward` takes and returns the usual mul-major layout (block of
``mul`` irreps stored ``[mul, 2l+1]``). The message-passing layer calls
:meth:`EdgeTensorProduct.forward_blocks`, which works on one tensor per block in component-major
layout ``[E, 2l+1, mul]``: every elementwise operation then runs along ``mul`` contiguous channels
(fast, vectorised) instead of along the 1-3 components of an irrep, and no concatenation of the
per-path outputs is needed. Paths sharing ``(l1 block, l2)`` form a group; per group:

* ``l1 = 0``: an outer product ``(x w)[u] * M[k]`` with ``M = Y @ C`` [E, d3];
* ``l2 = 0`` (``C`` is the identity, ``l3 = l1``): ``x[k, u] * (Y_0 w)[u]``;
* otherwise one batched matmul ``M^T x`` with ``M[e] = sum_j Y[e, j] C[:, j, :]`` [E, d1, d3] for
  all the group's ``l3`` at once, then the weight of each path.
"""
import math
from typing import List, Set, Tuple

import torch
from torch import Tensor, nn

from .clebsch_gordan import clebsch_gordan
from .irreps import Irrep, Irreps

# group kinds (see the module docstring); literals in forward_blocks, which TorchScript compiles
_OUTER = 0      # l1 = 0
_DIAGONAL = 1   # l2 = 0, C[:, 0, :] a multiple of the identity
_GENERAL = 2


class EdgeTensorProduct(nn.Module):
    """``x`` [E, irreps_in.dim], ``sh`` [E, irreps_sh.dim], ``weight`` [E, weight_numel] -> [E, irreps_out.dim].

    ``irreps_out`` (one block of ``mul`` per path, in path order) and ``weight_numel`` (sum of the
    path multiplicities; weights laid out path after path) are attributes.
    """

    groups: List[List[int]]
    group_d3: List[List[int]]
    group_kind: List[int]
    group_diag: List[float]
    in_sizes: List[int]
    in_muls: List[int]
    in_dims: List[int]
    sh_sizes: List[int]
    path_muls: List[int]

    def __init__(self, irreps_in: Irreps, irreps_sh: Irreps, allowed_out: Set[Irrep]):
        super().__init__()
        self.irreps_in = Irreps(irreps_in)
        self.irreps_sh = Irreps(irreps_sh)
        groups: List[List[int]] = []
        cg_chunks: List[torch.Tensor] = []
        rep_chunks: List[torch.Tensor] = []
        out_blocks: List[Tuple[int, Tuple[int, int]]] = []
        group_d3: List[List[int]] = []  # output dimension of each path of each group
        group_kind: List[int] = []
        group_diag: List[float] = []    # _DIAGONAL groups: C[:, 0, :] = group_diag * identity
        cg_off, rep_off, w_off = 0, 0, 0
        for i1, (mul, ir1) in enumerate(self.irreps_in):
            for i2, (mul2, ir2) in enumerate(self.irreps_sh):
                if mul2 != 1:
                    raise ValueError("edge harmonics must have multiplicity 1")
                outs = [ir3 for ir3 in ir1 * ir2 if ir3 in allowed_out]
                if not outs or mul == 0:
                    continue
                d1, d2 = ir1.dim, ir2.dim
                d3_total = sum(ir3.dim for ir3 in outs)
                # C_cat [d2, d1, d3_total], flattened to [d2, d1 * d3_total]
                c = torch.cat([
                    torch.from_numpy(clebsch_gordan(ir1.l, ir2.l, ir3.l)).permute(1, 0, 2) * math.sqrt(ir3.dim)
                    for ir3 in outs], dim=2)
                cg_chunks.append(c.reshape(-1))
                # which path each output column belongs to (local index inside the group)
                rep = torch.cat([torch.full((ir3.dim,), k, dtype=torch.long) for k, ir3 in enumerate(outs)])
                rep_chunks.append(rep)
                groups.append([i1, mul, d1, i2, d2, cg_off, d3_total, rep_off, len(outs)])
                group_d3.append([ir3.dim for ir3 in outs])
                kind, diag = _GENERAL, 0.0
                if d1 == 1:
                    kind = _OUTER
                elif d2 == 1 and len(outs) == 1 and d3_total == d1:
                    diag = float(c[0, 0, 0])
                    if float((c[0] - diag * torch.eye(d1, dtype=c.dtype)).abs().max()) < 1e-12:
                        kind = _DIAGONAL
                group_kind.append(kind)
                group_diag.append(diag)
                for ir3 in outs:
                    out_blocks.append((mul, (ir3.l, ir3.p)))
                cg_off += c.numel()
                rep_off += d3_total
                w_off += mul * len(outs)
        if not groups:
            raise ValueError(f"no allowed tensor-product path from {self.irreps_in} x {self.irreps_sh}")
        self.groups: List[List[int]] = groups
        self.group_d3: List[List[int]] = group_d3
        self.group_kind: List[int] = group_kind
        self.group_diag: List[float] = group_diag
        self.in_sizes: List[int] = [m.dim for m in self.irreps_in]
        self.in_muls: List[int] = [m.mul for m in self.irreps_in]
        self.in_dims: List[int] = [m.ir.dim for m in self.irreps_in]
        self.sh_sizes: List[int] = [m.dim for m in self.irreps_sh]
        self.path_muls: List[int] = [mul for mul, _ in out_blocks]
        # kept in float64 whatever the default dtype; model.to(dtype) casts it once. `rep` (which
        # path each output column of a group belongs to) is no longer used by the forward pass but
        # stays a buffer so state dicts keep their layout.
        self.register_buffer("cg", torch.cat(cg_chunks))
        self.register_buffer("rep", torch.cat(rep_chunks))
        self.irreps_out = Irreps(out_blocks)
        self.weight_numel = w_off

    def forward(self, x: Tensor, sh: Tensor, weight: Tensor) -> Tensor:
        """Mul-major in and out: ``x`` [E, irreps_in.dim] -> [E, irreps_out.dim]."""
        e = x.shape[0]
        xs = [blk.view(e, mul, d).transpose(1, 2)
              for blk, mul, d in zip(torch.split(x, self.in_sizes, dim=1), self.in_muls, self.in_dims)]
        outs = self.forward_blocks(xs, sh, weight)
        return torch.cat([o.transpose(1, 2).reshape(e, o.shape[1] * o.shape[2]) for o in outs], dim=1)

    def forward_blocks(self, xs: List[Tensor], sh: Tensor, weight: Tensor) -> List[Tensor]:
        """Component-major blocks: ``xs[b]`` [E, 2l+1, mul] per block of ``irreps_in``, ``sh``
        [E, irreps_sh.dim], ``weight`` [E, weight_numel] -> one [E, 2l3+1, mul] per path (the blocks
        of ``irreps_out``)."""
        e = sh.shape[0]
        cg = self.cg.to(sh.dtype)
        shs = torch.split(sh, self.sh_sizes, dim=1)
        ws = torch.split(weight, self.path_muls, dim=1)                    # [E, mul] per path
        outs: List[Tensor] = []
        p = 0
        for k, grp in enumerate(self.groups):
            i1, d1, i2, d2, cg_off, d3 = grp[0], grp[2], grp[3], grp[4], grp[5], grp[6]
            kind = self.group_kind[k]
            x = xs[i1]                                                     # [E, d1, mul]
            if kind == 1:  # _DIAGONAL
                # C[:, 0, :] = diag * I: out[k, u] = x[k, u] * (diag Y_0 w[u])
                s = ws[p] * (shs[i2] * self.group_diag[k])                  # [E, mul]
                outs.append(x * s.unsqueeze(1))
                p += 1
                continue
            c = cg[cg_off:cg_off + d2 * d1 * d3].view(d2, d1 * d3)
            # M = Y @ C [E, d1 * d3]; a broadcast product when Y is a single column (l2 = 0)
            m = shs[i2] * c if d2 == 1 else shs[i2] @ c
            if kind == 0:  # _OUTER
                # d1 = 1: out[k, u] = M[k] * (x w)[u]
                off = 0
                for d in self.group_d3[k]:
                    xw = x * ws[p].unsqueeze(1)                              # [E, 1, mul]
                    outs.append(m[:, off:off + d].unsqueeze(2) * xw)
                    off += d
                    p += 1
            else:
                y = torch.bmm(m.view(e, d1, d3).transpose(1, 2), x)           # [E, d3, mul]
                off = 0
                for d in self.group_d3[k]:
                    outs.append(y[:, off:off + d, :] * ws[p].unsqueeze(1))
                    off += d
                    p += 1
        return outs
