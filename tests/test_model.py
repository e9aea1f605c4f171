"""Physics of the learned model: invariances, conservative forces, stress, locality, smoothness.

All float64 unless stated. Edges come from ASE's ``neighbor_list`` (an independent reference),
so these tests do not depend on equiforce's own neighbour list.
"""
import ase
import numpy as np
import pytest
import torch

import helpers
from ase.neighborlist import neighbor_list

from equiforce.deploy.export import export_model, load_exported
from equiforce.model.forces import energy_forces_virial
from equiforce.o3 import rotations
from equiforce.model.network import EquiforceModel, ModelConfig

F64 = torch.float64
SPECIES = ["H", "C", "O"]


MODEL = dict(r_max=3.5, channels=8, lmax=2, num_layers=3, num_bessel=6, radial_hidden=16, avg_num_neighbors=4.0,
             scale=[0.7, 1.3, 0.9], shift=[-13.6, -1029.8, -2041.1])


def make_model(symmetry="O3", seed=0, dtype=F64, **kw):
    return helpers.make_model(SPECIES, seed, dtype, symmetry=symmetry, **{**MODEL, **kw})


def graph(atoms: ase.Atoms, r_max: float, dtype=F64):
    i, j, S = neighbor_list("ijS", atoms, r_max)
    pos = torch.tensor(atoms.positions, dtype=dtype)
    species = torch.tensor([SPECIES.index(s) for s in atoms.get_chemical_symbols()])
    edge_index = torch.tensor(np.stack([i, j]), dtype=torch.long)
    shift = torch.tensor(S @ atoms.cell.array, dtype=dtype)
    return pos, species, edge_index, shift


def evaluate(model, atoms, dtype=F64, pos=None, shift=None):
    p, species, edge_index, s = graph(atoms, model.r_max, dtype)
    p = p if pos is None else pos
    s = s if shift is None else shift
    batch = torch.zeros(len(atoms), dtype=torch.long)
    e, per_atom, f, v = energy_forces_virial(model, p, species, edge_index, s, batch, 1)
    return e[0].detach(), per_atom.detach(), f.detach(), v[0].detach()


def molecule(seed=0, n=8) -> ase.Atoms:
    rng = np.random.default_rng(seed)
    pos = rng.normal(size=(n, 3)) * 1.2
    symbols = [SPECIES[k % 3] for k in range(n)]
    return ase.Atoms(symbols, positions=pos)


def periodic(seed=0, n=10) -> ase.Atoms:
    rng = np.random.default_rng(seed)
    cell = np.array([[4.2, 0.0, 0.0], [0.9, 4.0, 0.0], [-0.6, 0.7, 4.4]])
    frac = rng.uniform(size=(n, 3))
    return ase.Atoms([SPECIES[k % 3] for k in range(n)], scaled_positions=frac, cell=cell, pbc=True)


def random_rotation(seed, improper=False):
    q = rotations.random_rotation(np.random.default_rng(seed))
    return -q if improper else q


@pytest.mark.parametrize("make", [molecule, periodic])
@pytest.mark.parametrize("improper", [False, True])
@pytest.mark.parametrize("feature_parity", ["natural", "both"])
def test_energy_invariant_forces_equivariant_o3(make, improper, feature_parity):
    model = make_model("O3", feature_parity=feature_parity)
    atoms = make(1)
    e, _, f, v = evaluate(model, atoms)
    R = random_rotation(2, improper)
    rot = atoms.copy()
    rot.positions = atoms.positions @ R.T
    if atoms.pbc.any():
        rot.cell = atoms.cell.array @ R.T
    e2, _, f2, v2 = evaluate(model, rot)
    Rt = torch.tensor(R)
    assert abs(e2 - e) < 1e-10 * max(1.0, abs(e))
    assert (f2 - f @ Rt.T).abs().max() < 1e-10
    assert (v2 - Rt @ v @ Rt.T).abs().max() < 1e-10


def test_feature_parity_both_populates_the_odd_blocks():
    """feature_parity 'both' (NequIP's parity: true): hidden features 0e+0o+1o+1e+2e+2o. The odd
    copies are zero after the first layer (scalar inputs times harmonics have natural parity only);
    the second layer fills 1e (1o x 1o) and 2o (2e x 1o), 0o needs a 1e input (a third hidden layer)."""
    model = make_model("O3", feature_parity="both")
    irreps = model.layers[0].irreps_out
    assert str(irreps) == "8x0e + 8x0o + 8x1o + 8x1e + 8x2e + 8x2o"
    outputs = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: outputs.append(out.detach())) for layer in model.layers]
    evaluate(model, molecule(3))
    for h in hooks:
        h.remove()
    blocks = dict(zip([str(m) for m in irreps], torch.split(outputs[1], [m.dim for m in irreps], dim=1)))
    first = dict(zip([str(m) for m in irreps], torch.split(outputs[0], [m.dim for m in irreps], dim=1)))
    for odd in ("8x0o", "8x1e", "8x2o"):
        assert float(first[odd].abs().max()) == 0.0
    for odd in ("8x1e", "8x2o"):
        assert float(blocks[odd].abs().max()) > 1e-3
    assert float(blocks["8x0o"].abs().max()) == 0.0


