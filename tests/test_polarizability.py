"""Polarizability head (l = 0 + 2 -> symmetric 3x3, e·Å²/V).

References: exact symmetry relations (rotation R alpha R^T, inversion and mirrors: a true tensor),
e3nn's Wigner D for the 5 -> 3x3 map, the eager model for the exported file and the ASE
calculator, batched vs single structures. float64 throughout, tolerances 1e-10 (symmetry) and
1e-12 (same computation by two routes). The training test (GFN2-xTB finite-field labels) compares
the trained head's error with the predict-the-mean baseline.
"""
import numpy as np
import pytest
import torch

import helpers
from helpers import random_rotation

from equiforce.data.dataset import atoms_to_graph, collate, extract_polarizability
from equiforce.data.neighbors import neighbor_list
from equiforce.deploy.export import export_model, load_exported
from equiforce.model.forces import model_outputs
from equiforce.o3.cartesian import irreps_from_symmetric, l2_basis, symmetric_from_irreps
from equiforce.o3.clebsch_gordan import wigner_D
from equiforce.training.config import ConfigError, DataError, TrainConfig
from equiforce.training.loop import predict, rotate_batch

R_MAX = 3.0
SPECIES = ["H", "C", "O"]


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)


def make_model(lmax=2, symmetry="O3", layers=2, seed=0, **kw):
    model = helpers.make_model(SPECIES, seed, r_max=R_MAX, channels=6, lmax=lmax, num_layers=layers,
                               radial_hidden=12, symmetry=symmetry, avg_num_neighbors=3.0, polarizability=True,
                               scale=[0.7, 1.3, 0.9], shift=[-1.0, -2.0, -3.0], **kw)
    with torch.no_grad():  # non-trivial scale and per-species atomic polarizabilities
        model.set_polarizability_scale_shift(0.3, torch.tensor([0.05, 0.12, 0.09]))
    return model


def molecule(seed=1, n=6):
    """A random compact cluster (Å) with species indices."""
    rng = np.random.default_rng(seed)
    pos = [np.zeros(3)]
    while len(pos) < n:
        d = rng.normal(size=3)
        cand = pos[rng.integers(len(pos))] + d / np.linalg.norm(d) * rng.uniform(1.0, 1.5)
        if min(np.linalg.norm(cand - p) for p in pos) > 0.9:
            pos.append(cand)
    return torch.tensor(np.array(pos)), torch.tensor(rng.integers(0, 3, size=n))


def alpha_of(model, pos, species):
    ei, shift, _ = neighbor_list(pos, R_MAX, torch.zeros(3, 3), torch.zeros(3, dtype=torch.bool))
    batch = torch.zeros(len(species), dtype=torch.long)
    out = model_outputs(model, pos, species, ei, shift.to(pos.dtype), batch, 1)
    return out["polarizability"][0].detach()


def anisotropy(a):
    """Norm of the symmetric traceless part (e·Å²/V)."""
    return float((a - torch.trace(a) / 3 * torch.eye(3)).norm())


# ---------------------------------------------------------------------------------------------
# the 5 -> 3x3 map
# ---------------------------------------------------------------------------------------------
def test_l2_basis_is_orthonormal_symmetric_traceless_and_equivariant():
    b = l2_basis()
    gram = torch.einsum("mij,nij->mn", b, b)
    assert float((gram - torch.eye(5)).abs().max()) < 1e-14
    assert float((b - b.transpose(1, 2)).abs().max()) == 0.0
    assert float(torch.diagonal(b, dim1=1, dim2=2).sum(-1).abs().max()) < 1e-14
    # Y_2(v) = v^T B v up to the normalisation (the definition of the basis)
    from equiforce.o3.spherical_harmonics import spherical_harmonics
    v = torch.tensor(np.random.default_rng(0).normal(size=(7, 3)))
    y2 = spherical_harmonics(2, v)[:, 4:9]
    quad = torch.einsum("ni,mij,nj->nm", v, b, v)
    ratio = y2 / quad
    assert float((ratio - ratio[0, 0]).abs().max()) < 1e-12
    # T(D_2(R) c) = R T(c) R^T with the project's D and with e3nn's (an independent reference)
    from e3nn import o3

    rng = np.random.default_rng(1)
    c = torch.tensor(rng.normal(size=5))
    a0 = torch.tensor(0.7)
    t = symmetric_from_irreps(a0, c, b)
    for _ in range(3):
        rot = random_rotation(rng)
        rt = torch.tensor(rot)
        ref = rt @ t @ rt.T
        d_ours = torch.tensor(wigner_D(2, rot))
        d_e3nn = o3.Irrep("2e").D_from_matrix(rt)
        assert float((symmetric_from_irreps(a0, d_ours @ c, b) - ref).abs().max()) < 1e-12
        assert float((symmetric_from_irreps(a0, d_e3nn @ c, b) - ref).abs().max()) < 1e-12
    # the inverse map
    a0_back, c_back = irreps_from_symmetric(t, b)
    assert abs(float(a0_back - a0)) < 1e-14 and float((c_back - c).abs().max()) < 1e-14


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetry,lmax,layers,parity", [("O3", 2, 2, "natural"), ("O3", 1, 2, "natural"),
                                                        ("O3", 2, 2, "both"), ("SE3", 2, 2, "natural")])
