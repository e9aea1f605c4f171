"""Training loop: data -> model with fitted scale/shift -> optimiser steps -> checkpoints and metrics.

Run directory (``config.out``)::

    last.pt      checkpoint after the latest epoch (resume from it)
    best.pt      checkpoint with the lowest validation loss (export from it)
    metrics.csv  one row per epoch (units in the column names)

Loss (weights from the config)::

    L = w_E mean_b ((E_b - E_b^ref) / n_b)^2 + w_F mean_{i,a} (F_ia - F_ia^ref)^2 + w_S mean (S - S^ref)^2

in eV/atom, eV/Å and eV/Å^3; the stress term covers only structures that have a stress label.
Models with a dipole head (``model.dipole``) add ``w_mu mean (mu - mu^ref)^2`` (e·Å, per component,
structures with a dipole label only). Direct-force models (``model.direct_forces``) use the head's
forces in the force term instead of ``-dE/dr``. ``rotation_augmentation`` rotates every training
batch by random rotations (one per structure; positions, forces, stress, dipole and cell alike)
-- a no-op for exactly equivariant models, the way non-equivariant models learn the symmetry.
Validation uses the EMA weights when ``ema_decay > 0``, and those are the weights exported; the
training metrics of an epoch are accumulated batch by batch with the weights of that moment.

Scale and shift (:func:`fit_scale_shift`): per-species shift by least squares of the training
energies on the species counts (or ``atomic_energies`` from the config, isolated-atom energies),
scale = RMS of the training force components. The model returns exactly the shift for an isolated
atom, so when isolated-atom reference energies are known, ``atomic_energies`` makes the energy
easier to learn than the least-squares shift (which puts the mean per-atom energy there).
Metrics: energy MAE per atom (meV/atom), force MAE and RMSE over Cartesian components (meV/Å),
stress MAE over the 9 components (meV/Å^3).
"""
import contextlib
import csv
import math
import os
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .. import __version__
from ..errors import CheckpointError, ConfigError, DataError
from .config import TrainConfig
from ..data.dataset import Graph, average_num_neighbors, collate, load_dataset, split_indices
from ..model.forces import model_outputs
from ..model.network import EquiforceModel, ModelConfig
from ..o3.rotations import random_rotations

CHECKPOINT_KIND = "equiforce-checkpoint"
CHECKPOINT_VERSION = 1
DTYPES = {"float32": torch.float32, "float64": torch.float64}
METRIC_NAMES = ("energy_mae_mev_per_atom", "force_mae_mev_per_a", "force_rmse_mev_per_a", "stress_mae_mev_per_a3",
                "dipole_mae_e_a")
CSV_COLUMNS = (["epoch", "lr", "train_loss", "val_loss"] + [f"train_{m}" for m in METRIC_NAMES]
               + [f"val_{m}" for m in METRIC_NAMES] + ["time_s"])
# epochs whose validation loss is within this relative margin of the best do not count as improvements
IMPROVEMENT_RTOL = 1e-6


# ---------------------------------------------------------------------------------------------
# scale and shift
# ---------------------------------------------------------------------------------------------
def fit_scale_shift(graphs: Sequence[Graph], num_species: int,
                    known_shift: Optional[Dict[int, float]] = None) -> Tuple[Tensor, Tensor]:
    """Per-species ``(scale [S], shift [S])`` in eV (float64).

    shift: the ``known_shift`` values (isolated-atom energies) where given; the other species by
    least squares of the remaining energy ``E_b - sum_known count_bs shift_s ~ sum_s count_bs shift_s``
    over ``graphs`` (minimum-norm when the compositions do not determine it). scale: RMS of all force
    components (eV/Å), the same for every species; 1.0 when all forces are zero.
    """
    known = dict(known_shift or {})
    counts = np.zeros((len(graphs), num_species))
    energies = np.zeros(len(graphs))
    for b, g in enumerate(graphs):
        counts[b] = np.bincount(g["species"].numpy(), minlength=num_species)
        energies[b] = float(g["energy"])
    shift = np.zeros(num_species)
    for s, e in known.items():
        shift[s] = e
        energies -= counts[:, s] * e
    free = [s for s in range(num_species) if s not in known]
    if free:
        shift[free] = np.linalg.lstsq(counts[:, free], energies, rcond=None)[0]
    forces = torch.cat([g["forces"].reshape(-1) for g in graphs])
    rms = float(torch.sqrt((forces * forces).mean())) if forces.numel() else 0.0
    scale = np.full(num_species, rms if rms > 0 else 1.0)
    return torch.tensor(scale, dtype=torch.float64), torch.tensor(shift, dtype=torch.float64)


