"""Training loop: data -> model with fitted scale/shift -> optimiser steps -> checkpoints and metrics.

Run directory (``config.out``)::

    last.pt      checkpoint after the latest epoch (resume from it)
    best.pt      checkpoint with the lowest validation loss (export from it)
    metrics.csv  one row per epoch (units in the column names)

Loss (weights from the config)::

    L = w_E mean_b ((E_b - E_b^ref) / n_b)^2 + w_F mean_{i,a} (F_ia - F_ia^ref)^2 + w_S mean (S - S^ref)^2

in eV/atom, eV/Å and eV/Å^3; the stress term covers only structures that have a stress label.
Models with a dipole head (``model.dipole``) add ``w_mu mean (mu - mu^ref)^2`` (e·Å, per component,
structures with a dipole label only); polarizability models (``model.polarizability``) add
``w_alpha mean (alpha - alpha^ref)^2`` (e·Å²/V, over the 9 components of the structures with a
polarizability label). Direct-force models (``model.direct_forces``) use the head's
forces in the force term instead of ``-dE/dr``. ``rotation_augmentation`` rotates every training
batch by random rotations (one per structure; positions, forces, stress, dipole, polarizability
and cell alike)
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

Several processes (``torchrun ... -m equiforce train``): :mod:`equiforce.training.distributed`
(each process takes a slice of every global batch; the step equals the one-process step; rank 0
alone writes files). Data: an extxyz file read into memory, or a graph store read lazily
(:mod:`equiforce.data.graphstore`). Fine-tuning (``init_from``): :mod:`equiforce.training.finetune`.
"""
import contextlib
import math
import os
import sys
import time
import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .. import __version__
from ..errors import CheckpointError, ConfigError, DataError
from ..deploy.ops import load_ops
from ..data.dataset import Graph, collate, load_dataset, split_indices
from ..data.graphstore import GraphStore, GraphSubset, is_graph_store
from ..model.forces import model_outputs
from ..model.network import EquiforceModel, ModelConfig
from ..o3.rotations import random_rotations
from ..units import dtype_from_name
from .distributed import (DistContext, barrier, gather_accumulator_sums, gather_sum, global_counts, process_rank,
                          shard, wrap_model)
from .distributed import setup as setup_distributed
from .distributed import teardown as teardown_distributed
from .checkpoints import (CHECKPOINT_KIND, CHECKPOINT_VERSION, build_model, data_digest, load_checkpoint,  # noqa: F401
                          model_from_checkpoint, save_checkpoint)
from .config import TrainConfig
from .ema import EMA
from .finetune import init_model_from, load_init
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
    stats = training_statistics(graphs, num_species)
    return scale_shift_from_statistics(stats, num_species, known_shift)


def training_statistics(graphs, num_species: int) -> dict:
    """What the untrained model is fitted to: ``counts`` [B, S] species counts, ``energies`` [B]
    (eV), ``force_rms`` (eV/Å), ``num_atoms``, ``num_edges``, ``dipole_rms`` (e·Å, None without
    dipole labels). A graph store's subset computes them from its arrays without building graphs."""
    if hasattr(graphs, "statistics"):
        return graphs.statistics()
    counts = np.zeros((len(graphs), num_species))
    energies = np.zeros(len(graphs))
    for b, g in enumerate(graphs):
        counts[b] = np.bincount(g["species"].numpy(), minlength=num_species)
        energies[b] = float(g["energy"])
    forces = torch.cat([g["forces"].reshape(-1) for g in graphs])
    labelled = [g["dipole"] for g in graphs if bool(g.get("has_dipole", torch.tensor(False)))]
    return {"counts": counts, "energies": energies,
            "force_rms": float(torch.sqrt((forces * forces).mean())) if forces.numel() else 0.0,
            "num_atoms": sum(int(g["natoms"]) for g in graphs),
            "num_edges": sum(int(g["edge_index"].shape[1]) for g in graphs),
            "dipole_rms": float(torch.sqrt((torch.stack(labelled) ** 2).mean())) if labelled else None}


