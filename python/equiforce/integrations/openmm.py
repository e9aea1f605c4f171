"""Run an exported equiforce model in OpenMM through openmm-torch's ``TorchForce``.

Three entry points, in the spirit of openmm-ml::

    force = create_force("model.pt", atoms=None, elements=["O", "H", "H"], periodic=False)
    system = create_system("model.pt", topology)                       # everything by the model
    system = create_mixed_system("model.pt", topology, mm_system, ml_atoms)   # ML/MM

Units at this boundary are OpenMM's: positions and box vectors in nm, energy in kJ/mol, forces in
kJ/mol/nm, masses in dalton. The conversion to the model's eV and Å happens inside the TorchScript
module (:class:`equiforce.integrations.openmm_module.OpenMMPotential`, which also does the neighbour search:
a Verlet list over the cell list of :mod:`equiforce.data.neighbors`, periodic and triclinic boxes
included), so the resulting ``System`` serialises to XML and runs on any platform openmm-torch
supports (Reference and CPU tested; CUDA through the same module, untested here: no GPU).
Read such XML back with :func:`deserialize_system` (OpenMM's own deserialiser crashes on
``TorchForce`` with the pinned wheels openmm 8.6.1 + openmmtorch 1.5).

Errors raised inside the module during an evaluation (atoms closer than the model's
``min_distance``, OpenMM's never-set default box with ``periodic=True``, a System without the ML
atoms) reach Python as ``openmm.OpenMMException`` whose reason is the last line of a TorchScript
trace; ``with clear_errors(): ...`` around the calls that evaluate re-raises them as
:class:`EquiforceOpenMMError` with the reason as its one-line message.

Mechanical embedding (``create_mixed_system``): bonds, angles and torsions whose atoms all lie in
the ML region are removed from the MM forces, non-bonded pairs inside the ML region become zero
exceptions (``NonbondedForce``) or exclusions (``CustomNonbondedForce``); ML-MM interactions stay
with the MM force field.
"""
import contextlib
import operator
import os
import re
import xml.etree.ElementTree as ET
from typing import Iterable, Iterator, List, Optional, Sequence, Set

import torch

from ..deploy.allocator import tune_malloc
from ..deploy.export import load_exported
from ..errors import ModelFileError
from .openmm_module import EV_TO_KJ_PER_MOL, NM_TO_ANGSTROM, OpenMMPotential

__all__ = ["create_force", "create_system", "create_mixed_system", "create_module", "deserialize_system",
           "tune_torchscript_for_md", "clear_errors", "torchscript_reason", "EquiforceOpenMMError",
           "EV_TO_KJ_PER_MOL", "NM_TO_ANGSTROM", "ModelFileError"]


def _import_openmm():
    try:
        import openmm  # noqa: F401
        import openmmtorch  # noqa: F401  (needs torch imported first; done at module top)
    except ImportError as exc:
        raise ImportError(f"equiforce.openmm needs the packages openmm and openmmtorch ({exc}); "
                          "install them with `pip install openmm openmmtorch`") from None
    _load_torch_kernels(openmm)
    return openmm, openmmtorch


def _load_torch_kernels(openmm) -> None:
    """Make sure openmm-torch's kernels are registered.

    OpenMM loads its plugins when ``openmm`` is first imported; if that happened before ``torch``
    (a user script starting with ``import openmm``), the TorchForce plugins fail to load
    ("libnvrtc.so.12: cannot open shared object file") and every Context later fails with
    "does not support all required kernels". torch is loaded now, so retry exactly those plugins.
    """
    if openmm.Platform.getPlatformByName("Reference").supportsKernels(["CalcTorchForce"]):
        return
    for failure in openmm.Platform.getPluginLoadFailures():
        match = re.search(r"Error loading library (\S*libOpenMMTorch\w*\.so)", failure)
        if match:
            try:
                openmm.Platform.loadPluginLibrary(match.group(1))
            except Exception:  # e.g. the OpenCL variant on a machine without OpenCL
                pass
    if not openmm.Platform.getPlatformByName("Reference").supportsKernels(["CalcTorchForce"]):
        raise ImportError("openmm-torch's TorchForce kernels could not be loaded: "
                          f"{[f for f in openmm.Platform.getPluginLoadFailures() if 'Torch' in f]}; "
                          "check that openmmtorch matches the installed openmm and torch")


