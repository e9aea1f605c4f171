"""LAMMPS `path exchange` (lammps_pair/path_exchange.cpp): the model stepped layer by layer,
ghost features refreshed between layers by LAMMPS' forward communication and their gradients
sent home by reverse communication, against the Python exported module and the serial run.

Model: a small learned-architecture EquiforceModel (3 layers, lmax 2, random weights, fused CPU
ops, float64), r_max 4 Å. Reference: the exported module's one-call forward in Python with ASE's
neighbour list (tests/lammps_util.py). Tolerances: |dE|/atom < 1e-10 eV, max|dF| < 1e-9 eV/Å,
virial pressure 1e-8 relative; per-atom virial: sum == global to 1e-10 relative, == the Python
per-edge reference to 1e-9 relative; MD positions == serial within 1e-8 Å. Multi-rank runs are
oversubscribed (`mpirun -np 2..8` on 2 cores) under run_lmp's timeout, so a hang fails.
"""
import re

import numpy as np
import pytest
import torch

from equiforce.deploy.export import export_model, load_exported
from lammps_util import (NKTV2P_METAL, Structure, deck, lammps_cell, parse_result, python_reference, read_dump,
                         run_lmp, wrap, write_data)
from helpers import layered_model as make_model, step_layers as stepped
from lammps_util import ELEMENTS, _random_positions, assert_matches, bulk, molecule, small_cell, triclinic

pytestmark = [pytest.mark.lammps]
R_MAX = 4.0
F64 = torch.float64


def slab():
    """40 atoms in a slab periodic in x and y, open in z (boundary p p f), 7 Å thick in a 40 Å box."""
    rng = np.random.default_rng(21)
    cell = lammps_cell(8.0, 8.0, 40.0)
    pos = _random_positions(np.diag([8.0, 8.0, 7.0]), 40, 1.9, rng) + np.array([0.0, 0.0, 16.0])
    symbols = [ELEMENTS[k] for k in rng.integers(0, 2, 40)]
    return Structure(wrap(pos, cell), symbols, cell, pbc=True)


PBC = {"slab": [True, True, False]}


def reference(model_path, s, name):
    """python_reference, with the slab's mixed boundary (open z)."""
    if name != "slab":
        return python_reference(model_path, s)
    from ase.neighborlist import primitive_neighbor_list

    module, meta = load_exported(model_path)
    i, j, S = primitive_neighbor_list("ijS", PBC[name], s.cell, s.positions, R_MAX, self_interaction=False)
    sp = torch.tensor([meta["species"].index(x) for x in s.symbols])
    e, ea, f, w = module(torch.tensor(s.positions), sp, torch.tensor(np.stack([i, j])), torch.tensor(S @ s.cell),
                         torch.zeros(3, 3, dtype=F64), len(s.symbols))
    press = w.numpy() / abs(np.linalg.det(s.cell)) * NKTV2P_METAL
    return {"energy": float(e), "atom_energy": ea.numpy(), "forces": f.numpy(), "virial": w.numpy(),
            "pressure6": np.array([press[0, 0], press[1, 1], press[2, 2], press[0, 1], press[0, 2], press[1, 2]])}


def make_deck(name, data, model_path, s, **kw):
    text = deck(data, model_path, ELEMENTS, s.pbc, **kw)
    if name == "slab":
        text = text.replace("boundary p p p", "boundary p p f")
    return text


STRUCTURES = {"bulk": bulk, "triclinic": triclinic, "small_cell": small_cell, "molecule": molecule, "slab": slab}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("exchange_model") / "model.pt")
    export_model(make_model(r_max=R_MAX).for_export(fused=True), path, dtype=F64, symmetry="O3")
    return path