def scale_shift_from_statistics(stats: dict, num_species: int,
                                known_shift: Optional[Dict[int, float]] = None) -> Tuple[Tensor, Tensor]:
    """:func:`fit_scale_shift` from :func:`training_statistics`."""
    known = dict(known_shift or {})
    counts, energies = stats["counts"], np.array(stats["energies"], dtype=np.float64)
    shift = np.zeros(num_species)
    for s, e in known.items():
        shift[s] = e
        energies -= counts[:, s] * e
    free = [s for s in range(num_species) if s not in known]
    if free:
        shift[free] = np.linalg.lstsq(counts[:, free], energies, rcond=None)[0]
    rms = stats["force_rms"]
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
    [B, 3, 3] (eV/Å^3; 0 if not periodic) and, for dipole models, dipoles [B, 3] (e·Å), for
    polarizability models polarizabilities [B, 3, 3] (e·Å²/V)."""
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
    if "polarizability" in out:
        pred["polarizability"] = out["polarizability"]
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
    ``r -> r R^T``): positions, edge shifts, cells, forces, dipoles, stress and polarizabilities
    (``R S R^T``)."""
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
    if "polarizability" in batch:
        out["polarizability"] = rot @ batch["polarizability"] @ rot.transpose(1, 2)
    return out


def batch_loss(pred: Dict[str, Tensor], batch: dict, config: TrainConfig,
               counts: Optional[Dict[str, int]] = None) -> Tensor:
    """Weighted MSE loss of one batch (see the module docstring).

    ``counts`` (:func:`equiforce.training.distributed.global_counts`): the normalisers of the whole
    global batch when ``batch`` is one process's shard of it (the shard losses then add up to the
    loss of the global batch); by default those of ``batch`` itself (the means)."""
    if counts is None:
        counts = global_counts(batch["natoms"].tolist(), batch["has_stress"].tolist(),
                               batch["has_dipole"].tolist() if "has_dipole" in batch else [],
                               batch["has_polarizability"].tolist() if "has_polarizability" in batch else [])
    de = (pred["energy"] - batch["energy"]) / batch["natoms"].to(pred["energy"].dtype)
    loss = config.energy_weight * (de * de).sum() / counts["energy"]
    df = pred["forces"] - batch["forces"]
    loss = loss + config.forces_weight * (df * df).sum() / counts["forces"]
    mask = batch["has_stress"]
    if config.stress_weight > 0 and bool(mask.any()):
        ds = pred["stress"][mask] - batch["stress"][mask]
        loss = loss + config.stress_weight * (ds * ds).sum() / counts["stress"]
    if "dipole" in pred and config.dipole_weight > 0 and bool(batch["has_dipole"].any()):
        dd = pred["dipole"][batch["has_dipole"]] - batch["dipole"][batch["has_dipole"]]
        loss = loss + config.dipole_weight * (dd * dd).sum() / counts["dipole"]
    if "polarizability" in pred and config.polarizability_weight > 0 and bool(batch["has_polarizability"].any()):
        m = batch["has_polarizability"]
        da = pred["polarizability"][m] - batch["polarizability"][m]
        loss = loss + config.polarizability_weight * (da * da).sum() / counts["polarizability"]
    return loss


def evaluate_graphs(model: nn.Module, graphs: Sequence[Graph], batch_size: int, dtype: torch.dtype,
                    device: torch.device) -> ErrorAccumulator:
    """Errors of ``model`` on ``graphs`` (no parameter gradients kept)."""
    acc = ErrorAccumulator()
    for start in range(0, len(graphs), batch_size):
        batch = collate([graphs[k] for k in range(start, min(start + batch_size, len(graphs)))], dtype, device)
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
    stats = training_statistics(train_graphs, len(species))
    if not stats["num_edges"]:
        raise DataError(f"no two atoms of the training structures in '{config.data}' are closer than the cutoff "
                        f"r_max = {config.model.r_max:g} Å, so the model would have no interactions; use a larger "
                        "cutoff (--r-max, typically 4-6 Å for molecules and solids)")
    avg = stats["num_edges"] / stats["num_atoms"] if stats["num_atoms"] and stats["num_edges"] else 1.0
    mc = ModelConfig.from_dict({**config.model.to_dict(), "avg_num_neighbors": avg})
    config = config.replace(model=mc)
    model = build_model(config.model, species)
    known = {species.index(name): e for name, e in (isolated or {}).items() if name in species}
    scale, shift = scale_shift_from_statistics(stats, len(species), known)
    if config.atomic_energies is not None:
        missing = [s for s in species if s not in config.atomic_energies]
        if missing:
            raise ConfigError(f"atomic_energies lacks {missing}; give an energy (eV) for every species in the "
                              f"data {species} or remove atomic_energies to fit the shifts by least squares")
        shift = torch.tensor([config.atomic_energies[s] for s in species], dtype=torch.float64)
    model = model.to(dtype_from_name(config.dtype))
    model.set_scale_shift(scale, shift)
    if config.model.dipole != "none":
        rms = stats.get("dipole_rms")
        if rms is None:
            raise DataError(f"model.dipole is '{config.model.dipole}' but no training structure has a dipole label "
                            f"'{config.dipole_key}'; add dipoles (e·Å) to the data (e.g. `equiforce datagen --dipole`) "
                            "or set model.dipole to none")
        model.set_dipole_scale(rms if rms > 0 else 1.0)
    if config.model.polarizability:
        scale, shift = fit_polarizability_scale_shift(train_graphs, len(species), config.polarizability_key)
        model.set_polarizability_scale_shift(scale, shift)
    return model, config


