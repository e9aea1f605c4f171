"""Bad inputs that lost data, gave silently wrong numbers or unclear errors (issue 18), one test each.

Every user mistake must end in one line that names the problem and the fix (CLI: exit status 2,
one ``equiforce: error:`` line, no traceback), and a file the user had must be unchanged byte for
byte. Write failures are simulated with a file-size limit (``RLIMIT_FSIZE``, SIGXFSZ ignored) in a
subprocess; no test writes to a device node.

Numbers: the float32 OpenMM model with the structure moved by 1e6 Å must give forces within 1e-4
(relative to the largest force) of the same float32 model at the origin and of the float64 model;
energies within 1e-4 relative likewise.
"""
import copy
import json
import os
import resource
import signal
import subprocess
import sys
import zipfile

import numpy as np
import openmm
import pytest
import torch

from equiforce.cli import main
from equiforce.data.datagen import make_md_dataset
from equiforce.deploy.export import (METADATA_FILE, ExportedPotential, build_metadata, export_model,
                                     load_exported)
from equiforce.errors import DatagenError, ModelFileError
from equiforce.model.analytic import AnalyticMessageModel
from equiforce.units import MIN_DISTANCE

from helpers import make_frames, write_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIES = ["H", "C", "O"]
SMALL = ["--r-max", "4.0", "--channels", "4", "--lmax", "1", "--layers", "1", "--threads", "1"]
# datagen parameters that make a real (tiny) GFN2-xTB data set in about a second
TINY_DATAGEN = ["--molecule", "H2O", "--frames", "1", "--stride", "1", "--equilibration", "0", "--quiet"]


def one_line_error(capsys, *argv) -> str:
    """Run the CLI; assert exit 2 with exactly one ``equiforce: error:`` line; return that line."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("equiforce: error:"), err
    assert "Traceback" not in err
    return lines[0]


def child_env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "python"), env.get("PYTHONPATH", "")])
    return env


def snapshot(directory) -> dict:
    """{name: bytes} of every file directly in ``directory``."""
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))
            if os.path.isfile(os.path.join(directory, name))}


@pytest.fixture(scope="module")
def analytic_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bad_models") / "analytic.pt")
    export_model(AnalyticMessageModel(SPECIES, r_max=4.0, num_layers=2), path, torch.float64)
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real training run (1 epoch, tiny network) for `equiforce export`."""
    d = tmp_path_factory.mktemp("bad_run")
    data = write_dataset(d / "train.extxyz", n=6, seed=1)
    run = d / "run"
    assert main(["train", "--data", data, "--out", str(run), "--epochs", "1", "--dtype", "float64",
                 "--val-fraction", "0.2", "--no-progress", *SMALL]) == 0
    return str(run)


# ---------------------------------------------------------------------------------------------
# data loss: datagen -o
# ---------------------------------------------------------------------------------------------
def test_datagen_refuses_a_file_it_did_not_write(tmp_path, capsys):
    user = tmp_path / "mine.extxyz"
    write_dataset(user, n=12)
    before = snapshot(tmp_path)
    line = one_line_error(capsys, "datagen", "-o", user, *TINY_DATAGEN)
    assert f"'{user}' already exists and was not written by `equiforce datagen`" in line
    assert "pass --force" in line
    assert snapshot(tmp_path) == before  # byte for byte, and no sidecar or temporary file appeared
    # a stray user file named like the sidecar is protected too
    other = tmp_path / "new.extxyz"
    (tmp_path / "new.extxyz.json").write_text('{"my": "notes"}')
    before = snapshot(tmp_path)
    line = one_line_error(capsys, "datagen", "-o", other, *TINY_DATAGEN)
    assert "new.extxyz.json' already exists and was not written" in line
    assert snapshot(tmp_path) == before


