"""The equivariant energy model: species embedding -> interaction layers -> per-atom energies.

Shapes: ``N`` atoms, ``E`` directed edges, ``S`` species, ``C`` channels.

Each interaction layer (NequIP-style)::

    h    = Linear(x)                                         # mix channels per irrep
    m_i  = 1/sqrt(avg_nn) sum_j TP(h_j, Y(r_ij); w(|r_ij|))   # CG product with edge harmonics,
                                                             # weights from a radial MLP x envelope
    x'   = Gate(Linear(m) + SpeciesLinear(x))                # self-interaction, gated non-linearity
    x'   = x + x'   when the layer's irreps in == out        # residual

The last layer keeps only scalars; a small MLP turns them into a per-atom energy ``e_i``, and
``E_i = scale[s_i] * (e_i - e_iso[s_i]) + shift[s_i]``, where ``e_iso[s]`` is the network's output
for an atom of species ``s`` with no neighbours, so an isolated atom's energy is exactly its shift.
"""
import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List

import torch
from torch import Tensor, nn

from .activations import NormalizedSiLU
from .gate import Gate
from .irreps import Irreps, spherical_harmonics_irreps
from .linear import Linear, SpeciesLinear
from .radial import BesselBasis, RadialMLP, polynomial_cutoff
from .scatter import scatter_sum
from .spherical_harmonics import safe_norm, safe_normalize, spherical_harmonics
from .tensor_product import EdgeTensorProduct

SYMMETRIES = ("O3", "SE3")


