"""Short-range-only vs long-range (learned charges + Coulomb) model on a reference with a known answer.

Reference potential (open boundaries, exact): ions Na (+1 e) and Cl (-1 e) with a Born-Mayer
repulsion ``A exp(-r / rho)`` between unlike ions (A = 1200 eV, rho = 0.32 Å, cut smoothly to zero
at 3 Å: purely short-range) plus the full Coulomb energy ``K_E q_i q_j / r`` of the fixed charges.

Training data: Na-Cl ion pairs (r = 2.0 .. 5.5 Å) and neutral Na2Cl2 clusters (random, 2.0 Å
minimum distance, within 6 Å), labelled with energies and forces. Both models share every setting
(r_max = 4 Å, 2 layers: receptive field 8 Å) except ``long_range``. Test: the ion pair at
separations 2 .. 24 Å and two NaCl dimers at centre distances 4 .. 24 Å. The short-range model
cannot see beyond 8 Å, so its ion-pair energy goes flat while the reference still changes by
``K_E / r`` (0.6 eV at 24 Å); the long-range model learns charges of about +-1 e and follows it.

Run: ``PYTHONPATH=python python examples/longrange/demo.py [--steps 600] [--out DIR]``
(about a minute per model on one CPU core). Writes ``results.json`` and ``energy_error.png``.
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch

from equiforce.model.forces import model_outputs
from equiforce.nn.electrostatics import K_E
from equiforce.model.network import EquiforceModel, ModelConfig
from equiforce.data.neighbors import neighbor_list

SPECIES = ["Na", "Cl"]
CHARGE = np.array([1.0, -1.0])
A, RHO, R_CUT = 1200.0, 0.32, 3.0


def reference(pos: np.ndarray, species: np.ndarray):
    """Exact energy (eV) and forces (eV/Å) of the reference potential."""
    p = torch.tensor(pos, requires_grad=True)
    q = torch.tensor(CHARGE[species])
    n = len(pos)
    e = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            r = torch.linalg.norm(p[j] - p[i])
            e = e + K_E * q[i] * q[j] / r
            if species[i] != species[j] and float(r) < R_CUT:
                x = r / R_CUT
                e = e + A * torch.exp(-r / RHO) * (1 - x * x) ** 2  # smooth to 0 at R_CUT
    (g,) = torch.autograd.grad(e, p)
    return float(e), (-g).numpy()


def random_cluster(rng, n_each=2, box=6.0, min_dist=2.0):
    species = np.array([0] * n_each + [1] * n_each)
    pos = []
    while len(pos) < len(species):
        c = rng.random(3) * box
        if all(np.linalg.norm(c - p) > min_dist for p in pos):
            pos.append(c)
    return np.array(pos), species


def ion_pair(r):
    return np.array([[0.0, 0.0, 0.0], [r, 0.0, 0.0]]), np.array([0, 1])


def dimer_pair(d, r0=2.4):
    """Two Na-Cl dimers (bond r0) side by side, antiparallel, centres ``d`` apart along y."""
    pos = np.array([[0, 0, 0], [r0, 0, 0], [r0, d, 0], [0, d, 0]], dtype=float)
    return pos, np.array([0, 1, 0, 1])


def make_data(rng, n_pairs=40, n_clusters=120):
    data = []
    for r in np.linspace(2.0, 5.5, n_pairs):
        data.append(ion_pair(r))
    for _ in range(n_clusters):
        data.append(random_cluster(rng))
    return [(p, s) + reference(p, s) for p, s in data]


def predict(model, pos, species, grad=True):
    pos_t = torch.tensor(pos)
    ei, es, _ = neighbor_list(pos_t, model.r_max, torch.zeros(3, 3), torch.tensor([False] * 3))
    n = len(pos)
    out = model_outputs(model, pos_t, torch.tensor(species), ei, es, torch.zeros(n, dtype=torch.long), 1,
                        create_graph=grad, total_charge=torch.zeros(1), cell=torch.zeros(1, 3, 3))
    return out


def train(long_range: str, data, steps: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(r_max=4.0, channels=16, lmax=1, num_layers=2, radial_hidden=32, avg_num_neighbors=2.0,
                      long_range=long_range)
    model = EquiforceModel(cfg, SPECIES).double()
    # isolated ions of the reference have zero energy (shift 0); energies are several eV (scale 3)
    with torch.no_grad():
        model.set_scale_shift(torch.full((2,), 3.0), torch.zeros(2))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-4)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    for step in range(steps):
        batch = rng.choice(len(data), 8, replace=False)
        loss = torch.zeros((), dtype=torch.float64)
        for k in batch:
            pos, species, e_ref, f_ref = data[k]
            out = predict(model, pos, species)
            loss = loss + (out["energy"][0] - e_ref) ** 2 / len(pos) ** 2 \
                + ((out["forces"] - torch.tensor(f_ref)) ** 2).mean()
        opt.zero_grad()
        (loss / len(batch)).backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  [{long_range}] step {step:4d} loss {float(loss) / len(batch):.4g}  {time.time() - t0:.0f} s",
                  flush=True)
    return model


def evaluate(model, data):
    e_err, f_err = [], []
    for pos, species, e_ref, f_ref in data:
        out = predict(model, pos, species, grad=False)
        e_err.append(abs(float(out["energy"][0]) - e_ref) / len(pos))
        f_err.append(np.abs(out["forces"].detach().numpy() - f_ref).mean())
    return float(np.mean(e_err)), float(np.mean(f_err))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    train_data = make_data(rng)
    test_data = make_data(np.random.default_rng(1), n_pairs=10, n_clusters=40)
    seps = [2.2, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 24.0]
    results = {"separations_A": seps, "models": {}}
    for mode in ("none", "ewald"):
        model = train(mode, train_data, args.steps)
        e_mae, f_mae = evaluate(model, test_data)
        pair_err, dimer_err = [], []
        for d in seps:
            for make, errs in ((ion_pair, pair_err), (dimer_pair, dimer_err)):
                pos, species = make(d)
                e_ref, _ = reference(pos, species)
                errs.append(float(predict(model, pos, species, grad=False)["energy"][0]) - e_ref)
        q = predict(model, *ion_pair(20.0), grad=False).get("charges")
        results["models"][mode] = {
            "test_energy_mae_eV_per_atom": e_mae, "test_force_mae_eV_A": f_mae,
            "ion_pair_energy_error_eV": pair_err, "dimer_pair_energy_error_eV": dimer_err,
            "ion_pair_charges_at_20A": None if q is None else q.detach().tolist(),
        }
        print(f"{mode:5s}: test E MAE {e_mae:.4f} eV/atom, F MAE {f_mae:.4f} eV/A")
        print("       ion pair error (eV) vs r: " + ", ".join(f"{d:g}:{e:+.3f}" for d, e in zip(seps, pair_err)))
        print("       dimer pair error (eV) vs d: " + ", ".join(f"{d:g}:{e:+.4f}" for d, e in zip(seps, dimer_err)))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        for mode, style in (("none", "o-"), ("ewald", "s-")):
            m = results["models"][mode]
            label = "short-range only" if mode == "none" else "long-range (learned charges)"
            ax[0].plot(seps, np.abs(m["ion_pair_energy_error_eV"]), style, label=label)
            ax[1].plot(seps, np.abs(m["dimer_pair_energy_error_eV"]), style, label=label)
        for a, title in zip(ax, ("Na+ ... Cl- ion pair", "two NaCl dimers")):
            a.axvline(8.0, color="gray", ls="--", lw=1)
            a.set_yscale("log")
            a.set_xlabel("separation (Å)")
            a.set_ylabel("|energy error| (eV)")
            a.set_title(title)
        ax[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "energy_error.png"), dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
