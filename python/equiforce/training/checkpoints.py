"""Checkpoints of a training run: atomic writes, clear errors on load, the model rebuilt from one.

A checkpoint is a dict saved with ``torch.save`` (keys: ``kind``, ``checkpoint_version``,
``config``, ``species``, ``model_state``, ``ema_state``, ``optimizer_state``, ``scheduler_state``,
``epoch``, ``best_loss``, ``best_epoch``, ``bad_epochs``, ``split``, ``metrics``, ``elapsed_s``,
``example_structure``, ``data_digest``). ``last.pt`` is written after every epoch, ``best.pt``
when the validation loss improved. A write goes to ``PATH.tmp`` and is renamed over ``PATH`` only
when complete, so a failed write (full disk, file-size limit, interruption) leaves the previous
checkpoint intact and no ``.tmp`` behind.
"""
import hashlib
import os
from typing import List, Tuple

import torch

from ..errors import CheckpointError, ConfigError
from ..model.network import EquiforceModel, ModelConfig
from ..units import dtype_from_name
from .config import TrainConfig
from .ema import EMA

CHECKPOINT_KIND = "equiforce-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: str, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (temporary file + rename). On failure the temporary
    file is removed, ``path`` is unchanged and a :class:`CheckpointError` names the cause and the fix."""
    tmp = path + ".tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: the old file stays, go on stopping
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"could not write checkpoint '{path}' ({type(exc).__name__}: {first}); the previous "
                              f"checkpoint there is unchanged: free disk space (or raise the file-size limit) and "
                              "continue with `equiforce train --out RUN_DIR --resume`") from None


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by :func:`equiforce.training.loop.train`, with clear errors for
    missing or corrupt files."""
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


def model_from_checkpoint(state: dict, use_ema: bool = True) -> Tuple[EquiforceModel, TrainConfig]:
    """Rebuild the model of a checkpoint (EMA weights when present and ``use_ema``)."""
    try:
        config = TrainConfig.from_dict(state["config"])
        model = build_model(config.model, state["species"]).to(dtype_from_name(config.dtype))
        model.load_state_dict(state["model_state"])
        if use_ema and state.get("ema_state") is not None:
            ema = EMA(model, state["ema_state"]["decay"])
            ema.load_state_dict(state["ema_state"])
            ema.copy_to(model)
    except (ConfigError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint does not match this version of the model ({str(exc).splitlines()[0]})") from None
    return model, config


def data_digest(path: str) -> str:
    """sha256 hex of the data file's bytes (recorded at the start of a run, compared on resume)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
