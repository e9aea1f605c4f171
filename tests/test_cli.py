"""The `equiforce` command line end to end, evaluation of exported files, and user errors (exit 2, one line)."""
import json
import os
import subprocess
import sys

import ase.io
import numpy as np
import pytest
import torch

from equiforce.model.analytic import AnalyticMessageModel
from equiforce.cli import main
from equiforce.deploy.evaluate import evaluate_exported
from equiforce.deploy.export import export_model

from helpers import LABEL_SPECIES, R_MAX, make_frames, write_dataset

SMALL = ["--r-max", str(R_MAX), "--channels", "8", "--lmax", "1", "--layers", "2", "--threads", "1"]
METRIC_KEYS = {"energy_mae_mev_per_atom", "force_mae_mev_per_a", "force_rmse_mev_per_a", "stress_mae_mev_per_a3",
               "n_structures"}


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(capsys, fragment, *argv):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("equiforce: error:"), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.slow
def test_train_export_info_eval_plot(tmp_path, capsys):
    data = write_dataset(tmp_path / "train.extxyz", n=8, periodic=2, seed=3)
    run, model = tmp_path / "run", tmp_path / "model.pt"
    code, out, err = run_cli(capsys, "train", "--data", data, "--out", run, "--epochs", 2, "--dtype", "float64",
                             "--val-fraction", 0.2, "--seed", 1, "--no-progress", *SMALL)
    assert code == 0, err
    assert os.path.isfile(run / "best.pt") and os.path.isfile(run / "last.pt")
    assert "epoch    2" in out

    code, out, err = run_cli(capsys, "export", run, "-o", model)
    assert code == 0, err
    code, out, err = run_cli(capsys, "info", model)
    assert code == 0, err
    assert "species" in out and "['H', 'O']" in out and "float64" in out and "O3" in out
    code, out, err = run_cli(capsys, "info", model, "--json")
    meta = json.loads(out)
    assert meta["r_max"] == R_MAX and meta["num_layers"] == 2 and meta["model_type"] == "equiforce"

    code, out, err = run_cli(capsys, "eval", model, data, "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert set(metrics) == METRIC_KEYS
    assert metrics["n_structures"] == 10 and metrics["stress_mae_mev_per_a3"] is not None
    # the exported file reproduces the metrics the trainer computed with the EMA weights of best.pt
    from equiforce.data.dataset import load_dataset
    from equiforce.training.loop import evaluate_graphs, load_checkpoint, model_from_checkpoint

    eager, _ = model_from_checkpoint(load_checkpoint(str(run / "best.pt")))
    graphs, _ = load_dataset(data, R_MAX)
    ref = evaluate_graphs(eager, graphs, 4, torch.float64, torch.device("cpu")).metrics()
    for key in ("energy_mae_mev_per_atom", "force_mae_mev_per_a", "force_rmse_mev_per_a", "stress_mae_mev_per_a3"):
        assert abs(metrics[key] - ref[key]) < 1e-8 * max(1.0, ref[key])

    code, out, err = run_cli(capsys, "eval", model, data)
    assert code == 0 and "force MAE" in out and "meV/atom" in out
    code, out, err = run_cli(capsys, "plot", run)
    assert code == 0, err
    png = out.strip()
    assert png.endswith(".png") and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    # a float32 export of the same run agrees with the float64 one to float32 precision
    model32 = tmp_path / "model32.pt"
    assert run_cli(capsys, "export", run, "-o", model32, "--dtype", "float32")[0] == 0
    code, out, err = run_cli(capsys, "eval", model32, data, "--json")
    m32 = json.loads(out)
    assert abs(m32["force_mae_mev_per_a"] - metrics["force_mae_mev_per_a"]) < 1e-3 * metrics["force_mae_mev_per_a"]
    assert json.loads(run_cli(capsys, "info", model32, "--json")[1])["dtype"] == "float32"

    # resume continues the same run (and refuses other data)
    assert_user_error(capsys, "not '", "train", "--out", run, "--resume", "--data", tmp_path / "other.extxyz")
    code, out, err = run_cli(capsys, "train", "--out", run, "--resume", "--epochs", 3, "--no-progress",
                             "--threads", "1")
    assert code == 0, err
    assert "resuming at epoch 3" in out


def test_config_file_and_flag_override(tmp_path, capsys):
    data = write_dataset(tmp_path / "train.extxyz", n=6, seed=4)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {data}\nepochs: 5\nlr: 5e-3\ndtype: float64\n"
                   f"model:\n  r_max: {R_MAX}\n  channels: 8\n  lmax: 1\n  num_layers: 1\n")
    code, out, err = run_cli(capsys, "train", "--config", cfg, "--out", tmp_path / "run", "--epochs", 1,
                             "--no-progress", "--threads", "1")
    assert code == 0, err
    from equiforce.training.loop import load_checkpoint

    state = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert state["epoch"] == 1 and state["config"]["epochs"] == 1 and state["config"]["lr"] == 5e-3
    assert state["config"]["model"]["num_layers"] == 1
    assert state["config"]["model"]["avg_num_neighbors"] > 1


