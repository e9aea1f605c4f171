"""Gated non-linearity: scalars go through a point-wise activation; every higher-order block is
multiplied channel by channel by a (sigmoid) function of an extra even scalar, so vectors stay
vectors (a norm-preserving direction, a learned invariant magnitude).

Input irreps: ``scalars + gates + gated``; output irreps: ``scalars + gated``.
In O(3) mode even scalars use SiLU and odd scalars (pseudoscalars) tanh, the only odd choice;
gates must be even scalars so the gated blocks keep their parity.
"""
from typing import List

import torch
from torch import Tensor, nn

from .activations import NormalizedSigmoid, NormalizedSiLU, NormalizedTanh
from ..o3.irreps import Irreps


class Gate(nn.Module):
    split_sizes: List[int]
    scalar_odd: List[int]
    gated_blocks: List[List[int]]

    def __init__(self, irreps_scalars: Irreps, irreps_gated: Irreps):
        super().__init__()
        self.irreps_scalars = Irreps(irreps_scalars)
        self.irreps_gated = Irreps(irreps_gated)
        for m in self.irreps_scalars:
            if m.ir.l != 0:
                raise ValueError(f"Gate scalars must be l=0, got {m}")
        for m in self.irreps_gated:
            if m.ir.l == 0:
                raise ValueError(f"Gate gated blocks must have l>0, got {m}")
        self.irreps_gates = Irreps([(self.irreps_gated.num_irreps, (0, 1))]) if len(self.irreps_gated) else Irreps()
        self.irreps_in = Irreps(list(self.irreps_scalars) + list(self.irreps_gates) + list(self.irreps_gated))
        self.irreps_out = Irreps(list(self.irreps_scalars) + list(self.irreps_gated))
        # one split of the input: scalar blocks, the gates, gated blocks
        self.split_sizes: List[int] = [m.dim for m in self.irreps_scalars] + \
            ([self.irreps_gates.dim] if len(self.irreps_gated) else []) + [m.dim for m in self.irreps_gated]
        self.scalar_odd: List[int] = [1 if m.ir.p == -1 else 0 for m in self.irreps_scalars]
        # gated blocks: [mul, d, first gate]
        self.gated_blocks: List[List[int]] = []
        g = 0
        for m in self.irreps_gated:
            self.gated_blocks.append([m.mul, m.ir.dim, g])
            g += m.mul
        self.dim_in = self.irreps_in.dim
        self.silu = NormalizedSiLU()
        self.tanh = NormalizedTanh()
        self.sigmoid = NormalizedSigmoid()

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [N, irreps_in.dim] -> [N, irreps_out.dim]."""
        if x.shape[1] != self.dim_in:
            raise ValueError("Gate input has the wrong dimension")
        n = x.shape[0]
        blocks = torch.split(x, self.split_sizes, dim=1)
        ns = len(self.scalar_odd)
        parts: List[Tensor] = []
        for k, odd in enumerate(self.scalar_odd):
            parts.append(self.tanh(blocks[k]) if odd == 1 else self.silu(blocks[k]))
        if len(self.gated_blocks) > 0:
            gates = self.sigmoid(blocks[ns])
            for k, blk in enumerate(self.gated_blocks):
                mul, d, g = blk[0], blk[1], blk[2]
                v = blocks[ns + 1 + k].view(n, mul, d)
                parts.append((v * gates[:, g:g + mul].unsqueeze(-1)).reshape(n, mul * d))
        return torch.cat(parts, dim=1)
