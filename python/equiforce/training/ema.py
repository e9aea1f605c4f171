"""Exponential moving average of the weights (validation and export use the averaged weights)."""
import contextlib
from typing import Iterator

import torch
from torch import nn


class EMA:
    """``shadow = d * shadow + (1 - d) * param`` after every step, with ``d = min(decay, (1+n)/(10+n))``
    (a warm-up so early shadows are not dominated by the random initialisation)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        for n, p in model.named_parameters():
            self.shadow[n].mul_(d).add_(p.detach(), alpha=1.0 - d)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Temporarily load the EMA weights into ``model``."""
        backup = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(backup[n])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            p.copy_(self.shadow[n])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for n, v in state["shadow"].items():
            self.shadow[n].copy_(v)