def is_isolated_atom(g: Graph) -> bool:
    """A single atom with no periodic direction: the reference energy of its species."""
    return int(g["pos"].shape[0]) == 1 and not bool(g["pbc"].any())


def isolated_atom_energies(graphs: Sequence[Graph], species: Sequence[str]) -> Dict[str, float]:
    """Energies (eV) of the isolated-atom structures in ``graphs`` by element (MACE's "E0s" frames).
    Two different energies for the same element are an error."""
    out: Dict[str, float] = {}
    for g in graphs:
        if is_isolated_atom(g):
            name = species[int(g["species"][0])]
            e = float(g["energy"])
            if name in out and abs(out[name] - e) > 1e-8:
                raise DataError(f"the data holds two isolated-atom energies for {name} ({out[name]} and {e} eV); "
                                "keep one")
            out[name] = e
    return out


# ---------------------------------------------------------------------------------------------
# exponential moving average of the weights
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# predictions, loss and metrics
# ---------------------------------------------------------------------------------------------
def predict(model: nn.Module, batch: dict, create_graph: bool) -> Dict[str, Tensor]:
    """Energies [B] (eV), forces [N, 3] (eV/Å; the head's for direct-force models), ASE stress
    [B, 3, 3] (eV/Å^3; 0 if not periodic) and, for dipole models, dipoles [B, 3] (e·Å)."""
    with torch.enable_grad():
        out = model_outputs(model, batch["pos"], batch["species"], batch["edge_index"], batch["edge_shift"],
                            batch["batch"], batch["num_graphs"], create_graph=create_graph,
                            total_charge=batch.get("total_charge"), cell=_long_range_cell(model, batch))
    virial = out["virial"]
    volume = torch.linalg.det(batch["cell"]).abs()
    safe = torch.where(volume > 0, volume, torch.ones_like(volume))
    stress = -virial / safe.view(-1, 1, 1) * (volume > 0).to(virial.dtype).view(-1, 1, 1)
    pred = {"energy": out["energy"], "forces": out["forces"], "stress": stress}
    if "dipole" in out:
        pred["dipole"] = out["dipole"]
    return pred


def _long_range_cell(model: nn.Module, batch: dict) -> Optional[Tensor]:
    """Cells [B, 3, 3] for the electrostatics of a long-range model (zeros for molecules), else None."""
    if not bool(getattr(model, "has_long_range", False)):
        return None
    pbc = batch["pbc"].to(torch.bool)
    full = pbc.all(dim=1)
    if bool((pbc.any(dim=1) & ~full).any()):
        raise DataError("model.long_range needs fully periodic structures (pbc=T T T) or molecules (pbc=F F F); "
                        "the data has partly periodic ones (slabs/wires), which the Ewald sum does not cover")
    return batch["cell"] * full.to(batch["cell"].dtype).view(-1, 1, 1)


def rotate_batch(batch: dict, rotations: Tensor) -> dict:
    """A copy of ``batch`` with structure ``b`` rotated by ``rotations[b]`` [B, 3, 3] (row vectors:
    ``r -> r R^T``): positions, edge shifts, cells, forces, dipoles and stress (``R S R^T``)."""
    rot = rotations.to(batch["pos"].dtype)
    atom_rot = rot.index_select(0, batch["batch"])                                   # [N, 3, 3]
    edge_rot = atom_rot.index_select(0, batch["edge_index"][0])                      # [E, 3, 3]
    out = dict(batch)
    out["pos"] = torch.einsum("nij,nj->ni", atom_rot, batch["pos"])
    out["forces"] = torch.einsum("nij,nj->ni", atom_rot, batch["forces"])
    out["edge_shift"] = torch.einsum("eij,ej->ei", edge_rot, batch["edge_shift"])
    out["cell"] = torch.einsum("bij,bkj->bki", rot, batch["cell"])
    out["stress"] = rot @ batch["stress"] @ rot.transpose(1, 2)
    if "dipole" in batch:
        out["dipole"] = torch.einsum("bij,bj->bi", rot, batch["dipole"])
    return out