def test_polarizability_transforms_as_R_alpha_RT(symmetry, lmax, layers, parity):
    model = make_model(lmax=lmax, symmetry=symmetry, layers=layers, feature_parity=parity)
    pos, species = molecule()
    rng = np.random.default_rng(3)
    a = alpha_of(model, pos, species)
    assert float((a - a.T).abs().max()) < 1e-14
    assert anisotropy(a) > 1e-3 and abs(float(torch.trace(a))) > 1e-3  # both parts non-trivial
    for _ in range(3):
        rot = torch.tensor(random_rotation(rng))
        moved = pos @ rot.T + torch.tensor(rng.normal(size=3))  # rotation and translation
        a_rot = alpha_of(model, moved, species)
        assert float((a_rot - rot @ a @ rot.T).abs().max()) < 1e-10


def test_o3_polarizability_is_a_true_tensor():
    """Inversion leaves alpha unchanged; a mirror M acts as M alpha M^T (0e + 2e, not pseudo)."""
    model = make_model()
    pos, species = molecule()
    a = alpha_of(model, pos, species)
    assert float((alpha_of(model, -pos, species) - a).abs().max()) < 1e-10
    mirror = torch.diag(torch.tensor([-1.0, 1.0, 1.0]))
    assert float((alpha_of(model, pos @ mirror, species) - mirror @ a @ mirror).abs().max()) < 1e-10
    # the mirror image is a different structure: alpha itself changes (the test is not trivial)
    assert float((mirror @ a @ mirror - a).abs().max()) > 1e-4


def test_invariant_baseline_polarizability_does_not_rotate():
    """lmax = 0: the tensor is rotation-INVARIANT, so it cannot follow the molecule."""
    pos, species = molecule()
    rot = torch.tensor(random_rotation(np.random.default_rng(5)))
    inv = make_model(lmax=0)
    a, b = alpha_of(inv, pos, species), alpha_of(inv, pos @ rot.T, species)
    assert anisotropy(a) > 1e-3
    assert float((a - b).abs().max()) < 1e-10
    assert float((b - rot @ a @ rot.T).abs().max()) > 1e-4


def test_batched_equals_single_and_rotate_batch():
    from ase import Atoms

    model = make_model()
    rng = np.random.default_rng(2)
    graphs = []
    for k, n in enumerate((5, 7, 4)):
        pos, species = molecule(seed=20 + k, n=n)
        atoms = Atoms([SPECIES[int(s)] for s in species], positions=pos.numpy())
        g = atoms_to_graph(atoms, SPECIES, R_MAX)
        a = torch.tensor(rng.normal(size=(3, 3)))
        g["polarizability"], g["has_polarizability"] = a + a.T, torch.tensor(True)
        graphs.append(g)
    batch = collate(graphs)
    pred = predict(model, batch, create_graph=False)
    for k, g in enumerate(graphs):
        assert float((pred["polarizability"][k].detach() - alpha_of(model, g["pos"], g["species"])).abs().max()) < 1e-12
    rots = torch.tensor(np.stack([random_rotation(rng) for _ in graphs]))
    rb = rotate_batch(batch, rots)
    rpred = predict(model, rb, create_graph=False)
    ref = rots @ pred["polarizability"].detach() @ rots.transpose(1, 2)
    assert float((rpred["polarizability"].detach() - ref).abs().max()) < 1e-10
    assert float((rb["polarizability"] - rots @ batch["polarizability"] @ rots.transpose(1, 2)).abs().max()) < 1e-14


