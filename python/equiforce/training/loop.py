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
stress MAE over the 9 components (meV/Å^3), see :mod:`equiforce.training.metrics`.

Structure: :func:`_setup` (configuration, data, model, optimiser; resume checks), :func:`_train_epoch`
(one pass), :func:`_validate`, then the epoch's checkpoints (:mod:`equiforce.training.checkpoints`,
atomic) and only then its metrics.csv row, so a failed write never leaves a row for an unsaved
epoch. EMA: :mod:`equiforce.training.ema`. A resumed run checks that the data file is unchanged
(sha256 recorded at the start) and accepts flags equal to the saved settings.
"""
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .. import __version__
from ..errors import CheckpointError, ConfigError, DataError
from ..deploy.ops import load_ops
from ..data.dataset import Graph, average_num_neighbors, collate, load_dataset, split_indices
from ..model.forces import model_outputs
from ..model.network import EquiforceModel, ModelConfig
from ..o3.rotations import random_rotations
from ..units import dtype_from_name
from .checkpoints import (CHECKPOINT_KIND, CHECKPOINT_VERSION, build_model, data_digest, load_checkpoint,  # noqa: F401
                          model_from_checkpoint, save_checkpoint)
from .config import TrainConfig
from .ema import EMA
from .metrics import ErrorAccumulator, MetricsLog

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
# the untrained model
# ---------------------------------------------------------------------------------------------
def init_model(config: TrainConfig, species: List[str], train_graphs: Sequence[Graph],
               isolated: Optional[Dict[str, float]] = None) -> Tuple[EquiforceModel, TrainConfig]:
    """The untrained model of a run: seeded initial weights, ``avg_num_neighbors`` from the training
    graphs, fitted scale/shift, in the configured dtype. Returns it with the completed config.

    Shifts: ``config.atomic_energies`` when set (every species), else the ``isolated`` atom energies
    found in the data for their species and least squares for the rest."""
    torch.manual_seed(config.seed)
    if not any(int(g["edge_index"].shape[1]) for g in train_graphs):
        raise DataError(f"no two atoms of the training structures in '{config.data}' are closer than the cutoff "
                        f"r_max = {config.model.r_max:g} Å, so the model would have no interactions; use a larger "
                        "cutoff (--r-max, typically 4-6 Å for molecules and solids)")
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
    model = model.to(dtype_from_name(config.dtype))
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


def _example_structure(g: Graph) -> Dict[str, Tensor]:
    return {k: g[k] for k in ("pos", "species", "edge_index", "edge_shift", "cell")}


# ---------------------------------------------------------------------------------------------
# the training loop: setup, one epoch, one checkpoint
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


@dataclass
class _Run:
    """Everything one training run holds between epochs."""
    config: TrainConfig
    state: Optional[dict]        # the checkpoint resumed from, or None
    device: torch.device
    dtype: torch.dtype
    species: List[str]
    train_graphs: List[Graph]
    val_graphs: List[Graph]
    split: Dict[str, List[int]]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    ema: Optional[EMA]
    data_digest: str
    start_epoch: int = 1
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    prior_time: float = 0.0

    @property
    def last_path(self) -> str:
        return os.path.join(self.config.out, "last.pt")

    @property
    def best_path(self) -> str:
        return os.path.join(self.config.out, "best.pt")


def _saved_value(config: TrainConfig, key: str):
    """The value of a (dotted, e.g. ``model.channels``) setting in ``config``."""
    obj = config
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _resume_config(config: TrainConfig, resume_overrides: Optional[Dict[str, object]]) -> Tuple[TrainConfig, dict]:
    """The saved configuration of the run in ``config.out`` with the allowed overrides applied, and
    its ``last.pt``. Flags equal to the saved values are accepted; others must be in :data:`RESUMABLE`."""
    out = config.out
    last_path = os.path.join(out, "last.pt")
    if not os.path.isfile(last_path):
        raise ConfigError(f"nothing to resume in '{out}': '{last_path}' does not exist; run without --resume to "
                          "start a new run there (with the same flags), or give the run's directory with --out")
    state = load_checkpoint(last_path)
    saved = TrainConfig.from_dict(state["config"])
    changes = {k: v for k, v in (resume_overrides or {}).items() if v is not None}
    if "data" in changes and os.path.abspath(str(changes["data"])) != os.path.abspath(saved.data):
        raise ConfigError(f"the run in '{out}' was trained on '{saved.data}', not '{changes['data']}'; "
                          "resume with the same data or start a new run with another --out")
    changes.pop("data", None)
    changes = {k: v for k, v in changes.items() if k in RESUMABLE or _saved_value(saved, k) != v}
    bad = sorted(set(changes) - set(RESUMABLE))
    if bad:
        was = ", ".join(f"{k} = {_saved_value(saved, k)!r}" for k in bad)
        raise ConfigError(f"cannot change {bad} when resuming (the run has {was}; only {list(RESUMABLE)} may "
                          "change); start a new run with another --out to change them")
    return saved.replace(**changes, out=out), state


def _load_split(config: TrainConfig, state: Optional[dict], progress: bool):
    """Species, training and validation graphs and the split of a run (the saved split on resume)."""
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
    split = {"train": train_idx, "val": val_idx, "test": test_idx}
    return species, [graphs[k] for k in train_idx], [graphs[k] for k in val_idx], split, isolated


def check_run_directory(out: str) -> None:
    """ConfigError unless ``out`` is a directory or can be created as one (checked before any work)."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out '{out}' is an existing file, not a run directory; give a directory (new or from "
                          "an earlier run; it is created when missing), e.g. --out run2")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.lexists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"cannot create the run directory '{out}': '{parent}' exists and is not a directory; "
                          "choose another --out")
    if not os.path.isdir(out) and not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create the run directory '{out}': no write permission in '{parent}'; "
                          "choose another --out")