@dataclass
class ModelConfig:
    """Hyper-parameters of :class:`EquiforceModel`. Lengths in Å."""

    r_max: float = 5.0              # cutoff radius (Å), > 0
    channels: int = 32              # multiplicity of every irrep in the hidden features
    lmax: int = 2                   # highest rotation order in features and spherical harmonics
    num_layers: int = 3             # interaction (message-passing) layers
    num_bessel: int = 8             # radial Bessel basis functions
    cutoff_p: int = 6               # polynomial envelope exponent
    radial_hidden: int = 64         # width of the radial MLP
    radial_layers: int = 2          # hidden layers of the radial MLP
    symmetry: str = "O3"            # "O3" (parity tracked) or "SE3" (parity ignored: chiral)
    avg_num_neighbors: float = 1.0  # message normalisation; the trainer sets it from data
    resnet: bool = True             # residual update when a layer's irreps in == out

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown model settings {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**known)

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting and what would be accepted."""
        if not (isinstance(self.r_max, (int, float)) and math.isfinite(self.r_max) and self.r_max > 0):
            raise ValueError(f"r_max must be a positive cutoff in Å (e.g. 5.0), got {self.r_max!r}")
        for name in ("channels", "num_layers", "num_bessel", "radial_hidden"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.lmax, int) or not 0 <= self.lmax <= 6:
            raise ValueError(f"lmax must be an integer in 0..6, got {self.lmax!r}")
        if not isinstance(self.radial_layers, int) or self.radial_layers < 0:
            raise ValueError(f"radial_layers must be an integer >= 0, got {self.radial_layers!r}")
        if not isinstance(self.cutoff_p, int) or self.cutoff_p < 2:
            raise ValueError(f"cutoff_p must be an integer >= 2, got {self.cutoff_p!r}")
        if self.symmetry not in SYMMETRIES:
            raise ValueError(f"symmetry must be one of {SYMMETRIES}, got {self.symmetry!r}")
        if not self.avg_num_neighbors > 0:
            raise ValueError(f"avg_num_neighbors must be > 0, got {self.avg_num_neighbors!r}")


class InteractionLayer(nn.Module):
    """One message-passing layer: ``x`` [N, irreps_in.dim] -> [N, irreps_out.dim]."""

    def __init__(self, irreps_in: Irreps, irreps_out: Irreps, irreps_sh: Irreps, num_species: int,
                 radial_sizes: List[int], avg_num_neighbors: float, resnet: bool):
        super().__init__()
        scalars = Irreps([m for m in irreps_out if m.ir.l == 0])
        gated = Irreps([m for m in irreps_out if m.ir.l > 0])
        self.gate = Gate(scalars, gated)
        self.irreps_in = Irreps(irreps_in)
        self.irreps_out = self.gate.irreps_out
        self.linear_1 = Linear(irreps_in, irreps_in)
        self.tp = EdgeTensorProduct(irreps_in, irreps_sh, {m.ir for m in irreps_out})
        self.radial = RadialMLP(list(radial_sizes) + [self.tp.weight_numel])
        self.linear_2 = Linear(self.tp.irreps_out, self.gate.irreps_in)
        self.self_connection = SpeciesLinear(irreps_in, self.gate.irreps_in, num_species)
        self.message_scale = 1.0 / math.sqrt(avg_num_neighbors)
        self.resnet = bool(resnet) and self.irreps_in == self.irreps_out

    def forward(self, x: Tensor, species: Tensor, edge_index: Tensor, sh: Tensor,
                radial_basis: Tensor, envelope: Tensor) -> Tensor:
        h = self.linear_1(x)
        weight = self.radial(radial_basis) * envelope.unsqueeze(-1)      # [E, weight_numel]
        msg = self.tp(h.index_select(0, edge_index[1]), sh, weight)       # [E, tp_out]
        agg = scatter_sum(msg, edge_index[0], x.shape[0]) * self.message_scale
        out = self.gate(self.linear_2(agg) + self.self_connection(x, species))
        if self.resnet:
            out = out + x
        return out


class EquiforceModel(nn.Module):
    """Per-atom energies (eV) from species and edge vectors (the energy-model contract of
    :mod:`equiforce.analytic`): ``forward(species [N], edge_index [2, E], edge_vec [E, 3] Å,
    batch [N], num_graphs) -> [N]``."""

    def __init__(self, config: ModelConfig, species_names: List[str]):
        super().__init__()
        config.validate()
        if len(species_names) == 0 or len(set(species_names)) != len(species_names):
            raise ValueError(f"species_names must be non-empty and unique, got {species_names}")
        self.config = config
        self.species_names: List[str] = list(species_names)
        self.r_max = float(config.r_max)
        self.num_layers = int(config.num_layers)
        self.lmax = int(config.lmax)
        self.cutoff_p = int(config.cutoff_p)
        parity = config.symmetry == "O3"
        s, c = len(species_names), config.channels
        irreps_sh = spherical_harmonics_irreps(config.lmax, parity)
        hidden = Irreps([(c, (l, (-1) ** l if parity else 1)) for l in range(config.lmax + 1)])
        scalars = Irreps([(c, (0, 1))])

        self.embedding = nn.Embedding(s, c)
        nn.init.normal_(self.embedding.weight)
        self.basis = BesselBasis(config.r_max, config.num_bessel)
        radial_sizes = [config.num_bessel] + [config.radial_hidden] * config.radial_layers
        layers: List[nn.Module] = []
        irreps = scalars
        for t in range(config.num_layers):
            target = scalars if t == config.num_layers - 1 else hidden
            layer = InteractionLayer(irreps, target, irreps_sh, s, radial_sizes, config.avg_num_neighbors,
                                     config.resnet)
            layers.append(layer)
            irreps = layer.irreps_out
        self.layers = nn.ModuleList(layers)
        width = max(c // 2, 1)
        self.readout = nn.Sequential(nn.Linear(c, width), NormalizedSiLU(), nn.Linear(width, 1))
        # float64 until the model is cast (shifts are ~1e3 eV: float32 would round them at 1e-4 eV)
        self.register_buffer("scale", torch.ones(s, dtype=torch.float64))
        self.register_buffer("shift", torch.zeros(s, dtype=torch.float64))
        self.register_buffer("isolated_raw", torch.zeros(s, dtype=torch.float64))
        # True while training (parameters change); export freezes e_iso into `isolated_raw`
        self.online_isolated = True

    def set_scale_shift(self, scale: Tensor, shift: Tensor) -> None:
        """Per-species energy scale and shift [S] (eV)."""
        s = len(self.species_names)
        if scale.shape != (s,) or shift.shape != (s,):
            raise ValueError(f"scale and shift must have shape ({s},)")
        self.scale.copy_(scale.to(self.scale))
        self.shift.copy_(shift.to(self.shift))

    def raw_energy(self, species: Tensor, edge_index: Tensor, edge_vec: Tensor) -> Tensor:
        """Network output per atom before scale, shift and isolated-atom reference [N]."""
        r = safe_norm(edge_vec)
        sh = spherical_harmonics(self.lmax, safe_normalize(edge_vec, r))
        basis = self.basis(r)
        envelope = polynomial_cutoff(r, self.r_max, self.cutoff_p)
        x = self.embedding(species).to(edge_vec.dtype)
        for layer in self.layers:
            x = layer(x, species, edge_index, sh, basis, envelope)
        return self.readout(x).squeeze(-1)

    def isolated_atom_raw(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``e_iso`` [S]: raw output of each species with no neighbours."""
        species = torch.arange(len(self.species_names), device=device)
        no_edges = torch.zeros((2, 0), dtype=torch.long, device=device)
        return self.raw_energy(species, no_edges, torch.zeros((0, 3), dtype=dtype, device=device))

    def forward(self, species: Tensor, edge_index: Tensor, edge_vec: Tensor, batch: Tensor,
                num_graphs: int) -> Tensor:
        raw = self.raw_energy(species, edge_index, edge_vec)
        if self.online_isolated:
            iso = self.isolated_atom_raw(edge_vec.dtype, edge_vec.device)
        else:
            iso = self.isolated_raw.to(edge_vec.dtype)
        scale = self.scale.to(edge_vec.dtype)
        shift = self.shift.to(edge_vec.dtype)
        return scale[species] * (raw - iso[species]) + shift[species]

    def for_export(self) -> "EquiforceModel":
        """A frozen copy for export: isolated-atom reference stored, no per-call recomputation."""
        model = copy.deepcopy(self).eval()
        with torch.no_grad():
            model.isolated_raw.copy_(model.isolated_atom_raw(model.scale.dtype, model.scale.device))
        model.online_isolated = False
        return model
