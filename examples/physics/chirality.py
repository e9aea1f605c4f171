"""Demo 4: a chiral molecule and its mirror image -- O(3), SE(3) and invariant models.

    python examples/physics/chirality.py [--quick]

Data: GFN2-xTB Langevin MD (500 K) of one enantiomer of bromochlorofluoromethane, CHFClBr, with
energies, forces and dipoles. The physics (like GFN2-xTB) is mirror-symmetric: the mirror image
of every frame has the same energy, mirrored forces and a mirrored (polar) dipole. Three models
(same data, trainer, size, all with a direct dipole head) are trained on the ONE enantiomer only,
then tested on held-out frames and on their mirror images (never seen):

* O(3): parity tracked -- mirror images get identical energies, dipoles mirror exactly;
* SE(3): parity ignored -- its "scalars" include pseudoscalars (triple products such as
  chi = r_CF . (r_CCl x r_CBr), which flip sign in the mirror), so E(R) != E(S) and its errors on
  the unseen enantiomer grow. A triple product needs three layers (lmax = 1): layer 2 forms
  cross products (pseudovectors, already in the l=1 outputs such as the dipole), layer 3 dots them
  with a third vector; ``--layers 2`` shows SE(3) energies still mirror-symmetric but its dipole not;
* invariant (lmax = 0): distances only -- identical energies for both, no usable dipole.

The pseudoscalar is made visible: the odd part (h(R) - h(S)) / 2 of the last-layer scalar features
of the carbon atom (exactly 0 for O(3) and the invariant model), plotted against chi for the SE(3)
model, together with E(R) - E(S).
"""
import argparse
import os
import time

import numpy as np
import torch

import common

MIRROR = np.diag([-1.0, 1.0, 1.0])


def chfclbr(path: str) -> str:
    """One enantiomer of CHFClBr (tetrahedral, typical bond lengths in Å), written as xyz."""
    from ase import Atoms
    import ase.io

    dirs = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=float) / np.sqrt(3.0)
    lengths = [1.09, 1.36, 1.78, 1.94]
    atoms = Atoms("CHFClBr", positions=np.vstack([np.zeros(3)] + [d * r for d, r in zip(dirs, lengths)]))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ase.io.write(path, atoms, format="xyz")
    return path


def chi(atoms) -> float:
    """Triple product r_CF . (r_CCl x r_CBr) (Å^3): a pseudoscalar, the sign tells the enantiomer."""
    p = atoms.positions
    return float(np.dot(p[2] - p[0], np.cross(p[3] - p[0], p[4] - p[0])))


def load_eager(run_dir: str):
    from equiforce.training.loop import load_checkpoint, model_from_checkpoint

    model, _ = model_from_checkpoint(load_checkpoint(os.path.join(run_dir, "best.pt")))
    return model.double().eval()


