"""Clebsch-Gordan tensor product of neighbour features with edge harmonics, weighted per edge.

For each edge, a feature block ``x`` (``mul`` copies of irrep ``l1``) is combined with the edge
harmonic ``Y_l2`` into every allowed output irrep ``l3``::

    out[u, k] = w[u] * sqrt(2 l3 + 1) * sum_ij C[i, j, k] x[u, i] Y[j]

(``C`` the unit-norm real Clebsch-Gordan tensor of :mod:`equiforce.o3.clebsch_gordan`, the
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

Merged groups (:meth:`EdgeTensorProduct.forward_merged`, used by the message-passing layer). The
Clebsch-Gordan coefficients depend on ``(l1, l2, l3)`` only, not on parities, so input blocks of the
same ``l1`` whose groups with harmonic ``l2`` produce the same list of ``l3`` (e.g. ``1o`` and ``1e``
with NequIP's ``parity: true`` features, ``feature_parity = "both"``) are concatenated along the
channel axis and go through one group: one gather, one matmul and one scatter per output ``l3``
for ``mul_a + mul_b`` channels instead of one each per block (fewer, larger operations; the batched
matmul of the general kind is much faster on 64 channels than twice on 32). A merged path is the
concatenation, along channels, of the original paths of its members; the radial weights are
produced in merged order (see ``weight_perm``), and :meth:`EdgeTensorProduct.split_merged` views
the merged outputs as the original paths again. Without any mergeable blocks (``feature_parity =
"natural"``, SE(3)) the merged groups are the original groups.

Fused kernels. :class:`FusedTensorProduct` runs gather, merged groups and scatter-sum of one layer
in the compiled op ``equiforce::tp_scatter`` (``cpp/equiforce_ops.cpp``, CPU, first derivatives),
with tables derived from the merged groups;
:class:`RadialPairing` finds the reverse edges that share radial weights. Both are used by exported
models (:meth:`equiforce.model.network.EquiforceModel.use_fused_kernels`) and tested against the PyTorch
path above, which stays the reference and the path for GPUs. Training with a force loss on the CPU
(``double_backward=True``) calls the op through :class:`_TpScatterFn`, whose derivatives of every
order are the op's forward and backward kernels (``equiforce::tp_scatter_backward``) with substituted
arguments; TorchScript (exported files) always compiles the plain op.
"""
import math
from typing import List, Set, Tuple

import torch
from torch import Tensor, nn

