"""Learning curves of a run directory (``equiforce plot run/``) from its metrics.csv, as a PNG."""
import csv
import math
import os
from typing import Dict, List, Optional

from ..errors import DataError


def read_metrics(path: str) -> Dict[str, List[float]]:
    """Columns of a metrics.csv as lists of floats (NaN for empty cells)."""
    if not os.path.isfile(path):
        raise DataError(f"'{path}' does not exist; give a run directory written by `equiforce train`")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise DataError(f"'{path}' has no epochs yet; train at least one epoch before plotting")
    cols: Dict[str, List[float]] = {k: [] for k in rows[0]}
    for row in rows:
        for k in cols:
            v = row.get(k, "")
            try:
                cols[k].append(float(v) if v not in ("", None) else math.nan)
            except ValueError:
                raise DataError(f"'{path}' is not a metrics file written by equiforce (column {k}: {v!r})") from None
    if "epoch" not in cols:
        raise DataError(f"'{path}' has no 'epoch' column; it is not an equiforce metrics file")
    return cols


def plot_run(run_dir: str, output: Optional[str] = None) -> str:
    """Draw loss, energy MAE and force MAE against epoch; returns the PNG path
    (default ``<run_dir>/learning_curves.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.isdir(run_dir):
        raise DataError(f"run directory '{run_dir}' does not exist")
    cols = read_metrics(os.path.join(run_dir, "metrics.csv"))
    output = output or os.path.join(run_dir, "learning_curves.png")
    panels = [("loss", "loss (weighted MSE)"), ("energy_mae_mev_per_atom", "energy MAE (meV/atom)"),
              ("force_mae_mev_per_a", "force MAE (meV/Å)")]
    if any(not math.isnan(v) for v in cols.get("val_stress_mae_mev_per_a3", [])):
        panels.append(("stress_mae_mev_per_a3", "stress MAE (meV/Å³)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    epoch = cols["epoch"]
    for ax, (key, label) in zip(axes, panels):
        for split, style in (("train", "-"), ("val", "--")):
            values = cols.get(f"{split}_{key}")
            if values and any(not math.isnan(v) and v > 0 for v in values):
                ax.plot(epoch, values, style, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if any(v > 0 for v in cols.get(f"train_{key}", []) if not math.isnan(v)):
            ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output