def test_datagen_force_replaces_and_own_output_is_reused(tmp_path, capsys):
    user = tmp_path / "mine.extxyz"
    write_dataset(user, n=12)
    assert main(["datagen", "-o", str(user), "--force", *TINY_DATAGEN]) == 0
    import ase.io
    frames = ase.io.read(str(user), index=":")
    assert len(frames) == 1 and frames[0].get_chemical_formula() == "H2O"
    assert os.path.isfile(str(user) + ".json")
    # its own output (with the record beside it): reused without --force, and regenerated for other parameters
    mtime = os.stat(user).st_mtime_ns
    assert main(["datagen", "-o", str(user), *TINY_DATAGEN]) == 0
    assert os.stat(user).st_mtime_ns == mtime
    assert main(["datagen", "-o", str(user), "--seed", "5", *TINY_DATAGEN]) == 0
    assert os.stat(user).st_mtime_ns != mtime
    capsys.readouterr()
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_datagen_refuses_non_regular_paths(tmp_path, capsys):
    directory = tmp_path / "adir"
    directory.mkdir()
    (directory / "keep.txt").write_text("keep")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    target = tmp_path / "target.extxyz"
    target.write_text("user data\n")
    link = tmp_path / "link.extxyz"
    os.symlink(target, link)
    for path in (directory, fifo, link):
        for force in ([], ["--force"]):  # --force never replaces a directory, device, pipe or link
            line = one_line_error(capsys, "datagen", "-o", path, *TINY_DATAGEN, *force)
            assert "exists and is not a regular file" in line and "give the path of a new .extxyz file" in line
    assert os.listdir(directory) == ["keep.txt"] and target.read_text() == "user data\n"
    assert os.path.islink(link)
    import stat
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    # a path under an ordinary file
    plain = tmp_path / "plain"
    plain.write_text("x")
    line = one_line_error(capsys, "datagen", "-o", plain / "x.extxyz", *TINY_DATAGEN)
    assert "cannot create its directory" in line and plain.read_text() == "x"


def test_datagen_structure_gfn2_cannot_label(tmp_path, capsys):
    import ase
    import ase.io
    overlap = tmp_path / "overlap.xyz"
    ase.io.write(str(overlap), ase.Atoms("OHH", positions=[[0, 0, 0], [0.96, 0, 0], [0.96, 0.1, 0]]))
    line = one_line_error(capsys, "datagen", "--molecule", overlap, "-o", tmp_path / "o.extxyz", *TINY_DATAGEN[2:])
    assert "atoms 1 (H) and 2 (H) are 0.1 Å apart, closer than the minimum distance 0.5 Å" in line
    heavy = tmp_path / "heavy.xyz"
    ase.io.write(str(heavy), ase.Atoms("UO2", positions=[[0, 0, 0], [1.8, 0, 0], [-1.8, 0, 0]]))
    line = one_line_error(capsys, "datagen", "--molecule", heavy, "-o", tmp_path / "h.extxyz", *TINY_DATAGEN[2:])
    assert "element(s) ['U'] (Z [92])" in line and "Z = 1..86" in line
    with pytest.raises(DatagenError, match="closer than the minimum distance"):
        make_md_dataset(str(overlap), n_frames=1, out=str(tmp_path / "api.extxyz"))
    assert not os.path.exists(tmp_path / "o.extxyz") and not os.path.exists(tmp_path / "api.extxyz")


# ---------------------------------------------------------------------------------------------
# data loss: export -o
# ---------------------------------------------------------------------------------------------
def _limited(limit_bytes):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return preexec


def test_export_write_failure_keeps_the_existing_model(trained_run, tmp_path):
    target = tmp_path / "model.pt"
    assert main(["export", trained_run, "-o", str(target)]) == 0
    old = target.read_bytes()
    assert len(old) > 20000
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "equiforce", "export", trained_run, "-o", str(target),
                           "--dtype", "float32"], capture_output=True, text=True, env=child_env(), timeout=300,
                          preexec_fn=_limited(4096))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"cannot write the model to '{target}' (File too large)" in lines[0]
    assert "the existing" in lines[0] and "is unchanged" in lines[0]
    assert snapshot(tmp_path) == before  # old model byte for byte, no temporary file left
    load_exported(str(target))
    # the same export without the limit replaces the file by a complete one
    assert main(["export", trained_run, "-o", str(target), "--dtype", "float32"]) == 0
    assert load_exported(str(target))[1]["dtype"] == "float32"
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]