def test_translation_and_permutation_invariance():
    model = make_model("O3")
    atoms = molecule(3)
    e, pa, f, _ = evaluate(model, atoms)
    moved = atoms.copy()
    moved.positions += np.array([3.1, -7.2, 0.4])
    assert abs(evaluate(model, moved)[0] - e) < 1e-10
    perm = np.random.default_rng(0).permutation(len(atoms))
    permuted = atoms[perm]
    e3, pa3, f3, _ = evaluate(model, permuted)
    assert abs(e3 - e) < 1e-10
    assert (f3 - f[perm]).abs().max() < 1e-10
    assert (pa3 - pa[perm]).abs().max() < 1e-10


def chiral_structure() -> ase.Atoms:
    """A tetrahedral centre with four different neighbours (three species + a longer bond)."""
    return ase.Atoms("CHOHO", positions=[[0, 0, 0], [1.0, 0.1, 0.0], [-0.3, 1.1, 0.1], [-0.4, -0.5, 0.9],
                                           [-0.2, -0.6, -1.3]])


def test_se3_distinguishes_mirror_images_o3_does_not():
    atoms = chiral_structure()
    mirror = atoms.copy()
    mirror.positions[:, 0] *= -1
    e_o3 = make_model("O3", seed=4)
    assert abs(evaluate(e_o3, atoms)[0] - evaluate(e_o3, mirror)[0]) < 1e-10
    se3 = make_model("SE3", seed=4)
    e_a, e_b = evaluate(se3, atoms)[0], evaluate(se3, mirror)[0]
    assert abs(e_a - e_b) > 1e-6
    # SE(3) is still exactly rotation invariant
    rot = atoms.copy()
    rot.positions = atoms.positions @ random_rotation(5).T
    assert abs(evaluate(se3, rot)[0] - e_a) < 1e-10


@pytest.mark.parametrize("make", [molecule, periodic])
def test_forces_match_central_finite_differences(make):
    model = make_model("O3", seed=1)
    atoms = make(4)
    _, _, f, _ = evaluate(model, atoms)
    p0, species, edge_index, shift = graph(atoms, model.r_max)
    h = 1e-5
    fd = torch.zeros_like(f)
    for a in range(len(atoms)):
        for k in range(3):
            plus, minus = p0.clone(), p0.clone()
            plus[a, k] += h
            minus[a, k] -= h
            fd[a, k] = -(evaluate(model, atoms, pos=plus)[0] - evaluate(model, atoms, pos=minus)[0]) / (2 * h)
    assert (f - fd).norm() / f.norm() < 1e-6


def test_stress_matches_finite_strain():
    model = make_model("O3", seed=2)
    atoms = periodic(5)
    _, _, _, virial = evaluate(model, atoms)
    volume = atoms.get_volume()
    stress = -virial / volume
    p0, _, _, s0 = graph(atoms, model.r_max)
    h = 1e-6
    fd = torch.zeros(3, 3, dtype=F64)
    for a in range(3):
        for b in range(3):
            def energy(eps):
                strain = torch.eye(3, dtype=F64)
                strain[a, b] += eps
                return evaluate(model, atoms, pos=p0 @ strain.T, shift=s0 @ strain.T)[0]
            fd[a, b] = (energy(h) - energy(-h)) / (2 * h) / volume
    assert (stress - fd).abs().max() < 1e-6 * max(1e-3, float(fd.abs().max()))
    assert (stress - stress.T).abs().max() < 1e-12


def test_per_atom_energies_sum_to_total_and_batching():
    model = make_model("O3", seed=3)
    a, b = molecule(6, 5), periodic(7, 6)
    ea, pa, fa, va = evaluate(model, a)
    eb, pb, fb, vb = evaluate(model, b)
    assert abs(pa.sum() - ea) < 1e-10
    ga, gb = graph(a, model.r_max), graph(b, model.r_max)
    pos = torch.cat([ga[0], gb[0]])
    species = torch.cat([ga[1], gb[1]])
    edge_index = torch.cat([ga[2], gb[2] + len(a)], dim=1)
    shift = torch.cat([ga[3], gb[3]])
    batch = torch.tensor([0] * len(a) + [1] * len(b))
    e, _, f, v = energy_forces_virial(model, pos, species, edge_index, shift, batch, 2)
    assert torch.allclose(e, torch.stack([ea, eb]), atol=1e-10, rtol=0)
    assert (f - torch.cat([fa, fb])).abs().max() < 1e-10
    assert (v - torch.stack([va, vb])).abs().max() < 1e-10