from ..o3.clebsch_gordan import clebsch_gordan
from ..o3.irreps import Irrep, Irreps
from ..deploy.ops import load_ops, ops_error

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
    gather_sets: List[List[int]]
    mgroups: List[List[int]]
    mgroup_d3: List[List[int]]
    mgroup_diag: List[float]
    mpath_muls: List[int]
    mpath_members: List[List[int]]
    mpath_member_muls: List[List[int]]

    __jit_ignored_attributes__ = ["_cg_exact"]

    def __init__(self, irreps_in: Irreps, irreps_sh: Irreps, allowed_out: Set[Irrep]):
        super().__init__()
        self.irreps_in = Irreps(irreps_in)
        self.irreps_sh = Irreps(irreps_sh)
        groups: List[List[int]] = []
        cg_chunks: List[torch.Tensor] = []
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
        # kept in float64 whatever the default dtype; model.to(dtype) casts it once. The exact float64
        # values stay beside it (not a buffer, not scripted), so a cast back to float64 after float32
        # training, or a checkpoint saved in float32, never leaves float32-rounded coefficients
        self._cg_exact = torch.cat(cg_chunks).to(torch.float64)
        self.register_buffer("cg", self._cg_exact.clone())
        self.irreps_out = Irreps(out_blocks)
        self.weight_numel = w_off
        self._build_merged(out_blocks)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # checkpoints written before equiforce dropped the unused `rep` buffer (path index of each
        # output column, derived from the irreps) still load: the stale entry is ignored
        state_dict.pop(prefix + "rep", None)
        _exact_coefficients(state_dict, prefix + "cg", self._cg_exact, self.cg.dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, recurse=True):
        """nn.Module._apply (``.to``, ``.double()``, ...), then ``cg`` re-cast from the exact float64
        coefficients (never a cast of a rounded copy)."""
        super()._apply(fn, recurse)
        self.cg = self._cg_exact.to(device=self.cg.device, dtype=self.cg.dtype, copy=True)
        return self

    def _build_merged(self, out_blocks: List[Tuple[int, Tuple[int, int]]]) -> None:
        """Merged groups (module docstring): original groups with equal ``(l1, l2, [l3...])``.

        Sets ``gather_sets`` (input blocks concatenated along channels, one list per merged input),
        ``mgroups`` ([gather set, kind, l2 block, d1, d2, cg offset, d3 total, channels] per merged
        group; the CG slice is that of its first original group, identical for all members),
        ``mgroup_d3`` / ``mgroup_diag`` (as ``group_d3`` / ``group_diag``), ``mpath_muls`` (channels of
        each merged path, in merged order), ``mpath_members`` / ``mpath_member_muls`` (the original
        paths a merged path concatenates, and their channels) and the non-persistent buffer
        ``weight_perm`` [weight_numel] (merged weight column ``c`` is original column
        ``weight_perm[c]``; empty when the orders coincide).
        """
        path_first: List[int] = []  # first original path of each original group
        w_first: List[int] = []     # first weight column of each original path
        p, w = 0, 0
        for k, grp in enumerate(self.groups):
            path_first.append(p)
            for _ in self.group_d3[k]:
                w_first.append(w)
                w += self.path_muls[p]
                p += 1
        keys: List[Tuple[int, int, Tuple[int, ...]]] = []
        members: List[List[int]] = []  # original groups per merged group, in input-block order
        for k, grp in enumerate(self.groups):
            key = (self.irreps_in[grp[0]].ir.l, grp[3], tuple(self.group_d3[k]))
            if key in keys:
                members[keys.index(key)].append(k)
            else:
                keys.append(key)
                members.append([k])
        gather_sets: List[List[int]] = []
        mgroups: List[List[int]] = []
        mgroup_d3: List[List[int]] = []
        mgroup_diag: List[float] = []
        mpath_muls: List[int] = []
        mpath_members: List[List[int]] = []
        mpath_member_muls: List[List[int]] = []
        perm: List[int] = []
        for ks in members:
            blocks = [self.groups[k][0] for k in ks]
            if blocks not in gather_sets:
                gather_sets.append(blocks)
            g0 = self.groups[ks[0]]
            mul = sum(self.groups[k][1] for k in ks)
            mgroups.append([gather_sets.index(blocks), self.group_kind[ks[0]], g0[3], g0[2], g0[4], g0[5], g0[6], mul])
            mgroup_d3.append(list(self.group_d3[ks[0]]))
            mgroup_diag.append(self.group_diag[ks[0]])
            for t in range(len(self.group_d3[ks[0]])):
                paths = [path_first[k] + t for k in ks]
                mpath_members.append(paths)
                mpath_member_muls.append([self.path_muls[q] for q in paths])
                mpath_muls.append(sum(self.path_muls[q] for q in paths))
                for q in paths:
                    perm.extend(range(w_first[q], w_first[q] + self.path_muls[q]))
        self.gather_sets: List[List[int]] = gather_sets
        self.mgroups: List[List[int]] = mgroups
        self.mgroup_d3: List[List[int]] = mgroup_d3
        self.mgroup_diag: List[float] = mgroup_diag
        self.mpath_muls: List[int] = mpath_muls
        self.mpath_members: List[List[int]] = mpath_members
        self.mpath_member_muls: List[List[int]] = mpath_member_muls
        identity = perm == list(range(len(perm)))
        self.register_buffer("weight_perm", torch.tensor([] if identity else perm, dtype=torch.long),
                             persistent=False)

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
        of ``irreps_out``). Runs the merged groups (:meth:`forward_merged`)."""
        outs = self.forward_merged(self.merge_inputs(xs), sh, self.merge_weights(weight))
        return self.split_merged(outs)

    def merge_inputs(self, xs: List[Tensor]) -> List[Tensor]:
        """One block per input block ``xs[b]`` [R, 2l+1, mul] -> one per gather set
        [R, 2l+1, sum of mul] (blocks concatenated along channels; a single block as is)."""
        out: List[Tensor] = []
        for blocks in self.gather_sets:
            if len(blocks) == 1:
                out.append(xs[blocks[0]])
            else:
                out.append(torch.cat([xs[b] for b in blocks], dim=2))
        return out

    def merge_weights(self, weight: Tensor) -> Tensor:
        """Weights [E, weight_numel] from the original path order to the merged one."""
        if self.weight_perm.numel() == 0:
            return weight
        return weight.index_select(1, self.weight_perm)

    def split_merged(self, outs: List[Tensor]) -> List[Tensor]:
        """Merged path outputs [R, d3, mul] -> the original paths [R, d3, mul_p] (channel slices),
        in path order (the blocks of ``irreps_out``)."""
        paths: List[Tensor] = [outs[0] for _ in self.path_muls]
        for q, out in enumerate(outs):
            members = self.mpath_members[q]
            if len(members) == 1:
                paths[members[0]] = out
            else:
                parts = torch.split(out, self.mpath_member_muls[q], dim=2)
                for t, p in enumerate(members):
                    paths[p] = parts[t]
        return paths

    def forward_merged(self, xs: List[Tensor], sh: Tensor, weight: Tensor) -> List[Tensor]:
        """Merged groups: ``xs[s]`` [E, 2l+1, mul_s] per gather set (:meth:`merge_inputs`), ``sh``
        [E, irreps_sh.dim], ``weight`` [E, weight_numel] in merged order (:meth:`merge_weights`) ->
        one [E, 2l3+1, mul] per merged path (:meth:`split_merged` gives the original paths)."""
        e = sh.shape[0]
        cg = self.cg.to(sh.dtype)
        shs = torch.split(sh, self.sh_sizes, dim=1)
        ws = torch.split(weight, self.mpath_muls, dim=1)                   # [E, mul] per merged path
        outs: List[Tensor] = []
        p = 0
        for k, grp in enumerate(self.mgroups):
            s, kind, i2, d1, d2, cg_off, d3 = grp[0], grp[1], grp[2], grp[3], grp[4], grp[5], grp[6]
            x = xs[s]                                                      # [E, d1, mul]
            if kind == 1:  # _DIAGONAL
                # C[:, 0, :] = diag * I: out[k, u] = x[k, u] * (diag Y_0 w[u])
                sc = ws[p] * (shs[i2] * self.mgroup_diag[k])                 # [E, mul]
                outs.append(x * sc.unsqueeze(1))
                p += 1
                continue
            c = cg[cg_off:cg_off + d2 * d1 * d3].view(d2, d1 * d3)
            # M = Y @ C [E, d1 * d3]; a broadcast product when Y is a single column (l2 = 0)
            m = shs[i2] * c if d2 == 1 else shs[i2] @ c
            if kind == 0:  # _OUTER
                # d1 = 1: out[k, u] = M[k] * (x w)[u]
                off = 0
                for d in self.mgroup_d3[k]:
                    xw = x * ws[p].unsqueeze(1)                              # [E, 1, mul]
                    outs.append(m[:, off:off + d].unsqueeze(2) * xw)
                    off += d
                    p += 1
            else:
                y = torch.bmm(m.view(e, d1, d3).transpose(1, 2), x)           # [E, d3, mul]
                # split (not slices): its backward is one concatenation, where slices would each
                # scatter their gradient into a zero-filled [E, d3, mul] before summing
                for yk in torch.split(y, self.mgroup_d3[k], dim=1):
                    outs.append(yk * ws[p].unsqueeze(1))
                    p += 1
        return outs


def _exact_coefficients(state_dict, key: str, exact: Tensor, dtype: torch.dtype) -> None:
    """Replace the Clebsch-Gordan coefficients ``state_dict[key]`` of a checkpoint by the exact ones
    (in ``dtype``) when they agree to float32 rounding: a checkpoint saved by a float32 model holds
    rounded coefficients that would otherwise limit a float64 export's equivariance to ~1e-8.
    Anything else (another shape, other values) is left for the usual load and its errors."""
    saved = state_dict.get(key)
    if saved is None or saved.shape != exact.shape:
        return
    if bool(torch.allclose(saved.detach().to(torch.float64).cpu(), exact, rtol=1e-6, atol=1e-7)):
        state_dict[key] = exact.to(dtype, copy=True)


def _tp_bwd(x: Tensor, sh: Tensor, w: Tensor, g: Tensor, idx: Tuple, need: Tuple[bool, bool, bool]) -> List:
    """The op's first backward (``equiforce::tp_scatter_backward``): [gx, gsh, gw], None where not needed."""
    windex, src, dst, n, groups, kpath, cg = idx
    out = torch.ops.equiforce.tp_scatter_backward(x, sh, w, windex, src, dst, n, groups, kpath, cg, g, *need)
    return [o if nd else None for o, nd in zip(out, need)]