def test_export_runner_and_ase_calculator(tmp_path):
    from ase import Atoms

    from equiforce.ase import EquiforceCalculator
    from equiforce.deploy.runner import ExportedRunner

    model = make_model(dipole="direct", dipole_scale=0.4)
    pos, species = molecule(n=6)
    ei, shift, _ = neighbor_list(pos, R_MAX, torch.zeros(3, 3), torch.zeros(3, dtype=torch.bool))
    check = (pos, species, ei, shift.double(), torch.zeros(3, 3))
    path = str(tmp_path / "polar.pt")
    meta = export_model(model.for_export(), path, torch.float64, symmetry="O3", check_structure=check)
    module, _ = load_exported(path)
    assert "polarizability" in meta["outputs"] and meta["units"]["polarizability"] == "e*Angstrom^2/V"
    assert "polarizability" in meta["methods"] and meta["exchange"] is True
    eager = alpha_of(model, pos, species)
    with torch.jit.optimized_execution(False):
        a = module.polarizability(pos, species, ei, shift.double(), torch.zeros(3, 3))
    assert float((a - eager).abs().max()) < 1e-12
    # ASE: results["polarizability"], rotated and translated molecule -> R alpha R^T
    atoms = Atoms([SPECIES[int(s)] for s in species], positions=pos.numpy())
    atoms.calc = EquiforceCalculator(path)
    a_ase = atoms.calc.get_property("polarizability", atoms)
    assert float(np.abs(a_ase - eager.numpy()).max()) < 1e-12
    assert "polarizability" in atoms.calc.results and "forces" in atoms.calc.results
    rot = random_rotation(np.random.default_rng(9))
    moved = atoms.copy()
    moved.positions = atoms.positions @ rot.T + np.array([3.0, -1.0, 7.0])
    moved.calc = EquiforceCalculator(path)
    moved.get_potential_energy()
    assert float(np.abs(moved.calc.results["polarizability"] - rot @ a_ase @ rot.T).max()) < 1e-10
    # `equiforce check` audits the tensor too (rotations, translations, reflections)
    from equiforce.deploy.audit import run_checks
    _, checks = run_checks(path, n_atoms=6)
    line = [c for c in checks if c.name == "polarizability R a R^T"]
    assert line and all(c.passed for c in checks) and line[0].worst < 1e-10
    # a file without the head: a clear refusal, and ASE does not offer the property
    plain = helpers.make_model(SPECIES, 0, r_max=R_MAX, channels=4, lmax=1, num_layers=1, dipole="direct")
    plain_path = str(tmp_path / "dipole_only.pt")
    export_model(plain.for_export(), plain_path, torch.float64, symmetry="O3")
    with pytest.raises(DataError, match="no polarizability head"):
        ExportedRunner(plain_path).polarizability(pos.numpy(), atoms.get_chemical_symbols())
    assert "polarizability" not in EquiforceCalculator(plain_path).implemented_properties
    module, _ = load_exported(plain_path)
    with pytest.raises(Exception, match="no polarizability head"):
        module.polarizability(pos, species, ei, shift.double(), torch.zeros(3, 3))


# ---------------------------------------------------------------------------------------------
# labels and settings
# ---------------------------------------------------------------------------------------------
def test_polarizability_labels_and_bad_inputs():
    from ase import Atoms

    a = np.array([[1.0, 0.2, 0.3], [0.2, 2.0, 0.5], [0.3, 0.5, 3.0]])
    atoms = Atoms("H2", positions=[[0, 0, 0], [0.8, 0, 0]])
    for value in (a, a.reshape(9), [1.0, 2.0, 3.0, 0.5, 0.3, 0.2]):
        atoms.info["polarizability"] = value
        assert np.array_equal(extract_polarizability(atoms, 0, "f"), a)
    del atoms.info["polarizability"]
    assert extract_polarizability(atoms, 0, "f") is None
    for value, match in ((np.arange(4.0), "must have 9"), (a + np.triu(np.ones((3, 3)), 1), "not symmetric"),
                         (np.full(9, np.nan), "non-finite")):
        atoms.info["polarizability"] = value
        with pytest.raises(DataError, match=match):
            extract_polarizability(atoms, 0, "f")
    with pytest.raises(ConfigError, match="num_layers >= 2"):
        TrainConfig.from_dict({"model": {"polarizability": True, "lmax": 1, "num_layers": 1}})
    with pytest.raises(ConfigError, match="model.polarizability' must be of type bool"):
        TrainConfig.from_dict({"model": {"polarizability": "yes"}})
    with pytest.raises(ConfigError, match="polarizability_weight"):
        TrainConfig.from_dict({"polarizability_weight": -1.0})