def _setup(config: TrainConfig, resume: bool, progress: bool,
           resume_overrides: Optional[Dict[str, object]]) -> _Run:
    """Configuration, data, model, optimiser, scheduler and EMA of a new or resumed run."""
    state = None
    if resume:
        config, state = _resume_config(config, resume_overrides)
    elif os.path.exists(os.path.join(config.out, "last.pt")):
        raise ConfigError(f"run directory '{config.out}' already holds a checkpoint; pass --resume to continue it "
                          "or choose another --out")
    if not config.data:
        raise ConfigError("no training data given; pass --data FILE.extxyz (or set 'data' in the config)")
    check_run_directory(config.out)
    if state is None:
        config = config.replace(data=os.path.abspath(config.data))  # resumable from any directory
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{config.device}' requested but CUDA is not available; use --device cpu")
    dtype = dtype_from_name(config.dtype)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    digest = data_digest(config.data) if os.path.isfile(config.data) else ""
    if state is not None and state.get("data_digest") and digest != state["data_digest"]:
        raise DataError(f"'{config.data}' changed since the run in '{config.out}' started (its sha256 differs from "
                        "the one recorded in last.pt): resuming would silently train and validate on other "
                        "structures; restore the original file, or start a new run with another --out")
    species, train_graphs, val_graphs, split, isolated = _load_split(config, state, progress)

    if state is None:
        model, config = init_model(config, species, train_graphs, isolated)
        model = model.to(device=device)
    else:
        torch.manual_seed(config.seed)
        model, _ = model_from_checkpoint(state, use_ema=False)
        model = model.to(device=device, dtype=dtype)
    if (config.fused_kernels and device.type == "cpu" and load_ops()
            and hasattr(torch.ops.equiforce, "tp_scatter_backward")):
        # message passing through the compiled op, with its second derivatives (force loss)
        model.use_fused_kernels(True, double_backward=True)
    optimizer = _make_optimizer(model, config)
    scheduler = _make_scheduler(optimizer, config)
    ema = EMA(model, config.ema_decay) if config.ema_decay > 0 else None
    run = _Run(config=config, state=state, device=device, dtype=dtype, species=species, train_graphs=train_graphs,
               val_graphs=val_graphs, split=split, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema,
               data_digest=digest)
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
            raise CheckpointError(f"checkpoint '{run.last_path}' cannot be resumed "
                                  f"({str(exc).splitlines()[0]})") from None
        run.start_epoch = int(state["epoch"]) + 1
        run.best_loss, run.best_epoch = float(state["best_loss"]), int(state["best_epoch"])
        run.bad_epochs = int(state["bad_epochs"])
        run.prior_time = float(state.get("elapsed_s", 0.0))
    return run