def _add(a, b):
    return b if a is None else (a if b is None else a + b)


class _TpScatterFn(torch.autograd.Function):
    """``equiforce::tp_scatter`` differentiable to any order (eager mode; used for training with a
    force loss). The op is trilinear in (x, sh, w): ``out = F(x, sh, w)``; its backward
    ``(F_x^T g, F_sh^T g, F_w^T g)`` is :class:`_TpScatterBwdFn`, whose own derivatives are again
    forward and backward calls with substituted arguments."""

    @staticmethod
    def forward(ctx, x, sh, w, windex, src, dst, n, groups, kpath, cg):
        ctx.idx = (windex, src, dst, n, groups, kpath, cg)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, sh, w)
        return torch.ops.equiforce.tp_scatter(x, sh, w, windex, src, dst, n, groups, kpath, cg)

    @staticmethod
    def backward(ctx, g):
        x, sh, w = ctx.saved_tensors
        need = tuple(bool(b) for b in ctx.needs_input_grad[:3])
        if g is None or not any(need):
            return (None,) * 10
        gx, gsh, gw = _TpScatterBwdFn.apply(x, sh, w, g.contiguous(), ctx.idx, need)
        return (gx if need[0] else None, gsh if need[1] else None, gw if need[2] else None) + (None,) * 7