def fit_polarizability_scale_shift(graphs: Sequence[Graph], num_species: int, key: str) -> Tuple[float, Tensor]:
    """``(scale, shift [S])`` (e·Å²/V) of the polarizability head from the labelled training graphs:
    shift = per-species isotropic atomic polarizabilities, least squares of ``tr(alpha_b)/3`` on the
    species counts (minimum-norm where the compositions do not determine it); scale = RMS of what
    is left for the network, the 9 components of ``alpha_b - (sum_s count_bs shift_s) I`` (1 when 0)."""
    counts_list, alpha_list = [], []  # only these per structure: graphs may be a lazy graph store
    for g in graphs:
        if bool(g.get("has_polarizability", torch.tensor(False))):
            counts_list.append(np.bincount(g["species"].numpy(), minlength=num_species))
            alpha_list.append(g["polarizability"].numpy())
    if not alpha_list:
        raise DataError(f"model.polarizability is true but no training structure has a polarizability label '{key}'; "
                        "add polarizabilities (e·Å²/V) to the data (e.g. `equiforce datagen --polarizability`) "
                        "or set model.polarizability to false")
    counts = np.stack(counts_list).astype(float)
    alphas = np.stack(alpha_list)
    iso = np.trace(alphas, axis1=1, axis2=2) / 3.0
    shift = np.linalg.lstsq(counts, iso, rcond=None)[0]
    rest = alphas - (counts @ shift)[:, None, None] * np.eye(3)
    rms = float(np.sqrt((rest * rest).mean()))
    return (rms if rms > 0 else 1.0), torch.tensor(shift, dtype=torch.float64)


