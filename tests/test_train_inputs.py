"""Training inputs that used to lose data or train something silently wrong (issue 18), each with
its message: a failed checkpoint write, a cutoff with no neighbours, atoms closer than
MIN_DISTANCE, a data file edited between runs, and --resume with the run's own or missing flags.

Write failures are simulated with a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored so the write
fails with EFBIG) in a subprocess, never by writing to device nodes.
"""
import csv
import os
import resource
import signal
import subprocess
import sys

import ase.io
import numpy as np
import pytest

from equiforce.cli import main
from equiforce.errors import DataError
from equiforce.training.config import build_config
from equiforce.training.loop import train
from helpers import R_MAX, make_frames, write_dataset

SMALL = ["--r-max", str(R_MAX), "--channels", "4", "--lmax", "1", "--layers", "1", "--threads", "1",
         "--dtype", "float64", "--batch-size", "4"]


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def config(data, out, **kw):
    settings = {"data": str(data), "out": str(out), "dtype": "float64", "num_threads": 1, "model.r_max": R_MAX,
                "model.channels": 4, "model.lmax": 1, "model.num_layers": 1, "epochs": 1, **kw}
    return build_config(None, settings)


def epochs_in(path):
    with open(path, newline="") as fh:
        return [int(r["epoch"]) for r in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "train.extxyz", n=12, seed=0)


def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # stays ignored across exec: writes fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_failed_checkpoint_write_keeps_the_run_intact(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, "train", "--data", dataset, "--out", run, "--epochs", 2, "--no-progress", *SMALL)[0] == 0
    before = {name: (run / name).read_bytes() for name in ("best.pt", "last.pt", "metrics.csv")}
    limit = len(before["last.pt"]) // 2  # checkpoints no longer fit; metrics.csv would
    assert len(before["metrics.csv"]) < limit // 4
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "equiforce", "train", "--out", str(run), "--resume", "--epochs", "3",
                           "--no-progress"], capture_output=True, text=True, env=env, timeout=600,
                          preexec_fn=_limit_file_size(limit))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("equiforce: error: could not write checkpoint"), proc.stderr
    assert "the previous checkpoint there is unchanged" in lines[-1] and "--resume" in lines[-1]
    assert sorted(os.listdir(run)) == ["best.pt", "last.pt", "metrics.csv"]  # no .tmp left
    for name, data in before.items():
        assert (run / name).read_bytes() == data, f"{name} changed by the failed epoch"
    # resuming without the limit runs epoch 3 once: no duplicate row
    assert cli(capsys, "train", "--out", run, "--resume", "--epochs", 3, "--no-progress")[0] == 0
    assert epochs_in(run / "metrics.csv") == [1, 2, 3]


def test_cutoff_without_neighbours_is_refused(dataset, tmp_path):
    with pytest.raises(DataError, match=r"no two atoms .* closer than the cutoff r_max = 0.1 Å, so the model would "
                                        r"have no interactions; use a larger cutoff \(--r-max"):
        train(config(dataset, tmp_path / "run", **{"model.r_max": 0.1}), progress=False, log=lambda s: None)
    assert not os.path.exists(tmp_path / "run" / "last.pt")


def test_training_data_with_atoms_too_close_is_refused(tmp_path):
    frames = make_frames(n=6, seed=1)
    frames[3].positions[4] = frames[3].positions[1] + np.array([0.2, 0.0, 0.0])
    path = str(tmp_path / "close.extxyz")
    ase.io.write(path, frames, format="extxyz")
    with pytest.raises(DataError, match=r"'.*close.extxyz' structure 3: atoms 1 and 4 are 0.2 Å apart, closer than "
                                        r"the minimum distance 0.5 Å"):
        train(config(path, tmp_path / "run"), progress=False, log=lambda s: None)


