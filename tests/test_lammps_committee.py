"""Committee files in LAMMPS (pair_style equiforce ... uncertainty yes): the mean against the
members' own files run in LAMMPS, the spread (per atom through `fix pair`, global through
`compute pair`) against the members' LAMMPS forces and against Python, on 1 and 2 MPI ranks; the
threshold (warn, stop, frames file); refusals.

Tolerances (float64): mean energy per atom and forces 1e-12 (eV, eV/Å) against the average of the
member files' LAMMPS runs; pressure relative 1e-10; uncertainty 1e-12 against the members' LAMMPS
forces, 1e-10 against the Python committee (other neighbour order).
"""
import os

import ase.io
import numpy as np
import pytest
import torch

from equiforce.ase import EquiforceCalculator
from equiforce.deploy.committee import export_committee
from equiforce.deploy.export import export_model

from helpers import make_model
from lammps_util import ELEMENTS, bulk, deck, mpirun_available, parse_result, read_dump, run_lmp, write_data

pytestmark = pytest.mark.lammps
SMALL = dict(r_max=3.5, channels=6, lmax=1, num_layers=2, num_bessel=6, radial_hidden=12, avg_num_neighbors=8.0)
TOL = 1e-12
UNC = ("compute unc all pair equiforce\n"
       "fix func all pair 1 equiforce force_uncertainty 0\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmp_committee")
    models = [make_model(ELEMENTS, s, scale=[1.5, 0.7], shift=[-3.0, -1.0], **SMALL).for_export() for s in (1, 2, 3)]
    members = []
    for k, m in enumerate(models):
        p = str(d / f"member{k}.pt")
        export_model(m, p, torch.float64, symmetry="O3")
        members.append(p)
    committee = str(d / "committee.pt")
    export_committee(models, committee, torch.float64, symmetries=["O3"] * 3, sources=members)
    s = bulk()
    write_data(str(d / "data.lmp"), s, ELEMENTS)
    return {"dir": str(d), "members": members, "committee": committee, "structure": s}


def committee_deck(setup, pair_style: str, dump: str, md_steps: int = 0, extra: str = UNC) -> str:
    text = deck("data.lmp", setup["committee"], ELEMENTS, True, pair_style=pair_style, dump_file=dump,
                md_steps=md_steps, extra=extra)
    if "f_func" not in text and "fix func" in extra:
        text = text.replace("c_pea c_prop", "c_pea c_prop f_func")
    if "compute unc" in extra:
        text += 'print "EQF_UNC $(c_unc[1]:%.17g) $(c_unc[2]:%.17g)"\n'
    return text