def test_training_without_labels_is_refused(tmp_path):
    from equiforce.training.loop import train

    data = helpers.write_water_without_extra_labels(tmp_path / "nolabels.extxyz")
    cfg = TrainConfig.from_dict({"data": data, "out": str(tmp_path / "run"), "epochs": 1,
                                 "model": {"r_max": 3.0, "channels": 4, "lmax": 2, "num_layers": 1,
                                           "polarizability": True}})
    with pytest.raises(DataError, match="no training structure has a polarizability label"):
        train(cfg, progress=False, log=lambda s: None)


# ---------------------------------------------------------------------------------------------
# GFN2-xTB finite-field labels
# ---------------------------------------------------------------------------------------------
def test_xtb_finite_field_labels_match_energy_second_derivatives_and_rotate():
    """alpha from dipole derivatives (the labels) equals -d2E/dF_i dF_j from energies in fields
    (an independent route through the same SCF) to 1e-4 relative, and the labels of a rotated
    molecule are R alpha R^T to 1e-5 relative (SCF convergence); periodic boxes are refused."""
    from ase.build import molecule as ase_molecule

    from equiforce.data.datagen import dataset_parameters, finite_field_polarizability, singlepoint_in_field
    from equiforce.errors import DatagenError

    rng = np.random.default_rng(4)
    atoms = ase_molecule("H2CO")
    atoms.positions = atoms.positions @ random_rotation(rng).T  # all 9 components non-zero
    alpha = finite_field_polarizability(atoms)
    assert np.all(np.linalg.eigvalsh(alpha) > 0.01)  # positive definite, e·Å²/V
    h = 0.05  # V/Å

    def energy(fx, fy, fz):
        return singlepoint_in_field(atoms, np.array([fx, fy, fz]))[0]

    from_energy = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            ei, ej = np.eye(3)[i] * h, np.eye(3)[j] * h
            from_energy[i, j] = -(energy(*(ei + ej)) - energy(*(ei - ej)) - energy(*(ej - ei))
                                  + energy(*(-ei - ej))) / (4 * h * h)
    assert np.abs(from_energy - alpha).max() < 1e-4 * np.abs(alpha).max(), (from_energy, alpha)
    rot = random_rotation(rng)
    turned = atoms.copy()
    turned.positions = atoms.positions @ rot.T
    assert np.abs(finite_field_polarizability(turned) - rot @ alpha @ rot.T).max() < 1e-5 * np.abs(alpha).max()
    with pytest.raises(DatagenError, match="isolated molecule"):
        dataset_parameters("H2O", 2, box_A=8.0, polarizability=True)


def test_datagen_polarizability_labels_survive_extxyz(tmp_path):
    """`equiforce datagen --polarizability`: every frame (isolated atoms too) carries a symmetric
    3x3 label that load_dataset reads back unchanged from the extxyz file."""
    import ase.io

    from equiforce.cli import main as cli_main
    from equiforce.data.dataset import load_dataset
    from equiforce.data.datagen import finite_field_polarizability

    out = str(tmp_path / "w.extxyz")
    assert cli_main(["datagen", "--molecule", "H2O", "--frames", "2", "--stride", "2", "--equilibration", "0",
                     "--isolated-atoms", "--polarizability", "--quiet", "-o", out]) == 0
    graphs, species = load_dataset(out, 3.0)
    assert species == ["H", "O"] and len(graphs) == 4 and all(bool(g["has_polarizability"]) for g in graphs)
    frame = ase.io.read(out, index=0)
    frame.calc = None
    ref = finite_field_polarizability(frame)
    assert float((graphs[0]["polarizability"] - torch.tensor(ref)).abs().max()) < 1e-6 * np.abs(ref).max()