def test_resume_refuses_a_data_file_edited_in_place(tmp_path):
    data = write_dataset(tmp_path / "d.extxyz", n=12, seed=0)
    out = tmp_path / "run"
    train(config(data, out), progress=False, log=lambda s: None)
    original = open(data).read()
    frames = ase.io.read(data, index=":")
    frames[5].positions[0] += 0.05  # same frame count, other structures
    ase.io.write(data, frames, format="extxyz")
    with pytest.raises(DataError, match=r"changed since the run .* started .*restore the original file"):
        train(config(data, out), resume=True, progress=False, log=lambda s: None, resume_overrides={"epochs": 2})
    with open(data, "w") as fh:
        fh.write(original)
    result = train(config(data, out), resume=True, progress=False, log=lambda s: None, resume_overrides={"epochs": 2})
    assert result["epoch"] == 2


def test_resume_accepts_the_run_flags_and_names_a_changed_one(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, "train", "--data", dataset, "--out", run, "--no-progress", "--epochs", 1, *SMALL)[0] == 0
    # the very flags the run was started with (issue 16): accepted
    code, _, err = cli(capsys, "train", "--data", dataset, "--out", run, "--resume", "--no-progress", "--epochs", 2,
                       *SMALL)
    assert code == 0, err
    assert epochs_in(run / "metrics.csv") == [1, 2]
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--epochs", 3, "--channels", 8, "--lmax", 1)
    assert code == 2
    assert ("cannot change ['model.channels'] when resuming (the run has model.channels = 4;" in err
            and len(err.strip().splitlines()) == 1), err


def test_resume_on_an_empty_directory_with_model_flags(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli(capsys, "train", "--out", empty, "--resume", "--channels", 8, "--epochs", 3)
    assert code == 2
    assert f"nothing to resume in '{empty}'" in err and "run without --resume" in err, err
    assert os.listdir(empty) == []


class _InterruptWhilePickled:
    """Raises KeyboardInterrupt when torch.save reaches it: Ctrl-C in the middle of a checkpoint write."""

    def __reduce__(self):
        raise KeyboardInterrupt


def test_interrupted_checkpoint_write_keeps_the_best_checkpoint(dataset, tmp_path):
    from equiforce.training.checkpoints import load_checkpoint, save_checkpoint

    out = tmp_path / "run"
    train(config(dataset, out), progress=False, log=lambda s: None)
    best = (out / "best.pt").read_bytes()
    state = load_checkpoint(str(out / "best.pt"))
    big = dict(state, padding=np.zeros(200000), boom=_InterruptWhilePickled())  # some bytes are written first
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(out / "best.pt"), big)
    assert (out / "best.pt").read_bytes() == best
    assert not os.path.exists(str(out / "best.pt") + ".tmp")
    assert load_checkpoint(str(out / "best.pt"))["epoch"] == 1


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_out_that_is_or_lies_under_a_file_is_refused(dataset, tmp_path, capsys, where):
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me\n")
    out = afile if where == "file" else afile / "run"
    code, _, err = cli(capsys, "train", "--data", dataset, "--out", out, "--epochs", 1, "--no-progress", *SMALL)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    expected = "is an existing file, not a run directory; give a directory" if where == "file" else \
        f"cannot create the run directory '{out}': '{afile}' exists and is not a directory; choose another --out"
    assert expected in err, err
    assert afile.read_text() == "keep me\n"


def test_data_errors_name_the_file_the_structure_and_the_fix(tmp_path, capsys):
    good = write_dataset(tmp_path / "d.extxyz", n=4)
    text = open(good).read()
    (tmp_path / "zz.extxyz").write_text(text.replace("\nO ", "\nZz ", 1))
    first_energy = text.split("energy=")[1].split()[0]
    (tmp_path / "abc.extxyz").write_text(text.replace(f"energy={first_energy}", "energy=abc", 1))
    (tmp_path / "adir").mkdir()
    cases = {"zz.extxyz": "contains the unknown element symbol 'Zz' (line",
             "abc.extxyz": "abc.extxyz' structure 0: label 'energy' holds 'abc', not numbers; fix the value",
             "adir": "adir' is a directory, not a data file; pass the extxyz file itself"}
    for name, fragment in cases.items():
        code, _, err = cli(capsys, "train", "--data", tmp_path / name, "--out", tmp_path / f"run_{name}", *SMALL)
        assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, (name, err)
