"""Equivariant linear maps: channel mixing within each irrep type.

A block of irrep ``(l, p)`` can only be mapped to blocks of the same ``(l, p)`` (Schur's lemma),
with one ``[mul_in, mul_out]`` matrix per pair of blocks, acting on all ``2l+1`` components alike.
Weights start N(0, 1) and are scaled by ``1/sqrt(fan_in)`` in the forward pass, where ``fan_in`` is
the total multiplicity of inputs feeding an output block.
"""
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..o3.irreps import Irreps


def _instructions(irreps_in: Irreps, irreps_out: Irreps, n_copies: int) -> Tuple[List[List[int]], List[float], int]:
    """Paths ``[in_block, mul_in, out_block, mul_out, d, w_offset]``, their 1/sqrt(fan_in) scales,
    and the number of weights (``n_copies`` independent weight sets, e.g. one per species)."""
    ins: List[List[int]] = []
    scales: List[float] = []
    offset = 0
    for o, (mul_o, ir_o) in enumerate(irreps_out):
        fan_in = sum(m.mul for m in irreps_in if m.ir == ir_o)
        for i, (mul_i, ir_i) in enumerate(irreps_in):
            if ir_i != ir_o or mul_i == 0 or mul_o == 0:
                continue
            ins.append([i, mul_i, o, mul_o, ir_o.dim, offset])
            scales.append(1.0 / math.sqrt(fan_in))
            offset += n_copies * mul_i * mul_o
    return ins, scales, offset


class Linear(nn.Module):
    """``x`` [N, irreps_in.dim] -> [N, irreps_out.dim]. Output blocks with no matching input are 0.

    ``bias=True`` adds a learnable bias to the even-scalar (0e) output blocks only (any other
    bias would break equivariance).
    """

    instructions: List[List[int]]
    scales: List[float]
    in_sizes: List[int]
    in_muls: List[int]
    in_dims: List[int]
    out_sizes: List[int]
    out_muls: List[int]
    out_dims: List[int]

    def __init__(self, irreps_in: Irreps, irreps_out: Irreps, bias: bool = False):
        super().__init__()
        self.irreps_in = Irreps(irreps_in)
        self.irreps_out = Irreps(irreps_out)
        ins, scales, n_w = _instructions(self.irreps_in, self.irreps_out, 1)
        self.instructions: List[List[int]] = ins
        self.scales: List[float] = scales
        self.in_sizes: List[int] = [m.dim for m in self.irreps_in]
        self.in_muls: List[int] = [m.mul for m in self.irreps_in]
        self.in_dims: List[int] = [m.ir.dim for m in self.irreps_in]
        self.out_sizes: List[int] = [m.dim for m in self.irreps_out]
        self.out_muls: List[int] = [m.mul for m in self.irreps_out]
        self.out_dims: List[int] = [m.ir.dim for m in self.irreps_out]
        self.weight = nn.Parameter(torch.randn(n_w))
        self.dim_out = self.irreps_out.dim
        scalar_mask = torch.zeros(self.dim_out)
        for (start, stop), m in zip(self.irreps_out.slices(), self.irreps_out):
            if m.ir.l == 0 and m.ir.p == 1:
                scalar_mask[start:stop] = 1.0
        self.use_bias = bool(bias)
        self.register_buffer("bias_mask", scalar_mask)
        self.bias = nn.Parameter(torch.zeros(self.dim_out if bias else 0))

    def _component_blocks(self, x: Tensor) -> List[Tensor]:
        """``x`` [N, irreps_in.dim] (mul-major) -> one component-major [N, 2l+1, mul] view per input block."""
        n = x.shape[0]
        blocks: List[Tensor] = []
        for k, blk in enumerate(torch.split(x, self.in_sizes, dim=1)):
            blocks.append(blk.view(n, self.in_muls[k], self.in_dims[k]).transpose(1, 2))
        return blocks

    def _products(self, xs: List[Tensor]) -> List[Optional[Tensor]]:
        """The instruction loop (the only one of this class): component-major input blocks
        [N, d, mul_i] -> summed output blocks [N, d, mul_o]; None where no input maps to a block."""
        outs: List[Optional[Tensor]] = [None for _ in self.out_sizes]
        for k, ins in enumerate(self.instructions):
            i, mul_i, o, mul_o, off = ins[0], ins[1], ins[2], ins[3], ins[5]
            w = self.weight[off:off + mul_i * mul_o].view(mul_i, mul_o) * self.scales[k]
            yb = torch.matmul(xs[i], w)                                          # [n, d, mul_o]
            cur = outs[o]
            outs[o] = yb if cur is None else cur + yb
        return outs

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_from_blocks(self._component_blocks(x))

    def forward_to_blocks(self, x: Tensor) -> List[Tensor]:
        """``x`` [N, irreps_in.dim] (mul-major) -> one component-major [N, 2l+1, mul] tensor per
        block of ``irreps_out`` (the layout of :meth:`EdgeTensorProduct.forward_blocks`)."""
        n = x.shape[0]
        outs = self._products(self._component_blocks(x))
        blocks: List[Tensor] = []
        bias = torch.split(self.bias * self.bias_mask, self.out_sizes) if self.use_bias else []
        for o, blk in enumerate(outs):
            mul, d = self.out_muls[o], self.out_dims[o]
            if blk is None:
                blk = torch.zeros((n, d, mul), dtype=x.dtype, device=x.device)
            if self.use_bias:
                blk = blk + bias[o].view(mul, d).t()
            blocks.append(blk)
        return blocks

    def forward_from_blocks(self, xs: List[Tensor]) -> Tensor:
        """One component-major [N, 2l+1, mul] tensor per block of ``irreps_in`` -> [N, irreps_out.dim]
        (mul-major); the same map as :meth:`forward`."""
        n = xs[0].shape[0]
        flat: List[Optional[Tensor]] = []
        for blk in self._products(xs):
            flat.append(None if blk is None else blk.transpose(1, 2).reshape(n, blk.shape[1] * blk.shape[2]))
        out = _assemble(flat, self.out_sizes, xs[0])
        if self.use_bias:
            out = out + self.bias * self.bias_mask
        return out