class ErrorAccumulator:
    """Sums of absolute and squared errors over batches; gives MSE terms and metrics in meV."""

    def __init__(self) -> None:
        self.n_struct = 0
        self.e_abs = self.e_sq = 0.0
        self.n_comp = 0
        self.f_abs = self.f_sq = 0.0
        self.n_stress = 0
        self.s_abs = self.s_sq = 0.0
        self.n_dipole = 0
        self.d_abs = self.d_sq = 0.0

    @torch.no_grad()
    def add(self, pred: Dict[str, Tensor], batch: dict) -> None:
        de = ((pred["energy"] - batch["energy"]) / batch["natoms"].to(pred["energy"].dtype)).double()
        self.n_struct += de.numel()
        self.e_abs += float(de.abs().sum())
        self.e_sq += float((de * de).sum())
        df = (pred["forces"] - batch["forces"]).double()
        self.n_comp += df.numel()
        self.f_abs += float(df.abs().sum())
        self.f_sq += float((df * df).sum())
        mask = batch["has_stress"]
        if bool(mask.any()):
            ds = (pred["stress"][mask] - batch["stress"][mask]).double()
            self.n_stress += ds.numel()
            self.s_abs += float(ds.abs().sum())
            self.s_sq += float((ds * ds).sum())
        if "dipole" in pred and "has_dipole" in batch and bool(batch["has_dipole"].any()):
            mask = batch["has_dipole"]
            dd = (pred["dipole"][mask] - batch["dipole"][mask]).double()
            self.n_dipole += dd.numel()
            self.d_abs += float(dd.abs().sum())
            self.d_sq += float((dd * dd).sum())

    def loss(self, config: TrainConfig) -> float:
        total = 0.0
        if self.n_struct:
            total += config.energy_weight * self.e_sq / self.n_struct
        if self.n_comp:
            total += config.forces_weight * self.f_sq / self.n_comp
        if self.n_stress:
            total += config.stress_weight * self.s_sq / self.n_stress
        if self.n_dipole:
            total += config.dipole_weight * self.d_sq / self.n_dipole
        return total

    def metrics(self) -> Dict[str, float]:
        nan = float("nan")
        return {
            "energy_mae_mev_per_atom": 1000.0 * self.e_abs / self.n_struct if self.n_struct else nan,
            "force_mae_mev_per_a": 1000.0 * self.f_abs / self.n_comp if self.n_comp else nan,
            "force_rmse_mev_per_a": 1000.0 * math.sqrt(self.f_sq / self.n_comp) if self.n_comp else nan,
            "stress_mae_mev_per_a3": 1000.0 * self.s_abs / self.n_stress if self.n_stress else nan,
            "dipole_mae_e_a": self.d_abs / self.n_dipole if self.n_dipole else nan,
        }


def batch_loss(pred: Dict[str, Tensor], batch: dict, config: TrainConfig) -> Tensor:
    """Weighted MSE loss of one batch (see the module docstring)."""
    de = (pred["energy"] - batch["energy"]) / batch["natoms"].to(pred["energy"].dtype)
    loss = config.energy_weight * (de * de).mean()
    df = pred["forces"] - batch["forces"]
    loss = loss + config.forces_weight * (df * df).mean()
    mask = batch["has_stress"]
    if config.stress_weight > 0 and bool(mask.any()):
        ds = pred["stress"][mask] - batch["stress"][mask]
        loss = loss + config.stress_weight * (ds * ds).mean()
    if "dipole" in pred and config.dipole_weight > 0 and bool(batch["has_dipole"].any()):
        dd = pred["dipole"][batch["has_dipole"]] - batch["dipole"][batch["has_dipole"]]
        loss = loss + config.dipole_weight * (dd * dd).mean()
    return loss