def test_lattice_translation_of_an_atom_changes_nothing():
    model = make_model("O3", seed=8)
    atoms = periodic(9)
    e, _, f, v = evaluate(model, atoms)
    moved = atoms.copy()
    moved.positions[2] += atoms.cell.array[0] - 2 * atoms.cell.array[2]
    e2, _, f2, v2 = evaluate(model, moved)
    assert abs(e2 - e) < 1e-10 and (f2 - f).abs().max() < 1e-10 and (v2 - v).abs().max() < 1e-10


def test_isolated_atom_returns_exactly_its_shift_and_far_apart_molecules_add():
    model = make_model("O3", seed=9)
    for s, name in enumerate(SPECIES):
        e, _, f, _ = evaluate(model, ase.Atoms(name, positions=[[0.3, 0.2, 0.1]]))
        assert float(e) == pytest.approx(float(model.shift[s]), abs=1e-12)
        assert f.abs().max() == 0
    a, b = molecule(10, 5), molecule(11, 4)
    far = b.copy()
    far.positions += np.array([100.0, 0, 0])
    both = a + far
    assert abs(evaluate(model, both)[0] - evaluate(model, a)[0] - evaluate(model, b)[0]) < 1e-10


def test_energy_and_forces_continuous_across_cutoff():
    model = make_model("O3", seed=10)
    r_max = model.r_max
    iso = sum(float(model.shift[SPECIES.index(s)]) for s in "CO")
    for d in (r_max - 1e-4, r_max - 1e-7, r_max + 1e-7):
        e, _, f, _ = evaluate(model, ase.Atoms("CO", positions=[[0, 0, 0], [0, 0, d]]))
        gap = max(0.0, r_max - d)
        assert abs(float(e) - iso) < 1e3 * gap ** 5 + 1e-11
        assert f.abs().max() < 1e3 * gap ** 4 + 1e-11


def test_coinciding_atoms_and_axis_aligned_bonds_give_no_nan():
    model = make_model("O3", seed=11)
    atoms = ase.Atoms("CHHO", positions=[[0, 0, 0], [0, 0, 0], [0, 0, 1.1], [0, 0, -1.2]])
    p, species, edge_index, shift = graph(atoms, model.r_max)
    p.requires_grad_(True)
    e, _, f, _ = energy_forces_virial(model, p, species, edge_index, shift, torch.zeros(4, dtype=torch.long), 1,
                                      create_graph=True)
    loss = e.sum() + (f ** 2).sum()
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert torch.isfinite(e).all() and torch.isfinite(f).all()
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    # an atom coinciding with its own periodic image cannot happen, but an image at the cutoff edge can
    small = ase.Atoms("C", positions=[[0, 0, 0]], cell=np.eye(3) * 1.7, pbc=True)
    e2, _, f2, v2 = evaluate(model, small)
    assert torch.isfinite(e2) and f2.abs().max() < 1e-10 and torch.isfinite(v2).all()


def test_exported_file_equals_eager_model(tmp_path):
    model = make_model("O3", seed=12)
    atoms = periodic(13)
    e, pa, f, v = evaluate(model, atoms)
    pos, species, edge_index, shift = graph(atoms, model.r_max)
    cell = torch.tensor(atoms.cell.array)
    path = str(tmp_path / "m.pt")
    meta = export_model(model.for_export(), path, F64, symmetry="O3",
                        check_structure=(pos, species, edge_index, shift, cell))
    assert meta["species"] == SPECIES and meta["num_layers"] == 3 and meta["r_max"] == 3.5
    module, meta2 = load_exported(path)
    assert meta2 == meta
    e2, pa2, f2, v2 = module(pos, species, edge_index, shift, cell, len(atoms))
    assert abs(e2 - e) < 1e-12 * max(1.0, abs(float(e)))
    assert (pa2 - pa).abs().max() < 1e-12 * max(1.0, float(pa.abs().max()))
    assert (f2 - f).abs().max() < 1e-12
    assert (v2 - v).abs().max() < 1e-12
    # the eager model is untouched by for_export()
    assert model.online_isolated


def test_float32_model_is_invariant_to_float32_precision():
    model = make_model("O3", seed=14, dtype=torch.float32)
    atoms = molecule(15)
    e = evaluate(model, atoms, torch.float32)[0]
    rot = atoms.copy()
    rot.positions = atoms.positions @ random_rotation(16, improper=True).T
    assert abs(evaluate(model, rot, torch.float32)[0] - e) < 1e-4 * max(1.0, abs(float(e)))


