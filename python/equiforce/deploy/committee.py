"""Committee files: several trained models of the same species and cutoff in ONE exported file.

A committee file keeps the exported contract (see :mod:`equiforce.deploy.export`)::

    energy, per_atom_energy, forces, virial = module(pos, species, edge_index, edge_shift, cell, n_local)

returns the committee MEAN (what MD integrates), so every engine and LAMMPS path that runs a
plain file runs a committee unchanged. One more method gives the members one by one::

    energies, per_atom_energies, forces, virials = module.committee(pos, species, edge_index, edge_shift, cell, n_local)
    #  [M] eV,  [M, N] eV,         [M, N, 3] eV/Å,  [M, 3, 3] eV

and ``forward`` is exactly the mean over the first axis of ``committee`` (``torch.mean(dim=0)``).
The members share the engine's neighbour list and the engine boundary (one call, one set of
edges); each member evaluates its own network on them, one after the other inside the module
(no weight batching across members: see README "Committee models").

The spread the engines report (:func:`committee_uncertainty`, the same definition everywhere):

* ``energy_uncertainty`` (eV): the standard deviation of the members' energies,
  ``sqrt(mean_m (E_m - mean E)^2)`` (population form, as DeePMD's model deviation);
* ``force_uncertainty`` [N] (eV/Å): per atom, the RMS deviation of the members' force vectors
  from their mean, ``sqrt(mean_m |F_m,i - mean F_i|^2)``; its maximum over the atoms is the
  frame's ``max_force_uncertainty``.

Both are invariant under rotations and translations (the members are) and are exactly zero for a
committee of identical members.

Metadata: that of the first member (species, r_max, dtype, masses, ...) with ``"committee":
{"size": M, "members": [...]}`` (each member's source and weights digest), ``num_layers`` and
``receptive_field`` the largest of the members (the ghost shell LAMMPS needs), ``"exchange": false``
(no per-layer entry points: LAMMPS runs committees on the images, ghost-shell or gather paths), and
``outputs`` / ``methods`` naming the uncertainty and ``committee``. Members must share species (same
order), r_max and the exported dtype; :func:`export_committee` refuses anything else in one line.
"""
import io
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ModelFileError
from ..units import MIN_DISTANCE
from .export import (METADATA_ATTRIBUTE, METADATA_FILE, build_metadata, check_output_path, exported_wrapper,
                     species_masses, weights_digest, write_atomic)

COMMITTEE_OUTPUTS = ["energy_uncertainty", "force_uncertainty"]
COMMITTEE_METHOD = ("(pos, species, edge_index, edge_shift, cell, n_local) -> (energy[M], per_atom_energy[M, N], "
                    "forces[M, N, 3], virial[M, 3, 3]) of the M members")