def _train_epoch(run: _Run, epoch: int, deadline: Optional[float], progress: bool) -> Tuple[ErrorAccumulator, bool]:
    """One pass over the training graphs (seeded shuffle and augmentation); returns the training
    errors and whether the time limit was hit."""
    from tqdm import tqdm

    config, model = run.config, run.model
    model.train()
    order = np.random.default_rng([config.seed, epoch]).permutation(len(run.train_graphs))
    aug_rng = np.random.default_rng([config.seed, epoch, 1])
    batches = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    acc = ErrorAccumulator()
    timed_out = False
    bar = tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=not progress, dynamic_ncols=True)
    for idx in bar:
        batch = collate([run.train_graphs[k] for k in idx], run.dtype, run.device)
        if config.rotation_augmentation:
            rots = random_rotations(len(idx), aug_rng)
            batch = rotate_batch(batch, torch.from_numpy(rots).to(run.device))
        run.optimizer.zero_grad(set_to_none=True)
        pred = predict(model, batch, create_graph=True)
        loss = batch_loss(pred, batch, config)
        if not torch.isfinite(loss):
            raise RuntimeError(f"training diverged at epoch {epoch} (loss {float(loss)}); "
                               "lower lr or use --dtype float64")
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        run.optimizer.step()
        if run.ema is not None:
            run.ema.update(model)
        acc.add({k: v.detach() for k, v in pred.items()}, batch)
        bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
        if deadline is not None and time.monotonic() > deadline:
            timed_out = True
            break
    bar.close()
    return acc, timed_out


def _validate(run: _Run, acc: ErrorAccumulator) -> ErrorAccumulator:
    """Validation errors (EMA weights when on; the training errors when there is no validation set)."""
    run.model.eval()
    ctx = run.ema.applied(run.model) if run.ema is not None else contextlib.nullcontext()
    with ctx:
        if not run.val_graphs:
            return acc
        return evaluate_graphs(run.model, run.val_graphs, run.config.batch_size, run.dtype, run.device)


def _checkpoint_state(run: _Run, epoch: int, metrics: dict, elapsed: float) -> dict:
    return {
        "kind": CHECKPOINT_KIND, "checkpoint_version": CHECKPOINT_VERSION, "equiforce_version": __version__,
        "config": run.config.to_dict(), "species": list(run.species), "model_state": run.model.state_dict(),
        "ema_state": run.ema.state_dict() if run.ema is not None else None,
        "optimizer_state": run.optimizer.state_dict(),
        "scheduler_state": run.scheduler.state_dict() if run.scheduler is not None else None,
        "epoch": epoch, "best_loss": run.best_loss, "best_epoch": run.best_epoch, "bad_epochs": run.bad_epochs,
        "split": run.split, "metrics": metrics, "elapsed_s": elapsed,
        "example_structure": _example_structure(run.train_graphs[0]), "data_digest": run.data_digest,
    }