def test_export_to_bad_targets(trained_run, tmp_path, capsys):
    directory = tmp_path / "models"
    directory.mkdir()
    line = one_line_error(capsys, "export", trained_run, "-o", directory)
    assert "is a directory; give the path of the file to write" in line
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    line = one_line_error(capsys, "export", trained_run, "-o", fifo)
    assert "exists and is not a regular file" in line
    plain = tmp_path / "plain"
    plain.write_text("x")
    line = one_line_error(capsys, "export", trained_run, "-o", plain / "m.pt")
    assert "cannot create the directory of -o" in line and plain.read_text() == "x"
    assert os.listdir(directory) == []
    with pytest.raises(ModelFileError, match="is a directory"):
        export_model(AnalyticMessageModel(SPECIES), str(directory))


# ---------------------------------------------------------------------------------------------
# metadata edited after export
# ---------------------------------------------------------------------------------------------
def rewrite_zip(src, dst, edit_meta=None, edit_member=None, indent=1):
    """Copy the archive ``src`` to ``dst``, editing the metadata dict (written back with ``indent``)
    and/or members' bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if edit_meta is not None and info.filename.endswith("extra/" + METADATA_FILE):
                meta = json.loads(data)
                edit_meta(meta)
                data = json.dumps(meta, indent=indent).encode()
            if edit_member is not None:
                data = edit_member(info.filename, data)
            zout.writestr(info, data)
    return str(dst)


def test_metadata_edited_after_export_is_refused(analytic_path, tmp_path, capsys):
    module, meta = load_exported(analytic_path)
    assert meta["min_distance"] == MIN_DISTANCE == 0.5
    assert len(meta["weights_digest"]) == 64
    assert module.equiforce_metadata == zipfile.ZipFile(analytic_path).read(
        [n for n in zipfile.ZipFile(analytic_path).namelist() if n.endswith(METADATA_FILE)][0]).decode()
    edits = {
        "species_permuted": lambda m: m.update(species=m["species"][::-1]),
        "r_max": lambda m: m.update(r_max=6.0),
        "only_whitespace": lambda m: None,  # written with indent 2: any change of the text is refused
    }
    for name, edit in edits.items():
        path = rewrite_zip(analytic_path, tmp_path / f"{name}.pt", edit_meta=edit,
                           indent=2 if name == "only_whitespace" else 1)
        with pytest.raises(ModelFileError, match=r"metadata of '.*' was changed after export \(species / r_max"):
            load_exported(path)
    permuted = str(tmp_path / "species_permuted.pt")
    line = one_line_error(capsys, "check", permuted)  # `equiforce check` passed this file before
    assert "was changed after export" in line and "re-export it with `equiforce export`" in line
    line = one_line_error(capsys, "info", permuted)
    assert "was changed after export" in line
    # the untouched file, and an unedited copy of the archive, still load
    same = rewrite_zip(analytic_path, tmp_path / "copy.pt")
    assert load_exported(same)[1] == meta
    assert main(["check", analytic_path]) == 0
    capsys.readouterr()


def test_weights_edited_after_export_are_refused(analytic_path, tmp_path):
    def flip(name, data):
        if "/data/" in name and not name.endswith(".data/serialization_id") and len(data) >= 8:
            value = np.frombuffer(data[:8], dtype="<f8")[0]
            return np.array([value * 1.5], dtype="<f8").tobytes() + data[8:]
        return data
    path = rewrite_zip(analytic_path, tmp_path / "weights.pt", edit_member=flip)
    with pytest.raises(ModelFileError, match="the weights of .* were changed after export"):
        load_exported(path)


def test_learned_model_digest_round_trip(tmp_path):
    """The equivariant network (fused export, buffers TorchScript keeps although the eager module
    marks them non-persistent) loads with a matching digest, float32 and float64."""
    from equiforce.model.network import EquiforceModel, ModelConfig
    torch.manual_seed(0)
    model = EquiforceModel(ModelConfig(r_max=4.0, channels=4, lmax=1, num_layers=2), SPECIES)
    for dtype in (torch.float32, torch.float64):
        path = str(tmp_path / f"net_{dtype}.pt")
        meta = export_model(copy.deepcopy(model).for_export(fused=True), path, dtype, symmetry="O3")
        assert load_exported(path)[1]["weights_digest"] == meta["weights_digest"]


def old_format_file(path, meta_edit=None):
    """A file as exported before the tamper check: no ``equiforce_metadata`` attribute, no digest."""
    model = AnalyticMessageModel(SPECIES, r_max=4.0, num_layers=2).to(torch.float64)
    meta = build_metadata(model, torch.float64, "none")
    if meta_edit is not None:
        meta_edit(meta)
    scripted = torch.jit.script(ExportedPotential(model))
    assert not hasattr(scripted, "equiforce_metadata")
    torch.jit.save(scripted, path, _extra_files={METADATA_FILE: json.dumps(meta, indent=1)})
    return path


def test_file_exported_before_the_check_still_loads(tmp_path):
    path = old_format_file(str(tmp_path / "old.pt"))
    module, meta = load_exported(path)
    assert "weights_digest" not in meta and meta["species"] == SPECIES
    pos = torch.tensor([[0.0, 0.0, 0.0], [1.1, 0.0, 0.0]], dtype=torch.float64)
    e, _, f, _ = module(pos, torch.tensor([1, 0]), torch.tensor([[0, 1], [1, 0]]), torch.zeros(2, 3),
                        torch.zeros(3, 3, dtype=torch.float64), 2)
    assert torch.isfinite(e) and torch.allclose(f.sum(0), torch.zeros(3, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("key", ["dtype", "species", "r_max"])
def test_metadata_missing_key_is_one_line(tmp_path, capsys, key):
    path = old_format_file(str(tmp_path / f"no_{key}.pt"), meta_edit=lambda m: m.pop(key))
    with pytest.raises(ModelFileError, match=f"has no valid '{key}' \\(missing"):
        load_exported(path)
    data = write_dataset(tmp_path / "d.extxyz", n=2)
    for argv in (["info", path], ["eval", path, data], ["check", path]):
        line = one_line_error(capsys, *argv)
        assert f"has no valid '{key}'" in line and "re-export the model" in line


# ---------------------------------------------------------------------------------------------
# unclear errors and tracebacks in the command line
# ---------------------------------------------------------------------------------------------
def test_unknown_element_in_data(tmp_path, capsys):
    bad = tmp_path / "zz.extxyz"
    bad.write_text('2\nProperties=species:S:1:pos:R:3:forces:R:3 energy=-1.0 pbc="F F F"\n'
                   "H 0 0 0 0 0 0\nZz 0 0 1 0 0 0\n")
    line = one_line_error(capsys, "train", "--data", bad, "--out", tmp_path / "run", *SMALL)
    assert f"'{bad}' contains the unknown element symbol 'Zz' (line 4)" in line
    assert "chemical symbols" in line


def test_directory_given_as_data_or_model(tmp_path, capsys):
    line = one_line_error(capsys, "train", "--data", tmp_path, "--out", tmp_path / "run", *SMALL)
    assert "is a directory, not a data file" in line
    line = one_line_error(capsys, "info", tmp_path)
    assert "is a directory, not a model file" in line
    line = one_line_error(capsys, "eval", tmp_path, tmp_path)
    assert "is a directory, not a model file" in line


def test_non_numeric_label_names_file_and_frame(tmp_path, capsys):
    frames = make_frames(n=3)
    import ase.io
    path = tmp_path / "abc.extxyz"
    ase.io.write(str(path), frames, format="extxyz")
    text = path.read_text().splitlines()
    comment = [k for k, line in enumerate(text) if "energy=" in line][2]  # third structure
    import re
    text[comment] = re.sub(r"energy=\S+", "energy=abc", text[comment])
    path.write_text("\n".join(text) + "\n")
    line = one_line_error(capsys, "train", "--data", path, "--out", tmp_path / "run", *SMALL)
    assert f"'{path}' structure 2: label 'energy' holds 'abc', not numbers" in line


def test_out_is_a_file_or_under_a_file(tmp_path, capsys):
    data = write_dataset(tmp_path / "d.extxyz", n=4)
    existing = tmp_path / "notes.txt"
    existing.write_text("my notes\n")
    line = one_line_error(capsys, "train", "--data", data, "--out", existing, *SMALL)
    assert f"--out '{existing}' is an existing file, not a run directory" in line
    line = one_line_error(capsys, "train", "--data", data, "--out", existing / "deeper" / "run", *SMALL)
    assert f"'{existing}' exists and is not a directory" in line
    line = one_line_error(capsys, "train", "--out", existing, "--resume")
    assert "is an existing file, not a run directory" in line
    assert existing.read_text() == "my notes\n"


def test_plot_on_garbage_metrics(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("garbage\n")
    line = one_line_error(capsys, "plot", run)
    assert "is not a metrics file written by `equiforce train` (its first line has no 'epoch' column)" in line
    (run / "metrics.csv").write_bytes(bytes(range(256)) * 4)
    line = one_line_error(capsys, "plot", run)
    assert "is not a metrics file written by `equiforce train`" in line
    (run / "metrics.csv").write_text("epoch,train_loss\n")  # a real header, no rows yet: unchanged message
    line = one_line_error(capsys, "plot", run)
    assert "has no epochs yet" in line


def test_other_os_errors_are_one_line(tmp_path, capsys):
    """Any OSError the CLI meets (here: plot -o into a missing directory) is one line, not a traceback."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,train_loss,val_loss\n1,0.5,0.6\n2,0.4,0.5\n")
    target = tmp_path / "missing" / "curves.png"
    line = one_line_error(capsys, "plot", run, "-o", target)
    assert "cannot use" in line and "No such file or directory" in line and "check the paths given" in line


