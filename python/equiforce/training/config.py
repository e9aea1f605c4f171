"""Training configuration: one typed object built once from YAML plus command-line overrides.

YAML layout (every key optional; the defaults are the values below)::

    data: train.extxyz        # extxyz file with energies and forces
    out: run                  # run directory: checkpoints, metrics.csv, plots
    energy_key: energy        # label names (see equiforce.data.dataset)
    forces_key: forces
    stress_key: stress
    dipole_key: dipole        # dipole label (e·Å), used when model.dipole != none
    charge_key: charge        # total charge of a structure (e), default 0 when absent
    polarizability_key: polarizability  # polarizability label (e·Å²/V; 3x3, 9 or 6 Voigt numbers),
                              #   used when model.polarizability is true
    val_fraction: 0.1
    test_fraction: 0.0
    seed: 0
    batch_size: 4
    epochs: 100
    max_minutes: null         # wall-clock budget; stops cleanly keeping the best checkpoint
    lr: 0.005
    optimizer: adam           # adam | adamw
    weight_decay: 0.0
    scheduler: plateau        # plateau | cosine | none
    plateau_factor: 0.5
    plateau_patience: 10
    min_lr: 1.0e-6
    ema_decay: 0.99           # 0 disables the exponential moving average of the weights
    early_stopping_patience: 50   # epochs without validation improvement; 0 disables
    grad_clip: 10.0           # max gradient norm; 0 disables
    energy_weight: 1.0        # loss weights: energy per atom (eV/atom)^2,
    forces_weight: 10.0       #   forces (eV/Å)^2,
    stress_weight: 1.0        #   stress (eV/Å^3)^2 on structures that have it
    dipole_weight: 1.0        #   dipole (e·Å)^2 per component, on structures that have it
    polarizability_weight: 1.0  # polarizability (e·Å²/V)^2 per 3x3 component, on structures that have it
    rotation_augmentation: false  # rotate every training structure randomly each time it is used
    atomic_energies: null     # per-species shift: null = least squares of E on species counts;
                              #   or isolated-atom energies in eV, e.g. {H: -13.6, O: -2041.3}
    dtype: float32            # float32 | float64
    device: cpu               # cpu | cuda | cuda:N
    num_threads: null         # CPU threads for torch (null: torch's default); 1 is fastest for small models
    init_from: null           # fine-tune: start from this run directory (its best.pt) or checkpoint
    init_shifts: refit        #   per-species shifts: refit (least squares on the new data) | keep
    max_data_mb: 256          # graph stores (equiforce preprocess): resident-memory cap of the mapped data (MiB)
    fused_kernels: true       # CPU: message passing through the compiled op equiforce::tp_scatter, with
                              #   second derivatives for the force loss; false: the PyTorch path
    model:                    # equiforce.model.network.ModelConfig
      r_max: 5.0
      channels: 32
      lmax: 2
      num_layers: 3
      symmetry: O3            # O3 | SE3
      feature_parity: natural # natural (l with parity (-1)^l) | both (also 0o, 1e, ...: NequIP's parity: true)
      dipole: none            # none | direct | charges | both (dipole head, e·Å)
      direct_forces: false    # true: forces from a per-atom l=1 head (non-conservative baseline)
      polarizability: false   # true: polarizability head (0e + 2e -> symmetric 3x3, e·Å²/V)
      long_range: none        # none | ewald | pme: + electrostatics of learned charges (Ewald or mesh / Coulomb)
      long_range_accuracy: null    # relative accuracy; null: ewald 1e-6 (energy), pme 1e-4 (forces)
      long_range_cutoff: 10.0      # real-space cutoff (Å)
"""
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from ..errors import CheckpointError, ConfigError, DataError, UserError  # noqa: F401 (re-exported)
from ..errors import reject_unknown_keys
from ..model.network import ModelConfig


CHOICES = {
    "optimizer": ("adam", "adamw"),
    "scheduler": ("plateau", "cosine", "none"),
    "dtype": ("float32", "float64"),
    "init_shifts": ("refit", "keep"),
}