class _TpScatterBwdFn(torch.autograd.Function):
    """``(gx, gsh, gw) = (F_x^T g, F_sh^T g, F_w^T g)``, linear in g and bilinear in the other two of
    (x, sh, w) (gx does not depend on x, ...). With upstream gradients (a, b, c) of (gx, gsh, gw)::

        d/dg  = F(a, sh, w) + F(x, b, w) + F(x, sh, c)
        d/dx  = F_x^T g |(sh->b)   + F_x^T g |(w->c)
        d/dsh = F_sh^T g |(x->a)   + F_sh^T g |(w->c)
        d/dw  = F_w^T g |(x->a)    + F_w^T g |(sh->b)

    i.e. three backward calls (arguments (x, b, w), (x, sh, c), (a, sh, w)), each giving two of the
    six terms, and three forward calls."""

    @staticmethod
    def forward(ctx, x, sh, w, g, idx, need):
        ctx.idx = idx
        ctx.need = need
        ctx.set_materialize_grads(False)  # unused outputs: None, not zeros (no work for them)
        ctx.save_for_backward(x, sh, w, g)
        out = _tp_bwd(x, sh, w, g, idx, need)
        # outputs must be tensors: a zero-size placeholder where a gradient is not needed
        return tuple(o if o is not None else x.new_zeros(0) for o in out)

    @staticmethod
    def backward(ctx, a, b, c):
        x, sh, w, g = ctx.saved_tensors
        need = ctx.need
        a = a if need[0] and a is not None else None
        b = b if need[1] and b is not None else None
        c = c if need[2] and c is not None else None
        nx, nsh, nw, ng = (bool(t) for t in ctx.needs_input_grad[:4])
        windex, src, dst, n, groups, kpath, cg = ctx.idx
        dx = dsh = dw = dg = None
        if ng:
            for args in ((a, sh, w), (x, b, w), (x, sh, c)):
                if args[0] is not None and args[1] is not None and args[2] is not None:
                    dg = _add(dg, _TpScatterFn.apply(args[0].contiguous(), args[1].contiguous(),
                                                     args[2].contiguous(), windex, src, dst, n, groups,
                                                     kpath, cg))
        if b is not None and (nx or nw):     # (x, b, w): d/dx term 1 and d/dw term 2
            t = _TpScatterBwdFn.apply(x, b.contiguous(), w, g, ctx.idx, (nx, False, nw))
            dx, dw = _add(dx, t[0] if nx else None), _add(dw, t[2] if nw else None)
        if c is not None and (nx or nsh):    # (x, sh, c): d/dx term 2 and d/dsh term 2
            t = _TpScatterBwdFn.apply(x, sh, c.contiguous(), g, ctx.idx, (nx, nsh, False))
            dx, dsh = _add(dx, t[0] if nx else None), _add(dsh, t[1] if nsh else None)
        if a is not None and (nsh or nw):    # (a, sh, w): d/dsh term 1 and d/dw term 1
            t = _TpScatterBwdFn.apply(a.contiguous(), sh, w, g, ctx.idx, (False, nsh, nw))
            dsh, dw = _add(dsh, t[1] if nsh else None), _add(dw, t[2] if nw else None)
        return dx, dsh, dw, dg, None, None


