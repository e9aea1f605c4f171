"""Error metrics, in one place: training epochs (:mod:`equiforce.training.loop`) and ``equiforce eval``
(:mod:`equiforce.deploy.evaluate`) both sum their errors in an :class:`ErrorAccumulator`.

Metrics (keys of :meth:`ErrorAccumulator.metrics`, :data:`METRIC_NAMES`):

* ``energy_mae_mev_per_atom``: mean over structures of ``|E - E_ref| / n_atoms`` (meV/atom)
* ``force_mae_mev_per_a``, ``force_rmse_mev_per_a``: over all Cartesian force components (meV/Å)
* ``stress_mae_mev_per_a3``: over the 9 components of the structures with a stress label (meV/Å^3)
* ``dipole_mae_e_a``: over the Cartesian components of the structures with a dipole label (e·Å)
* ``polarizability_mae_e_a2_per_v``: over the 9 components of the structures with a polarizability
  label (e·Å²/V)

A metric with no data is NaN. :class:`MetricsLog` writes them to a run's ``metrics.csv`` (one row
per SAVED epoch: the row is written after the epoch's checkpoint). This module imports only numpy
(torch tensors are converted).
"""
import csv
import math
import os
from typing import Dict, Optional, Sequence

import numpy as np

METRIC_NAMES = ("energy_mae_mev_per_atom", "force_mae_mev_per_a", "force_rmse_mev_per_a", "stress_mae_mev_per_a3",
                "dipole_mae_e_a", "polarizability_mae_e_a2_per_v")


CSV_COLUMNS = (["epoch", "lr", "train_loss", "val_loss"] + [f"train_{m}" for m in METRIC_NAMES]
               + [f"val_{m}" for m in METRIC_NAMES] + ["time_s"])


def _np(x) -> np.ndarray:
    """float64 numpy copy of a numpy array, a number or a (detached) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


class ErrorAccumulator:
    """Sums of absolute and squared errors per quantity (``energy`` per atom, ``forces``, ``stress``,
    ``dipole`` components, ``polarizability`` components); gives the weighted MSE loss and the metrics."""

    QUANTITIES = ("energy", "forces", "stress", "dipole", "polarizability")

    def __init__(self) -> None:
        # quantity -> [number of values, sum |e|, sum e^2]
        self.sums: Dict[str, list] = {q: [0, 0.0, 0.0] for q in self.QUANTITIES}

    def add_errors(self, energy_per_atom=None, forces=None, stress=None, dipole=None, polarizability=None) -> None:
        """Add prediction-minus-reference errors: energy per atom [B] (eV/atom), force components
        (any shape, eV/Å), stress components of labelled structures (eV/Å^3), dipole components
        of labelled structures (e·Å), polarizability components of labelled structures (e·Å²/V).
        ``None`` or empty adds nothing for that quantity."""
        for q, err in zip(self.QUANTITIES, (energy_per_atom, forces, stress, dipole, polarizability)):
            if err is None:
                continue
            e = _np(err).ravel()
            acc = self.sums[q]
            acc[0] += e.size
            acc[1] += float(np.abs(e).sum())
            acc[2] += float((e * e).sum())

    def add(self, pred: Dict, batch: dict) -> None:
        """Add a training batch: ``pred`` and ``batch`` as in :func:`equiforce.training.loop.predict`
        (energy [B], forces [N, 3], stress [B, 3, 3] with mask ``has_stress``, dipole [B, 3] with mask
        ``has_dipole``, polarizability [B, 3, 3] with mask ``has_polarizability``)."""
        de = (pred["energy"].detach() - batch["energy"]) / batch["natoms"].to(pred["energy"].dtype)
        df = pred["forces"].detach() - batch["forces"]
        mask = batch["has_stress"]
        ds = (pred["stress"].detach()[mask] - batch["stress"][mask]) if bool(mask.any()) else None
        dd = None
        if "dipole" in pred and "has_dipole" in batch and bool(batch["has_dipole"].any()):
            m = batch["has_dipole"]
            dd = pred["dipole"].detach()[m] - batch["dipole"][m]
        da = None
        if "polarizability" in pred and "has_polarizability" in batch and bool(batch["has_polarizability"].any()):
            m = batch["has_polarizability"]
            da = pred["polarizability"].detach()[m] - batch["polarizability"][m]
        self.add_errors(de, df, ds, dd, da)

    def _mean(self, q: str, which: int) -> float:
        n = self.sums[q][0]
        return self.sums[q][which] / n if n else float("nan")

    def loss(self, config) -> float:
        """Weighted sum of the mean squared errors over everything added, with the weights
        ``energy_weight``, ``forces_weight``, ``stress_weight``, ``dipole_weight``,
        ``polarizability_weight`` of ``config``
        (a :class:`equiforce.training.config.TrainConfig`); quantities with no data add nothing."""
        weights = (config.energy_weight, config.forces_weight, config.stress_weight, config.dipole_weight,
                   config.polarizability_weight)
        return sum(w * self._mean(q, 2) for q, w in zip(self.QUANTITIES, weights) if self.sums[q][0])

    def metrics(self) -> Dict[str, float]:
        """The metrics of the module docstring (NaN where nothing was added)."""
        return {
            "energy_mae_mev_per_atom": 1000.0 * self._mean("energy", 1),
            "force_mae_mev_per_a": 1000.0 * self._mean("forces", 1),
            "force_rmse_mev_per_a": 1000.0 * math.sqrt(self._mean("forces", 2)),
            "stress_mae_mev_per_a3": 1000.0 * self._mean("stress", 1),
            "dipole_mae_e_a": self._mean("dipole", 1),
            "polarizability_mae_e_a2_per_v": self._mean("polarizability", 1),
        }


def nan_to_none(metrics: Dict[str, float]) -> Dict[str, Optional[float]]:
    """The same dict with NaN metrics as ``None`` (JSON output of ``equiforce eval``)."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def _fmt(v: float) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"


class MetricsLog:
    """A run's ``metrics.csv`` (columns :data:`CSV_COLUMNS`, units in the names).

    ``MetricsLog(path, resume_epoch=None)`` starts a new file; with ``resume_epoch`` (the epoch of
    the checkpoint a run resumes from) it keeps the rows up to that epoch and drops any later ones,
    so a resumed run never repeats an epoch's row.
    """

    def __init__(self, path: str, resume_epoch: Optional[int] = None):
        self.path = path
        rows = []
        if resume_epoch is not None and os.path.isfile(path):
            with open(path, newline="") as fh:
                reader = csv.reader(fh)
                next(reader, None)
                for row in reader:
                    try:
                        if row and int(row[0]) <= resume_epoch:
                            rows.append(row)
                    except ValueError:
                        continue
        tmp = path + ".tmp"
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(rows)
        os.replace(tmp, path)

    def append(self, epoch: int, lr: float, train_loss: float, val_loss: float, train: Dict[str, float],
               val: Dict[str, float], time_s: float) -> None:
        """One row: the epoch, learning rate, losses, the train and validation metrics, elapsed seconds."""
        values: Sequence[float] = ([lr, train_loss, val_loss] + [train[m] for m in METRIC_NAMES]
                                   + [val[m] for m in METRIC_NAMES] + [time_s])
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh).writerow([epoch] + [_fmt(float(v)) for v in values])