def _element_symbol(element) -> str:
    """Symbol of an ``openmm.app.Element``, or a string symbol as given."""
    if element is None:
        raise ValueError("an atom has no element (element is None); equiforce models need the element "
                         "of every ML atom: fix the topology or pass elements= explicitly")
    if isinstance(element, str):
        return element
    symbol = getattr(element, "symbol", None)
    if symbol is None:
        raise TypeError(f"element {element!r} is neither a symbol string nor an openmm.app.Element")
    return str(symbol)


def _species_indices(elements: Sequence, species_names: List[str], atoms: Optional[Sequence[int]]) -> torch.Tensor:
    index = {name: k for k, name in enumerate(species_names)}
    out = []
    for k, element in enumerate(elements):
        symbol = _element_symbol(element)
        if symbol not in index:
            where = f"atom {atoms[k]}" if atoms is not None else f"atom {k}"
            raise ValueError(
                f"element '{symbol}' ({where}) is not one of the model's species {species_names}; "
                "use a model trained on this element or leave the atom out of the ML region")
        out.append(index[symbol])
    return torch.tensor(out, dtype=torch.long)


def _as_indices(values: Iterable, name: str) -> List[int]:
    """Particle indices as ints; ValueError for anything that is not an integer (8.9 is not 8)."""
    out = []
    for value in values:
        if isinstance(value, bool):
            raise ValueError(f"{name} contains {value!r}; give integer particle indices")
        try:
            out.append(operator.index(value))  # int, numpy integers; not floats or strings
        except TypeError:
            raise ValueError(f"{name} contains {value!r}, which is not an integer; give integer particle "
                             f"indices (0-based), e.g. [0, 1, 2]") from None
    return out


def _check_atoms(atoms: Optional[Iterable[int]], n_elements: int) -> Optional[List[int]]:
    if atoms is None:
        return None
    atoms = _as_indices(atoms, "atoms=")
    if len(atoms) == 0:
        raise ValueError("atoms= is empty; give the indices of the ML region (or None for all atoms)")
    if len(set(atoms)) != len(atoms):
        raise ValueError("atoms= contains repeated indices; each ML atom must appear once")
    if min(atoms) < 0:
        raise ValueError(f"atoms= contains a negative index ({min(atoms)}); indices are 0-based particle indices")
    if len(atoms) != n_elements:
        raise ValueError(f"atoms= has {len(atoms)} indices but elements= has {n_elements} entries; "
                         "give one element per ML atom, in the order of atoms=")
    return atoms


