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

Extra outputs (:mod:`equiforce.nn.heads`, :meth:`EquiforceModel.predict`), chosen in :class:`ModelConfig`:

* ``dipole``: "direct" (sum of per-atom l=1 vectors, times ``dipole_scale``), "charges"
  (``sum q_i (r_i - centroid)`` with conserved total charge), "both" (their sum), "none".
* ``long_range``: "ewald" or "pme" adds the electrostatic energy of learned atomic charges (a
  :class:`equiforce.nn.heads.ChargeHead`, total charge conserved exactly) to the per-atom energies:
  Ewald summation (or its reciprocal part on a mesh, :mod:`equiforce.nn.mesh_electrostatics`) for
  periodic cells, plain Coulomb for open boundaries
  (:mod:`equiforce.nn.electrostatics`; settings ``long_range_accuracy``, ``long_range_cutoff`` Å,
  ``long_range_damping`` Å). Such a model needs positions and the cell: use :meth:`predict` /
  :func:`equiforce.model.forces.model_outputs` (``forward`` raises). With a charge dipole head the same
  charges serve both.
* ``polarizability``: a symmetric 3x3 polarizability per structure (e·Å²/V), the sum over atoms of
  ``a0_i I + T(c_i)`` (:class:`equiforce.nn.heads.PolarizabilityHead`): ``a0_i`` isotropic (scalars,
  scaled, plus a per-species atomic polarizability), ``c_i`` the five l=2 components of a ``C x 2e``
  output block of the last layer, ``T`` the map of :mod:`equiforce.o3.cartesian`. Needs ``lmax >= 2``,
  or ``lmax = 1`` with at least two layers (the l=2 block then comes from ``1o x 1o``); ``lmax = 0``
  gives the invariant baseline (a tensor that does not turn with the molecule).
* ``direct_forces``: forces predicted as a per-atom l=1 output ``F_i = scale[s_i] * v_i`` and trained
  directly on forces; NOT the gradient of the energy (non-conservative: curl != 0), the energy
  head stays for the energy.

