"""Data-parallel training (torch.distributed, gloo on the CPU) against one process.

The reference is the one-process trainer with the same global batch and seed: the weights, the EMA
weights and the optimiser state after N processes must equal it to 1e-6 (float64; in practice they
agree to about 1e-13). Processes are started with torchrun (``python -m torch.distributed.run``),
oversubscribed on a 2-core machine, under a timeout so a hang fails the test.
"""
import csv
import os
import subprocess
import sys

import pytest
import torch

from equiforce.training.config import build_config
from equiforce.training.distributed import global_counts, shard
from equiforce.training.loop import load_checkpoint, train

from helpers import R_MAX, write_dataset

TIMEOUT_S = 300
# batch 3 over 16 training structures: uneven shards (2 + 1) and a last batch of one structure
# (the second process has an empty shard there); augmentation draws one rotation per structure
FLAGS = ["--dtype", "float64", "--batch-size", "3", "--lr", "0.01", "--val-fraction", "0.2", "--ema-decay", "0.9",
         "--seed", "0", "--threads", "1", "--r-max", str(R_MAX), "--channels", "8", "--lmax", "1", "--layers", "2",
         "--radial-hidden", "16", "--num-bessel", "6", "--rotation-augmentation", "--no-progress"]


def _config(data, out, epochs):
    return build_config(None, {"data": str(data), "out": str(out), "dtype": "float64", "batch_size": 3, "lr": 0.01,
                               "val_fraction": 0.2, "ema_decay": 0.9, "seed": 0, "num_threads": 1,
                               "model.r_max": R_MAX, "model.channels": 8, "model.lmax": 1, "model.num_layers": 2,
                               "model.radial_hidden": 16, "model.num_bessel": 6, "rotation_augmentation": True,
                               "epochs": epochs})


