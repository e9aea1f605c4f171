"""Point-wise activations rescaled to unit second moment under a standard normal input.

Keeping ``E[f(x)^2] = 1`` for ``x ~ N(0, 1)`` (as e3nn does) keeps feature magnitudes O(1) through
deep stacks without tuning. The constants are computed once by Gauss-Hermite quadrature.
"""
import math

import numpy as np
import torch
from torch import Tensor, nn


def _second_moment_factor(f) -> float:
    x, w = np.polynomial.hermite_e.hermegauss(200)  # weight exp(-x^2/2)
    m2 = float((w * f(x) ** 2).sum() / math.sqrt(2.0 * math.pi))
    return 1.0 / math.sqrt(m2)


class NormalizedSiLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.factor = _second_moment_factor(lambda x: x / (1.0 + np.exp(-x)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.silu(x) * self.factor


class NormalizedSigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.factor = _second_moment_factor(lambda x: 1.0 / (1.0 + np.exp(-x)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x) * self.factor


class NormalizedTanh(nn.Module):
    """Odd activation: the only kind allowed on pseudoscalars (0o) in O(3) mode."""

    def __init__(self):
        super().__init__()
        self.factor = _second_moment_factor(np.tanh)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x) * self.factor
