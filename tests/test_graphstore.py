"""The on-disk graph store (equiforce preprocess): identical graphs and batches to the in-memory data
set, clear refusals, training from it, and resident memory bounded by the configured cap."""
import json
import os

import ase.io
import numpy as np
import pytest
import torch

from equiforce.cli import main
from equiforce.data.dataset import collate, load_dataset
from equiforce.data.graphstore import GraphStore, GraphStoreWriter, GraphSubset, preprocess
from equiforce.errors import DataError
from equiforce.training.config import ConfigError, build_config
from equiforce.training.loop import load_checkpoint, train

from helpers import R_MAX, make_frames

MIB = 2 ** 20


@pytest.fixture(scope="module")
def extxyz(tmp_path_factory):
    frames = make_frames(n=14, seed=3, periodic=4)  # molecules and periodic cells with stress
    rng = np.random.default_rng(0)
    for k, atoms in enumerate(frames):
        if k % 3 == 0:  # some dipole labels and charges
            atoms.info["dipole"] = rng.normal(size=3)
            atoms.info["charge"] = float(k % 2)
        if k % 4 == 1:  # some polarizability labels (symmetric 3x3, e·Å²/V)
            a = rng.normal(size=(3, 3))
            atoms.info["polarizability"] = (a + a.T).reshape(-1)
    path = tmp_path_factory.mktemp("store") / "data.extxyz"
    ase.io.write(str(path), frames, format="extxyz")
    return str(path)


def test_lazy_graphs_and_batches_equal_the_in_memory_ones(extxyz, tmp_path):
    out = str(tmp_path / "data.eqd")
    assert main(["preprocess", extxyz, "-o", out, "--r-max", str(R_MAX)]) == 0
    graphs, species = load_dataset(extxyz, R_MAX)
    store = GraphStore(out)
    assert store.species == species and len(store) == len(graphs) == 18
    assert sum(bool(g["has_polarizability"]) for g in graphs) > 0
    for k, g in enumerate(graphs):
        lazy = store[k]
        assert sorted(lazy) == sorted(g), k
        for key, v in g.items():
            assert lazy[key].dtype == v.dtype and torch.equal(lazy[key], v), (k, key)
    order = np.random.default_rng(1).permutation(len(graphs))
    subset = GraphSubset(store, order)
    for start in range(0, len(order), 4):
        a = collate([graphs[k] for k in order[start:start + 4]])
        b = collate([subset[i] for i in range(start, min(start + 4, len(order)))])
        for key, v in a.items():
            assert (v == b[key]) if key == "num_graphs" else torch.equal(v, b[key]), key
    # species of another model (a superset, other order) are honoured; unknown elements are refused
    other = GraphStore(out, species_names=["O", "C", "H"])
    assert torch.equal(other[0]["species"], torch.tensor([["O", "C", "H"].index(species[int(s)])
                                                          for s in graphs[0]["species"]]))
    with pytest.raises(DataError, match=r"element\(s\) \['O'\] that the model does not know"):
        GraphStore(out, species_names=["H"])


