"""Segment sums used by message passing and by per-structure reductions."""
import torch
from torch import Tensor


def scatter_sum(src: Tensor, index: Tensor, dim_size: int) -> Tensor:
    """Sum rows of ``src`` [M, ...] into ``dim_size`` bins given by ``index`` [M] (int64)."""
    out = torch.zeros((dim_size,) + src.shape[1:], dtype=src.dtype, device=src.device)
    return out.index_add(0, index, src)