@pytest.mark.parametrize("bad,match", [
    (dict(r_max=0.0), "r_max must be a positive cutoff"),
    (dict(r_max=-1.0), "r_max must be a positive cutoff"),
    (dict(symmetry="E3"), "symmetry must be one of"),
    (dict(lmax=9), "lmax must be an integer"),
    (dict(channels=0), "channels must be an integer"),
    (dict(feature_parity="odd"), "feature_parity must be one of"),
    (dict(feature_parity="both", symmetry="SE3"), "feature_parity 'both' needs symmetry O3"),
])
def test_bad_model_settings_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        EquiforceModel(ModelConfig(**bad), SPECIES)
    with pytest.raises(ValueError, match="unknown model setting"):
        ModelConfig.from_dict({"rmax": 5.0})


def test_float32_model_exports(tmp_path):
    """A float32 model (float64 scale/shift buffers) exports and matches its eager self."""
    model = make_model("O3", seed=17, dtype=torch.float32)
    atoms = molecule(18)
    e = evaluate(model, atoms, torch.float32)[0]
    path = str(tmp_path / "f32.pt")
    export_model(model.for_export(), path, torch.float32, symmetry="O3")
    module, meta = load_exported(path)
    assert meta["dtype"] == "float32"
    pos, species, edge_index, shift = graph(atoms, model.r_max, torch.float32)
    e2 = module(pos, species, edge_index, shift, torch.zeros(3, 3), len(atoms))[0]
    assert abs(float(e2) - float(e)) < 1e-4 * max(1.0, abs(float(e)))


def test_state_dict_of_a_checkpoint_with_the_old_rep_buffer_still_loads():
    """0.1.0 checkpoints carry an unused ``tp.rep`` buffer (path index per output column): it is
    ignored on load (strict), and the loaded weights and buffers equal the saved ones."""
    torch.manual_seed(3)
    cfg = ModelConfig(r_max=3.0, channels=4, lmax=1, num_layers=2, radial_hidden=8, avg_num_neighbors=3.0)
    model = EquiforceModel(cfg, ["H", "C"]).double()
    state = model.state_dict()
    assert not [k for k in state if k.endswith(".rep")]
    tp_prefixes = sorted({k[: -len("cg")] for k in state if k.endswith("tp.cg")})
    assert tp_prefixes, "no tensor-product buffers found"
    old = dict(state, **{p + "rep": torch.zeros(5, dtype=torch.long) for p in tp_prefixes})
    fresh = EquiforceModel(cfg, ["H", "C"]).double()
    fresh.load_state_dict(old, strict=True)
    for k, v in state.items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_float32_round_trip_keeps_exact_clebsch_gordan_coefficients():
    """Training in float32 and exporting in float64 must not leave float32-rounded Clebsch-Gordan
    coefficients: the live model cast back (``.double()``), a float64 model loading a float32
    checkpoint, and the fused export module all hold the exact float64 values (bitwise), so tensor
    outputs of a float64 export stay equivariant to ~1e-15, not ~1e-8."""
    settings = dict(r_max=3.0, channels=4, lmax=2, num_layers=2)
    exact = helpers.make_model(["H", "O"], seed=1, **settings)
    trained32 = helpers.make_model(["H", "O"], seed=1, dtype=torch.float32, **settings)
    names = [n for n, _ in exact.named_buffers() if n.endswith(".tp.cg")]
    assert names, "no tensor-product coefficient buffers found"
    ref = dict(exact.named_buffers())
    # the float32 copy really is rounded (else this test could not fail)
    assert any(not torch.equal(dict(trained32.named_buffers())[n].double(), ref[n]) for n in names)
    back = dict(trained32.double().named_buffers())
    for n in names:
        assert torch.equal(back[n], ref[n]), n
    # a float64 model loading a checkpoint written by a float32 model
    state32 = helpers.make_model(["H", "O"], seed=1, dtype=torch.float32, **settings).state_dict()
    loaded = helpers.make_model(["H", "O"], seed=2, **settings)
    loaded.load_state_dict(state32, strict=True)
    for n in names:
        assert torch.equal(dict(loaded.named_buffers())[n], ref[n]), n
    # the fused export path (its own copy of the coefficients), built in float32 and cast to float64
    fused = helpers.make_model(["H", "O"], seed=1, dtype=torch.float32, **settings).for_export().double()
    fused_cg = {n: b for n, b in fused.named_buffers() if n.endswith(".fused_tp.cg")}
    assert len(fused_cg) == len(names), "the fused module keeps no coefficient buffer"
    for n, b in fused_cg.items():
        assert b.dtype == torch.float64 and torch.equal(b, ref[n.replace(".fused_tp.cg", ".tp.cg")]), n