def test_store_refusals(extxyz, tmp_path):
    out = str(tmp_path / "s.eqd")
    preprocess(extxyz, out, R_MAX)
    with pytest.raises(DataError, match="already exists"):
        preprocess(extxyz, out, R_MAX)
    bad = tmp_path / "bad.extxyz"
    frames = make_frames(n=3, seed=0)
    frames[2].positions[1] = frames[2].positions[0] + [0.2, 0, 0]
    ase.io.write(str(bad), frames, format="extxyz")
    with pytest.raises(DataError, match="structure 2: atoms 0 and 1 are 0.2 Å apart"):
        preprocess(str(bad), str(tmp_path / "bad.eqd"), R_MAX)
    assert not os.path.exists(tmp_path / "bad.eqd") and not os.path.exists(tmp_path / "bad.eqd.tmp")
    assert not any(f.startswith(".equiforce") for f in os.listdir(out))  # no partial marker in a finished store
    # OUT.tmp that this package did not write (even one holding only .json files) is never removed
    foreign = tmp_path / "f.eqd.tmp"
    foreign.mkdir()
    (foreign / "notes.json").write_text("{}")
    with pytest.raises(DataError, match="is not a partial graph store written by equiforce preprocess"):
        preprocess(extxyz, str(tmp_path / "f.eqd"), R_MAX)
    assert (foreign / "notes.json").read_text() == "{}"
    # an interrupted preprocessing (its marker present) is cleaned up and redone
    interrupted = tmp_path / "i.eqd.tmp"
    interrupted.mkdir()
    (interrupted / ".equiforce-graphstore-partial").write_text("partial\n")
    (interrupted / "pos.bin").write_bytes(b"\0" * 24)
    preprocess(extxyz, str(tmp_path / "i.eqd"), R_MAX)
    assert not interrupted.exists() and len(GraphStore(str(tmp_path / "i.eqd"))) == 18
    index = os.path.join(out, "index.json")
    meta = json.load(open(index))
    json.dump({**meta, "version": 99}, open(index, "w"))
    with pytest.raises(DataError, match="version 99; this equiforce reads version 1"):
        GraphStore(out)
    json.dump(meta, open(index, "w"))
    with open(os.path.join(out, "pos.bin"), "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(DataError, match="pos.bin missing or of the wrong size"):
        GraphStore(out)


def test_training_from_the_store_equals_training_in_memory(extxyz, tmp_path):
    store = str(tmp_path / "t.eqd")
    preprocess(extxyz, store, R_MAX)
    settings = {"dtype": "float64", "batch_size": 4, "lr": 1e-2, "val_fraction": 0.2, "ema_decay": 0.9, "seed": 0,
                "num_threads": 1, "epochs": 2, "model.r_max": R_MAX, "model.channels": 4, "model.lmax": 1,
                "model.num_layers": 1, "model.radial_hidden": 8, "model.num_bessel": 4, "max_data_mb": 0.01}
    train(build_config(None, {**settings, "data": extxyz, "out": str(tmp_path / "mem")}), progress=False,
          log=lambda s: None)
    train(build_config(None, {**settings, "data": store, "out": str(tmp_path / "lazy")}), progress=False,
          log=lambda s: None)
    a, b = load_checkpoint(str(tmp_path / "lazy" / "last.pt")), load_checkpoint(str(tmp_path / "mem" / "last.pt"))
    assert a["split"] == b["split"]
    for k, v in b["model_state"].items():
        assert torch.allclose(a["model_state"][k], v, rtol=1e-10, atol=1e-12), k
    with pytest.raises(ConfigError, match="r_max = 4 Å but the model's cutoff is 5 Å"):
        train(build_config(None, {**settings, "model.r_max": 5.0, "data": store, "out": str(tmp_path / "x")}),
              progress=False, log=lambda s: None)


def _synthetic_store(path, n_structures, n_atoms=21, seed=0):
    """A store of ``n_structures`` random 21-atom molecules with all pairs as edges (~15 KB each)."""
    rng = np.random.default_rng(seed)
    i, j = np.nonzero(~np.eye(n_atoms, dtype=bool))
    edges = np.stack([i, j])
    numbers = np.array(([6] * 9 + [1] * 8 + [8] * 4)[:n_atoms])
    w = GraphStoreWriter(str(path), 5.0, {"energy": "energy", "forces": "forces", "stress": "stress",
                                          "dipole": "dipole", "charge": "charge"})
    for _ in range(n_structures):
        w.add({"pos": rng.normal(size=(n_atoms, 3)) * 3, "forces": rng.normal(size=(n_atoms, 3)),
               "edge_index": edges, "edge_shift": np.zeros((edges.shape[1], 3)), "cell": np.zeros((3, 3)),
               "pbc": np.zeros(3, bool), "energy": rng.normal(), "stress": np.zeros((3, 3)), "has_stress": False,
               "dipole": np.zeros(3), "has_dipole": False, "total_charge": 0.0}, numbers)
    w.close()
    return str(path)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_growth(store: GraphStore, batch_size: int = 8) -> int:
    """Largest resident-memory growth (bytes) over one shuffled epoch of batches read from ``store``."""
    subset = GraphSubset(store, np.random.default_rng(0).permutation(len(store)))
    collate([subset[i] for i in range(batch_size)])  # warm-up: library code pages, allocator pools
    store.release()
    base = peak = _rss_bytes()
    for start in range(0, len(subset), batch_size):
        batch = collate([subset[i] for i in range(start, min(start + batch_size, len(subset)))])
        peak = max(peak, _rss_bytes())
        del batch
    store.release()
    return peak - base


def test_resident_memory_stays_under_the_cap_for_a_store_ten_times_larger(tmp_path):
    cap_mb = 4.0
    path = _synthetic_store(tmp_path / "big.eqd", 3000)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    assert size > 10 * cap_mb * MIB
    capped = _peak_rss_growth(GraphStore(path, max_resident_mb=cap_mb))
    uncapped = _peak_rss_growth(GraphStore(path, max_resident_mb=1e9))  # control: the test can fail
    print(f"store {size / MIB:.1f} MiB; peak RSS growth over an epoch: {capped / MIB:.1f} MiB with a "
          f"{cap_mb:g} MiB cap, {uncapped / MIB:.1f} MiB without")
    assert capped < cap_mb * MIB + 3 * MIB
    assert uncapped > 0.7 * size
