"""Demo 1: the dipole of a polar molecule in random orientations -- invariant vs equivariant models.

    python examples/physics/dipole_rotations.py [--quick]

Data: GFN2-xTB Langevin MD of formaldehyde (H2CO, ~2.8 D in GFN2-xTB) with dipoles (e·Å); every
frame is turned by a random rotation (positions, forces and dipole together), so orientation
carries no information. Three models with the same data pipeline and trainer, trained on
energies, forces and dipoles:

* invariant (lmax = 0, distance-only messages; its "vector" head is nn.Linear on invariant scalars)
* equivariant, direct dipole head (lmax = 1, sum of per-atom l=1 vectors)
* equivariant, charge head (mu = sum q_i (r_i - centroid), total charge conserved)

Reported (JSON + PNG in examples/physics/results/): test dipole MAE of each exported model; the
invariant model's mean predicted vector and the spread of its predictions for one molecule under
20 rotations (0: it returns the same vector in every orientation, the best it can do is ~ the
average dipole over orientations, i.e. ~0); the MAE of the trivial predictor mu = 0 for scale.
"""
import argparse
import time

import numpy as np

import common


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer frames and epochs (a couple of minutes)")
    args = p.parse_args()
    t_start = time.perf_counter()
    n_frames, epochs = (120, 30) if args.quick else (240, 60)
    raw = common.make_data("H2CO", n_frames=n_frames, temperature_K=600.0, seed=1, stride=20, dipole=True)
    rng = np.random.default_rng(0)
    frames = [common.transform_frame(a, common.random_rotation(rng)) for a in common.read_frames(raw)]
    n_test = len(frames) // 4
    train_path = common.write_frames(f"{common.WORK}/dipole/train.extxyz", frames[n_test:])
    test = frames[:n_test]
    common.log(f"{len(frames) - n_test} training / {n_test} test frames of H2CO in random orientations")

    base = {"r_max": 4.0, "channels": 16, "num_layers": 2, "radial_hidden": 16, "num_bessel": 6}
    variants = {
        "invariant": {**base, "lmax": 0, "dipole": "direct"},
        "equivariant_direct": {**base, "lmax": 1, "dipole": "direct"},
        "equivariant_charges": {**base, "lmax": 1, "dipole": "charges"},
    }
    results = {}
    models = {}
    for name, model in variants.items():
        path = common.train_model(f"dipole_{name}", train_path, model, epochs, dipole_weight=100.0,
                                  forces_weight=1.0)
        models[name] = common.Exported(path)
        results[name] = common.errors(models[name], test, dipole=True)
        common.log(f"{name}: {results[name]}")
    ref = np.array([a.info["dipole"] for a in test])
    zero_mae = float(np.abs(ref).mean())

    # one molecule, 20 orientations: the invariant model returns the same vector every time
    probe = test[0]
    rots = [common.random_rotation(np.random.default_rng(100 + k)) for k in range(20)]
    spread = {}
    for name, m in models.items():
        preds = np.array([m.dipole(common.transform_frame(probe, R)) for R in rots])
        refs = np.array([np.asarray(probe.info["dipole"]) @ R.T for R in rots])
        spread[name] = {"std_of_prediction_over_rotations_e_a": float(preds.std(axis=0).max()),
                        "mae_e_a": float(np.abs(preds - refs).mean())}
    inv_preds = np.array([models["invariant"].dipole(a) for a in test])
    payload = {
        "molecule": "H2CO", "method": "GFN2-xTB", "n_train": len(frames) - n_test, "n_test": n_test,
        "epochs": epochs, "quick": args.quick,
        "mean_reference_dipole_norm_e_a": float(np.linalg.norm(ref, axis=1).mean()),
        "zero_predictor_dipole_mae_e_a": zero_mae,
        "test_errors": results,
        "invariant_mean_predicted_vector_e_a": inv_preds.mean(axis=0).tolist(),
        "invariant_mean_predicted_norm_e_a": float(np.linalg.norm(inv_preds, axis=1).mean()),
        "one_molecule_20_rotations": spread,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    common.save_json("dipole_rotations", payload)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for name, m in models.items():
        pred = np.array([m.dipole(a) for a in test])
        axes[0].scatter(ref.ravel(), pred.ravel(), s=8, label=name, alpha=0.7)
    lim = float(np.abs(ref).max()) * 1.1
    axes[0].plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
    axes[0].set(xlabel="GFN2-xTB dipole component (e·Å)", ylabel="predicted (e·Å)", title="test set, random orientations")
    axes[0].legend(fontsize=8)
    names = list(results)
    axes[1].bar(names + ["mu = 0"], [results[n]["dipole_mae_e_a"] for n in names] + [zero_mae],
                color=["C0", "C1", "C2", "grey"])
    axes[1].set(ylabel="dipole MAE (e·Å)", title="test dipole error")
    axes[1].tick_params(axis="x", labelrotation=20, labelsize=8)
    for name, m in models.items():
        preds = np.array([m.dipole(common.transform_frame(probe, R)) for R in rots])
        axes[2].plot(preds[:, 2], "o-", ms=3, label=f"{name} (z)")
    axes[2].plot([(np.asarray(probe.info["dipole"]) @ R.T)[2] for R in rots], "k*", label="GFN2-xTB (z)")
    axes[2].set(xlabel="rotation #", ylabel="mu_z (e·Å)", title="one molecule, 20 rotations")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(common.figure_path("dipole_rotations"), dpi=120)
    common.log(f"wrote {common.figure_path('dipole_rotations')} ({payload['seconds']} s)")


if __name__ == "__main__":
    main()
