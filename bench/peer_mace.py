"""MACE backend of bench/worker.py (runs only inside bench/.venvs/mace; never imported by equiforce).

Builds ``mace.modules.MACE`` with random weights and the settings speed.py sends (the mace-torch
training defaults for everything else: RealAgnosticResidualInteractionBlock, first layer
RealAgnosticInteractionBlock, SiLU gate) and times ``model(data, compute_force=True)``.
e3nn 0.4.4 (pinned by mace-torch) needs TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 on torch >= 2.6; the
parent sets it in this worker's environment.
"""

import numpy as np
import torch

_DT = {"float32": torch.float32, "float64": torch.float64}


def MaceBackend(Base):
    class _Mace(Base):
        def __init__(self):
            super().__init__()
            import mace
            from mace import modules  # noqa: F401  (fails early when e3nn/torch do not fit)
            self._version = getattr(mace, "__version__", None)
            if self._version is None:
                import importlib.metadata as md
                self._version = md.version("mace-torch")

        def versions(self):
            import e3nn
            v = super().versions()
            v.update(mace=self._version, e3nn=e3nn.__version__)
            return v

        def build(self, dtype, config, species, avg_num_neighbors):
            from e3nn import o3
            from mace import modules
            from ase.data import atomic_numbers
            cfg = dict(config)
            torch.manual_seed(0)
            z = [atomic_numbers[s] for s in species]
            model = modules.MACE(
                r_max=float(cfg["r_max"]), num_bessel=int(cfg["num_bessel"]),
                num_polynomial_cutoff=int(cfg["num_polynomial_cutoff"]), max_ell=int(cfg["max_ell"]),
                interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
                interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
                num_interactions=int(cfg["num_interactions"]), num_elements=len(z),
                hidden_irreps=o3.Irreps(cfg["hidden_irreps"]), MLP_irreps=o3.Irreps(cfg["MLP_irreps"]),
                atomic_energies=np.zeros(len(z)), avg_num_neighbors=float(avg_num_neighbors),
                atomic_numbers=z, correlation=int(cfg["correlation"]), gate=torch.nn.functional.silu,
                radial_MLP=list(cfg["radial_MLP"]),
            )
            model = model.to(_DT[dtype]).eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self.models[dtype] = model
            return {"num_params": int(sum(p.numel() for p in model.parameters())),
                    "description": f"mace.modules.MACE {cfg} (eager)"}

        def prepare(self, data, dtype):
            dt = _DT[dtype]
            n = data["pos"].shape[0]
            return {
                "positions": torch.tensor(data["pos"], dtype=dt),
                "node_attrs": torch.ones((n, 1), dtype=dt),
                "edge_index": torch.tensor(data["edge_index"], dtype=torch.long),
                "shifts": torch.tensor(data["shift"], dtype=dt),
                "unit_shifts": torch.tensor(data["cell_shift"], dtype=dt),
                "cell": torch.tensor(data["cell"], dtype=dt).view(1, 3, 3),
                "batch": torch.zeros(n, dtype=torch.long),
                "ptr": torch.tensor([0, n], dtype=torch.long),
                "head": torch.zeros(1, dtype=torch.long),
                "weight": torch.ones(1, dtype=dt),
                "num_atoms": n, "num_edges": int(data["edge_index"].shape[1]),
            }

        def evaluate(self, p, dtype):
            d = {k: v for k, v in p.items() if isinstance(v, torch.Tensor)}
            out = self.models[dtype](d, training=False, compute_force=True, compute_virials=False,
                                     compute_stress=False)
            return out["energy"].detach(), out["forces"].detach()

        def evaluate_end_to_end(self, p, dtype):
            # MACE's own neighbour list (mace.data.neighborhood.get_neighborhood, matscipy)
            from mace.data.neighborhood import get_neighborhood
            pos = p["positions"].detach().numpy().astype(np.float64)
            cell = p["cell"].reshape(3, 3).detach().numpy().astype(np.float64)
            edge_index, shifts, unit_shifts, _ = get_neighborhood(pos, cutoff=self.r_max, pbc=(True, True, True),
                                                                  cell=cell)
            dt = p["positions"].dtype
            q = dict(p, edge_index=torch.tensor(edge_index, dtype=torch.long), shifts=torch.tensor(shifts, dtype=dt),
                     unit_shifts=torch.tensor(unit_shifts, dtype=dt))
            return self.evaluate(q, dtype)

    return _Mace()