def create_module(model_path: str, atoms: Optional[Iterable[int]] = None, elements: Optional[Sequence] = None,
                  periodic: bool = False, neighbor_skin: float = 1.0,
                  allow_default_box: bool = False, check_min_distance: bool = True) -> torch.jit.ScriptModule:
    """The scripted :class:`OpenMMPotential` for ``model_path`` (what ``create_force`` wraps).

    Applies the glibc allocator tuning of :func:`equiforce.deploy.allocator.tune_malloc` to this
    process (as the LAMMPS plugin and the ASE calculator do; ``EQUIFORCE_MALLOC_TUNING=0`` opts out).

    Args:
        model_path: an equiforce export (``equiforce export``); anything else raises ``ModelFileError``.
        atoms: particle indices (0-based, in the OpenMM ``System``) of the ML region; ``None``: all.
        elements: element of each ML atom (symbols or ``openmm.app.Element``), in the order of ``atoms``.
        periodic: apply periodic boundary conditions with the box vectors OpenMM passes (nm).
        neighbor_skin: Verlet-list skin in Å (candidates within r_max + skin are reused until an atom
            moved skin / 2; results are exact either way); 0 searches neighbours on every call.
        allow_default_box: with ``periodic``, accept OpenMM's default box (a 2 nm cube). By default
            the module refuses it: a ``System`` has exactly that box when its box vectors were never
            set, and the model would silently run in a 2 nm periodic box.
        check_min_distance: stop (RuntimeError from the module) when two ML atoms are closer than the
            file's ``min_distance`` (0.5 Å). OpenMM's minimiser (``Simulation.minimizeEnergy``) makes
            trial steps of up to 1 nm in total, which can overlap two atoms of a small molecule for one
            trial; pass False for a System used to minimise such a structure.
    """
    if elements is None:
        raise ValueError("elements= is required: the element of each ML atom (e.g. from topology.atoms())")
    tune_malloc()  # process-wide, as the LAMMPS plugin and the runner do; opt out with EQUIFORCE_MALLOC_TUNING=0
    elements = list(elements)
    atoms = _check_atoms(atoms, len(elements))
    model, meta = load_exported(os.fspath(model_path), map_location="cpu")
    for key in ("species", "r_max", "dtype"):
        if key not in meta:
            raise ModelFileError(f"'{model_path}' metadata has no '{key}'; re-export the model with `equiforce export`")
    if meta["dtype"] not in ("float32", "float64"):
        raise ModelFileError(f"'{model_path}' has dtype '{meta['dtype']}'; equiforce.openmm runs float32 or float64 models")
    species = _species_indices(elements, list(meta["species"]), atoms)
    if not neighbor_skin >= 0.0:
        raise ValueError(f"neighbor_skin={neighbor_skin} must be >= 0 Å")
    wrapper = OpenMMPotential(model, meta, species, atoms=atoms, periodic=bool(periodic), skin=float(neighbor_skin),
                              allow_default_box=bool(allow_default_box), check_min_distance=bool(check_min_distance))
    return torch.jit.script(wrapper)


def create_force(model_path: str, atoms: Optional[Iterable[int]] = None, elements: Optional[Sequence] = None,
                 periodic: bool = False, force_group: int = 0, neighbor_skin: float = 1.0,
                 tune_torchscript: bool = True, allow_default_box: bool = False, check_min_distance: bool = True):
    """An ``openmmtorch.TorchForce`` evaluating the model on ``atoms``, ready for ``System.addForce``.

    Positions in nm and energy in kJ/mol at OpenMM's side; the force outputs its own forces
    (kJ/mol/nm, ``setOutputsForces(True)``) and uses periodic boundary conditions when ``periodic``
    (any box size and shape OpenMM accepts: images are found by the module's cell list).
    ``force_group`` sets the OpenMM force group (0..31). ``neighbor_skin``: see :func:`create_module`.
    ``tune_torchscript``: call :func:`tune_torchscript_for_md` (a process-wide TorchScript setting).
    With ``periodic``, the System's box vectors must be set: OpenMM's default box (a 2 nm cube, the
    box of a System whose vectors were never set) is refused at the first evaluation unless
    ``allow_default_box=True``. ``check_min_distance``: see :func:`create_module`. Errors raised inside the module reach you as ``OpenMMException``
    holding a TorchScript trace; :func:`clear_errors` turns them into one line.
    """
    _, openmmtorch = _import_openmm()
    if not 0 <= int(force_group) <= 31:
        raise ValueError(f"force_group={force_group} is out of range; OpenMM force groups are 0..31")
    module = create_module(model_path, atoms=atoms, elements=elements, periodic=periodic, neighbor_skin=neighbor_skin,
                           allow_default_box=allow_default_box, check_min_distance=check_min_distance)
    if tune_torchscript:
        tune_torchscript_for_md()
    force = openmmtorch.TorchForce(module)
    force.setOutputsForces(True)
    force.setUsesPeriodicBoundaryConditions(bool(periodic))
    force.setForceGroup(int(force_group))
    force.setName("equiforce")
    return force