def test_eval_metrics_closed_form(tmp_path):
    """An exported analytic model evaluated on its own labels gives ~0; shifted labels give the shift."""
    model_path = str(tmp_path / "analytic.pt")
    export_model(AnalyticMessageModel(LABEL_SPECIES, r_max=R_MAX, num_layers=2), model_path, torch.float64)
    frames = make_frames(n=3, periodic=2, seed=7)
    exact = str(tmp_path / "exact.extxyz")
    ase.io.write(exact, frames, format="extxyz")
    m = evaluate_exported(model_path, exact)
    assert m["n_structures"] == 5
    # labels are stored with 8 decimals in extxyz; positions too
    assert m["energy_mae_mev_per_atom"] < 1e-3 and m["force_mae_mev_per_a"] < 1e-3
    assert m["stress_mae_mev_per_a3"] < 1e-3
    for atoms in frames:
        atoms.calc.results["energy"] += 0.01 * len(atoms)      # +10 meV/atom
        atoms.calc.results["forces"] += np.where(np.arange(3) == 0, 0.004, -0.004)  # |dF| = 4 meV/A
        atoms.calc.results.get("stress", np.zeros(6))[:] += 0.002  # 6 of 9 components +2 meV/A^3
    shifted = str(tmp_path / "shifted.extxyz")
    ase.io.write(shifted, frames, format="extxyz")
    m = evaluate_exported(model_path, shifted)
    assert abs(m["energy_mae_mev_per_atom"] - 10.0) < 1e-3
    assert abs(m["force_mae_mev_per_a"] - 4.0) < 1e-3 and abs(m["force_rmse_mev_per_a"] - 4.0) < 1e-3
    # Voigt +2 on xx, yy, zz, yz, xz, xy -> all 9 components of the symmetric 3x3 move by 2
    assert abs(m["stress_mae_mev_per_a3"] - 2.0) < 1e-3


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    assert_user_error(capsys, "empty", "train", "--data", empty, "--out", tmp_path / "r1", *SMALL)

    noforces = tmp_path / "noforces.extxyz"
    frames = make_frames(n=2)
    for atoms in frames:
        e = atoms.get_potential_energy()
        atoms.calc = None
        atoms.info["energy"] = e
    ase.io.write(str(noforces), frames, format="extxyz")
    assert_user_error(capsys, "no forces under key 'forces'", "train", "--data", noforces, "--out",
                      tmp_path / "r2", *SMALL)

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("epochs: 3\nlearning_rate: 0.01\n")
    assert_user_error(capsys, "unknown setting(s) ['learning_rate']", "train", "--config", cfg)
    cfg.write_text("model:\n  chanels: 8\n")
    assert_user_error(capsys, "unknown model setting(s) ['chanels']", "train", "--config", cfg)
    assert_user_error(capsys, "r_max must be a positive cutoff", "train", "--data", noforces, "--r-max", "-1")
    assert_user_error(capsys, "symmetry must be one of", "train", "--data", noforces, "--symmetry", "E3")
    assert_user_error(capsys, "no training data given", "train", "--out", tmp_path / "r3")

    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"\x00garbage" * 10)
    assert_user_error(capsys, "corrupt", "export", run, "-o", tmp_path / "m.pt")
    assert_user_error(capsys, "does not exist", "export", tmp_path / "nowhere", "-o", tmp_path / "m.pt")
    assert_user_error(capsys, "does not exist", "train", "--out", tmp_path / "nowhere", "--resume")
    assert_user_error(capsys, "does not exist", "info", tmp_path / "missing.pt")
    assert_user_error(capsys, "not a TorchScript file", "eval", run / "best.pt", noforces)
    assert_user_error(capsys, "does not exist", "plot", tmp_path / "nowhere")

    model_path = str(tmp_path / "analytic.pt")
    export_model(AnalyticMessageModel(["H", "C"], r_max=R_MAX), model_path, torch.float64)
    assert_user_error(capsys, "element(s) ['O']", "eval", model_path, write_dataset(tmp_path / "d.extxyz", n=2))


@pytest.mark.slow
def test_console_entry_point_no_traceback(tmp_path):
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "python"),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "equiforce", "train", "--data", str(empty), "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "empty" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "equiforce", "frobnicate"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_train_help_reaches_every_setting(capsys):
    """Every TrainConfig / ModelConfig field has a `train` flag or switch, or is listed as YAML-only
    (and named in --help); flags land on their settings with the right types."""
    import dataclasses

    from equiforce.cli import TRAIN_FLAGS, TRAIN_SWITCHES, TRAIN_YAML_ONLY, build_parser
    from equiforce.model.network import ModelConfig
    from equiforce.training.config import TrainConfig, build_config

    keys = {f.name for f in dataclasses.fields(TrainConfig) if f.name != "model"}
    keys |= {"model." + f.name for f in dataclasses.fields(ModelConfig)}
    reachable = {k for _, k, _, _ in TRAIN_FLAGS} | {k for _, k, _ in TRAIN_SWITCHES} | {"out"}
    assert not (keys - reachable - set(TRAIN_YAML_ONLY)), sorted(keys - reachable - set(TRAIN_YAML_ONLY))
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, _, _, _ in TRAIN_FLAGS:
        assert flag in text, flag
    for key in TRAIN_YAML_ONLY:
        assert key in text, key
    args = parser.parse_args(["train", "--scheduler", "cosine", "--ema-decay", "0", "--resnet", "false",
                              "--long-range", "ewald", "--radial-hidden", "16"])
    overrides = {k: getattr(args, k.replace(".", "__")) for _, k, _, _ in TRAIN_FLAGS}
    config = build_config(None, {k: v for k, v in overrides.items() if v is not None})
    assert (config.scheduler, config.ema_decay, config.model.resnet, config.model.long_range,
            config.model.radial_hidden) == ("cosine", 0.0, False, "ewald", 16)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--resnet", "maybe"])
    assert "expected true or false, got 'maybe'" in capsys.readouterr().err
