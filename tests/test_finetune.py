"""Fine-tuning (--init-from) on real GFN2-xTB data: a model trained on ethanol learns methanol faster
than a model trained from scratch; shifts kept or refitted; clear refusals."""
import os

import ase
import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator

from equiforce.data.datagen import make_md_dataset
from equiforce.errors import DataError
from equiforce.training.config import ConfigError, build_config
from equiforce.training.loop import load_checkpoint, train

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow

MODEL = {"model.r_max": 4.0, "model.channels": 8, "model.lmax": 1, "model.num_layers": 2,
         "model.radial_hidden": 16, "model.num_bessel": 6}
SETTINGS = {"dtype": "float64", "batch_size": 4, "lr": 1e-2, "val_fraction": 0.25, "ema_decay": 0.9, "seed": 0,
            "num_threads": 1, "scheduler": "none"}
FINE_TUNE_EPOCHS = 4


def _train(data, out, epochs, **kw):
    settings = {**SETTINGS, **MODEL, "data": data, "out": str(out), "epochs": epochs, **kw}
    if kw.get("init_from"):  # fine-tuning takes the model settings from the checkpoint
        settings = {k: v for k, v in settings.items() if not k.startswith("model.")}
    train(build_config(None, settings), progress=False, log=lambda s: None)
    return load_checkpoint(os.path.join(str(out), "best.pt"))


@pytest.fixture(scope="module")
def pretrained(xtb_ethanol_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "ethanol"
    _train(xtb_ethanol_dataset, out, 20)
    return str(out)


@pytest.fixture(scope="module")
def methanol():
    return make_md_dataset("CH3OH", n_frames=32, temperature_K=800.0, seed=1, stride=20, equilibration_steps=200,
                           cache_dir=os.path.join(REPO_ROOT, "data_cache"))


def test_fine_tuning_learns_a_new_molecule_faster_than_scratch(pretrained, methanol, tmp_path):
    torch.set_num_threads(1)
    scratch = _train(methanol, tmp_path / "scratch", FINE_TUNE_EPOCHS)
    tuned = _train(methanol, tmp_path / "tuned", FINE_TUNE_EPOCHS, init_from=pretrained)
    s, t = scratch["metrics"]["val"], tuned["metrics"]["val"]
    print(f"methanol after {FINE_TUNE_EPOCHS} epochs (val, GFN2-xTB): from scratch F MAE "
          f"{s['force_mae_mev_per_a']:.0f} meV/A, E MAE {s['energy_mae_mev_per_atom']:.1f} meV/atom; fine-tuned "
          f"from ethanol F MAE {t['force_mae_mev_per_a']:.0f} meV/A, E MAE {t['energy_mae_mev_per_atom']:.1f} meV/atom")
    assert t["force_mae_mev_per_a"] < 0.7 * s["force_mae_mev_per_a"]
    # the model settings and species come from the pretrained run
    base = load_checkpoint(os.path.join(pretrained, "best.pt"))
    assert tuned["species"] == base["species"] == ["H", "C", "O"]
    assert tuned["config"]["model"] == base["config"]["model"]
    assert tuned["config"]["init_from"] == os.path.join(pretrained, "best.pt")


def test_shifts_kept_or_refitted(pretrained, methanol, tmp_path):
    base = load_checkpoint(os.path.join(pretrained, "best.pt"))
    kept = _train(methanol, tmp_path / "keep", 1, init_from=pretrained, init_shifts="keep", lr=1e-12)
    assert torch.equal(kept["model_state"]["shift"], base["model_state"]["shift"])
    # a constant offset per element in the new reference is absorbed by the refit
    shifted = tmp_path / "shifted.extxyz"
    frames = ase.io.read(methanol, ":")
    offset = {"H": 0.3, "C": -1.7, "O": 2.5}
    for a in frames:
        e = a.get_potential_energy() + sum(offset[s] for s in a.get_chemical_symbols())
        a.calc = SinglePointCalculator(a, energy=e, forces=a.get_forces())
    ase.io.write(str(shifted), frames, format="extxyz")
    plain = _train(methanol, tmp_path / "refit0", 1, init_from=pretrained, lr=1e-12)
    moved = _train(str(shifted), tmp_path / "refit1", 1, init_from=pretrained, lr=1e-12)
    delta = (moved["model_state"]["shift"] - plain["model_state"]["shift"]).numpy()
    # methanol's composition (C1 O1 H4) determines only C + O + 4 H; the minimum-norm fit spreads it
    assert np.isclose(delta[1] + delta[2] + 4 * delta[0], -1.7 + 2.5 + 4 * 0.3, atol=1e-8)
    assert abs(moved["metrics"]["val"]["energy_mae_mev_per_atom"]
               - plain["metrics"]["val"]["energy_mae_mev_per_atom"]) < 1e-3


def test_fine_tuning_refusals(pretrained, tmp_path, capsys):
    data = tmp_path / "nh3.extxyz"
    a = ase.Atoms("NH3", positions=[[0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    frames = []
    for k in range(4):
        b = a.copy()
        b.positions += 0.01 * k
        b.calc = SinglePointCalculator(b, energy=-1.0 * k, forces=np.zeros((4, 3)))
        frames.append(b)
    ase.io.write(str(data), frames, format="extxyz")
    with pytest.raises(DataError, match=r"element\(s\) \['N'\] that the model does not know.*can only fine-tune"):
        _train(str(data), tmp_path / "n", 1, init_from=pretrained)
    with pytest.raises(ConfigError, match="model.channels = 8.*fine-tuning keeps the model's settings"):
        train(build_config(None, {**SETTINGS, "data": str(data), "out": str(tmp_path / "c"), "init_from": pretrained,
                                  "model.channels": 16}), progress=False, log=lambda s: None)
    # a flag equal to the DEFAULT but not to the checkpoint (lmax 2 vs the model's 1) is refused too,
    # through the command line (flags are compared by value whatever the default) and the API
    from equiforce.cli import main

    assert main(["train", "--data", str(data), "--out", str(tmp_path / "l"), "--init-from", pretrained,
                 "--lmax", "2", "--epochs", "1", "--no-progress"]) == 2
    assert "model.lmax = 1" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "l" / "best.pt")
    with pytest.raises(ConfigError, match="model.lmax = 1.*fine-tuning keeps the model's settings"):
        train(build_config(None, {**SETTINGS, "data": str(data), "out": str(tmp_path / "m"), "init_from": pretrained,
                                  "model.lmax": 2}), progress=False, log=lambda s: None, explicit=["model.lmax"])