def torchrun(nproc, args, timeout=TIMEOUT_S):
    """``torchrun --standalone --nproc_per_node nproc -m equiforce ARGS``; returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", EQUIFORCE_DIST_TIMEOUT_S="120")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", str(nproc), "-m", "equiforce"] + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def assert_same_state(a, b, tol=1e-6):
    """Model weights, EMA weights and Adam moments of two checkpoints agree to ``tol`` (absolute,
    relative to max(1, |value|))."""
    def close(x, y, what):
        assert x.shape == y.shape, what
        err = float(((x - y).abs() / y.abs().clamp(min=1.0)).max()) if x.numel() else 0.0
        assert err <= tol, f"{what}: {err:.3g}"
        return err
    worst = 0.0
    for k, v in b["model_state"].items():
        if v.is_floating_point():
            worst = max(worst, close(a["model_state"][k], v, f"model {k}"))
    for k, v in b["ema_state"]["shadow"].items():
        worst = max(worst, close(a["ema_state"]["shadow"][k], v, f"ema {k}"))
    sa, sb = a["optimizer_state"]["state"], b["optimizer_state"]["state"]
    assert sa.keys() == sb.keys()
    for k in sb:
        assert float(sa[k]["step"]) == float(sb[k]["step"])
        for m in ("exp_avg", "exp_avg_sq"):
            worst = max(worst, close(sa[k][m], sb[k][m], f"adam {k} {m}"))
    assert a["epoch"] == b["epoch"] and a["best_epoch"] == b["best_epoch"]
    assert abs(a["best_loss"] - b["best_loss"]) <= 1e-9 * abs(b["best_loss"])
    return worst


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_shard_slices_cover_the_batch_once():
    for n in range(0, 9):
        for world in (1, 2, 3, 4):
            parts = [shard(list(range(n)), r, world) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert global_counts([3, 5], [True, False], [False, False]) == {"energy": 2, "forces": 24, "stress": 9,
                                                                      "dipole": 0, "polarizability": 0}
    assert global_counts([3, 5], [True, False], [False, True], [True, True])["polarizability"] == 18


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ddp") / "train.extxyz", n=20, seed=0)


@pytest.mark.mpi
@pytest.mark.slow
def test_two_processes_equal_one_and_resume_across_process_counts(data, tmp_path):
    torch.set_num_threads(1)
    two, one = tmp_path / "two", tmp_path / "one"
    # 2 epochs with 2 gloo processes (the CLI under torchrun) and with 1 process (in this process)
    res = torchrun(2, ["train", "--data", str(data), "--out", str(two), "--epochs", "2"] + FLAGS)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "x 2 processes (gloo)" in res.stdout
    assert res.stdout.count("epoch    1") == 1  # only rank 0 reports
    train(_config(data, one, 2), progress=False, log=lambda s: None)
    a, b = load_checkpoint(str(two / "last.pt")), load_checkpoint(str(one / "last.pt"))
    assert a["world_size"] == 2 and b["world_size"] == 1
    worst = assert_same_state(a, b)
    print(f"2 processes vs 1 after 2 epochs (12 steps): max relative weight difference {worst:.2e}")
    for ra, rb in zip(read_rows(two / "metrics.csv"), read_rows(one / "metrics.csv")):
        for key in ra:
            if key != "time_s" and ra[key]:
                assert abs(float(ra[key]) - float(rb[key])) <= 1e-9 * abs(float(rb[key])), (key, ra, rb)
    assert sorted(os.listdir(two)) == ["best.pt", "last.pt", "metrics.csv"]  # no stray files from rank 1

    # resume the 2-process run with 1 process and the 1-process run with 2 processes, to epoch 4
    train(_config(data, two, 4), resume=True, progress=False, log=lambda s: None, resume_overrides={"epochs": 4})
    res = torchrun(2, ["train", "--out", str(one), "--resume", "--epochs", "4", "--no-progress"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming at epoch 3" in res.stdout
    a, b = load_checkpoint(str(two / "last.pt")), load_checkpoint(str(one / "last.pt"))
    assert a["epoch"] == b["epoch"] == 4
    worst = assert_same_state(a, b)
    print(f"2->1 vs 1->2 processes after 4 epochs: max relative weight difference {worst:.2e}")
    assert [int(r["epoch"]) for r in read_rows(one / "metrics.csv")] == [1, 2, 3, 4]

    # the exported files of the two runs give the same energies and forces (ASE calculator, float64)
    from ase.io import read
    from equiforce.ase import EquiforceCalculator
    from equiforce.cli import main

    results = []
    for run in (two, one):
        assert main(["export", str(run), "-o", str(run / "model.pt")]) == 0
        atoms = read(str(data), index=0)
        atoms.calc = EquiforceCalculator(str(run / "model.pt"))
        results.append((atoms.get_potential_energy(), atoms.get_forces()))
    assert abs(results[0][0] - results[1][0]) <= 1e-8 * abs(results[1][0])
    assert float(abs(results[0][1] - results[1][1]).max()) <= 1e-8


@pytest.mark.mpi
def test_time_limit_stops_every_process_together(data, tmp_path):
    out = tmp_path / "t"
    res = torchrun(2, ["train", "--data", str(data), "--out", str(out), "--epochs", "50", "--max-minutes", "1e-6"]
                   + FLAGS)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "stopped (max_minutes) after epoch 1" in res.stdout
    state = load_checkpoint(str(out / "best.pt"))
    assert state["epoch"] == 1 and float(state["optimizer_state"]["state"][0]["step"]) == 1.0  # one step
    assert len(read_rows(out / "metrics.csv")) == 1


@pytest.mark.mpi
def test_a_failure_on_rank_0_stops_every_process(data, tmp_path):
    # rank 0 cannot write last.pt (a directory sits where its temporary file goes); rank 1 writes
    # nothing and would wait for rank 0 in the next epoch: torchrun must stop it, with rank 0's message
    out = tmp_path / "r"
    (out / "last.pt.tmp").mkdir(parents=True)
    (out / "last.pt.tmp" / "keep").write_text("x")
    res = torchrun(2, ["train", "--data", str(data), "--out", str(out), "--epochs", "3"] + FLAGS, timeout=180)
    assert res.returncode != 0
    assert "equiforce: error: could not write checkpoint" in res.stderr
    assert "rank 0" in res.stderr or "rank      : 0" in res.stderr  # torchrun names the failed rank
    assert not os.path.exists(out / "last.pt")


@pytest.mark.mpi
def test_bad_device_fails_on_every_process_with_one_line(data, tmp_path):
    res = torchrun(2, ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--device", "cuda:1",
                       "--epochs", "1", "--no-progress"], timeout=120)
    assert res.returncode != 0
    assert "equiforce: error:" in res.stderr and "--device" in res.stderr
    assert not os.path.exists(tmp_path / "r" / "last.pt")