_TORCHSCRIPT_TRACE = "The following operation failed in the TorchScript interpreter"
_REASON_LINE = re.compile(r"^(?:builtins\.)?(\w+(?:Error|Exception)): (.+)$")


def torchscript_reason(message: str) -> Optional[str]:
    """The reason (``"ValueError: ..."``) at the end of a TorchScript trace in ``message``; None when
    ``message`` holds no such trace."""
    if _TORCHSCRIPT_TRACE not in message:
        return None
    for line in reversed(message.strip().splitlines()):
        match = _REASON_LINE.match(line.strip())
        if match:
            return f"{match.group(1)}: {match.group(2)}"
    return None


class EquiforceOpenMMError(RuntimeError):
    """An error raised inside the equiforce TorchForce module, as one line; ``.trace`` holds the
    original OpenMM message (TorchScript trace)."""

    def __init__(self, reason: str, trace: str):
        super().__init__(reason)
        self.trace = trace


@contextlib.contextmanager
def clear_errors() -> Iterator[None]:
    """Re-raise errors whose reason OpenMM buries at the end of a TorchScript trace as one line.

    openmm-torch reports an exception raised inside the module (particles closer than the minimum
    distance, a System without the ML atoms, the default box) as an ``OpenMMException`` whose
    message is a TorchScript trace with the reason on its last line. Wrap the calls that evaluate
    forces::

        with equiforce.openmm.clear_errors():
            simulation.step(1000)

    and such an error becomes :class:`EquiforceOpenMMError` (a RuntimeError) whose message is the
    reason, e.g. ``"RuntimeError: equiforce OpenMMPotential: particles 0 and 1 are 0.0100 nm apart,
    ..."``; other exceptions pass unchanged.
    """
    try:
        yield
    except Exception as exc:
        reason = torchscript_reason(str(exc))
        if reason is None:
            raise
        raise EquiforceOpenMMError(reason, str(exc)) from None


def tune_torchscript_for_md() -> None:
    """Process-wide: run TorchScript modules with the simple executor (``torch.jit.set_fusion_strategy``
    ``[("STATIC", 0)]``: zero specialisations, so the graph is optimised once, without profiling).

    openmm-torch freezes the module and runs it with TorchScript's graph optimiser on, and the
    positions it passes require grad. With the default strategy the profiling executor then
    (a) re-specialises the graph for every new edge count, which changes at every MD step
    (512 atoms: 22 instead of 181 steps/s), and (b) turns the model's force pass into JIT autodiff
    subgraphs (``prim::DifferentiableGraph``, 151 of them for the bench model), whose symbolic
    backward is slower than the autograd the other engines run: 1.22-1.24x the bare call at 4096 atoms
    (fp32 and fp64), also with the earlier ``[("DYNAMIC", 20)]``. The simple executor applies only
    the shape-independent passes (inlining, constant propagation, dead-code elimination), so the
    TorchForce costs what the bare call costs (measured 4096 atoms, 1 thread, CPU time: 1.00x fp32,
    1.02x fp64; ``bench/openmm_overhead.py``). ``create_force`` calls this unless
    ``tune_torchscript=False``. It affects every TorchScript module run in this process (openmm-torch
    included, as intended); a C++ program loading the System XML is not affected and keeps
    TorchScript's defaults.
    """
    torch.jit.set_fusion_strategy([("STATIC", 0)])


def _resolve_periodic(periodic: Optional[bool], has_box: bool, what: str) -> bool:
    if periodic is None:
        return has_box
    if periodic and not has_box:
        raise ValueError(f"periodic=True was requested but {what} has no periodic box vectors; "
                         "set them (e.g. topology.setPeriodicBoxVectors(...)) or use periodic=False")
    return bool(periodic)