@pytest.fixture(scope="module")
def cases(model_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("exchange_data")
    out = {}
    for name, make in STRUCTURES.items():
        s = make()
        data = str(d / f"{name}.data")
        write_data(data, s, ELEMENTS)
        out[name] = (s, data, reference(model_path, s, name))
    return out


def check(proc, s, ref, dump):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    energy, press6 = parse_result(proc.stdout)
    fr = read_dump(dump)[0]
    assert_matches(s, ref, energy, press6, fr["id"].astype(int), np.stack([fr["fx"], fr["fy"], fr["fz"]], 1),
                   fr["c_pea"])
    return fr


@pytest.mark.mpi
@pytest.mark.parametrize("name,nprocs,grid", [
    ("bulk", 1, ""),              # 1 rank: every ghost is an image of a local atom (== images path)
    ("bulk", 2, "2 1 1"), ("bulk", 4, "2 2 1"), ("bulk", 8, "2 2 2"),
    ("triclinic", 3, "3 1 1"), ("triclinic", 4, "2 2 1"),
    ("small_cell", 2, "1 1 2"),   # cell edges < ghost cutoff 6 Å: several swaps per direction
    ("slab", 8, "1 1 8"),         # open z, 8 slices of 5 Å over a 7 Å slab: most ranks own no atom
    ("molecule", 4, "4 1 1"),     # open cluster in one quarter of the box: ranks without atoms
])
def test_exchange_matches_python(cases, model_path, tmp_path, name, nprocs, grid):
    s, data, ref = cases[name]
    text = make_deck(name, data, model_path, s, processors=grid, pair_style="pair_style equiforce device cpu path exchange")
    proc = run_lmp(text, str(tmp_path), nprocs=nprocs, timeout=300)
    fr = check(proc, s, ref, str(tmp_path / "dump.out"))
    assert f"exchange path ({nprocs} MPI rank(s), path exchange)" in proc.stdout
    assert "2 forward + 2 reverse exchanges per step" in proc.stdout
    assert "communication cutoff set" not in proc.stdout  # ghost cutoff stays r_max + skin
    owners = set(fr["c_prop"].astype(int))
    if name in ("slab", "molecule"):
        assert len(owners) < nprocs  # really ranks without atoms
    else:
        assert owners == set(range(nprocs))


@pytest.mark.mpi
def test_auto_takes_exchange_on_several_ranks(cases, model_path, tmp_path):
    s, data, ref = cases["bulk"]
    proc = run_lmp(deck(data, model_path, ELEMENTS, True, processors="2 1 1"), str(tmp_path), nprocs=2)
    check(proc, s, ref, str(tmp_path / "dump.out"))
    assert "exchange path (2 MPI rank(s), path auto: the model file has per-layer entry points)" in proc.stdout


@pytest.mark.mpi
@pytest.mark.parametrize("nprocs,grid", [(2, "2 1 1"), (4, "2 2 1")])
def test_exchange_under_hybrid_with_null_type(cases, model_path, tmp_path, nprocs, grid):
    """Type 2 (C) NULL for equiforce, lj/cut for the pairs with C: the exchange run on several ranks
    equals the serial-images run (checked against Python and LAMMPS' lj/cut in test_lammps.py)."""
    s, data, _ = cases["bulk"]
    lj = "pair_coeff 1 2 lj/cut 0.02 2.2\npair_coeff 2 2 lj/cut 0.03 2.4"
    out = {}
    for n, g, path in ((1, "", "images"), (nprocs, grid, "exchange")):
        wd = tmp_path / path
        wd.mkdir()
        text = deck(data, f"equiforce {model_path}", ["Si", "NULL"], True, processors=g, extra=lj,
                    pair_style=f"pair_style hybrid equiforce device cpu path {path} lj/cut 6.0")
        proc = run_lmp(text, str(wd), nprocs=n, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[path] = (parse_result(proc.stdout), read_dump(str(wd / "dump.out"))[0])
    (e1, p1), f1 = out["images"]
    (e2, p2), f2 = out["exchange"]
    assert abs(e1 - e2) / len(s.symbols) < 1e-10
    assert np.abs(p1 - p2).max() / np.abs(p1).max() < 1e-8
    for c in ("fx", "fy", "fz"):
        assert np.abs(f1[c] - f2[c]).max() < 1e-9
    assert np.abs(f1["c_pea"] - f2["c_pea"]).max() < 1e-10


@pytest.mark.mpi
@pytest.mark.slow
def test_md_with_migration_equals_serial(cases, model_path, tmp_path):
    """200 NVE steps at 1500 K (reneighbouring, atoms changing owner): 2 and 4 ranks on the exchange
    path stay on the serial trajectory within 1e-8 Å."""
    s, data, _ = cases["bulk"]
    # 2 layers, lmax 1, 4 channels: the same code path, a quicker step. Random weights: seed 1 keeps
    # every pair above the 0.5 Å minimum distance over the 200 steps (seed 0 lets two atoms meet)
    tiny = str(tmp_path / "tiny.pt")
    export_model(make_model(seed=1, r_max=R_MAX, num_layers=2, lmax=1, channels=4).for_export(fused=True), tiny,
                 dtype=F64, symmetry="O3")
    frames = {}
    for nprocs, grid, path in ((1, "", "images"), (2, "2 1 1", "exchange"), (4, "2 2 1", "exchange")):
        wd = tmp_path / f"np{nprocs}"
        wd.mkdir()
        proc = run_lmp(deck(data, tiny, ELEMENTS, True, processors=grid, md_steps=200,
                            pair_style=f"pair_style equiforce device cpu path {path}"), str(wd), nprocs=nprocs,
                       timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        first, last = read_dump(str(wd / "dump.out"))
        assert last["step"] == 200
        frames[nprocs] = (first, last, parse_result(proc.stdout))
        if nprocs > 1:
            assert np.count_nonzero(first["c_prop"] != last["c_prop"]) > 0, "no atom migrated between ranks"
        m = re.search(r"Neighbor list builds = (\d+)", proc.stdout)
        assert m and int(m.group(1)) > 0, "no reneighbouring during the run"
    _, last1, (e1, p1) = frames[1]
    for nprocs in (2, 4):
        _, last, (e, p) = frames[nprocs]
        for c in ("x", "y", "z"):
            assert np.abs(last[c] - last1[c]).max() < 1e-8
        assert abs(e - e1) / 64 < 1e-10
        assert np.abs(p - p1).max() / np.abs(p1).max() < 1e-8


# ---- per-atom virial ------------------------------------------------------------------------------

def per_atom_virial_reference(model_path, s):
    """Per-atom virial [N, 6] (eV; xx yy zz xy xz yz) from the model's per-edge gradients: edge
    e = (i, j) with r = r_j - r_i and g = dE/dr gives each of i and j half of -r (x) g."""
    from ase.neighborlist import primitive_neighbor_list

    module, meta = load_exported(model_path)
    n = len(s.symbols)
    i, j, S = primitive_neighbor_list("ijS", [True] * 3, s.cell, s.positions, R_MAX, self_interaction=False)
    sp = torch.tensor([meta["species"].index(x) for x in s.symbols])
    ev = torch.tensor(s.positions[j] - s.positions[i] + S @ s.cell)
    _, _, g = stepped(module, meta, sp, torch.tensor(np.stack([i, j])), ev, n)
    r, g = ev.numpy(), g.numpy()
    ve = -np.stack([r[:, 0] * g[:, 0], r[:, 1] * g[:, 1], r[:, 2] * g[:, 2],
                    r[:, 0] * g[:, 1], r[:, 0] * g[:, 2], r[:, 1] * g[:, 2]], 1)
    v = np.zeros((n, 6))
    np.add.at(v, i, 0.5 * ve)
    np.add.at(v, j, 0.5 * ve)
    return v


@pytest.mark.mpi
def test_per_atom_virial(cases, model_path, tmp_path):
    """compute stress/atom on 1 and 4 ranks: sum == global virial (1e-10 relative), == the Python
    per-edge reference (1e-9 relative), and 1 rank == 4 ranks."""
    s, data, ref = cases["triclinic"]
    vol = abs(np.linalg.det(s.cell))
    v_ref = per_atom_virial_reference(model_path, s)
    # the reference itself adds up to the model's virial
    w = ref["virial"]
    w6 = np.array([w[0, 0], w[1, 1], w[2, 2], w[0, 1], w[0, 2], w[1, 2]])
    assert np.abs(v_ref.sum(0) - w6).max() < 1e-10 * np.abs(w6).max()
    got = {}
    for nprocs, grid in ((1, ""), (4, "2 2 1")):
        wd = tmp_path / f"np{nprocs}"
        wd.mkdir()
        text = deck(data, model_path, ELEMENTS, True, processors=grid,
                    pair_style="pair_style equiforce device cpu path exchange",
                    extra="compute sa all stress/atom NULL virial")
        text = text.replace("c_pea c_prop", "c_pea c_prop c_sa[1] c_sa[2] c_sa[3] c_sa[4] c_sa[5] c_sa[6]")
        proc = run_lmp(text, str(wd), nprocs=nprocs, timeout=300)
        fr = check(proc, s, ref, str(wd / "dump.out"))
        # stress/atom = -nktv2p * per-atom virial (bar A^3); rows sorted by id == s.tags order here
        v = -np.stack([fr[f"c_sa[{k}]"] for k in range(1, 7)], 1) / NKTV2P_METAL
        order = np.argsort(s.tags)
        assert np.abs(v.sum(0) - w6).max() < 1e-10 * np.abs(w6).max()
        _, press6 = parse_result(proc.stdout)
        assert np.abs(-fr["c_sa[1]"].sum() / vol - press6[0]) < 1e-10 * np.abs(press6).max()
        assert np.abs(v - v_ref[order]).max() < 1e-9 * np.abs(v_ref).max()
        got[nprocs] = v
    assert np.abs(got[1] - got[4]).max() < 1e-10 * np.abs(got[1]).max()


# ---- bad inputs -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_models(tmp_path_factory):
    from equiforce.model.analytic import AnalyticMessageModel

    d = tmp_path_factory.mktemp("other_models")
    analytic = str(d / "analytic.pt")
    export_model(AnalyticMessageModel(ELEMENTS, r_max=R_MAX, num_layers=2), analytic, dtype=F64)
    direct = str(d / "direct.pt")
    export_model(make_model(r_max=R_MAX, num_layers=2, lmax=1, direct_forces=True).for_export(fused=False), direct,
                 dtype=F64, symmetry="O3")
    return {"analytic": analytic, "direct": direct}


@pytest.mark.parametrize("case", ["analytic_file", "direct_force_file", "stress_atom_on_images"])
def test_bad_input_is_a_clear_lammps_error(cases, model_path, other_models, tmp_path, case):
    s, data, _ = cases["bulk"]
    style = "pair_style equiforce device cpu path exchange"
    extra = ""
    if case == "analytic_file":
        path = other_models["analytic"]
        pattern = (r"'path exchange' needs a model file with per-layer entry points, and model .*analytic.pt.* "
                   r"cannot be stepped layer by layer: it has no per-layer entry points .*`equiforce export`")
    elif case == "direct_force_file":
        path = other_models["direct"]
        pattern = r"'path exchange' needs a model file with per-layer entry points.*direct-force model"
    else:
        path, style = model_path, "pair_style equiforce device cpu path images"
        extra = "compute sa all stress/atom NULL virial"
        pattern = r"per-atom virials .* on the exchange path only; use 'pair_style equiforce path exchange'"
    text = deck(data, path, ELEMENTS, True, pair_style=style, extra=extra)
    if case == "stress_atom_on_images":
        text = text.replace("dump_modify d format float %.17g sort id",
                            "dump_modify d format float %.17g sort id\ndump d2 all custom 1 d2.out c_sa[1]")
    proc = run_lmp(text, str(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    err = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert err, out[-2000:]
    assert re.search(pattern, err[0]), err[0]
    assert "Segmentation" not in out and "terminate called" not in out


# ---- input checks on every path (issue 18) -------------------------------------------------------

def _bonded_data(path, s):
    """The 9-atom cluster as atom_style bond with a chain of 8 bonds (1-2, 2-3, ...)."""
    lo, hi = 0.0, 30.0
    n = len(s.symbols)
    with open(path, "w") as f:
        f.write(f"bonded cluster\n\n{n} atoms\n{n - 1} bonds\n2 atom types\n1 bond types\n\n")
        f.write(f"{lo} {hi} xlo xhi\n{lo} {hi} ylo yhi\n{lo} {hi} zlo zhi\n\nMasses\n\n1 28.085\n2 12.011\n\n")
        f.write("Atoms # bond\n\n")
        for tag, sym, p in zip(s.tags, s.symbols, s.positions.tolist()):
            f.write(f"{int(tag)} 1 {ELEMENTS.index(sym) + 1} {p[0]!r} {p[1]!r} {p[2]!r}\n")
        f.write("\nBonds\n\n")
        for k in range(n - 1):
            f.write(f"{k + 1} 1 {int(s.tags[k])} {int(s.tags[k + 1])}\n")


@pytest.mark.parametrize("weights", ["default", "one"])
def test_special_bonds_must_keep_bonded_pairs(cases, model_path, tmp_path, weights):
    """With bonds, LAMMPS' default special_bonds (lj/coul 0 0 0) removes bonded pairs from the
    neighbour list: refused, naming the fix; with `special_bonds lj/coul 1 1 1` the run equals the
    model on the same atoms without bonds (Python)."""
    s, _, ref = cases["molecule"]
    data = str(tmp_path / "bonded.data")
    _bonded_data(data, s)
    special = "special_bonds lj/coul 1 1 1\n" if weights == "one" else ""
    text = (f"units metal\natom_style bond\nboundary f f f\n{special}read_data {data}\nbond_style zero\n"
            f"bond_coeff 1 1.5\npair_style equiforce device cpu\npair_coeff * * {model_path} Si C\n"
            "compute pea all pe/atom\ncompute vir all pressure NULL virial\ncompute prop all property/atom proc\n"
            "dump d all custom 1 dump.out id type x y z fx fy fz c_pea c_prop\n"
            "dump_modify d format float %.17g sort id\nrun 0\n"
            'print "EQF_RESULT $(pe:%.17g) $(c_vir[1]:%.17g) $(c_vir[2]:%.17g) $(c_vir[3]:%.17g) '
            '$(c_vir[4]:%.17g) $(c_vir[5]:%.17g) $(c_vir[6]:%.17g)"\n')
    proc = run_lmp(text, str(tmp_path))
    if weights == "one":
        check(proc, s, ref, str(tmp_path / "dump.out"))
        return
    err = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("ERROR")]
    assert proc.returncode != 0 and err, proc.stdout[-2000:]
    assert re.search(r"needs every bonded pair in the neighbour list, but special_bonds weights are lj 0 0 0 .*"
                     r"add 'special_bonds lj/coul 1 1 1'", err[0]), err[0]


@pytest.mark.parametrize("path", ["images", "exchange", "gather"])
def test_atoms_closer_than_min_distance_stop_the_run(model_path, tmp_path, path):
    cell = lammps_cell(12.0, 12.0, 12.0)
    pos = np.array([[3.0, 3.0, 3.0], [3.3, 3.0, 3.0], [6.0, 6.0, 6.0]])
    s = Structure(pos, ["Si", "C", "Si"], cell, pbc=True, tags=np.array([1, 2, 3]))
    data = str(tmp_path / "close.data")
    write_data(data, s, ELEMENTS)
    proc = run_lmp(deck(data, model_path, ELEMENTS, True, pair_style=f"pair_style equiforce device cpu path {path}"),
                   str(tmp_path))
    out = proc.stdout + proc.stderr
    err = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert proc.returncode != 0 and err, out[-2000:]
    assert re.search(r"atoms (1 and 2|2 and 1) are 0\.3 A apart at step 0, closer than the model's minimum distance 0\.5 A",
                     err[0]), err[0]
    assert "Segmentation" not in out


def test_null_type_without_hybrid_is_a_clear_error(cases, model_path, tmp_path):
    s, data, _ = cases["bulk"]
    proc = run_lmp(deck(data, model_path, ["Si", "NULL"], True), str(tmp_path))
    err = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("ERROR")]
    assert proc.returncode != 0 and err
    assert re.search(r"1 of 2 atom type\(s\) are NULL, but NULL .*needs another pair style .*use 'pair_style hybrid",
                     err[0]), err[0]


@pytest.mark.mpi
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs it)")
def test_exchange_on_cuda_matches_python(cases, model_path, tmp_path):
    """`device cuda` on 2 ranks sharing the GPU: features on the GPU, exchanges staged through the
    host; the same numbers as the CPU Python module (float64; the GPU runs the PyTorch path)."""
    s, data, ref = cases["bulk"]
    proc = run_lmp(deck(data, model_path, ELEMENTS, True, processors="2 1 1",
                        pair_style="pair_style equiforce device cuda path exchange"), str(tmp_path), nprocs=2)
    check(proc, s, ref, str(tmp_path / "dump.out"))
    assert "on cuda" in proc.stdout


@pytest.mark.mpi
def test_comm_cutoff_below_the_need_is_raised_by_lammps(cases, model_path, tmp_path):
    """`comm_modify cutoff 3` (below r_max + skin = 6 Å, what the exchange path needs) cannot take
    effect: LAMMPS raises the ghost cutoff to the pair cutoff + skin itself and says so, and the run
    stays exact (so the style needs no error of its own for it)."""
    s, data, ref = cases["bulk"]
    text = deck(data, model_path, ELEMENTS, True, processors="2 1 1",
                pair_style="pair_style equiforce device cpu path exchange")
    text = text.replace("read_data", "comm_modify cutoff 3.0\nread_data", 1)
    proc = run_lmp(text, str(tmp_path), nprocs=2)
    check(proc, s, ref, str(tmp_path / "dump.out"))
    assert "Communication cutoff adjusted to 6" in proc.stdout + proc.stderr


@pytest.mark.parametrize("check", ["yes", "no"])
def test_type_masses_must_match_the_elements(cases, model_path, tmp_path, check):
    """pair_coeff elements in another order than the data file's types (types 1 Si, 2 C with their
    masses; pair_coeff * * model C Si) give a plausible wrong energy: refused, naming the types, the
    masses and the fix; `check_masses no` (isotopes, repartitioned masses) runs it as asked."""
    s, data, ref = cases["bulk"]
    style = "pair_style equiforce device cpu" + (" check_masses no" if check == "no" else "")
    proc = run_lmp(deck(data, model_path, ["C", "Si"], True, pair_style=style), str(tmp_path))
    out = proc.stdout + proc.stderr
    if check == "no":
        assert proc.returncode == 0, out[-2000:]
        energy, _ = parse_result(proc.stdout)
        assert abs(energy - ref["energy"]) > 1e-3  # the swapped species: another (wrong) energy
        return
    err = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert proc.returncode != 0 and err, out[-2000:]
    assert re.search(r"atom type 1 is mapped to element C \(standard mass 12\.01 amu\) but has mass 28\.09: the "
                     r"element names of pair_coeff are probably not in the order of the types.*'check_masses no'",
                     err[0]), err[0]


def test_metadata_records_the_species_masses(model_path):
    """The masses LAMMPS checks come from the file: ASE's standard atomic masses of the species."""
    from ase.data import atomic_masses, atomic_numbers

    _, meta = load_exported(model_path)
    assert meta["masses"] == [float(atomic_masses[atomic_numbers[el]]) for el in meta["species"]]