# ---------------------------------------------------------------------------------------------
# OpenMM
# ---------------------------------------------------------------------------------------------
def _context(force, n, box_nm=None, masses=12.0):
    system = openmm.System()
    for _ in range(n):
        system.addParticle(masses)
    if box_nm is not None:
        system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in np.asarray(box_nm)])
    system.addForce(force)
    return openmm.Context(system, openmm.VerletIntegrator(0.0005), openmm.Platform.getPlatformByName("Reference"))


def _energy_forces(ctx, pos_angstrom):
    from openmm import unit
    ctx.setPositions(np.asarray(pos_angstrom) / 10.0)
    state = ctx.getState(getEnergy=True, getForces=True)
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            np.asarray(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)))


CLUSTER_SYMBOLS = ["C", "C", "O", "H", "H"]
CLUSTER = np.array([[0.0, 0.0, 0.0], [2.25, 0.0, 0.0], [1.12, 1.95, 0.0], [-1.1, -1.3, 1.25], [3.35, -1.3, 1.25]])


def test_openmm_periodic_without_box_is_refused(analytic_path):
    from equiforce.openmm import EquiforceOpenMMError, clear_errors, create_force
    ctx = _context(create_force(analytic_path, elements=CLUSTER_SYMBOLS, periodic=True), 5)
    with pytest.raises(openmm.OpenMMException, match="default 2 nm cube"):
        _energy_forces(ctx, CLUSTER)
    with pytest.raises(EquiforceOpenMMError) as info, clear_errors():
        _energy_forces(ctx, CLUSTER)
    message = str(info.value)
    assert message.startswith("ValueError: equiforce OpenMMPotential: periodic=True but the box is OpenMM's "
                              "default 2 nm cube") and "\n" not in message
    assert "setDefaultPeriodicBoxVectors" in message and "TorchScript" in info.value.trace
    # a box that was set runs, and so does the 2 nm cube when asked for explicitly
    e_set, _ = _energy_forces(_context(create_force(analytic_path, elements=CLUSTER_SYMBOLS, periodic=True), 5,
                                       box_nm=np.eye(3) * 3.0), CLUSTER)
    e_open, _ = _energy_forces(_context(create_force(analytic_path, elements=CLUSTER_SYMBOLS), 5), CLUSTER)
    assert abs(e_set - e_open) < 1e-9 * abs(e_open)  # 3 nm box > cluster + 2 r_max: no images
    e_default, _ = _energy_forces(_context(create_force(analytic_path, elements=CLUSTER_SYMBOLS, periodic=True,
                                                        allow_default_box=True), 5), CLUSTER)
    assert np.isfinite(e_default)