def carbon_scalars(model, atoms) -> np.ndarray:
    """Last-layer scalar features of atom 0 (carbon) of the trained eager model [C]."""
    from equiforce.data.dataset import atoms_to_graph
    from equiforce.model.forces import edge_vectors

    g = atoms_to_graph(atoms, model.species_names, model.r_max)
    with torch.no_grad():
        x = model.features(g["species"], g["edge_index"], edge_vectors(g["pos"], g["edge_index"], g["edge_shift"]))
    return x[0, :model.channels].numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer frames and epochs")
    p.add_argument("--layers", type=int, default=3, help="interaction layers (3; with 2 no pseudoscalar can form)")
    args = p.parse_args()
    t_start = time.perf_counter()
    n_frames, epochs = (160, 30) if args.quick else (320, 60)
    xyz = chfclbr(os.path.join(common.WORK, "chiral", "CHFClBr_R.xyz"))
    raw = common.make_data(xyz, n_frames=n_frames, temperature_K=500.0, seed=4, stride=20, dipole=True)
    frames = common.read_frames(raw)
    signs = np.sign([chi(a) for a in frames])
    n_test = n_frames // 4
    test, train = frames[:n_test], frames[n_test:]
    mirror = [common.transform_frame(a, MIRROR) for a in test]
    train_path = common.write_frames(f"{common.WORK}/chiral/train.extxyz", train)
    # three layers: a pseudoscalar needs three vectors (layer 2 forms a cross product a x b, layer 3
    # dots it with a third vector); with two layers SE(3) scalars are still mirror-even
    base = {"r_max": 4.0, "channels": 16, "num_layers": args.layers, "radial_hidden": 16, "num_bessel": 6,
            "dipole": "direct"}
    variants = {"O3": {**base, "lmax": 1, "symmetry": "O3"}, "SE3": {**base, "lmax": 1, "symmetry": "SE3"},
                "invariant": {**base, "lmax": 0, "symmetry": "O3"}}
    results = {}
    odd = {}
    for name, model in variants.items():
        path = common.train_model(f"chiral_{name}", train_path, model, epochs, dipole_weight=100.0, forces_weight=1.0)
        m = common.Exported(path)
        e_r = np.array([m.energy_forces(a)[0] for a in test])
        e_s = np.array([m.energy_forces(a)[0] for a in mirror])
        mu_r = np.array([m.dipole(a) for a in test])
        mu_s = np.array([m.dipole(a) for a in mirror])
        eager = load_eager(os.path.join(common.WORK, f"chiral_{name}"))
        h_r = np.array([carbon_scalars(eager, a) for a in test])
        h_s = np.array([carbon_scalars(eager, a) for a in mirror])
        odd[name] = (h_r - h_s) / 2.0
        results[name] = {
            "seen_enantiomer": common.errors(m, test, dipole=True),
            "mirror_enantiomer": common.errors(m, mirror, dipole=True),
            "mean_abs_E_R_minus_E_S_mev": 1000 * float(np.abs(e_r - e_s).mean()),
            "mean_E_R_minus_E_S_mev": 1000 * float((e_r - e_s).mean()),
            "max_abs_mirror_dipole_violation_e_a": float(np.abs(mu_s - mu_r @ MIRROR.T).max()),
            "max_abs_odd_part_of_carbon_scalars": float(np.abs(odd[name]).max()),
            "max_abs_carbon_scalars": float(np.abs(h_r).max()),
        }
        common.log(f"{name}: {results[name]}")
    # the SE(3) channel that is most odd (by construction its value flips sign in the mirror image)
    k = int(np.abs(odd["SE3"]).mean(axis=0).argmax())
    chis = np.array([chi(a) for a in test])
    payload = {"molecule": "CHFClBr (one enantiomer)", "method": "GFN2-xTB", "n_train": len(train), "n_test": n_test,
               "quick": args.quick, "epochs": epochs, "num_layers": args.layers,
               "chirality_sign_of_all_md_frames": sorted(set(int(s) for s in signs)),
               "chi_triple_product_A3": {"seen_mean": float(chis.mean()),
                                          "mirror_mean": float(np.mean([chi(a) for a in mirror]))},
               "results": results,
               "se3_most_odd_channel": {"index": k, "mean_odd_part_seen_enantiomer": float(odd["SE3"][:, k].mean()),
                                        "o3_same_channel_max_abs_odd_part": float(np.abs(odd["O3"][:, k]).max())},
               "seconds": round(time.perf_counter() - t_start, 1)}
    suffix = "" if args.layers == 3 else f"_{args.layers}layers"
    common.save_json("chirality" + suffix, payload)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    names = list(results)
    x = np.arange(len(names))
    axes[0].bar(x - 0.2, [results[n]["seen_enantiomer"]["energy_mae_mev_per_atom"] for n in names], 0.4, label="seen enantiomer")
    axes[0].bar(x + 0.2, [results[n]["mirror_enantiomer"]["energy_mae_mev_per_atom"] for n in names], 0.4, label="mirror image")
    axes[0].set_xticks(x, names)
    axes[0].set(ylabel="energy MAE (meV/atom)", title="trained on one enantiomer")
    axes[0].legend(fontsize=8)
    axes[1].bar(x - 0.2, [results[n]["seen_enantiomer"]["dipole_mae_e_a"] for n in names], 0.4, label="seen enantiomer")
    axes[1].bar(x + 0.2, [results[n]["mirror_enantiomer"]["dipole_mae_e_a"] for n in names], 0.4, label="mirror image")
    axes[1].set_xticks(x, names)
    axes[1].set(ylabel="dipole MAE (e·Å)", title="dipole (polar vector)")
    axes[1].legend(fontsize=8)
    axes[2].scatter(chis, odd["SE3"][:, k], s=10, label=f"SE(3), channel {k} (seen)")
    axes[2].scatter(-chis, -odd["SE3"][:, k], s=10, label="SE(3), mirror image")
    axes[2].scatter(np.concatenate([chis, -chis]), np.zeros(2 * len(chis)) + odd["O3"][:, k].tolist() * 2,
                    s=10, marker="x", label="O(3) (odd part = 0)")
    axes[2].set(xlabel="chi = r_CF . (r_CCl x r_CBr) (Å^3)", ylabel="odd part of carbon scalar feature",
                title="the pseudoscalar SE(3) can form")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(common.figure_path("chirality" + suffix), dpi=120)
    common.log(f"wrote {common.figure_path('chirality' + suffix)} ({payload['seconds']} s)")


if __name__ == "__main__":
    main()
