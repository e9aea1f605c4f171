"""NequIP backend of bench/worker.py (runs only inside bench/.venvs/nequip; never imported by equiforce).

Builds ``nequip.model.NequIPGNNModel`` with random weights from the settings speed.py sends
(nequip >= 0.7 needs ``set_global_state()`` before a model is built) and evaluates it on the
benchmark structure with the model's own autograd forces (``ForceStressOutput``; it also
computes the virial through a cell displacement, as equiforce's exported file returns the virial).
"""

import numpy as np
import torch

_DT = {"float32": torch.float32, "float64": torch.float64}


def NequipBackend(Base):
    class _Nequip(Base):
        def __init__(self):
            super().__init__()
            import nequip
            from nequip.utils.global_state import set_global_state
            set_global_state()
            self._version = nequip.__version__

        def versions(self):
            import e3nn
            v = super().versions()
            v.update(nequip=self._version, e3nn=e3nn.__version__)
            return v

        def build(self, dtype, config, species, avg_num_neighbors):
            from nequip.model import NequIPGNNModel
            cfg = dict(config)
            model = NequIPGNNModel(seed=0, model_dtype=dtype, type_names=list(species),
                                   avg_num_neighbors=avg_num_neighbors, per_type_energy_scales=1.0,
                                   per_type_energy_shifts=0.0, **cfg)
            model.eval()
            self.models[dtype] = model
            return {"num_params": int(sum(p.numel() for p in model.parameters())),
                    "description": f"nequip.model.NequIPGNNModel {cfg} (eager, model_dtype={dtype})"}

        def prepare(self, data, dtype):
            # nequip keeps positions in float64 (the global dtype) and casts inside the model
            n = data["pos"].shape[0]
            return {
                "pos": torch.tensor(data["pos"], dtype=torch.float64),
                "atom_types": torch.zeros(n, dtype=torch.long),
                "edge_index": torch.tensor(data["edge_index"], dtype=torch.long),
                "edge_cell_shift": torch.tensor(data["cell_shift"], dtype=torch.float64),
                "cell": torch.tensor(data["cell"], dtype=torch.float64).view(1, 3, 3),
                "pbc": torch.ones((1, 3), dtype=torch.bool),
            }

        def evaluate(self, p, dtype):
            out = self.models[dtype](dict(p))
            return out["total_energy"].detach(), out["forces"].detach()

        def evaluate_end_to_end(self, p, dtype):
            # nequip's own neighbour list (compute_neighborlist_: matscipy by default, NEQUIP_NL)
            try:
                from nequip.data import compute_neighborlist_
            except ImportError:
                from nequip.data.AtomicDataDict import compute_neighborlist_
            data = {k: v for k, v in p.items() if k not in ("edge_index", "edge_cell_shift")}
            data = compute_neighborlist_(data, self.r_max)
            out = self.models[dtype](data)
            return out["total_energy"].detach(), out["forces"].detach()

    return _Nequip()