def test_openmm_non_integer_atom_indices(analytic_path):
    from openmm import app
    from equiforce.openmm import create_force, create_mixed_system
    for bad in ([0, 8.9], [0, 8.0], [0, "8"], [0, True]):
        with pytest.raises(ValueError, match=r"atoms= contains .*(not an integer|integer particle indices)"):
            create_force(analytic_path, atoms=bad, elements=["C", "H"])
    create_force(analytic_path, atoms=np.array([0, 8]), elements=["C", "H"])  # numpy integers are integers
    top = app.Topology()
    res = top.addResidue("X", top.addChain())
    mm = openmm.System()
    for s in ["C", "H", "O"]:
        top.addAtom(s, app.Element.getBySymbol(s), res)
        mm.addParticle(12.0)
    with pytest.raises(ValueError, match=r"ml_atoms contains 1.5, which is not an integer"):
        create_mixed_system(analytic_path, top, mm, [0, 1.5])


def test_openmm_trace_reason_first():
    from equiforce.openmm import EquiforceOpenMMError, clear_errors, torchscript_reason
    trace = ("The following operation failed in the TorchScript interpreter.\nTraceback of TorchScript, "
             "serialized code (most recent call last):\n  File \"code/x.py\", line 4, in forward\n"
             "    ops.prim.RaiseException(_0)\n\nbuiltins.ValueError: equiforce OpenMMPotential: the reason\n")
    assert torchscript_reason(trace) == "ValueError: equiforce OpenMMPotential: the reason"
    assert torchscript_reason("an ordinary OpenMM error") is None
    with pytest.raises(EquiforceOpenMMError, match="^ValueError: equiforce OpenMMPotential: the reason$"), \
            clear_errors():
        raise openmm.OpenMMException(trace)
    with pytest.raises(KeyError), clear_errors():  # anything else passes unchanged
        raise KeyError("x")