Inference kernels (:meth:`EquiforceModel.use_fused_kernels`, on in :meth:`EquiforceModel.for_export`):
on the CPU each layer's gather / tensor product / scatter runs as one compiled op and the radial MLPs
run once per pair of reverse edges (:mod:`equiforce.nn.tensor_product`); same numbers to rounding. The
compiled op has first derivatives only; training with a force loss uses
``use_fused_kernels(True, double_backward=True)`` (a Python autograd wrapper with derivatives of every
order, eager mode; the trainer's default on the CPU, ``fused_kernels: false`` opts out).

When a vector output is needed and ``lmax >= 1``, the last layer outputs ``C x 0e + C x 1o``
(``1e`` in SE(3) mode), the vector block gated like in every other layer; a polarizability head adds
a ``C x 2e`` block after it. With ``lmax = 0`` (the
invariant, distance-only baseline) the vector heads read the invariant scalars and their outputs
are rotation-invariant (see :class:`equiforce.nn.heads.VectorHead`).
"""
import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import reject_unknown_keys
from ..nn.activations import NormalizedSiLU
from ..nn.gate import Gate
from ..nn.heads import (ChargeHead, PolarizabilityHead, VectorHead, charge_dipole, conserve_charge,
                        polarizability_basis, polarizability_sum)
from ..o3.irreps import Irreps, spherical_harmonics_irreps
from ..nn.linear import Linear, SpeciesLinear
from ..nn.electrostatics import Electrostatics
from ..nn.radial import BesselBasis, RadialMLP, polynomial_cutoff
from ..nn.scatter import scatter_sum
from ..o3.spherical_harmonics import safe_norm, safe_normalize, spherical_harmonics
from ..nn.tensor_product import EdgeTensorProduct, FusedTensorProduct, RadialPairing

SYMMETRIES = ("O3", "SE3")
FEATURE_PARITIES = ("natural", "both")
DIPOLE_MODES = ("none", "direct", "charges", "both")
LONG_RANGE_MODES = ("none", "ewald", "pme")
#: relative accuracy of each long-range method when long_range_accuracy is not given
#: (ewald: energy terms dropped; pme: RMS force error, see equiforce.nn.mesh_electrostatics)
DEFAULT_LONG_RANGE_ACCURACY = {"ewald": 1e-6, "pme": 1e-4}


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
    feature_parity: str = "natural"  # O3: "natural" (l with parity (-1)^l, like the harmonics)
                                     # or "both" (even and odd copies of every l, NequIP's parity: true)
    avg_num_neighbors: float = 1.0  # message normalisation; the trainer sets it from data
    resnet: bool = True             # residual update when a layer's irreps in == out
    dipole: str = "none"            # dipole head: "none" | "direct" | "charges" | "both" (e·Å)
    direct_forces: bool = False     # forces from a per-atom l=1 head (non-conservative baseline)
    polarizability: bool = False    # polarizability head: symmetric 3x3 per structure (e·Å²/V), 0e + 2e
    long_range: str = "none"        # "none" | "ewald" | "pme": + electrostatics of learned charges
    # relative accuracy; None: ewald 1e-6 (energy; sets alpha and k_cut), pme 1e-4 (forces; sets
    # the smearing and mesh spacing)
    long_range_accuracy: Optional[float] = None
    long_range_cutoff: float = 10.0     # real-space cutoff (Å)
    long_range_damping: float = 0.0     # Coulomb kernel erf(r/w)/r with width w (Å); 0: 1/r

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        reject_unknown_keys(d, cls.__dataclass_fields__, "model setting")
        return cls(**d)

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
        if self.feature_parity not in FEATURE_PARITIES:
            raise ValueError(f"feature_parity must be one of {FEATURE_PARITIES}, got {self.feature_parity!r}")
        if self.feature_parity == "both" and self.symmetry != "O3":
            raise ValueError("feature_parity 'both' needs symmetry O3 (in SE3 mode every feature is even); "
                             "use feature_parity 'natural' with SE3")
        if not self.avg_num_neighbors > 0:
            raise ValueError(f"avg_num_neighbors must be > 0, got {self.avg_num_neighbors!r}")
        if self.dipole not in DIPOLE_MODES:
            raise ValueError(f"dipole must be one of {DIPOLE_MODES}, got {self.dipole!r}")
        if not isinstance(self.direct_forces, bool):
            raise ValueError(f"direct_forces must be true or false, got {self.direct_forces!r}")
        if not isinstance(self.polarizability, bool):
            raise ValueError(f"polarizability must be true or false, got {self.polarizability!r}")
        if self.polarizability and self.lmax == 1 and self.num_layers < 2:
            raise ValueError("polarizability needs l=2 features: with lmax 1 the l=2 block comes from 1o x 1o, "
                             "which needs num_layers >= 2; use lmax >= 2 or more layers")
        if self.long_range not in LONG_RANGE_MODES:
            raise ValueError(f"long_range must be one of {LONG_RANGE_MODES}, got {self.long_range!r}")
        if self.long_range != "none":
            accuracy = self.long_range_accuracy
            if accuracy is not None and not (isinstance(accuracy, float) and 0.0 < accuracy < 1e-2):
                raise ValueError("long_range_accuracy must be a relative accuracy in (0, 0.01), e.g. 1e-6 (ewald) "
                                 f"or 1e-4 (pme), or unset for the method's default; got {accuracy!r}")
            if not (isinstance(self.long_range_cutoff, (int, float)) and self.long_range_cutoff > 0):
                raise ValueError(f"long_range_cutoff must be a real-space cutoff > 0 Å (e.g. 10.0), "
                                 f"got {self.long_range_cutoff!r}")
            if not (isinstance(self.long_range_damping, (int, float)) and self.long_range_damping >= 0):
                raise ValueError(f"long_range_damping must be a width >= 0 Å (0: plain 1/r), "
                                 f"got {self.long_range_damping!r}")
            s = math.sqrt(-math.log(self.resolved_long_range_accuracy()))
            if self.long_range_damping * s > self.long_range_cutoff:
                raise ValueError(f"long_range_damping {self.long_range_damping} Å needs long_range_cutoff >= "
                                 f"{self.long_range_damping * s:.3g} Å; raise the cutoff or lower the damping")


    def resolved_long_range_accuracy(self) -> float:
        """``long_range_accuracy``, or the method's default when it is None."""
        if self.long_range_accuracy is not None:
            return float(self.long_range_accuracy)
        return DEFAULT_LONG_RANGE_ACCURACY.get(self.long_range, 1e-6)


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
        self.radial.set_output_order(self.tp.weight_perm)  # weights in the TP's merged path order
        self.linear_2 = Linear(self.tp.irreps_out, self.gate.irreps_in)
        self.self_connection = SpeciesLinear(irreps_in, self.gate.irreps_in, num_species)
        self.message_scale = 1.0 / math.sqrt(avg_num_neighbors)
        self.resnet = bool(resnet) and self.irreps_in == self.irreps_out
        # the compiled message passing (EquiforceModel.use_fused_kernels); None: the PyTorch path only
        self.fused_tp: Optional[FusedTensorProduct] = None

    def forward(self, x: Tensor, species: Tensor, edge_index: Tensor, sh: Tensor,
                radial_basis: Tensor, envelope: Tensor, radial_index: Optional[Tensor] = None,
                n_out: int = -1) -> Tensor:
        # n_out >= 0: only the first n_out atoms are updated ([n_out, dim_out]; every receiver
        # edge_index[0] must be < n_out); the other rows only send messages (ghost atoms)
        # Feature blocks travel component-major ([rows, 2l+1, mul], see EdgeTensorProduct) from
        # linear_1 to linear_2. The tensor product is linear in the harmonics, so the envelope and
        # 1/sqrt(avg_num_neighbors) scale them ([E, sh_dim]) instead of every weight or message.
        # Blocks the TP merges (same l, see EdgeTensorProduct) are concatenated along channels per
        # atom, before the gather, and split back per atom after the scatter.
        n = x.shape[0] if n_out < 0 else n_out
        hs = self.tp.merge_inputs(self.linear_1.forward_to_blocks(x))     # [N, d, mul] per gather set
        src, dst = edge_index[1], edge_index[0]
        sh = sh * (envelope * self.message_scale).unsqueeze(-1)
        # radial weights [E, weight_numel] in merged path order; with radial_index, [U, ...] (one row
        # per pair of reverse edges, see EquiforceModel.features) and radial_index [E] the row of each edge
        weight = self.radial(radial_basis)
        fused = self.fused_tp
        if fused is not None and sh.device.type == "cpu":
            if radial_index is None:
                radial_index = torch.arange(sh.shape[0], device=sh.device)
            agg = fused(hs, sh, weight, radial_index, src, dst, x.shape[0])  # [N, d3, mul] per merged path
            if n_out >= 0:
                agg = [a[:n_out] for a in agg]  # rows beyond n_out received nothing
        else:
            if radial_index is not None:
                weight = weight.index_select(0, radial_index)
            xs = [hb.index_select(0, src) for hb in hs]                   # [E, d, mul] per gather set
            msgs = self.tp.forward_merged(xs, sh, weight)                 # [E, d3, mul] per merged path
            agg = [scatter_sum(m, dst, n) for m in msgs]                  # [N, d3, mul] per merged path
        if n_out >= 0:
            x, species = x[:n_out], species[:n_out]
        out = self.gate(self.linear_2.forward_from_blocks(self.tp.split_merged(agg))
                        + self.self_connection(x, species))
        if self.resnet:
            out = out + x
        return out


class EquiforceModel(nn.Module):
    """Per-atom energies (eV) from species and edge vectors (the energy-model contract of
    :mod:`equiforce.model.analytic`): ``forward(species [N], edge_index [2, E], edge_vec [E, 3] Å,
    batch [N], num_graphs) -> [N]``."""

    __jit_unused_properties__ = ["fused_kernels"]

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
        if config.feature_parity == "both":  # 0e 0o 1o 1e 2e 2o ...: natural parity first
            hidden = Irreps([(c, (l, p * (-1) ** l)) for l in range(config.lmax + 1) for p in (1, -1)])
        else:
            hidden = Irreps([(c, (l, (-1) ** l if parity else 1)) for l in range(config.lmax + 1)])
        scalars = Irreps([(c, (0, 1))])
        self.channels = int(c)
        self.dipole_mode = str(config.dipole)
        self.direct_forces = bool(config.direct_forces)
        self.has_dipole = self.dipole_mode != "none"
        self.long_range = str(config.long_range)
        self.has_long_range = self.long_range != "none"
        needs_vectors = self.dipole_mode in ("direct", "both") or self.direct_forces
        # with lmax >= 1 the last layer also outputs C vectors (1o in O(3), 1e in SE(3) mode)
        vector_ir = (1, -1 if parity else 1)
        self.equivariant_vectors = config.lmax >= 1
        last = scalars + Irreps([(c, vector_ir)]) if needs_vectors and self.equivariant_vectors else scalars
        # the polarizability's l=2 block (even under inversion: a true tensor) after the vectors
        self.has_polarizability = bool(config.polarizability)
        l2_start = last.dim
        if self.has_polarizability and self.equivariant_vectors:
            last = last + Irreps([(c, (2, 1))])

        self.embedding = nn.Embedding(s, c)
        nn.init.normal_(self.embedding.weight)
        self.basis = BesselBasis(config.r_max, config.num_bessel)
        radial_sizes = [config.num_bessel] + [config.radial_hidden] * config.radial_layers
        layers: List[nn.Module] = []
        irreps = scalars
        for t in range(config.num_layers):
            target = last if t == config.num_layers - 1 else hidden
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
        # heads (None when not configured: no parameters, no change to the energy model's state)
        vec = [vector_ir[0], vector_ir[1]]
        self.dipole_head = VectorHead(c, 1, vec, self.equivariant_vectors) \
            if self.dipole_mode in ("direct", "both") else None
        self.charge_head = ChargeHead(c) if self.dipole_mode in ("charges", "both") or self.has_long_range \
            else None
        self.electrostatics = Electrostatics(config.resolved_long_range_accuracy(), float(config.long_range_cutoff),
                                             0.0, float(config.long_range_damping), self.long_range) \
            if self.has_long_range else None
        self.force_head = VectorHead(c, 1, vec, self.equivariant_vectors) if self.direct_forces else None
        if self.has_dipole or self.has_long_range:
            # e·Å per unit of network output; the trainer sets it to the RMS dipole component
            self.register_buffer("dipole_scale", torch.ones((), dtype=torch.float64))
        self.polarizability_head = PolarizabilityHead(c, l2_start, self.equivariant_vectors) \
            if self.has_polarizability else None
        if self.has_polarizability:
            # e·Å²/V per unit of network output and per-species atomic (isotropic) polarizabilities;
            # the trainer fits both (set_polarizability_scale_shift)
            self.register_buffer("polarizability_scale", torch.ones((), dtype=torch.float64))
            self.register_buffer("polarizability_shift", torch.zeros(s, dtype=torch.float64))
            # the l=2 basis [5, 3, 3]: not saved in checkpoints, and re-derived exactly after every
            # dtype/device change (_apply), so a model trained in float32 and exported in float64
            # does not keep a float32-rounded map (measured without this: R alpha R^T held to 2e-8)
            self.register_buffer("polarizability_l2_basis", polarizability_basis(torch.float64), persistent=False)
        # True while training (parameters change); export freezes e_iso into `isolated_raw`
        self.online_isolated = True
        # inference kernels (use_fused_kernels): reverse edges share radial weights on the CPU
        self.radial_pairing: Optional[RadialPairing] = None

    def set_scale_shift(self, scale: Tensor, shift: Tensor) -> None:
        """Per-species energy scale and shift [S] (eV)."""
        s = len(self.species_names)
        if scale.shape != (s,) or shift.shape != (s,):
            raise ValueError(f"scale and shift must have shape ({s},)")
        self.scale.copy_(scale.to(self.scale))
        self.shift.copy_(shift.to(self.shift))

    def set_dipole_scale(self, value: float) -> None:
        """e·Å per unit of the dipole heads' output (the trainer uses the RMS dipole component)."""
        if not self.has_dipole:
            raise ValueError("this model has no dipole head (model.dipole = 'none')")
        if not value > 0:
            raise ValueError(f"dipole scale must be > 0 e·Å, got {value}")
        self.dipole_scale.fill_(float(value))

    def _apply(self, fn, recurse=True):
        """nn.Module._apply (``.to``, ``.double()``, ``.cuda()``, ...), then the polarizability's l=2
        basis re-derived in float64 and cast once to the new dtype and device (never a cast of a
        rounded copy)."""
        super()._apply(fn, recurse)
        if getattr(self, "has_polarizability", False):
            b = self.polarizability_l2_basis
            self.polarizability_l2_basis = polarizability_basis(torch.float64).to(device=b.device, dtype=b.dtype)
        return self

    def set_polarizability_scale_shift(self, scale: float, shift: Tensor) -> None:
        """e·Å²/V per unit of the polarizability head's output (> 0) and per-species isotropic atomic
        polarizabilities [S] (e·Å²/V; the trainer fits them by least squares of tr(alpha)/3)."""
        if not self.has_polarizability:
            raise ValueError("this model has no polarizability head (model.polarizability = false)")
        if not scale > 0:
            raise ValueError(f"polarizability scale must be > 0 e·Å²/V, got {scale}")
        s = len(self.species_names)
        if shift.shape != (s,):
            raise ValueError(f"polarizability shift must have shape ({s},)")
        self.polarizability_scale.fill_(float(scale))
        self.polarizability_shift.copy_(shift.to(self.polarizability_shift))

    def features(self, species: Tensor, edge_index: Tensor, edge_vec: Tensor) -> Tensor:
        """Output of the last interaction layer [N, dim]: ``C`` scalars first (then ``C`` vectors
        when a vector head needs them)."""
        sh, basis, envelope, radial_index = self.edge_terms(species, edge_index, edge_vec)
        x = self.embedding(species).to(edge_vec.dtype)
        for layer in self.layers:
            x = layer(x, species, edge_index, sh, basis, envelope, radial_index)
        return x

    def edge_terms(self, species: Tensor, edge_index: Tensor,
                   edge_vec: Tensor) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """What every layer reads from the edges: harmonics [E, sh_dim], radial basis [E or U,
        num_bessel], envelope [E], and (fused kernels on the CPU) the row of the radial basis of
        each edge [E] (None: one row per edge)."""
        r = safe_norm(edge_vec)
        sh = spherical_harmonics(self.lmax, safe_normalize(edge_vec, r))
        envelope = polynomial_cutoff(r, self.r_max, self.cutoff_p)
        radial_index: Optional[Tensor] = None
        pairing = self.radial_pairing
        if pairing is not None and edge_vec.device.type == "cpu":
            # reverse edges (j->i, i->j: vectors exactly opposite) share their radial weights: the
            # radial MLPs run on one edge of each pair. The other edge's radial derivative is then
            # credited to its partner, which gives the same forces and virial (v and -v, src and dst
            # swapped); per-edge gradients with respect to edge_vec are not split the same way.
            reps, radial_index = pairing(edge_index, edge_vec, species.shape[0])
            basis = self.basis(r.index_select(0, reps))
        else:
            basis = self.basis(r)
        return sh, basis, envelope, radial_index

    # ---- per-layer entry points (an engine that exchanges features between layers, e.g. LAMMPS'
    # `path exchange`); features() == layer_step(L-1, ... layer_step(0, embed_species(species)))

    def layer_dims(self) -> List[int]:
        """Feature width before each layer and after the last: [d0, d1, ..., dL]."""
        return [int(self.channels)] + [int(layer.irreps_out.dim) for layer in self.layers]

    def embed_species(self, species: Tensor) -> Tensor:
        """Input features of the first layer [N, d0] (no dependence on positions)."""
        return self.embedding(species)

    def layer_step(self, k: int, x: Tensor, species: Tensor, edge_index: Tensor, edge_vec: Tensor,
                   n_update: int) -> Tensor:
        """Layer ``k`` on features ``x`` [N, d_k] -> [n_update, d_{k+1}]: the first ``n_update``
        atoms updated, exact when every edge into them is given with the neighbours' features in
        ``x``. Every receiver ``edge_index[0]`` must be ``< n_update`` (rows beyond only send
        messages: ghost atoms), so only the updated rows pay for the output transforms."""
        if k < 0 or k >= self.num_layers:
            raise RuntimeError("equiforce: layer index " + str(k) + " outside [0, " + str(self.num_layers) + ")")
        sh, basis, envelope, radial_index = self.edge_terms(species, edge_index, edge_vec)
        out = x
        for i, layer in enumerate(self.layers):
            if i == k:
                out = layer(x, species, edge_index, sh, basis, envelope, radial_index, n_update)
        return out

    def readout_energy(self, x: Tensor, species: Tensor) -> Tensor:
        """Per-atom energies [N] (eV; scale, shift and isolated-atom reference included) from the
        last layer's features ``x`` [N, d_L]."""
        raw = self.readout(x[:, :self.channels]).squeeze(-1)
        return self._atom_energy(raw, species, x)

    def raw_energy(self, species: Tensor, edge_index: Tensor, edge_vec: Tensor) -> Tensor:
        """Network output per atom before scale, shift and isolated-atom reference [N]."""
        x = self.features(species, edge_index, edge_vec)
        return self.readout(x[:, :self.channels]).squeeze(-1)

    def isolated_atom_raw(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``e_iso`` [S]: raw output of each species with no neighbours."""
        species = torch.arange(len(self.species_names), device=device)
        no_edges = torch.zeros((2, 0), dtype=torch.long, device=device)
        return self.raw_energy(species, no_edges, torch.zeros((0, 3), dtype=dtype, device=device))

    def forward(self, species: Tensor, edge_index: Tensor, edge_vec: Tensor, batch: Tensor,
                num_graphs: int) -> Tensor:
        if self.has_long_range:
            raise RuntimeError("a long-range model (long_range = 'ewald' or 'pme') needs positions and the cell: call "
                               "predict(..., pos=, cell=) or equiforce.model.forces.model_outputs(..., cell=)")
        raw = self.raw_energy(species, edge_index, edge_vec)
        return self._atom_energy(raw, species, edge_vec)

    @torch.jit.export
    def predict(self, species: Tensor, edge_index: Tensor, edge_vec: Tensor, batch: Tensor, num_graphs: int,
                pos: Optional[Tensor] = None, total_charge: Optional[Tensor] = None,
                cell: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Every output of the model in one pass over the features.

        Args as :meth:`forward`, plus ``pos`` [N, 3] (Å; needed by the charge dipole and long-range
        models), ``total_charge`` [B] (e; default 0) and ``cell`` [B, 3, 3] (Å, lattice rows; zeros
        for open boundaries; needed by long-range models). For long-range models
        ``per_atom_energy`` includes the electrostatic part, given alone as ``electrostatic_energy``
        [N]; forces need the gradients with respect to ``pos`` and ``cell`` as well as ``edge_vec``
        (see :func:`equiforce.model.forces.model_outputs`). Returns a dict with ``per_atom_energy`` [N] (eV) and,
        when configured, ``dipole`` [B, 3] (e·Å), ``charges`` [N] (e), ``direct_dipole`` /
        ``charge_dipole`` [B, 3] (the two parts of ``dipole`` in mode "both"), ``forces`` [N, 3]
        (eV/Å, the direct-force head; conservative forces are ``-dE/dpos``, see
        :func:`equiforce.model.forces.model_outputs`), ``polarizability`` [B, 3, 3] (e·Å²/V, symmetric).
        """
        x = self.features(species, edge_index, edge_vec)
        raw = self.readout(x[:, :self.channels]).squeeze(-1)
        out: Dict[str, Tensor] = {"per_atom_energy": self._atom_energy(raw, species, edge_vec)}
        dipole = torch.zeros((num_graphs, 3), dtype=edge_vec.dtype, device=edge_vec.device)
        head = self.dipole_head
        if head is not None:
            direct = scatter_sum(head(x)[:, 0, :], batch, num_graphs) * self.dipole_scale.to(edge_vec.dtype)
            out["direct_dipole"] = direct
            dipole = dipole + direct
        charge_head = self.charge_head
        if charge_head is not None:
            if pos is None:
                raise ValueError("atomic charges (charge dipole, long-range) need the positions: pass pos= to predict")
            q = charge_head(x) * self.dipole_scale.to(edge_vec.dtype)
            if total_charge is None:
                total = torch.zeros(num_graphs, dtype=edge_vec.dtype, device=edge_vec.device)
            else:
                total = total_charge.to(edge_vec.dtype)
            q = conserve_charge(q, batch, num_graphs, total)
            out["charges"] = q
            if self.dipole_mode in ("charges", "both"):
                qd = charge_dipole(q, pos.to(edge_vec.dtype), batch, num_graphs)
                out["charge_dipole"] = qd
                dipole = dipole + qd
            electrostatics = self.electrostatics
            if electrostatics is not None:
                if cell is None:
                    raise ValueError("a long-range model needs the cell: pass cell= [B, 3, 3] to predict "
                                     "(zeros for open boundaries)")
                e_el = electrostatics(pos.to(edge_vec.dtype), q, cell.to(edge_vec.dtype), batch, num_graphs)
                out["electrostatic_energy"] = e_el
                out["per_atom_energy"] = out["per_atom_energy"] + e_el
        if self.has_dipole:
            out["dipole"] = dipole
        force_head = self.force_head
        if force_head is not None:
            scale = self.scale.to(edge_vec.dtype)
            out["forces"] = force_head(x)[:, 0, :] * scale[species].unsqueeze(-1)
        polarizability_head = self.polarizability_head
        if polarizability_head is not None:
            a0, l2 = polarizability_head(x)
            p_scale = self.polarizability_scale.to(edge_vec.dtype)
            a0 = a0 * p_scale + self.polarizability_shift.to(edge_vec.dtype)[species]
            out["polarizability"] = polarizability_sum(a0, l2 * p_scale, batch, num_graphs,
                                                       self.polarizability_l2_basis.to(edge_vec.dtype))
        return out

    def _atom_energy(self, raw: Tensor, species: Tensor, edge_vec: Tensor) -> Tensor:
        """``scale * (raw - e_iso) + shift`` per atom [N] (eV)."""
        if self.online_isolated:
            iso = self.isolated_atom_raw(edge_vec.dtype, edge_vec.device)
        else:
            iso = self.isolated_raw.to(edge_vec.dtype)
        scale = self.scale.to(edge_vec.dtype)
        shift = self.shift.to(edge_vec.dtype)
        return scale[species] * (raw - iso[species]) + shift[species]

    def use_fused_kernels(self, enabled: bool = True, double_backward: bool = False) -> "EquiforceModel":
        """Run message passing through the compiled op ``equiforce::tp_scatter`` on the CPU (same
        numbers as the PyTorch path to rounding; faster, and no per-edge intermediates kept for the
        backward pass). The op itself has first derivatives only: energies, forces, stress and
        virial (``create_graph=True`` raises). ``double_backward=True`` (training with a force loss,
        eager mode) wraps it in a Python autograd function with derivatives of every order, built
        from the same kernels (``equiforce.nn.tensor_product._TpScatterFn``); TorchScript always
        compiles the plain op. Other devices always take the PyTorch path. Returns ``self``."""
        device = self.embedding.weight.device
        for layer in self.layers:
            layer.fused_tp = FusedTensorProduct(layer.tp).to(device) if enabled else None
            if layer.fused_tp is not None:
                layer.fused_tp.double_backward = bool(double_backward)
        self.radial_pairing = RadialPairing() if enabled else None
        return self

    @property
    def fused_kernels(self) -> bool:
        """True when message passing runs through the compiled op (:meth:`use_fused_kernels`)."""
        return self.radial_pairing is not None

    def for_export(self, fused: bool = True) -> "EquiforceModel":
        """A frozen copy for export: isolated-atom reference stored, no per-call recomputation, and
        parameters that do not require grad, so autograd (forces = -dE/dr) keeps only what the
        gradient with respect to the geometry needs (no activations saved for weight gradients).
        ``fused``: message passing through the compiled op on the CPU (:meth:`use_fused_kernels`);
        False gives a file that any libtorch program loads without equiforce's op library."""
        model = copy.deepcopy(self).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        model.use_fused_kernels(bool(fused))
        with torch.no_grad():
            weight = model.embedding.weight  # the network's dtype (buffers may stay float64)
            model.isolated_raw.copy_(model.isolated_atom_raw(weight.dtype, weight.device))
        model.online_isolated = False
        return model