def evaluate_graphs(model: nn.Module, graphs: Sequence[Graph], batch_size: int, dtype: torch.dtype,
                    device: torch.device) -> ErrorAccumulator:
    """Errors of ``model`` on ``graphs`` (no parameter gradients kept)."""
    acc = ErrorAccumulator()
    for start in range(0, len(graphs), batch_size):
        batch = collate(graphs[start:start + batch_size], dtype, device)
        pred = predict(model, batch, create_graph=False)
        acc.add({k: v.detach() for k, v in pred.items()}, batch)
    return acc


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically (temporary file + rename), so an interrupted run never leaves half a file."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by :func:`train`, with clear errors for missing or corrupt files."""
    if os.path.isdir(path):
        raise CheckpointError(f"'{path}' is a directory; give a checkpoint file such as {os.path.join(path, 'best.pt')}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist; train first with `equiforce train`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint '{path}' is corrupt or not a checkpoint ({first}); "
                              "use another checkpoint of the run or train again") from None
    if not isinstance(state, dict) or state.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"'{path}' is not an equiforce training checkpoint")
    if state.get("checkpoint_version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint '{path}' has version {state.get('checkpoint_version')}; this equiforce "
                              f"reads version {CHECKPOINT_VERSION}")
    missing = [k for k in ("config", "species", "model_state", "epoch") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint '{path}' is incomplete (missing {missing}); train again")
    return state


def build_model(model_config: ModelConfig, species: List[str]) -> EquiforceModel:
    return EquiforceModel(model_config, list(species))


def init_model(config: TrainConfig, species: List[str], train_graphs: Sequence[Graph],
               isolated: Optional[Dict[str, float]] = None) -> Tuple[EquiforceModel, TrainConfig]:
    """The untrained model of a run: seeded initial weights, ``avg_num_neighbors`` from the training
    graphs, fitted scale/shift, in the configured dtype. Returns it with the completed config.

    Shifts: ``config.atomic_energies`` when set (every species), else the ``isolated`` atom energies
    found in the data for their species and least squares for the rest."""
    torch.manual_seed(config.seed)
    mc = ModelConfig.from_dict({**config.model.to_dict(), "avg_num_neighbors": average_num_neighbors(train_graphs)})
    config = config.replace(model=mc)
    model = build_model(config.model, species)
    known = {species.index(name): e for name, e in (isolated or {}).items() if name in species}
    scale, shift = fit_scale_shift(train_graphs, len(species), known)
    if config.atomic_energies is not None:
        missing = [s for s in species if s not in config.atomic_energies]
        if missing:
            raise ConfigError(f"atomic_energies lacks {missing}; give an energy (eV) for every species in the "
                              f"data {species} or remove atomic_energies to fit the shifts by least squares")
        shift = torch.tensor([config.atomic_energies[s] for s in species], dtype=torch.float64)
    model = model.to(DTYPES[config.dtype])
    model.set_scale_shift(scale, shift)
    if config.model.dipole != "none":
        labelled = [g["dipole"] for g in train_graphs if bool(g.get("has_dipole", torch.tensor(False)))]
        if not labelled:
            raise DataError(f"model.dipole is '{config.model.dipole}' but no training structure has a dipole label "
                            f"'{config.dipole_key}'; add dipoles (e·Å) to the data (e.g. `equiforce datagen --dipole`) "
                            "or set model.dipole to none")
        rms = float(torch.sqrt((torch.stack(labelled) ** 2).mean()))
        model.set_dipole_scale(rms if rms > 0 else 1.0)
    return model, config


def model_from_checkpoint(state: dict, use_ema: bool = True) -> Tuple[EquiforceModel, TrainConfig]:
    """Rebuild the model of a checkpoint (EMA weights when present and ``use_ema``)."""
    try:
        config = TrainConfig.from_dict(state["config"])
        model = build_model(config.model, state["species"]).to(DTYPES[config.dtype])
        model.load_state_dict(state["model_state"])
        if use_ema and state.get("ema_state") is not None:
            ema = EMA(model, state["ema_state"]["decay"])
            ema.load_state_dict(state["ema_state"])
            ema.copy_to(model)
    except (ConfigError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint does not match this version of the model ({str(exc).splitlines()[0]})") from None
    return model, config


def _example_structure(g: Graph) -> Dict[str, Tensor]:
    return {k: g[k] for k in ("pos", "species", "edge_index", "edge_shift", "cell")}


# ---------------------------------------------------------------------------------------------
# the training loop
# ---------------------------------------------------------------------------------------------
RESUMABLE = ("epochs", "max_minutes", "early_stopping_patience", "num_threads", "device")


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    if config.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=config.plateau_factor, patience=config.plateau_patience, min_lr=config.min_lr)
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs, eta_min=config.min_lr)
    return None


def _fmt(v: float) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"