def evaluate_energies(model: nn.Module, graphs: Sequence[Graph], batch_size: int = 16) -> np.ndarray:
    """Energies [len(graphs)] (eV, float64) the model predicts (in its own dtype and device)."""
    p = next(model.parameters())
    out = []
    for start in range(0, len(graphs), batch_size):
        batch = collate([graphs[k] for k in range(start, min(start + batch_size, len(graphs)))], p.dtype, p.device)
        out.append(predict(model, batch, create_graph=False)["energy"].detach().double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _example_structure(g: Graph) -> Dict[str, Tensor]:
    return {k: g[k] for k in ("pos", "species", "edge_index", "edge_shift", "cell")}


# ---------------------------------------------------------------------------------------------
# the training loop: setup, one epoch, one checkpoint
# ---------------------------------------------------------------------------------------------
RESUMABLE = ("epochs", "max_minutes", "early_stopping_patience", "num_threads", "device", "max_data_mb")


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
    ctx: DistContext = dataclasses.field(default_factory=DistContext)
    step: Optional[nn.Module] = None  # the training forward (_TrainStep, in DDP with several processes)
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


def _load_split(config: TrainConfig, species: Optional[List[str]], state: Optional[dict], progress: bool):
    """Species, training and validation graphs and the split of a run (the saved split on resume;
    ``species``: the model's, else those of the data). An extxyz file is read into memory; a graph
    store (``equiforce preprocess``) is read lazily."""
    try:
        if is_graph_store(config.data):
            return _load_split_store(config, species, state, progress)
        graphs, species = load_dataset(config.data, config.model.r_max, species, config.energy_key,
                                       config.forces_key, config.stress_key, config.dipole_key, config.charge_key,
                                       config.polarizability_key)
    except DataError as exc:
        if config.init_from and "does not know" in str(exc):
            raise DataError(f"{exc}; --init-from '{config.init_from}' can only fine-tune on elements it was trained "
                            "on: remove those structures or train from scratch") from None
        raise
    # single isolated atoms are reference energies (the species shifts), not training structures
    isolated = isolated_atom_energies(graphs, species)
    graphs = [g for g in graphs if not is_isolated_atom(g)]
    train_idx, val_idx, split = _split(config, state, len(graphs), progress, isolated)
    return species, [graphs[k] for k in train_idx], [graphs[k] for k in val_idx], split, isolated


def _split(config: TrainConfig, state: Optional[dict], n: int, progress: bool, isolated: Dict[str, float]):
    if not n:
        raise DataError(f"'{config.data}' holds only isolated atoms; add structures to train on")
    if isolated and progress:
        print("equiforce train: isolated-atom energies used as species shifts: "
              + ", ".join(f"{k} {v:.6f} eV" for k, v in isolated.items()), file=sys.stderr)
    if state is None:
        train_idx, val_idx, test_idx = split_indices(n, config.val_fraction, config.test_fraction, config.seed)
    else:
        split = state["split"]
        train_idx, val_idx, test_idx = list(split["train"]), list(split["val"]), list(split["test"])
        if max(train_idx + val_idx + test_idx) >= n:
            raise DataError(f"'{config.data}' has {n} structures, fewer than when the run started; "
                            "resume with the same data file")
    return train_idx, val_idx, {"train": train_idx, "val": val_idx, "test": test_idx}


def _load_split_store(config: TrainConfig, species: Optional[List[str]], state: Optional[dict], progress: bool):
    """:func:`_load_split` for a graph store: lazy subsets, same isolated-atom rule and split."""
    store = GraphStore(config.data, species, max_resident_mb=config.max_data_mb)
    if abs(store.r_max - config.model.r_max) > 1e-9 * store.r_max:
        raise ConfigError(f"graph store '{config.data}' holds neighbour lists for r_max = {store.r_max:g} Å but the "
                          f"model's cutoff is {config.model.r_max:g} Å; train with --r-max {store.r_max:g} or "
                          f"preprocess the data again with --r-max {config.model.r_max:g}")
    wanted = {"energy": config.energy_key, "forces": config.forces_key, "stress": config.stress_key,
              "dipole": config.dipole_key, "charge": config.charge_key,
              "polarizability": config.polarizability_key}
    differ = {k: (store.keys.get(k), v) for k, v in wanted.items() if store.keys.get(k) != v}
    if differ:
        raise ConfigError(f"graph store '{config.data}' was made with other label names "
                          + ", ".join(f"{k}_key {a!r} (not {b!r})" for k, (a, b) in differ.items())
                          + "; preprocess again with the label options you want, or drop those options")
    natoms, pbc = store.natoms(), store.structure_array("pbc")
    iso_mask = (natoms == 1) & ~pbc.any(axis=1)
    isolated = isolated_atom_energies([store[k] for k in np.flatnonzero(iso_mask)], store.species)
    kept = np.flatnonzero(~iso_mask)
    train_idx, val_idx, split = _split(config, state, len(kept), progress, isolated)
    return (store.species, GraphSubset(store, kept[train_idx]), GraphSubset(store, kept[val_idx]), split,
            isolated)


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
           resume_overrides: Optional[Dict[str, object]], ctx_holder: list,
           explicit: Optional[Sequence[str]] = None) -> _Run:
    """Configuration, data, model, optimiser, scheduler and EMA of a new or resumed run; joins the
    process group of a torchrun launch (the context is appended to ``ctx_holder`` for teardown)."""
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
    ctx = setup_distributed(config.device)
    ctx_holder.append(ctx)
    device = ctx.device
    dtype = dtype_from_name(config.dtype)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    digest = data_digest(config.data) if os.path.isfile(config.data) else ""
    if is_graph_store(config.data):
        digest = data_digest(os.path.join(config.data, "index.json"))
    if state is not None and state.get("data_digest") and digest != state["data_digest"]:
        raise DataError(f"'{config.data}' changed since the run in '{config.out}' started (its sha256 differs from "
                        "the one recorded in last.pt): resuming would silently train and validate on other "
                        "structures; restore the original file, or start a new run with another --out")
    init_state, species = None, (None if state is None else list(state["species"]))
    if state is None and config.init_from:
        init_state, config, species = load_init(config, explicit)
    species, train_graphs, val_graphs, split, isolated = _load_split(config, species, state, progress)

    if init_state is not None:
        model = init_model_from(init_state, config, species, train_graphs,
                                log=_stderr if progress else _silent).to(device=device)
    elif state is None:
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
               data_digest=digest, ctx=ctx, step=wrap_model(ctx, _TrainStep(model)))
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