def tp_scatter_differentiable(x: Tensor, sh: Tensor, w: Tensor, windex: Tensor, src: Tensor, dst: Tensor, n: int,
                              groups: Tensor, kpath: Tensor, cg: Tensor) -> Tensor:
    """``torch.ops.equiforce.tp_scatter`` with derivatives of every order (eager mode only)."""
    return _TpScatterFn.apply(x.contiguous(), sh.contiguous(), w.contiguous(), windex, src, dst, n, groups,
                              kpath, cg)


class FusedTensorProduct(nn.Module):
    """Gather, tensor product and scatter-sum of an :class:`EdgeTensorProduct` in one compiled op
    (``equiforce::tp_scatter``, CPU; tables derived from the product's merged groups).

    A separate module so that a model without it never mentions the op: TorchScript does not compile
    the branch of an attribute that is None, and exported files stay loadable by plain libtorch.
    """

    set_dims: List[int]
    set_muls: List[int]
    mpath_d3: List[int]
    mpath_muls: List[int]

    __jit_ignored_attributes__ = ["_cg_exact"]

    def __init__(self, tp: EdgeTensorProduct):
        super().__init__()
        if not load_ops():
            raise RuntimeError(f"the compiled equiforce ops are not available ({ops_error()}); reinstall "
                               "equiforce (pip install --no-build-isolation .), or keep fused kernels off "
                               "(model.for_export(fused=False), `equiforce export --portable`)")
        self._build_tables(tp)
        self._cg_exact = tp._cg_exact
        self.register_buffer("cg", tp._cg_exact.to(device=tp.cg.device, dtype=tp.cg.dtype, copy=True), persistent=False)
        # True: derivatives of every order (training with a force loss, eager mode only; see
        # _TpScatterFn); TorchScript always compiles the plain op (first derivatives)
        self.double_backward = False

    def _apply(self, fn, recurse=True):
        """As :meth:`EdgeTensorProduct._apply`: ``cg`` re-cast from the exact float64 coefficients."""
        super()._apply(fn, recurse)
        self.cg = self._cg_exact.to(device=self.cg.device, dtype=self.cg.dtype, copy=True)
        return self

    def _build_tables(self, tp: EdgeTensorProduct) -> None:
        """The op's tables (layouts in ``cpp/equiforce_ops.cpp``) from the merged groups of ``tp``:
        non-persistent buffers ``groups`` [G, 10] and ``kpath`` [sum of d3], and ``set_dims`` /
        ``set_muls`` (irrep dimension and channels of each gather set, the blocks of the op's input),
        ``mpath_d3`` / ``mpath_muls`` (output dimension and channels of each merged path)."""
        self.set_dims = [tp.in_dims[blocks[0]] for blocks in tp.gather_sets]
        self.set_muls = [sum(tp.in_muls[b] for b in blocks) for blocks in tp.gather_sets]
        set_off = [0]
        for d, m in zip(self.set_dims, self.set_muls):
            set_off.append(set_off[-1] + d * m)
        sh_off = [0]
        for size in tp.sh_sizes:
            sh_off.append(sh_off[-1] + size)
        rows: List[List[int]] = []
        kpath: List[int] = []
        mpath_d3: List[int] = []
        out_off, w_off = 0, 0
        for k, grp in enumerate(tp.mgroups):
            s, i2, d1, d2, cg_off, d3, mul = grp[0], grp[2], grp[3], grp[4], grp[5], grp[6], grp[7]
            rows.append([set_off[s], d1, mul, sh_off[i2], d2, cg_off, d3, out_off, w_off, len(kpath)])
            for t, dt in enumerate(tp.mgroup_d3[k]):
                kpath.extend([t] * dt)
                mpath_d3.append(dt)
            out_off += d3 * mul
            w_off += len(tp.mgroup_d3[k]) * mul
        self.mpath_d3 = mpath_d3
        self.mpath_muls = list(tp.mpath_muls)
        self.register_buffer("groups", torch.tensor(rows, dtype=torch.long), persistent=False)
        self.register_buffer("kpath", torch.tensor(kpath, dtype=torch.long), persistent=False)

    @torch.jit.unused
    def _differentiable(self, x: Tensor, sh: Tensor, weight: Tensor, weight_index: Tensor, src: Tensor,
                        dst: Tensor, n: int) -> Tensor:
        return tp_scatter_differentiable(x, sh, weight, weight_index, src, dst, n, self.groups, self.kpath,
                                         self.cg.to(sh.dtype))

    def forward(self, hs: List[Tensor], sh: Tensor, weight: Tensor, weight_index: Tensor, src: Tensor,
                dst: Tensor, n: int) -> List[Tensor]:
        """``hs[s]`` [N, 2l+1, mul_s] per gather set (:meth:`EdgeTensorProduct.merge_inputs`), ``sh``
        [E, irreps_sh.dim], ``weight`` [U, weight_numel] in merged order with ``weight_index`` [E] its
        row for each edge, ``src`` / ``dst`` [E] -> one [n, d3, mul] per merged path, equal to
        ``scatter_sum(tp.forward_merged([h[src] for h in hs], sh, weight[weight_index]), dst, n)``.
        First derivatives only, unless ``double_backward`` (eager mode: every order, for training)."""
        x = hs[0].reshape(n, -1) if len(hs) == 1 else torch.cat([h.reshape(n, -1) for h in hs], dim=1)
        if not torch.jit.is_scripting() and self.double_backward:  # TorchScript compiles only the op
            out = self._differentiable(x, sh, weight, weight_index, src, dst, n)
        else:
            out = torch.ops.equiforce.tp_scatter(x, sh, weight, weight_index, src, dst, n, self.groups,
                                                 self.kpath, self.cg.to(sh.dtype))
        sizes = [d * m for d, m in zip(self.mpath_d3, self.mpath_muls)]
        return [o.view(n, d, m) for o, d, m in zip(torch.split(out, sizes, dim=1), self.mpath_d3, self.mpath_muls)]


class RadialPairing(nn.Module):
    """Reverse edges (j->i and i->j, vectors exactly opposite) share their radial weights:
    ``forward(edge_index [2, E], edge_vec [E, 3], n)`` -> ``(reps [U], index [E])``, the edges whose
    radial weights are computed and the row of ``reps`` each edge uses (``equiforce::radial_pairs``,
    CPU). A module for the same reason as :class:`FusedTensorProduct`."""

    def __init__(self):
        super().__init__()
        if not load_ops():
            raise RuntimeError(f"the compiled equiforce ops are not available ({ops_error()}); reinstall "
                               "equiforce, or keep fused kernels off (`equiforce export --portable`)")

    def forward(self, edge_index: Tensor, edge_vec: Tensor, n: int) -> Tuple[Tensor, Tensor]:
        return torch.ops.equiforce.radial_pairs(edge_index, edge_vec.detach(), n)
