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
from .irreps import Irreps


class Gate(nn.Module):
    scalar_blocks: List[List[int]]
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
        # scalar blocks: [start, stop, odd]
        self.scalar_blocks: List[List[int]] = []
        for (start, stop), m in zip(self.irreps_scalars.slices(), self.irreps_scalars):
            self.scalar_blocks.append([start, stop, 1 if m.ir.p == -1 else 0])
        self.n_scalars = self.irreps_scalars.dim
        self.n_gates = self.irreps_gates.dim
        # gated blocks: [start (within gated part), mul, d, gate_start]
        self.gated_blocks: List[List[int]] = []
        g = 0
        for (start, stop), m in zip(self.irreps_gated.slices(), self.irreps_gated):
            self.gated_blocks.append([start, m.mul, m.ir.dim, g])
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
        parts: List[Tensor] = []
        for blk in self.scalar_blocks:
            s = x[:, blk[0]:blk[1]]
            parts.append(self.tanh(s) if blk[2] == 1 else self.silu(s))
        if self.n_gates > 0:
            gates = self.sigmoid(x[:, self.n_scalars:self.n_scalars + self.n_gates])
            base = self.n_scalars + self.n_gates
            for blk in self.gated_blocks:
                start, mul, d, g = blk[0], blk[1], blk[2], blk[3]
                v = x[:, base + start:base + start + mul * d].reshape(n, mul, d)
                parts.append((v * gates[:, g:g + mul].unsqueeze(-1)).reshape(n, mul * d))
        return torch.cat(parts, dim=1)