def run_ok(text, workdir, nprocs=1, name="in.deck"):
    r = run_lmp(text, workdir, nprocs=nprocs, name=name, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def by_id(frame, key):
    order = np.argsort(frame["id"])
    return np.asarray(frame[key])[order]


def forces_of(frame):
    return np.stack([by_id(frame, c) for c in ("fx", "fy", "fz")], axis=1)


@pytest.fixture(scope="module")
def member_runs(setup):
    """Each member's own file in LAMMPS (1 rank): energy, pressure, forces by atom id."""
    out = []
    for k, p in enumerate(setup["members"]):
        dump = f"member{k}.dump"
        text = deck("data.lmp", p, ELEMENTS, True, dump_file=dump)
        r = run_ok(text, setup["dir"], name=f"in.member{k}")
        e, press = parse_result(r.stdout)
        frame = read_dump(os.path.join(setup["dir"], dump))[0]
        out.append({"energy": e, "pressure": press, "forces": forces_of(frame), "atom_energy": by_id(frame, "c_pea")})
    return out


@pytest.mark.parametrize("nprocs,uncertainty,path", [
    (1, True, "auto"), pytest.param(2, True, "auto", marks=pytest.mark.mpi),
    pytest.param(2, False, "ghost_shell", marks=pytest.mark.mpi)],
    ids=["1rank-images", "2ranks-gather", "2ranks-ghost-shell-mean-only"])
def test_committee_mean_and_spread_in_lammps(setup, member_runs, nprocs, uncertainty, path):
    if nprocs > 1 and not mpirun_available():
        pytest.fail("mpirun of the venv is missing (the mpich wheel provides it)")
    n = len(setup["structure"].symbols)
    dump = f"committee_{nprocs}_{int(uncertainty)}.dump"
    style = f"pair_style equiforce device cpu path {path}" + (" uncertainty yes" if uncertainty else "")
    text = committee_deck(setup, style, dump, extra=UNC if uncertainty else "")
    r = run_ok(text, setup["dir"], nprocs=nprocs, name=f"in.c{nprocs}{int(uncertainty)}")
    if uncertainty and nprocs > 1:
        assert "gather path" in r.stdout and "'uncertainty yes' needs every member's complete force" in r.stdout
    if path == "ghost_shell":
        assert "ghost-shell path" in r.stdout
    assert "committee of 3 members" in r.stdout
    e, press = parse_result(r.stdout)
    frame = read_dump(os.path.join(setup["dir"], dump))[0]
    f = forces_of(frame)
    mean_e = np.mean([m["energy"] for m in member_runs])
    mean_f = np.mean([m["forces"] for m in member_runs], axis=0)
    mean_p = np.mean([m["pressure"] for m in member_runs], axis=0)
    assert abs(e - mean_e) / n <= TOL, (e, mean_e)
    assert np.abs(f - mean_f).max() <= TOL, np.abs(f - mean_f).max()
    np.testing.assert_allclose(by_id(frame, "c_pea"), np.mean([m["atom_energy"] for m in member_runs], axis=0),
                               rtol=0, atol=TOL)
    assert np.abs(press - mean_p).max() <= 1e-10 * np.abs(mean_p).max()
    if not uncertainty:
        return
    # spread: from the members' LAMMPS forces, and from the Python committee (ASE)
    mf = np.array([m["forces"] for m in member_runs])
    unc_ref = np.sqrt(np.mean(np.sum((mf - mf.mean(axis=0)) ** 2, axis=2), axis=0))
    unc = by_id(frame, "f_func")
    assert np.abs(unc - unc_ref).max() <= TOL
    e_unc_ref = float(np.std([m["energy"] for m in member_runs]))
    line = next(x for x in r.stdout.splitlines() if x.startswith("EQF_UNC"))
    max_unc, e_unc = (float(v) for v in line.split()[1:])
    assert abs(max_unc - unc_ref.max()) <= TOL and abs(e_unc - e_unc_ref) <= TOL
    s = setup["structure"]
    from ase import Atoms

    atoms = Atoms(s.symbols, positions=s.positions, cell=s.cell, pbc=True)
    atoms.calc = EquiforceCalculator(setup["committee"])
    atoms.get_potential_energy()
    py = atoms.calc.results
    order = np.argsort(s.tags)
    assert np.abs(unc - py["force_uncertainty"][order]).max() < 1e-10
    assert abs(e_unc - py["energy_uncertainty"]) < 1e-10
    assert unc.min() > 1e-6  # distinct members: every atom has a spread


@pytest.mark.parametrize("nprocs", [1, pytest.param(2, marks=pytest.mark.mpi)], ids=["1rank", "2ranks"])
def test_threshold_stop_writes_the_frame_and_ends_the_run(setup, nprocs):
    if nprocs > 1 and not mpirun_available():
        pytest.fail("mpirun of the venv is missing (the mpich wheel provides it)")
    frames = os.path.join(setup["dir"], f"over_{nprocs}.xyz")
    if os.path.exists(frames):
        os.remove(frames)
    # the largest spread at step 0, from the run above's definition, sets a threshold the MD passes
    style = f"pair_style equiforce device cpu uncertainty yes threshold 1e-9 on_exceed stop frames {frames}"
    text = committee_deck(setup, style, f"stop_{nprocs}.dump", md_steps=20)
    r = run_lmp(text, setup["dir"], nprocs=nprocs, name=f"in.stop{nprocs}", timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-2000:]
    assert "exceeds the threshold 1e-09 eV/A" in out and "on_exceed stop" in out and "at step 0" in out
    assert "EQF_RESULT" not in out  # the run did not go on
    got = ase.io.read(frames, index=":")
    assert len(got) == 1  # written once, by one rank
    fr = got[0]
    assert len(fr) == len(setup["structure"].symbols) and fr.info["step"] == 0
    unc = fr.arrays["force_uncertainty"]
    assert fr.info["max_force_uncertainty"] == pytest.approx(unc.max(), abs=0) and unc.max() > 1e-9
    # the frame holds the structure: the Python committee on it gives the recorded spread
    fr.calc = EquiforceCalculator(setup["committee"])
    fr.get_potential_energy()
    assert np.abs(fr.calc.results["force_uncertainty"] - unc).max() < 1e-10
    assert abs(fr.calc.results["energy_uncertainty"] - fr.info["energy_uncertainty"]) < 1e-10


def test_threshold_warn_goes_on_and_halts_through_fix_halt(setup):
    frames = os.path.join(setup["dir"], "warn.xyz")
    if os.path.exists(frames):
        os.remove(frames)
    style = f"pair_style equiforce device cpu uncertainty yes threshold 1e-9 frames {frames}"
    text = committee_deck(setup, style, "warn.dump", md_steps=3)
    r = run_ok(text, setup["dir"], name="in.warn")
    assert r.stdout.count("WARNING: pair equiforce: committee force uncertainty") == 4  # steps 0..3
    assert len(ase.io.read(frames, index=":")) == 4
    # the LAMMPS-native graceful stop: fix halt on c_unc[1]
    extra = UNC + "variable maxunc equal c_unc[1]\nfix stop all halt 1 v_maxunc > 1e-9 error continue\n"
    text = committee_deck(setup, "pair_style equiforce device cpu uncertainty yes", "halt.dump", md_steps=5,
                          extra=extra)
    r = run_ok(text, setup["dir"], name="in.halt")
    assert "Fix halt condition" in r.stdout and "EQF_RESULT" in r.stdout


def test_uncertainty_refusals(setup):
    cases = [
        (deck("data.lmp", setup["members"][0], ELEMENTS, True, pair_style="pair_style equiforce uncertainty yes"),
         "'uncertainty yes' needs a committee file"),
        (deck("data.lmp", setup["committee"], ELEMENTS, True, pair_style="pair_style equiforce threshold 0.1"),
         "add 'uncertainty yes'"),
        (deck("data.lmp", setup["committee"], ELEMENTS, True,
              pair_style="pair_style equiforce uncertainty yes on_exceed stop"), "need a 'threshold F'"),
        (deck("data.lmp", setup["committee"], ELEMENTS, True,
              pair_style="pair_style equiforce uncertainty yes threshold -1"), "'threshold' needs a positive number"),
        (deck("data.lmp", setup["committee"], ELEMENTS, True,
              pair_style="pair_style equiforce uncertainty yes path ghost_shell"), "use 'path auto'"),
    ]
    for k, (text, fragment) in enumerate(cases):
        r = run_lmp(text, setup["dir"], name=f"in.bad{k}", timeout=120)
        out = r.stdout + r.stderr
        assert r.returncode != 0 and fragment in out, (fragment, out[-1500:])
