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

Paths sharing ``(l1 block, l2)`` are evaluated together: one matmul builds
``M[e] = sum_j Y[e, j] C[:, j, :]`` for all their ``l3`` at once, one batched matmul applies it.
"""
import math
from typing import List, Set, Tuple

import torch
from torch import Tensor, nn

from .clebsch_gordan import clebsch_gordan
from .irreps import Irrep, Irreps


class EdgeTensorProduct(nn.Module):
    """``x`` [E, irreps_in.dim], ``sh`` [E, irreps_sh.dim], ``weight`` [E, weight_numel] -> [E, irreps_out.dim].

    ``irreps_out`` (one block of ``mul`` per path, in path order) and ``weight_numel`` (sum of the
    path multiplicities; weights laid out path after path) are attributes.
    """

    groups: List[List[int]]
    group_d3: List[List[int]]
    in_sizes: List[int]
    sh_sizes: List[int]
    group_w_sizes: List[int]

    def __init__(self, irreps_in: Irreps, irreps_sh: Irreps, allowed_out: Set[Irrep]):
        super().__init__()
        self.irreps_in = Irreps(irreps_in)
        self.irreps_sh = Irreps(irreps_sh)
        groups: List[List[int]] = []
        cg_chunks: List[torch.Tensor] = []
        rep_chunks: List[torch.Tensor] = []
        out_blocks: List[Tuple[int, Tuple[int, int]]] = []
        group_d3: List[List[int]] = []  # output dimension of each path of each group
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
                for ir3 in outs:
                    out_blocks.append((mul, (ir3.l, ir3.p)))
                cg_off += c.numel()
                rep_off += d3_total
                w_off += mul * len(outs)
        if not groups:
            raise ValueError(f"no allowed tensor-product path from {self.irreps_in} x {self.irreps_sh}")
        self.groups: List[List[int]] = groups
        self.group_d3: List[List[int]] = group_d3
        self.in_sizes: List[int] = [m.dim for m in self.irreps_in]
        self.sh_sizes: List[int] = [m.dim for m in self.irreps_sh]
        self.group_w_sizes: List[int] = [g[1] * g[8] for g in groups]
        # kept in float64 whatever the default dtype; model.to(dtype) casts it once
        self.register_buffer("cg", torch.cat(cg_chunks))
        self.register_buffer("rep", torch.cat(rep_chunks))
        self.irreps_out = Irreps(out_blocks)
        self.weight_numel = w_off

    def forward(self, x: Tensor, sh: Tensor, weight: Tensor) -> Tensor:
        # split once (one concatenating backward) rather than slicing per path
        e = x.shape[0]
        cg = self.cg.to(x.dtype)
        xs = torch.split(x, self.in_sizes, dim=1)
        shs = torch.split(sh, self.sh_sizes, dim=1)
        ws = torch.split(weight, self.group_w_sizes, dim=1)
        parts: List[Tensor] = []
        for k, grp in enumerate(self.groups):
            i1, mul, d1, i2, d2, cg_off, d3, rep_off, n_paths = (
                grp[0], grp[1], grp[2], grp[3], grp[4], grp[5], grp[6], grp[7], grp[8])
            c = cg[cg_off:cg_off + d2 * d1 * d3].view(d2, d1 * d3)
            m = (shs[i2] @ c).view(e, d1, d3)                                  # [E, d1, d3]
            xb = xs[i1].view(e, mul, d1)                                       # [E, mul, d1]
            if d1 == 1:
                y = xb * m                                                     # [E, mul, d3]
            else:
                y = torch.bmm(xb, m)                                           # [E, mul, d3]
            w = ws[k].view(e, n_paths, mul).transpose(1, 2)                    # [E, mul, n_paths]
            if n_paths == 1:
                y = y * w
            else:
                y = y * w.index_select(2, self.rep[rep_off:rep_off + d3])
            for yp in torch.split(y, self.group_d3[k], dim=2):
                parts.append(yp.reshape(e, yp.shape[1] * yp.shape[2]))
        return torch.cat(parts, dim=1)