def create_system(model_path: str, topology, periodic: Optional[bool] = None, remove_cm_motion: bool = True,
                  force_group: int = 0, neighbor_skin: float = 1.0, check_min_distance: bool = True):
    """A ``System`` whose only interaction is the model, for every atom of ``topology``.

    Masses come from the topology's elements (dalton). ``periodic=None`` follows the topology
    (periodic when it has box vectors); ``periodic=True`` without box vectors raises ``ValueError``.
    """
    openmm, _ = _import_openmm()
    atoms = list(topology.atoms())
    if not atoms:
        raise ValueError("the topology has no atoms")
    box = topology.getPeriodicBoxVectors()
    periodic = _resolve_periodic(periodic, box is not None, "the topology")
    elements = [a.element for a in atoms]
    # the topology's box is set explicitly (even if it is a 2 nm cube)
    force = create_force(model_path, atoms=None, elements=elements, periodic=periodic, force_group=force_group,
                         neighbor_skin=neighbor_skin, allow_default_box=True, check_min_distance=check_min_distance)
    system = openmm.System()
    for atom in atoms:
        system.addParticle(atom.element.mass)
    if periodic:
        system.setDefaultPeriodicBoxVectors(*box)
    system.addForce(force)
    if remove_cm_motion:
        system.addForce(openmm.CMMotionRemover())
    return system


# particle attributes of bonded terms: p1, p2, ... (all bond/angle/torsion forces), a1..a4, b1..b4 (CMAP)
_PARTICLE_KEY = re.compile(r"^(p\d+|a\d|b\d)$")


def _remove_internal_bonded_terms(system, ml: Set[int]):
    """Copy of ``system`` without bonds/angles/torsions whose particles all lie in ``ml``.

    Works on the XML form so every bonded force type (harmonic, Custom*, RB, periodic torsions)
    is handled the same way: a term is an element under ``Bonds``/``Angles``/``Torsions`` whose
    particle attributes are ``p1, p2, ...`` (``a1..a4, b1..b4`` for CMAP torsions). Constraints are
    kept (remove them from ``mm_system`` first if the ML region should be unconstrained).
    """
    openmm, _ = _import_openmm()
    root = ET.fromstring(openmm.XmlSerializer.serialize(system))
    for tag, term in (("Bonds", "Bond"), ("Angles", "Angle"), ("Torsions", "Torsion")):
        for group in root.iter(tag):
            for element in list(group.findall(term)):
                particles = [int(v) for k, v in element.attrib.items() if _PARTICLE_KEY.match(k)]
                if particles and all(p in ml for p in particles):
                    group.remove(element)
    return deserialize_system(ET.tostring(root, encoding="unicode"))


def create_mixed_system(model_path: str, topology, mm_system, ml_atoms: Iterable[int],
                        periodic: Optional[bool] = None, force_group: int = 0, neighbor_skin: float = 1.0,
                        check_min_distance: bool = True):
    """ML/MM ``System``: the model on ``ml_atoms``, ``mm_system`` everywhere else (mechanical embedding).

    ``mm_system`` (not modified) must describe the same particles as ``topology``. In the returned
    copy, MM bonded terms entirely inside the ML region are removed and non-bonded pairs inside it
    are excluded (zero ``NonbondedForce`` exceptions, ``CustomNonbondedForce`` exclusions); ML-MM
    pairs keep their MM interactions. ``periodic=None`` follows ``mm_system``.
    """
    openmm, _ = _import_openmm()
    n = mm_system.getNumParticles()
    if topology.getNumAtoms() != n:
        raise ValueError(f"the topology has {topology.getNumAtoms()} atoms but mm_system has {n} particles; "
                         "they must describe the same system")
    ml_atoms = _as_indices(ml_atoms, "ml_atoms")
    bad = [a for a in ml_atoms if not 0 <= a < n]
    if bad:
        raise ValueError(f"ml_atoms contains indices {bad[:5]} outside the system's 0..{n - 1}")
    periodic = _resolve_periodic(periodic, mm_system.usesPeriodicBoundaryConditions(), "mm_system")
    all_atoms = list(topology.atoms())
    elements = [all_atoms[a].element for a in ml_atoms]
    force = create_force(model_path, atoms=ml_atoms, elements=elements, periodic=periodic, force_group=force_group,
                         neighbor_skin=neighbor_skin, allow_default_box=topology.getPeriodicBoxVectors() is not None,
                         check_min_distance=check_min_distance)

    ml = set(ml_atoms)
    system = _remove_internal_bonded_terms(mm_system, ml)
    ordered = sorted(ml)
    pairs = [(a, b) for k, a in enumerate(ordered) for b in ordered[k + 1:]]
    for f in system.getForces():
        if isinstance(f, openmm.NonbondedForce):
            for a, b in pairs:
                f.addException(a, b, 0.0, 1.0, 0.0, True)
        elif isinstance(f, openmm.CustomNonbondedForce):
            existing = {tuple(sorted(f.getExclusionParticles(k))) for k in range(f.getNumExclusions())}
            for a, b in pairs:
                if (a, b) not in existing:
                    f.addExclusion(a, b)
    system.addForce(force)
    return system