def train(config: TrainConfig, resume: bool = False, progress: bool = True,
          log: Callable[[str], None] = print, resume_overrides: Optional[Dict[str, object]] = None) -> dict:
    """Train (or resume) a model as described by ``config``; returns a summary dict.

    ``resume=True`` continues from ``<out>/last.pt``: the saved configuration is used, except the
    settings in :data:`RESUMABLE` given in ``resume_overrides``. The epoch count continues.
    torch's thread count is restored on return when ``num_threads`` changed it.
    """
    threads = torch.get_num_threads()
    try:
        return _train(config, resume, progress, log, resume_overrides)
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainConfig, resume: bool, progress: bool, log: Callable[[str], None],
           resume_overrides: Optional[Dict[str, object]]) -> dict:
    out = config.out
    last_path, best_path = os.path.join(out, "last.pt"), os.path.join(out, "best.pt")
    csv_path = os.path.join(out, "metrics.csv")
    state = None
    if resume:
        state = load_checkpoint(last_path)
        saved = TrainConfig.from_dict(state["config"])
        changes = {k: v for k, v in (resume_overrides or {}).items() if v is not None}
        if "data" in changes and os.path.abspath(str(changes["data"])) != os.path.abspath(saved.data):
            raise ConfigError(f"the run in '{out}' was trained on '{saved.data}', not '{changes['data']}'; "
                              "resume with the same data or start a new run with another --out")
        changes.pop("data", None)
        bad = sorted(set(changes) - set(RESUMABLE))
        if bad:
            raise ConfigError(f"cannot change {bad} when resuming (only {list(RESUMABLE)}); "
                              "start a new run with another --out to change them")
        config = saved.replace(**changes, out=out)
    elif os.path.exists(last_path):
        raise ConfigError(f"run directory '{out}' already holds a checkpoint; pass --resume to continue it "
                          "or choose another --out")
    if not config.data:
        raise ConfigError("no training data given; pass --data FILE.extxyz (or set 'data' in the config)")
    if state is None:
        config = config.replace(data=os.path.abspath(config.data))  # resumable from any directory
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{config.device}' requested but CUDA is not available; use --device cpu")
    dtype = DTYPES[config.dtype]
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    species = None if state is None else list(state["species"])
    graphs, species = load_dataset(config.data, config.model.r_max, species, config.energy_key,
                                   config.forces_key, config.stress_key, config.dipole_key, config.charge_key)
    # single isolated atoms are reference energies (the species shifts), not training structures
    isolated = isolated_atom_energies(graphs, species)
    graphs = [g for g in graphs if not is_isolated_atom(g)]
    if not graphs:
        raise DataError(f"'{config.data}' holds only isolated atoms; add structures to train on")
    if isolated and progress:
        print("equiforce train: isolated-atom energies used as species shifts: "
              + ", ".join(f"{k} {v:.6f} eV" for k, v in isolated.items()), file=sys.stderr)
    if state is None:
        train_idx, val_idx, test_idx = split_indices(len(graphs), config.val_fraction, config.test_fraction, config.seed)
    else:
        split = state["split"]
        train_idx, val_idx, test_idx = list(split["train"]), list(split["val"]), list(split["test"])
        if max(train_idx + val_idx + test_idx) >= len(graphs):
            raise DataError(f"'{config.data}' has {len(graphs)} structures, fewer than when the run started; "
                            "resume with the same data file")
    train_graphs = [graphs[k] for k in train_idx]
    val_graphs = [graphs[k] for k in val_idx]

    if state is None:
        model, config = init_model(config, species, train_graphs, isolated)
        model = model.to(device=device)
    else:
        torch.manual_seed(config.seed)
        model, _ = model_from_checkpoint(state, use_ema=False)
        model = model.to(device=device, dtype=dtype)
    optimizer = _make_optimizer(model, config)
    scheduler = _make_scheduler(optimizer, config)
    ema = EMA(model, config.ema_decay) if config.ema_decay > 0 else None
    start_epoch, best_loss, best_epoch, bad_epochs = 1, math.inf, 0, 0
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer_state"])
            if scheduler is not None and state.get("scheduler_state") is not None:
                scheduler.load_state_dict(state["scheduler_state"])
                if config.scheduler == "cosine":
                    scheduler.T_max = config.epochs
            if ema is not None and state.get("ema_state") is not None:
                ema.load_state_dict(state["ema_state"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint '{last_path}' cannot be resumed ({str(exc).splitlines()[0]})") from None
        start_epoch = int(state["epoch"]) + 1
        best_loss, best_epoch = float(state["best_loss"]), int(state["best_epoch"])
        bad_epochs = int(state["bad_epochs"])

    os.makedirs(out, exist_ok=True)
    if state is None or not os.path.isfile(csv_path):
        with open(csv_path, "w", newline="") as fh:
            csv.writer(fh).writerow(CSV_COLUMNS)
    log(f"equiforce {__version__}: {len(train_graphs)} train / {len(val_graphs)} val / {len(test_idx)} test "
        f"structures, species {species}, {sum(p.numel() for p in model.parameters())} parameters, "
        f"{config.dtype} on {device}" + (f", resuming at epoch {start_epoch}" if state else ""))

    t0 = time.monotonic()
    deadline = t0 + 60.0 * config.max_minutes if config.max_minutes else None
    prior_time = float(state.get("elapsed_s", 0.0)) if state else 0.0
    stop_reason = "epochs"
    epoch = start_epoch - 1
    split = {"train": train_idx, "val": val_idx, "test": test_idx}
    from tqdm import tqdm

    for epoch in range(start_epoch, config.epochs + 1):
        model.train()
        order = np.random.default_rng([config.seed, epoch]).permutation(len(train_graphs))
        aug_rng = np.random.default_rng([config.seed, epoch, 1])
        batches = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        acc = ErrorAccumulator()
        timed_out = False
        bar = tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=not progress,
                   dynamic_ncols=True)
        for idx in bar:
            batch = collate([train_graphs[k] for k in idx], dtype, device)
            if config.rotation_augmentation:
                rots = random_rotations(len(idx), aug_rng)
                batch = rotate_batch(batch, torch.from_numpy(rots).to(device))
            optimizer.zero_grad(set_to_none=True)
            pred = predict(model, batch, create_graph=True)
            loss = batch_loss(pred, batch, config)
            if not torch.isfinite(loss):
                raise RuntimeError(f"training diverged at epoch {epoch} (loss {float(loss)}); "
                                   "lower lr or use --dtype float64")
            loss.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update(model)
            acc.add({k: v.detach() for k, v in pred.items()}, batch)
            bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
            if deadline is not None and time.monotonic() > deadline:
                timed_out = True
                break
        bar.close()

        model.eval()
        ctx = ema.applied(model) if ema is not None else contextlib.nullcontext()
        with ctx:
            val = evaluate_graphs(model, val_graphs, config.batch_size, dtype, device) if val_graphs else acc
        val_loss, train_loss = val.loss(config), acc.loss(config)
        lr = optimizer.param_groups[0]["lr"]
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val_loss)
        elif scheduler is not None:
            scheduler.step()
        improved = val_loss < best_loss * (1.0 - IMPROVEMENT_RTOL)
        if improved:
            best_loss, best_epoch, bad_epochs = val_loss, epoch, 0
        else:
            bad_epochs += 1
        elapsed = prior_time + time.monotonic() - t0
        tm, vm = acc.metrics(), val.metrics()
        row = [epoch, lr, train_loss, val_loss] + [tm[m] for m in METRIC_NAMES] + [vm[m] for m in METRIC_NAMES] + [elapsed]
        with open(csv_path, "a", newline="") as fh:
            csv.writer(fh).writerow([row[0]] + [_fmt(float(v)) for v in row[1:]])
        ckpt = {
            "kind": CHECKPOINT_KIND, "checkpoint_version": CHECKPOINT_VERSION, "equiforce_version": __version__,
            "config": config.to_dict(), "species": list(species), "model_state": model.state_dict(),
            "ema_state": ema.state_dict() if ema is not None else None,
            "optimizer_state": optimizer.state_dict(),
            "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
            "epoch": epoch, "best_loss": best_loss, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
            "split": split, "metrics": {"train": tm, "val": vm, "train_loss": train_loss, "val_loss": val_loss},
            "elapsed_s": elapsed, "example_structure": _example_structure(train_graphs[0]),
        }
        if improved:
            save_checkpoint(best_path, ckpt)
        save_checkpoint(last_path, ckpt)
        log(f"epoch {epoch:4d}  lr {lr:.3g}  loss {train_loss:.4g}/{val_loss:.4g}  "
            f"E {vm['energy_mae_mev_per_atom']:.3g} meV/atom  F {vm['force_mae_mev_per_a']:.3g} meV/A"
            + ("" if math.isnan(vm["dipole_mae_e_a"]) else f"  mu {vm['dipole_mae_e_a']:.3g} eA")
            + ("  *" if improved else ""))
        if timed_out:
            stop_reason = "max_minutes"
            break
        if config.early_stopping_patience and bad_epochs >= config.early_stopping_patience:
            stop_reason = "early_stopping"
            break
    log(f"stopped ({stop_reason}) after epoch {epoch}; best epoch {best_epoch} (val loss {best_loss:.4g}) "
        f"saved in {best_path}")
    return {"out": out, "epoch": epoch, "best_epoch": best_epoch, "best_loss": best_loss, "stop_reason": stop_reason,
            "species": species, "config": config}
