"""Radial functions of the interatomic distance: Bessel basis, smooth cutoff envelope, radial MLP.

Everything here depends only on ``r = |r_ij|`` (Å), so the tensor-product weights it produces are
rotation-invariant. The envelope makes every edge's contribution vanish smoothly at ``r_max``
(value and first ``p-1`` derivatives), so energies and forces are continuous when a neighbour
crosses the cutoff; edges with ``r >= r_max`` contribute exactly zero.
"""
import math
from typing import List

import torch
from torch import Tensor, nn

from .activations import NormalizedSiLU


def polynomial_cutoff(r: Tensor, r_max: float, p: int = 6) -> Tensor:
    """Envelope [E]: 1 at r=0, 0 with p-1 vanishing derivatives at ``r_max``, 0 beyond."""
    x = r / r_max
    env = (
        1.0
        - 0.5 * (p + 1) * (p + 2) * x.pow(p)
        + p * (p + 2) * x.pow(p + 1)
        - 0.5 * p * (p + 1) * x.pow(p + 2)
    )
    return env * (x < 1.0).to(r.dtype)


class BesselBasis(nn.Module):
    """``b_n(r) = sqrt(2/r_max) sin(n pi r / r_max) / r`` for n = 1..num_basis, [E] -> [E, num_basis].

    At r = 0 it takes its limit ``sqrt(2/r_max) n pi / r_max``; the r = 0 branch is masked with a
    double ``where`` so first and second derivatives stay finite (``torch.sinc`` gives NaN second
    derivatives at 0, which training on forces needs).
    """

    def __init__(self, r_max: float, num_basis: int = 8):
        super().__init__()
        self.r_max = float(r_max)
        n = torch.arange(1, num_basis + 1, dtype=torch.get_default_dtype())
        self.register_buffer("n", n)
        self.prefactor = math.sqrt(2.0 / self.r_max)

    def forward(self, r: Tensor) -> Tensor:
        k = self.n.to(r.dtype) * (math.pi / self.r_max)  # [num_basis]
        r = r.unsqueeze(-1)  # [E, 1]
        nonzero = r > 0
        r_safe = torch.where(nonzero, r, torch.ones_like(r))
        return self.prefactor * torch.where(nonzero, torch.sin(k * r_safe) / r_safe, k.expand(r.shape[0], -1))


class _InputScaledLinear(nn.Linear):
    """``nn.Linear`` (no bias) applied to ``input_scale * x``; the scale goes on the [out, in] weight
    rather than on the [E, in] activations. Same parameters (and init) as ``nn.Linear``.

    ``out_index`` (a non-persistent buffer, empty by default) reorders the outputs: output ``c`` is
    row ``out_index[c]`` of the weight (a gather on the [out, in] weight, not on the activations).
    """

    def __init__(self, in_features: int, out_features: int, input_scale: float):
        super().__init__(in_features, out_features, bias=False)
        self.input_scale = float(input_scale)
        self.register_buffer("out_index", torch.zeros(0, dtype=torch.long), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight if self.out_index.numel() == 0 else self.weight.index_select(0, self.out_index)
        return torch.nn.functional.linear(x, weight * self.input_scale)


class RadialMLP(nn.Module):
    """Fully connected net on the radial basis, [E, sizes[0]] -> [E, sizes[-1]], normalised SiLU
    between layers, no biases. Weights start as N(0, 1/fan_in) (variance-preserving).

    The normalisation factor of each SiLU is applied to the weight of the following layer (plain
    ``nn.SiLU`` in between), saving one pass over the [E, hidden] activations per layer forward
    and backward; parameter names and values are those of ``Linear, NormalizedSiLU, Linear, ...``.
    """

    def __init__(self, sizes: List[int]):
        super().__init__()
        if len(sizes) < 2:
            raise ValueError("RadialMLP needs at least input and output sizes")
        factor = NormalizedSiLU().factor
        layers: List[nn.Module] = []
        for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            lin = _InputScaledLinear(a, b, 1.0 if k == 0 else factor)
            nn.init.normal_(lin.weight, std=1.0 / math.sqrt(a))
            layers.append(lin)
            if k < len(sizes) - 2:
                layers.append(nn.SiLU())
        self.net = nn.Sequential(*layers)

    def set_output_order(self, index: Tensor) -> None:
        """Output ``c`` becomes the original output ``index[c]`` ([sizes[-1]] int64; empty: unchanged).
        Not part of the state dict: parameters keep their layout."""
        last = self.net[len(self.net) - 1]
        assert isinstance(last, _InputScaledLinear)
        last.out_index = index.clone()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