class _TrainStep(nn.Module):
    """The training forward pass (energies, forces by autograd with ``create_graph``, stress) as one
    module, so that DistributedDataParallel sees the whole pass as its ``forward``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> Dict[str, Tensor]:
        return predict(self.model, batch, create_graph=True)


def _label_flags(source, indices: Sequence[int]) -> Tuple[List[int], List[bool], List[bool], List[bool]]:
    """Atom counts and stress/dipole/polarizability label flags of ``source[k]`` for ``k`` in
    ``indices`` (without building the graphs when the source can tell, as a graph store does)."""
    flags = getattr(source, "label_flags", None)
    if flags is not None:
        return flags(indices)
    gs = [source[k] for k in indices]
    return ([int(g["natoms"]) for g in gs], [bool(g["has_stress"]) for g in gs],
            [bool(g.get("has_dipole", False)) for g in gs], [bool(g.get("has_polarizability", False)) for g in gs])


def _train_epoch(run: _Run, epoch: int, deadline: Optional[float], progress: bool) -> Tuple[ErrorAccumulator, bool]:
    """One pass over the training graphs (seeded shuffle and augmentation); returns the training
    errors (summed over all processes) and whether the time limit was hit.

    With several processes each takes its shard of every global batch (see
    :mod:`equiforce.training.distributed`); the step is the one-process step of the global batch."""
    from tqdm import tqdm

    config, model, ctx = run.config, run.model, run.ctx
    model.train()
    order = np.random.default_rng([config.seed, epoch]).permutation(len(run.train_graphs))
    aug_rng = np.random.default_rng([config.seed, epoch, 1])
    batches = [order[i:i + config.batch_size].tolist() for i in range(0, len(order), config.batch_size)]
    acc = ErrorAccumulator()
    timed_out = False
    bar = tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", leave=False,
               disable=not (progress and ctx.is_main), dynamic_ncols=True)
    for idx in bar:
        rots = random_rotations(len(idx), aug_rng) if config.rotation_augmentation else None
        counts = None
        positions = list(range(len(idx)))
        if ctx.enabled:
            counts = global_counts(*_label_flags(run.train_graphs, idx))
            positions = shard(positions, ctx.rank, ctx.world_size)
        empty = not positions
        if empty:  # fewer structures than processes: take part in the gradient reduction with weight 0
            positions = [0]
        batch = collate([run.train_graphs[idx[p]] for p in positions], run.dtype, run.device)
        if rots is not None:
            batch = rotate_batch(batch, torch.from_numpy(rots[positions]).to(run.device))
        run.optimizer.zero_grad(set_to_none=True)
        pred = run.step(batch)
        loss = batch_loss(pred, batch, config, counts)
        if empty:
            loss = loss * 0.0
        over = deadline is not None and time.monotonic() > deadline
        total, over_any = gather_sum(ctx, torch.tensor([float(loss.detach()), float(over)], dtype=torch.float64))
        if not math.isfinite(float(total)):
            raise RuntimeError(f"training diverged at epoch {epoch} (loss {float(total)}); "
                               "lower lr or use --dtype float64")
        (loss * ctx.world_size if ctx.enabled else loss).backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        run.optimizer.step()
        if run.ema is not None:
            run.ema.update(model)
        if not empty:
            acc.add({k: v.detach() for k, v in pred.items()}, batch)
        bar.set_postfix(loss=f"{float(total):.4g}")
        if float(over_any) > 0:
            timed_out = True
            break
    bar.close()
    if ctx.enabled:
        acc.sums = gather_accumulator_sums(ctx, acc.sums)
    return acc, timed_out


def _validate(run: _Run, acc: ErrorAccumulator) -> ErrorAccumulator:
    """Validation errors (EMA weights when on; the training errors when there is no validation set),
    each process evaluating its shard of the validation set, summed over the processes."""
    run.model.eval()
    if not len(run.val_graphs):
        return acc
    ctx = run.ema.applied(run.model) if run.ema is not None else contextlib.nullcontext()
    mine = shard(list(range(len(run.val_graphs))), run.ctx.rank, run.ctx.world_size)
    with ctx:
        val = evaluate_graphs(run.model, [run.val_graphs[k] for k in mine], run.config.batch_size, run.dtype,
                              run.device)
    if run.ctx.enabled:
        val.sums = gather_accumulator_sums(run.ctx, val.sums)
    return val


def _silent(message: str) -> None:
    pass


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


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
        "world_size": run.ctx.world_size,
    }


def train(config: TrainConfig, resume: bool = False, progress: bool = True,
          log: Callable[[str], None] = print, resume_overrides: Optional[Dict[str, object]] = None,
          explicit: Optional[Sequence[str]] = None) -> dict:
    """Train (or resume) a model as described by ``config``; returns a summary dict.

    ``resume=True`` continues from ``<out>/last.pt``: the saved configuration is used, except the
    settings in :data:`RESUMABLE` given in ``resume_overrides`` (other settings may be given with
    their saved values). The epoch count continues; the data file must be unchanged (sha256).
    ``explicit``: the setting names the user gave (``model.lmax``, ...), with ``config.init_from``:
    each model setting named there must equal the checkpoint's (see :func:`finetune.load_init`).
    torch's thread count is restored on return when ``num_threads`` changed it.
    """
    threads = torch.get_num_threads()
    ctx_holder: List[DistContext] = []
    try:
        return _train(config, resume, progress, log, resume_overrides, ctx_holder, explicit)
    finally:
        torch.set_num_threads(threads)
        for ctx in ctx_holder:
            teardown_distributed(ctx)


def _train(config: TrainConfig, resume: bool, progress: bool, log: Callable[[str], None],
           resume_overrides: Optional[Dict[str, object]], ctx_holder: list,
           explicit: Optional[Sequence[str]] = None) -> dict:
    run = _setup(config, resume, progress and process_rank() == 0, resume_overrides, ctx_holder, explicit)
    config, main = run.config, run.ctx.is_main
    if not main:  # only rank 0 writes files and reports
        log = _silent
    metrics_log = None
    if main:
        try:
            os.makedirs(config.out, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the run directory '{config.out}' ({exc.strerror}); choose another "
                              "--out") from None
        metrics_log = MetricsLog(os.path.join(config.out, "metrics.csv"),
                                 resume_epoch=run.start_epoch - 1 if run.state is not None else None)
    log(f"equiforce {__version__}: {len(run.train_graphs)} train / {len(run.val_graphs)} val / "
        f"{len(run.split['test'])} test structures, species {run.species}, "
        f"{sum(p.numel() for p in run.model.parameters())} parameters, {config.dtype} on {run.device}"
        + (f" x {run.ctx.world_size} processes ({run.ctx.backend})" if run.ctx.enabled else "")
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
        if metrics_log is not None:
            if improved:
                save_checkpoint(run.best_path, ckpt)
            save_checkpoint(run.last_path, ckpt)
            metrics_log.append(epoch, lr, train_loss, val_loss, tm, vm, elapsed)
        log(f"epoch {epoch:4d}  lr {lr:.3g}  loss {train_loss:.4g}/{val_loss:.4g}  "
            f"E {vm['energy_mae_mev_per_atom']:.3g} meV/atom  F {vm['force_mae_mev_per_a']:.3g} meV/A"
            + ("" if math.isnan(vm["dipole_mae_e_a"]) else f"  mu {vm['dipole_mae_e_a']:.3g} eA")
            + ("" if math.isnan(vm["polarizability_mae_e_a2_per_v"])
               else f"  alpha {vm['polarizability_mae_e_a2_per_v']:.3g} eA2/V")
            + ("  *" if improved else ""))
        if timed_out:
            stop_reason = "max_minutes"
            break
        if config.early_stopping_patience and run.bad_epochs >= config.early_stopping_patience:
            stop_reason = "early_stopping"
            break
    barrier(run.ctx)  # every process returns after rank 0 has written the last checkpoint
    log(f"stopped ({stop_reason}) after epoch {epoch}; best epoch {run.best_epoch} (val loss {run.best_loss:.4g}) "
        f"saved in {run.best_path}")
    return {"out": config.out, "epoch": epoch, "best_epoch": run.best_epoch, "best_loss": run.best_loss,
            "stop_reason": stop_reason, "species": run.species, "config": config}