class SpeciesLinear(nn.Module):
    """Linear map whose weights depend on the atom's species (the self-interaction).

    ``x`` [N, irreps_in.dim], ``species`` [N] -> [N, irreps_out.dim]; equivalent to a tensor product
    with the one-hot species vector.
    """

    instructions: List[List[int]]
    scales: List[float]
    in_sizes: List[int]
    out_sizes: List[int]

    def __init__(self, irreps_in: Irreps, irreps_out: Irreps, num_species: int):
        super().__init__()
        self.irreps_in = Irreps(irreps_in)
        self.irreps_out = Irreps(irreps_out)
        self.num_species = int(num_species)
        ins, scales, n_w = _instructions(self.irreps_in, self.irreps_out, self.num_species)
        self.instructions: List[List[int]] = ins
        self.scales: List[float] = scales
        self.in_sizes: List[int] = [m.dim for m in self.irreps_in]
        self.out_sizes: List[int] = [m.dim for m in self.irreps_out]
        self.weight = nn.Parameter(torch.randn(n_w))
        self.dim_out = self.irreps_out.dim

    def forward(self, x: Tensor, species: Tensor) -> Tensor:
        n = x.shape[0]
        s = self.num_species
        xs = torch.split(x, self.in_sizes, dim=1)
        outs: List[Optional[Tensor]] = [None for _ in self.out_sizes]
        for k, ins in enumerate(self.instructions):
            i, mul_i, o, mul_o, d, off = ins[0], ins[1], ins[2], ins[3], ins[4], ins[5]
            w = self.weight[off:off + s * mul_i * mul_o].view(s, mul_i, mul_o) * self.scales[k]
            xb = xs[i].view(n, mul_i, d)
            if s == 1:
                yb = torch.einsum("nud,uw->nwd", xb, w[0])
            else:
                yb = torch.bmm(w.index_select(0, species).transpose(1, 2), xb)  # [n, mul_o, d]
            yb = yb.reshape(n, mul_o * d)
            cur = outs[o]
            outs[o] = yb if cur is None else cur + yb
        return _assemble(outs, self.out_sizes, x)


def _assemble(outs: List[Optional[Tensor]], sizes: List[int], like: Tensor) -> Tensor:
    """Concatenate output blocks; a block nothing maps to is zero."""
    parts: List[Tensor] = []
    for o, size in enumerate(sizes):
        blk = outs[o]
        if blk is None:
            parts.append(torch.zeros((like.shape[0], size), dtype=like.dtype, device=like.device))
        else:
            parts.append(blk)
    return torch.cat(parts, dim=1)