def train(config: TrainConfig, resume: bool = False, progress: bool = True,
          log: Callable[[str], None] = print, resume_overrides: Optional[Dict[str, object]] = None) -> dict:
    """Train (or resume) a model as described by ``config``; returns a summary dict.

    ``resume=True`` continues from ``<out>/last.pt``: the saved configuration is used, except the
    settings in :data:`RESUMABLE` given in ``resume_overrides`` (other settings may be given with
    their saved values). The epoch count continues; the data file must be unchanged (sha256).
    torch's thread count is restored on return when ``num_threads`` changed it.
    """
    threads = torch.get_num_threads()
    try:
        return _train(config, resume, progress, log, resume_overrides)
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainConfig, resume: bool, progress: bool, log: Callable[[str], None],
           resume_overrides: Optional[Dict[str, object]]) -> dict:
    run = _setup(config, resume, progress, resume_overrides)
    config = run.config
    try:
        os.makedirs(config.out, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the run directory '{config.out}' ({exc.strerror}); choose another --out") \
            from None
    metrics_log = MetricsLog(os.path.join(config.out, "metrics.csv"),
                             resume_epoch=run.start_epoch - 1 if run.state is not None else None)
    log(f"equiforce {__version__}: {len(run.train_graphs)} train / {len(run.val_graphs)} val / "
        f"{len(run.split['test'])} test structures, species {run.species}, "
        f"{sum(p.numel() for p in run.model.parameters())} parameters, {config.dtype} on {run.device}"
        + (f", resuming at epoch {run.start_epoch}" if run.state else ""))

    t0 = time.monotonic()
    deadline = t0 + 60.0 * config.max_minutes if config.max_minutes else None
    stop_reason = "epochs"
    epoch = run.start_epoch - 1
    for epoch in range(run.start_epoch, config.epochs + 1):
        acc, timed_out = _train_epoch(run, epoch, deadline, progress)
        val = _validate(run, acc)
        val_loss, train_loss = val.loss(config), acc.loss(config)
        lr = run.optimizer.param_groups[0]["lr"]
        if isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            run.scheduler.step(val_loss)
        elif run.scheduler is not None:
            run.scheduler.step()
        improved = val_loss < run.best_loss * (1.0 - IMPROVEMENT_RTOL)
        if improved:
            run.best_loss, run.best_epoch, run.bad_epochs = val_loss, epoch, 0
        else:
            run.bad_epochs += 1
        elapsed = run.prior_time + time.monotonic() - t0
        tm, vm = acc.metrics(), val.metrics()
        ckpt = _checkpoint_state(run, epoch, {"train": tm, "val": vm, "train_loss": train_loss, "val_loss": val_loss},
                                 elapsed)
        # checkpoints first, then the metrics row: a failed write leaves no row for an unsaved epoch
        if improved:
            save_checkpoint(run.best_path, ckpt)
        save_checkpoint(run.last_path, ckpt)
        metrics_log.append(epoch, lr, train_loss, val_loss, tm, vm, elapsed)
        log(f"epoch {epoch:4d}  lr {lr:.3g}  loss {train_loss:.4g}/{val_loss:.4g}  "
            f"E {vm['energy_mae_mev_per_atom']:.3g} meV/atom  F {vm['force_mae_mev_per_a']:.3g} meV/A"
            + ("" if math.isnan(vm["dipole_mae_e_a"]) else f"  mu {vm['dipole_mae_e_a']:.3g} eA")
            + ("  *" if improved else ""))
        if timed_out:
            stop_reason = "max_minutes"
            break
        if config.early_stopping_patience and run.bad_epochs >= config.early_stopping_patience:
            stop_reason = "early_stopping"
            break
    log(f"stopped ({stop_reason}) after epoch {epoch}; best epoch {run.best_epoch} (val loss {run.best_loss:.4g}) "
        f"saved in {run.best_path}")
    return {"out": config.out, "epoch": epoch, "best_epoch": run.best_epoch, "best_loss": run.best_loss,
            "stop_reason": stop_reason, "species": run.species, "config": config}