def test_openmm_min_distance(analytic_path):
    from equiforce.openmm import EquiforceOpenMMError, clear_errors, create_force
    pos = np.zeros((6, 3))
    pos[:, 0] = np.arange(6) * 3.0
    pos[5] = pos[3] + [0.3, 0.0, 0.0]  # ML atoms 3 and 5 of the System are 0.3 Å apart
    force = create_force(analytic_path, atoms=[1, 3, 5], elements=["C", "H", "O"])
    ctx = _context(force, 6)
    with pytest.raises(EquiforceOpenMMError) as info, clear_errors():
        _energy_forces(ctx, pos)
    assert str(info.value).startswith("RuntimeError: equiforce OpenMMPotential: particles 3 and 5 are 0.0300 nm "
                                      "(0.300 Å) apart, closer than the model's minimum distance 0.500 Å")
    unchecked = _context(create_force(analytic_path, atoms=[1, 3, 5], elements=["C", "H", "O"],
                                      check_min_distance=False), 6)
    e, f = _energy_forces(unchecked, pos)
    assert np.isfinite(e) and np.all(np.isfinite(f))
    pos[5] = pos[3] + [0.6, 0.0, 0.0]  # above the minimum: runs
    e, _ = _energy_forces(ctx, pos)
    assert np.isfinite(e)


def test_openmm_float32_far_from_origin(tmp_path):
    """float32 model, cluster moved by 1e6 Å (1e5 nm): forces within 1e-4 relative of the float32
    result at the origin and of the float64 model (before: positions were cast to float32 first,
    which rounds 1e6 Å to 0.0625 Å steps)."""
    from equiforce.openmm import create_force
    model = AnalyticMessageModel(SPECIES, r_max=4.0, num_layers=2)
    paths = {}
    for name, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        paths[name] = str(tmp_path / f"{name}.pt")
        export_model(copy.deepcopy(model), paths[name], dtype)
    results = {}
    for name, offset in (("float64", 0.0), ("float32", 0.0), ("float32_far", 1e6)):
        ctx = _context(create_force(paths[name.split("_")[0]], elements=CLUSTER_SYMBOLS), 5)
        results[name] = _energy_forces(ctx, CLUSTER + offset)
    e64, f64 = results["float64"]
    scale = np.abs(f64).max()
    assert scale > 10.0  # a non-trivial structure (kJ/mol/nm)
    for ref in ("float32", "float64"):
        e_ref, f_ref = results[ref]
        e_far, f_far = results["float32_far"]
        assert abs(e_far - e_ref) <= 1e-4 * abs(e_ref), (ref, e_far, e_ref)
        assert np.abs(f_far - f_ref).max() <= 1e-4 * np.abs(f_ref).max(), (ref, np.abs(f_far - f_ref).max())