class ExportedCommittee(nn.Module):
    """M exported wrappers (:func:`equiforce.deploy.export.exported_wrapper`) behind the exported
    signature: ``forward`` is the members' mean, :meth:`committee` the members' outputs stacked."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(list(members))
        self.size = len(members)

    @torch.jit.export
    def committee(self, pos: Tensor, species: Tensor, edge_index: Tensor, edge_shift: Tensor, cell: Tensor,
                  n_local: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every member on the same inputs: energies [M] (eV), per-atom energies [M, N] (eV),
        forces [M, N, 3] (eV/Å), virials [M, 3, 3] (eV)."""
        energies: List[Tensor] = []
        atom_energies: List[Tensor] = []
        forces: List[Tensor] = []
        virials: List[Tensor] = []
        for member in self.members:
            e, ea, f, w = member(pos, species, edge_index, edge_shift, cell, n_local)
            energies.append(e)
            atom_energies.append(ea)
            forces.append(f)
            virials.append(w)
        return torch.stack(energies), torch.stack(atom_energies), torch.stack(forces), torch.stack(virials)

    def forward(self, pos: Tensor, species: Tensor, edge_index: Tensor, edge_shift: Tensor, cell: Tensor,
                n_local: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        e, ea, f, w = self.committee(pos, species, edge_index, edge_shift, cell, n_local)
        return e.mean(dim=0), ea.mean(dim=0), f.mean(dim=0), w.mean(dim=0)


def committee_uncertainty(energies, forces) -> Tuple[float, np.ndarray]:
    """(energy_uncertainty eV, force_uncertainty [N] eV/Å) of member energies [M] and forces [M, N, 3]
    (numpy or torch, any float dtype; computed in float64). See the module docstring."""
    e = np.asarray(energies, dtype=np.float64).reshape(-1)
    f = np.asarray(forces, dtype=np.float64)
    if e.size == 0 or f.ndim != 3 or f.shape[0] != e.size or f.shape[2] != 3:
        raise ValueError(f"committee_uncertainty: expected energies [M] and forces [M, N, 3], got shapes "
                         f"{e.shape} and {f.shape}")
    # deviations from the first member, var = mean(d^2) - mean(d)^2: the same number as the
    # deviations from the mean, and exactly 0 for identical members (no rounding of a mean)
    de = e - e[0]
    energy_unc = float(np.sqrt(max(float(np.mean(de * de) - np.mean(de) ** 2), 0.0)))
    df = f - f[:1]
    mean_df = df.mean(axis=0)
    var = np.mean(np.sum(df * df, axis=2), axis=0) - np.sum(mean_df * mean_df, axis=1)
    return energy_unc, np.sqrt(np.maximum(var, 0.0))


def _member_label(k: int, sources: Sequence[str]) -> str:
    return f"member {k + 1} ({sources[k]})" if k < len(sources) else f"member {k + 1}"


def check_members(models: Sequence[nn.Module], sources: Sequence[str] = ()) -> None:
    """ModelFileError (one line, naming the members and the fix) unless the models can form a
    committee: at least two, same species in the same order, same r_max, none long-range."""
    if len(models) < 2:
        raise ModelFileError(f"a committee needs at least 2 trained models, got {len(models)}; give several run "
                             "directories: `equiforce export RUN_A RUN_B RUN_C -o committee.pt`")
    first = models[0]
    for k, m in enumerate(models):
        if bool(getattr(m, "has_long_range", False)):
            raise ModelFileError(f"{_member_label(k, sources)} has long-range electrostatics; committees of "
                                 "long-range models are not supported: export it on its own")
        if k == 0:
            continue
        if list(m.species_names) != list(first.species_names):
            raise ModelFileError(f"{_member_label(k, sources)} has species {list(m.species_names)} but "
                                 f"{_member_label(0, sources)} has {list(first.species_names)}; every member of a "
                                 "committee must be trained on the same species (same order): train it on the same "
                                 "data set or leave it out")
        if abs(float(m.r_max) - float(first.r_max)) > 1e-12:
            raise ModelFileError(f"{_member_label(k, sources)} has r_max {float(m.r_max):g} Å but "
                                 f"{_member_label(0, sources)} has {float(first.r_max):g} Å; the members share one "
                                 "neighbour list, so train them with the same --r-max")


def export_committee(models: Sequence[nn.Module], path: str, dtype: torch.dtype = torch.float64,
                     symmetries: Optional[Sequence[str]] = None, sources: Sequence[str] = (),
                     member_metadata: Optional[Sequence[Dict[str, Any]]] = None,
                     check_structure: Optional[Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = None
                     ) -> Dict[str, Any]:
    """Script ``models`` (energy models, e.g. ``model.for_export()``) as one committee file at ``path``.

    Args:
        models: M >= 2 models with the same species (order), r_max; see :func:`check_members`.
        dtype: exported dtype of every member.
        symmetries: each member's "O3" / "SE3" / "none" (the file's is the common one, else "SE3").
        sources: where each member came from (run directory or checkpoint), for messages and metadata.
        member_metadata: per member, extra entries for ``metadata["committee"]["members"][k]``.
        check_structure: (pos, species, edge_index, edge_shift, cell): the scripted committee is
            re-run against the eager one and the export fails if they differ.

    The file is written atomically (:func:`equiforce.deploy.export.write_atomic`). Returns the metadata.
    """
    models = [m.to(dtype).eval() for m in models]
    check_members(models, sources)
    check_output_path(path)
    symmetries = list(symmetries) if symmetries else ["none"] * len(models)
    symmetry = symmetries[0] if len(set(symmetries)) == 1 else "SE3"
    wrappers = [exported_wrapper(m) for m in models]
    committee = ExportedCommittee(wrappers)
    meta = build_metadata(models[0], dtype, symmetry, "equiforce")
    meta["num_layers"] = max(int(m.num_layers) for m in models)
    meta["receptive_field"] = max(float(m.r_max) * int(m.num_layers) for m in models)
    meta["conservative"] = all(not bool(getattr(m, "direct_forces", False)) for m in models)
    meta["outputs"] = ["energy", "per_atom_energy", "forces", "virial"] + COMMITTEE_OUTPUTS
    meta["exchange"] = False  # no per-layer entry points for a committee
    for key in ("layer_dims", "dipole_mode", "forces_from"):
        meta.pop(key, None)
    meta["methods"] = {"committee": COMMITTEE_METHOD}
    meta["units"] = {"energy": "eV", "length": "Angstrom", "forces": "eV/Angstrom", "virial": "eV",
                     "energy_uncertainty": "eV", "force_uncertainty": "eV/Angstrom"}
    meta["custom_ops"] = sorted({op for m in models for op in build_metadata(m, dtype)["custom_ops"]})
    meta["min_distance"] = float(MIN_DISTANCE)
    masses = species_masses(meta["species"])
    if masses is not None:
        meta["masses"] = masses
    members = []
    for k, w in enumerate(wrappers):
        entry: Dict[str, Any] = {"source": sources[k] if k < len(sources) else f"member {k + 1}",
                                 "num_layers": int(models[k].num_layers), "symmetry": symmetries[k]}
        if member_metadata and k < len(member_metadata):
            entry.update(member_metadata[k])
        members.append(entry)
    meta["committee"] = {"size": len(models), "members": members,
                         "mean": "forward returns the mean of the members (energy, per-atom energy, forces, virial)",
                         "energy_uncertainty": "standard deviation of the members' energies (eV, population form)",
                         "force_uncertainty": "per atom, RMS deviation of the members' force vectors from their "
                                              "mean (eV/Angstrom)"}
    setattr(committee, METADATA_ATTRIBUTE, "")
    scripted = torch.jit.script(committee)
    state = scripted.state_dict()
    meta["weights_digest"] = weights_digest(state)
    for k, entry in enumerate(members):  # as the member's own exported file records it (scripted state)
        prefix = f"members.{k}."
        entry["weights_digest"] = weights_digest({key[len(prefix):]: v for key, v in state.items()
                                                  if key.startswith(prefix)})
    text = json.dumps(meta, indent=1)
    setattr(scripted, METADATA_ATTRIBUTE, text)
    if check_structure is not None:
        pos, species, edge_index, edge_shift, cell = check_structure
        args = (pos.to(dtype), species, edge_index, edge_shift.to(dtype), cell.to(dtype), int(pos.shape[0]))
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        for name, a, b in zip(("energy", "per_atom_energy", "forces", "virial"), committee(*args), scripted(*args)):
            scale = max(1.0, float(a.abs().max()) if a.numel() else 1.0)
            if a.shape != b.shape or (a.numel() and float((a - b).abs().max()) > tol * scale):
                raise RuntimeError(f"export check failed: scripted and eager committee {name} differ")
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer, _extra_files={METADATA_FILE: text})
    write_atomic(path, buffer.getvalue())
    return meta


def committee_size(meta: Dict[str, Any]) -> int:
    """Number of members of an exported file (0 for a single model)."""
    c = meta.get("committee")
    return int(c.get("size", 0)) if isinstance(c, dict) else 0


@dataclass
class CommitteeResult:
    """Members' outputs for one structure (float64 numpy): energies [M] (eV), forces [M, N, 3] (eV/Å),
    and the spread (:func:`committee_uncertainty`)."""
    energies: np.ndarray
    forces: np.ndarray
    energy_uncertainty: float
    force_uncertainty: np.ndarray

    @property
    def max_force_uncertainty(self) -> float:
        return float(self.force_uncertainty.max()) if self.force_uncertainty.size else 0.0
