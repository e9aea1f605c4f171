"""Fine-tuning: a new run that starts from the weights of an earlier run (``--init-from``).

``equiforce train --data new.extxyz --out ft/ --init-from RUN_DIR_or_checkpoint [--init-shifts refit|keep]``

* weights: the EMA weights of the checkpoint (``best.pt`` of a run directory), the ones exported;
* model settings (every ``model.*`` setting, ``avg_num_neighbors`` included) and species come from
  the checkpoint; a model setting given for the new run that differs from the checkpoint's is
  refused (the weights only fit their own architecture);
* the new data may hold only elements the model knows (a clear error names the others);
* per-species energy shifts: ``keep`` leaves them as trained; ``refit`` (default) adds the least
  squares correction ``delta = argmin sum_b (E_b^ref - E_b^model - sum_s count_bs delta_s)^2`` over
  (up to :data:`REFIT_MAX_STRUCTURES`) training structures, so a constant per-element offset
  between the old and the new reference (another code, another functional) costs no training;
* the optimiser, learning-rate schedule, EMA and epoch count start afresh (the new run's settings).
"""
import os
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import ConfigError
from ..model.network import ModelConfig
from ..units import dtype_from_name
from .checkpoints import load_checkpoint, model_from_checkpoint
from .config import TrainConfig

REFIT_MAX_STRUCTURES = 2000


def resolve_init_path(path: str) -> str:
    """The checkpoint file of ``--init-from``: ``best.pt`` of a run directory, or the file itself."""
    return os.path.join(path, "best.pt") if os.path.isdir(path) else path


def load_init(config: TrainConfig, explicit: Optional[Iterable[str]] = None) -> Tuple[dict, TrainConfig, List[str]]:
    """The checkpoint to start from, the new run's config with the checkpoint's model settings, and
    the model's species. Refuses model settings that differ from the checkpoint's and
    ``atomic_energies`` (the shifts come from the checkpoint: see ``init_shifts``).

    ``explicit``: the setting names the user gave (``model.lmax``, ...: command-line flags and YAML
    keys), each compared with the checkpoint's value, defaults included (``--lmax 2`` on an lmax-3
    model is refused). Without it (the Python API), a model setting counts as given when it
    differs from the default."""
    path = resolve_init_path(str(config.init_from))
    state = load_checkpoint(path)
    saved = TrainConfig.from_dict(state["config"]).model
    default, given = ModelConfig().to_dict(), config.model.to_dict()
    named = None if explicit is None else {k[len("model."):] for k in explicit if k.startswith("model.")}
    clash = sorted(k for k, v in given.items()
                   if k != "avg_num_neighbors" and v != getattr(saved, k)
                   and (k in named if named is not None else v != default[k]))
    if clash:
        have = ", ".join(f"model.{k} = {getattr(saved, k)!r}" for k in clash)
        raise ConfigError(f"--init-from '{path}': the model there has {have}; fine-tuning keeps the model's settings, "
                          "so drop those options (or train from scratch without --init-from to change them)")
    if config.atomic_energies is not None:
        raise ConfigError("atomic_energies cannot be combined with --init-from: the per-species shifts come from the "
                          "checkpoint; choose --init-shifts keep or refit instead")
    config = config.replace(model=saved, init_from=os.path.abspath(path))
    return state, config, list(state["species"])


def init_model_from(state: dict, config: TrainConfig, species: Sequence[str], train_graphs,
                    log=print) -> torch.nn.Module:
    """The model of ``state`` (EMA weights) in the run's dtype, with its shifts kept or refitted
    on ``train_graphs`` as ``config.init_shifts`` says."""
    model, _ = model_from_checkpoint(state, use_ema=True)
    model = model.to(dtype_from_name(config.dtype))
    if config.init_shifts == "refit":
        delta = shift_correction(model, train_graphs, len(species), config.seed)
        model.set_scale_shift(model.scale.detach().double(), model.shift.detach().double() + delta)
        log("equiforce train: fine-tuning shifts refitted by " + ", ".join(
            f"{s} {float(d):+.4f} eV" for s, d in zip(species, delta)))
    return model


def shift_correction(model: torch.nn.Module, graphs, num_species: int, seed: int) -> torch.Tensor:
    """Least-squares per-species correction [S] (eV, float64) of the model's energies on ``graphs``
    (a seeded sample of at most :data:`REFIT_MAX_STRUCTURES`); zero for species not in them."""
    from .loop import evaluate_energies

    n = len(graphs)
    pick = np.arange(n) if n <= REFIT_MAX_STRUCTURES else np.sort(
        np.random.default_rng(seed).choice(n, REFIT_MAX_STRUCTURES, replace=False))
    sample = [graphs[int(k)] for k in pick]
    predicted = evaluate_energies(model, sample)
    counts = np.stack([np.bincount(g["species"].numpy(), minlength=num_species) for g in sample]).astype(float)
    residual = np.array([float(g["energy"]) for g in sample]) - predicted
    delta = np.linalg.lstsq(counts, residual, rcond=None)[0]
    return torch.tensor(delta, dtype=torch.float64)