# ---------------------------------------------------------------------------------------------
# training on GFN2-xTB finite-field polarizabilities
# ---------------------------------------------------------------------------------------------
def xtb_formaldehyde(path, n, seed):
    """Distorted formaldehyde in random orientations with GFN2-xTB energy, forces and finite-field
    polarizability (e·Å²/V) -- :func:`equiforce.data.datagen.label_structure`."""
    import ase.io
    from ase.build import molecule as ase_molecule

    from equiforce.data.datagen import label_structure

    rng = np.random.default_rng(seed)
    ref = ase_molecule("H2CO")
    frames = []
    for _ in range(n):
        a = ref.copy()
        a.positions = (a.positions + rng.normal(scale=0.06, size=a.positions.shape)) @ random_rotation(rng).T
        frames.append(label_structure(a, periodic=False, polarizability=True))
    ase.io.write(path, frames, format="extxyz")
    return path


@pytest.mark.slow
def test_polarizability_training_learns_and_eval_reports_it(tmp_path, capsys):
    import json

    import ase.io

    from equiforce.cli import main as cli_main
    from equiforce.data.dataset import load_dataset
    from equiforce.training.loop import evaluate_graphs, load_checkpoint, model_from_checkpoint, train

    data = xtb_formaldehyde(str(tmp_path / "h2co.extxyz"), 40, seed=0)
    cfg = TrainConfig.from_dict({
        "data": data, "out": str(tmp_path / "run"), "epochs": 30, "batch_size": 4, "lr": 0.02,
        "val_fraction": 0.25, "dtype": "float64", "ema_decay": 0.0, "num_threads": 1, "seed": 0,
        "energy_weight": 0.01, "forces_weight": 0.01, "polarizability_weight": 1000.0, "scheduler": "none",
        "model": {"r_max": 3.0, "channels": 8, "lmax": 2, "num_layers": 1, "radial_hidden": 16,
                  "polarizability": True}})
    train(cfg, progress=False, log=lambda s: None)
    state = load_checkpoint(str(tmp_path / "run" / "best.pt"))
    model, config = model_from_checkpoint(state)
    graphs, _ = load_dataset(data, config.model.r_max, state["species"])
    train_g = [graphs[k] for k in state["split"]["train"]]
    val = [graphs[k] for k in state["split"]["val"]]
    # baseline: the mean training tensor (the best constant; ~ isotropic in random orientations)
    mean = torch.stack([g["polarizability"] for g in train_g]).mean(0)
    baseline = float(torch.stack([(g["polarizability"] - mean).abs().mean() for g in val]).mean())
    metrics = evaluate_graphs(model, val, 8, torch.float64, torch.device("cpu")).metrics()
    mae = metrics["polarizability_mae_e_a2_per_v"]
    assert mae < 0.2 * baseline, (mae, baseline)
    # `equiforce eval` runs the exported file and reports the same error on the same structures
    model_path = str(tmp_path / "polar.pt")
    assert cli_main(["export", str(tmp_path / "run"), "-o", model_path]) == 0
    val_path = str(tmp_path / "val.extxyz")
    ase.io.write(val_path, [ase.io.read(data, index=k) for k in state["split"]["val"]], format="extxyz")
    capsys.readouterr()
    assert cli_main(["eval", model_path, val_path, "--json"]) == 0
    assert abs(json.loads(capsys.readouterr().out)["polarizability_mae_e_a2_per_v"] - mae) < 1e-9
    print(f"polarizability MAE {mae:.4g} e·Å²/V, predict-the-mean {baseline:.4g} e·Å²/V")