@dataclass
class TrainConfig:
    """Every training setting; see the module docstring for meanings and units."""

    data: str = ""
    out: str = "run"
    energy_key: str = "energy"
    forces_key: str = "forces"
    stress_key: str = "stress"
    dipole_key: str = "dipole"
    charge_key: str = "charge"
    polarizability_key: str = "polarizability"
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    seed: int = 0
    batch_size: int = 4
    epochs: int = 100
    max_minutes: Optional[float] = None
    lr: float = 5e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    scheduler: str = "plateau"
    plateau_factor: float = 0.5
    plateau_patience: int = 10
    min_lr: float = 1e-6
    ema_decay: float = 0.99
    early_stopping_patience: int = 50
    grad_clip: float = 10.0
    energy_weight: float = 1.0
    forces_weight: float = 10.0
    stress_weight: float = 1.0
    dipole_weight: float = 1.0
    polarizability_weight: float = 1.0
    rotation_augmentation: bool = False
    atomic_energies: Optional[Dict[str, float]] = None
    dtype: str = "float32"
    device: str = "cpu"
    num_threads: Optional[int] = None
    max_data_mb: float = 256.0
    init_from: Optional[str] = None
    init_shifts: str = "refit"
    fused_kernels: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Build and validate from a (YAML) mapping; unknown keys are an error listing the known ones."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"the configuration must be a mapping of settings, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        reject_unknown_keys(d, fields, "setting")
        kwargs: Dict[str, Any] = {}
        for name, value in d.items():
            if name == "model":
                kwargs["model"] = _model_config(value)
            elif name == "atomic_energies":
                kwargs[name] = _atomic_energies(value)
            else:
                kwargs[name] = _coerce(name, fields[name], value)
        config = cls(**kwargs)
        config.validate()
        return config

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A validated copy with some top-level settings changed."""
        d = self.to_dict()
        d.update(changes)
        return TrainConfig.from_dict(d)

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {v}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError("val_fraction + test_fraction must be < 1 (some structures must be left to train on)")
        for name in ("batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("plateau_patience", "early_stopping_patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads must be >= 1 (or null for torch's default), got {self.num_threads}")
        if not self.max_data_mb > 0:
            raise ConfigError(f"max_data_mb must be > 0 (MiB of mapped data kept resident), got {self.max_data_mb}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"max_minutes must be > 0 (or null for no limit), got {self.max_minutes}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "min_lr", "grad_clip", "energy_weight", "forces_weight", "stress_weight",
                     "dipole_weight", "polarizability_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.energy_weight == 0 and self.forces_weight == 0 and self.stress_weight == 0:
            raise ConfigError("at least one of energy_weight, forces_weight, stress_weight must be > 0")
        if not 0.0 < self.plateau_factor < 1.0:
            raise ConfigError(f"plateau_factor must be in (0, 1), got {self.plateau_factor}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1) (0 disables EMA), got {self.ema_decay}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        try:
            self.model.validate()
        except ValueError as exc:
            raise ConfigError(f"model: {exc}") from None


def _atomic_energies(value: Any) -> Optional[Dict[str, float]]:
    from ase.data import atomic_numbers

    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"atomic_energies must map element symbols to energies in eV (e.g. {{H: -13.6}}), got {value!r}")
    out: Dict[str, float] = {}
    for symbol, energy in value.items():
        if symbol not in atomic_numbers or symbol == "X":
            raise ConfigError(f"atomic_energies: '{symbol}' is not a chemical element symbol")
        out[str(symbol)] = _coerce(f"atomic_energies.{symbol}", dataclasses.field(default=0.0), energy, "float")
    return out


def _model_config(value: Any) -> ModelConfig:
    if isinstance(value, ModelConfig):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"'model' must be a mapping of model settings, got {value!r}")
    known = {f.name: f for f in dataclasses.fields(ModelConfig)}
    reject_unknown_keys(value, known, "model setting")
    return ModelConfig(**{k: _coerce(f"model.{k}", known[k], v) for k, v in value.items()})


def _coerce(name: str, f: dataclasses.Field, value: Any, type_name: Optional[str] = None) -> Any:
    """Check and convert one setting to the type its field declares (YAML reads 5e-3 as a string)."""
    tname = type_name or str(f.type)
    optional = "Optional" in tname
    kind = re.sub(r"<class '(\w+)'>", r"\1", tname).replace("typing.", "")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"setting '{name}' must not be empty")
    try:
        if "float" in kind:
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
            if not math.isfinite(v):
                raise ValueError
            return v
        if "int" in kind:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if "bool" in kind:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if "str" in kind:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"setting '{name}' must be of type {kind}, got {value!r}") from None
    return value


def read_yaml(path: str) -> Dict[str, Any]:
    """The mapping in a YAML file (empty file -> {})."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        with open(path) as fh:
            d = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML ({' '.join(str(exc).split())})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of settings (key: value), got {type(d).__name__}")
    return d


def build_config(yaml_path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """YAML file (optional) + overrides -> validated :class:`TrainConfig`.

    Override keys are top-level setting names or ``model.<name>`` for model settings; ``None``
    values are ignored (a command-line flag that was not given).
    """
    d = read_yaml(yaml_path) if yaml_path else {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key.startswith("model."):
            model = d.setdefault("model", {})
            if model is None:
                model = d["model"] = {}
            if not isinstance(model, dict):
                raise ConfigError(f"'model' must be a mapping of model settings, got {model!r}")
            model[key[len("model."):]] = value
        else:
            d[key] = value
    return TrainConfig.from_dict(d)