def _torch_force_from_xml(element):
    """Rebuild an ``openmmtorch.TorchForce`` from its ``<Force type="TorchForce">`` XML element."""
    import io
    _, openmmtorch = _import_openmm()
    encoded = element.get("encodedFileContents", "")
    if not encoded:
        raise ValueError("a TorchForce in the XML has no encodedFileContents (a version-1 file that only names "
                         f"'{element.get('file')}'); re-serialise it with openmm-torch >= 1.1")
    try:
        data = bytes.fromhex(encoded)  # openmm-torch >= 1.4 writes hex
    except ValueError:
        import base64
        data = base64.b64decode(encoded)  # older files: base64
    force = openmmtorch.TorchForce(torch.jit.load(io.BytesIO(data), map_location="cpu"))
    force.setForceGroup(int(element.get("forceGroup", "0")))
    force.setUsesPeriodicBoundaryConditions(element.get("usesPeriodic", "0") not in ("0", "false"))
    force.setOutputsForces(element.get("outputsForces", "0") not in ("0", "false"))
    for child in element:
        if child.tag == "GlobalParameters":
            for p in child:
                force.addGlobalParameter(p.get("name"), float(p.get("default")))
        elif child.tag == "ParameterDerivatives":
            for p in child:
                force.addEnergyParameterDerivative(p.get("name"))
        elif child.tag == "Properties":
            for p in child:
                force.setProperty(p.get("name"), p.get("value"))
    return force


def deserialize_system(xml: str):
    """``openmm.XmlSerializer.deserialize`` for a ``System`` XML that may hold ``TorchForce`` objects.

    With the pinned wheels (openmm 8.6.1, openmmtorch 1.5) ``XmlSerializer.deserialize`` crashes the
    process (segmentation fault inside ``TorchForceProxy::deserialize``) on any TorchForce. This reads
    the XML written by ``XmlSerializer.serialize`` (unchanged format), deserialises every other part
    with OpenMM's own serializer and rebuilds each TorchForce from its embedded module, keeping the
    order of forces, force groups, periodicity, outputs-forces flag, global parameters and properties.
    """
    openmm, _ = _import_openmm()
    tune_malloc()  # the System will run the model: same allocator setting as create_module
    root = ET.fromstring(xml)
    if root.tag != "System":
        raise ValueError(f"expected the XML of a System, got <{root.tag}>; use openmm.XmlSerializer.deserialize for other objects")
    forces = root.find("Forces")
    elements = list(forces) if forces is not None else []
    for el in elements:
        forces.remove(el)
    system = openmm.XmlSerializer.deserialize(ET.tostring(root, encoding="unicode"))
    for el in elements:
        if el.get("type") == "TorchForce":
            system.addForce(_torch_force_from_xml(el))
        else:
            system.addForce(openmm.XmlSerializer.deserialize(ET.tostring(el, encoding="unicode")))
    return system