def test_float32_training_does_not_round_the_l2_map():
    """A float32 round trip (training in float32, exporting in float64) leaves the 5 -> 3x3 map
    exact (it is re-derived after every cast), and checkpoints do not carry it."""
    model = make_model().to(torch.float32)
    assert model.polarizability_l2_basis.dtype == torch.float32
    model = model.to(torch.float64)
    assert torch.equal(model.polarizability_l2_basis, l2_basis())
    assert not any("l2_basis" in k for k in model.state_dict())
    # the whole route: weights as a float32 training leaves them, restored into a float64 model from
    # the float32 state (Clebsch-Gordan coefficients re-derived exactly, nn/tensor_product.py):
    # R alpha R^T to 1e-10 relative, as for a float64-trained model
    trained = make_model().to(torch.float32)
    model = make_model(seed=5)
    model.load_state_dict({k: v.to(torch.float64) if v.is_floating_point() else v
                           for k, v in trained.state_dict().items()})
    pos, species = molecule(seed=3)
    rot = torch.tensor(random_rotation(np.random.default_rng(7)))
    a, a_rot = alpha_of(model, pos, species), alpha_of(model, pos @ rot.T, species)
    assert float((a_rot - rot @ a @ rot.T).abs().max()) < 1e-10 * float(a.abs().max())


@pytest.mark.lammps
@pytest.mark.mpi
@pytest.mark.parametrize("nprocs,style", [(1, ""), (2, " path exchange")])
def test_polarizability_model_runs_unchanged_in_lammps(tmp_path, nprocs, style):
    """A file with the head (its last layer carries the extra 2e block) gives LAMMPS the same energy,
    forces and virial as the exported module in Python: serial images and 2-rank exchange."""
    from lammps_util import deck, parse_result, python_reference, read_dump, run_lmp, small_bulk, write_data

    model = helpers.make_model(["C", "Si"], 0, r_max=3.0, channels=4, lmax=2, num_layers=2, radial_hidden=8,
                               avg_num_neighbors=6.0, polarizability=True, scale=[0.7, 1.3], shift=[-1.0, -2.0])
    path = str(tmp_path / "polar.pt")
    export_model(model.for_export(), path, torch.float64, symmetry="O3")
    s = small_bulk()
    data = str(tmp_path / "bulk.data")
    write_data(data, s, ["C", "Si"])
    ref = python_reference(path, s)
    text = deck(data, path, ["C", "Si"], True, processors="2 1 1" if nprocs == 2 else "",
                pair_style="pair_style equiforce device cpu" + style)
    proc = run_lmp(text, str(tmp_path), nprocs=nprocs, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if nprocs == 2:
        assert "exchange path (2 MPI rank(s), path exchange)" in proc.stdout
    energy, press6 = parse_result(proc.stdout)
    fr = read_dump(str(tmp_path / "dump.out"))[0]
    forces = np.stack([fr["fx"], fr["fy"], fr["fz"]], 1)[np.argsort(fr["id"].astype(int))]
    assert abs(energy - ref["energy"]) < 1e-9
    assert np.abs(forces - ref["forces"][np.argsort(s.tags)]).max() < 1e-9
    assert np.abs(press6 - ref["pressure6"]).max() < 1e-8 * max(1.0, np.abs(ref["pressure6"]).max())


@pytest.mark.openmm
def test_polarizability_model_runs_unchanged_in_openmm(tmp_path):
    """OpenMM's TorchForce (forward only) gives the exported file's energy and forces, Reference platform."""
    import openmm
    import openmmtorch  # noqa: F401  (registers the TorchForce kernels)
    from openmm import app, unit

    from equiforce.deploy.runner import ExportedRunner
    from equiforce.openmm import EV_TO_KJ_PER_MOL, NM_TO_ANGSTROM, create_system

    model = make_model()
    path = str(tmp_path / "polar.pt")
    export_model(model.for_export(), path, torch.float64, symmetry="O3")
    pos, species = molecule(n=6)
    symbols = [SPECIES[int(k)] for k in species]
    top = app.Topology()
    res = top.addResidue("MOL", top.addChain())
    for s in symbols:
        top.addAtom(s, app.Element.getBySymbol(s), res)
    ctx = openmm.Context(create_system(path, top), openmm.VerletIntegrator(0.0005),
                         openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(pos.numpy() / NM_TO_ANGSTROM)
    state = ctx.getState(getEnergy=True, getForces=True)
    e = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    f = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    ref = ExportedRunner(path).run(pos.numpy(), symbols)
    assert abs(e - ref.energy * EV_TO_KJ_PER_MOL) < 1e-7
    assert np.abs(np.asarray(f) - ref.forces * EV_TO_KJ_PER_MOL * NM_TO_ANGSTROM).max() < 1e-6
