"""Demo 5: the polarizability tensor of a molecule in random orientations -- invariant vs equivariant.

    python examples/physics/polarizability_rotations.py [--quick]

Data: GFN2-xTB Langevin MD of formaldehyde (H2CO) with static polarizabilities by finite fields
(``equiforce datagen --polarizability``: central differences of the dipole in +-0.02 V/Å fields,
e·Å²/V); every frame is turned by a random rotation (positions, forces, alpha -> R alpha R^T), so
orientation carries no information. Two models, same data pipeline and trainer, trained on
energies, forces and polarizabilities:

* invariant (lmax = 0): its five "l=2" numbers are nn.Linear of invariant scalars, so its tensor
  is the same in every orientation;
* equivariant (lmax = 2): the l=0 + l=2 head of equiforce.nn.heads.PolarizabilityHead.

Reported (JSON + PNG in examples/physics/results/): test MAE over the 9 components of each exported
model and of the best constant (the training mean, ~isotropic); the isotropic and anisotropic
parts separately; for one molecule under 20 rotations the largest |alpha(R x) - R alpha(x) R^T|
of the exported equivariant model (the rotation test, in float64).
"""
import argparse
import time

import numpy as np

import common

A3_PER_E_A2_PER_V = 14.399645  # polarizability volume (Å^3) per e·Å²/V


def parts(a: np.ndarray):
    """Isotropic part tr/3 and the traceless remainder of [..., 3, 3]."""
    iso = np.trace(a, axis1=-2, axis2=-1) / 3.0
    return iso, a - iso[..., None, None] * np.eye(3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer frames and epochs (a few minutes)")
    args = p.parse_args()
    t_start = time.perf_counter()
    n_frames, epochs = (120, 30) if args.quick else (240, 60)
    raw = common.make_data("H2CO", n_frames=n_frames, temperature_K=600.0, seed=1, stride=20, polarizability=True)
    rng = np.random.default_rng(0)
    frames = [common.transform_frame(a, common.random_rotation(rng)) for a in common.read_frames(raw)]
    n_test = len(frames) // 4
    train_path = common.write_frames(f"{common.WORK}/polarizability/train.extxyz", frames[n_test:])
    test = frames[:n_test]
    common.log(f"{len(frames) - n_test} training / {n_test} test frames of H2CO in random orientations")

    base = {"r_max": 4.0, "channels": 16, "num_layers": 2, "radial_hidden": 16, "num_bessel": 6,
            "polarizability": True}
    variants = {"invariant": {**base, "lmax": 0}, "equivariant": {**base, "lmax": 2}}
    ref = np.array([np.asarray(a.info["polarizability"]).reshape(3, 3) for a in test])
    train_ref = np.array([np.asarray(a.info["polarizability"]).reshape(3, 3) for a in frames[n_test:]])
    mean = train_ref.mean(axis=0)
    ref_iso, ref_aniso = parts(ref)
    results = {"predict_training_mean": {
        "mae_e_a2_per_v": float(np.abs(ref - mean).mean()),
        "isotropic_mae_e_a2_per_v": float(np.abs(ref_iso - parts(mean)[0]).mean()),
        "anisotropic_mae_e_a2_per_v": float(np.abs(ref_aniso - parts(mean)[1]).mean())}}
    models = {}
    for name, model in variants.items():
        path = common.train_model(f"polarizability_{name}", train_path, model, epochs,
                                  polarizability_weight=1000.0, forces_weight=1.0)
        models[name] = common.Exported(path)
        pred = np.array([models[name].polarizability(a) for a in test])
        iso, aniso = parts(pred)
        results[name] = {"mae_e_a2_per_v": float(np.abs(pred - ref).mean()),
                         "isotropic_mae_e_a2_per_v": float(np.abs(iso - ref_iso).mean()),
                         "anisotropic_mae_e_a2_per_v": float(np.abs(aniso - ref_aniso).mean())}
        common.log(f"{name}: {results[name]}")

    probe = test[0]
    rots = [common.random_rotation(np.random.default_rng(100 + k)) for k in range(20)]
    rotation = {}
    for name, m in models.items():
        a0 = m.polarizability(probe)
        preds = np.array([m.polarizability(common.transform_frame(probe, R)) for R in rots])
        turned = np.array([R @ a0 @ R.T for R in rots])
        rotation[name] = {"max_abs_alpha_Rx_minus_R_alpha_RT_e_a2_per_v": float(np.abs(preds - turned).max()),
                          "std_of_prediction_over_rotations_e_a2_per_v": float(preds.std(axis=0).max())}
    payload = {
        "molecule": "H2CO", "method": "GFN2-xTB finite field (+-0.02 V/Å)", "unit": "e·Å²/V",
        "n_train": len(frames) - n_test, "n_test": n_test, "epochs": epochs, "quick": args.quick,
        "mean_isotropic_polarizability_e_a2_per_v": float(ref_iso.mean()),
        "mean_isotropic_polarizability_volume_A3": float(ref_iso.mean() * A3_PER_E_A2_PER_V),
        "mean_anisotropy_norm_e_a2_per_v": float(np.linalg.norm(ref_aniso, axis=(1, 2)).mean()),
        "test_errors": results, "one_molecule_20_rotations": rotation,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    common.save_json("polarizability_rotations", payload)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for name, m in models.items():
        pred = np.array([m.polarizability(a) for a in test])
        axes[0].scatter(ref.ravel(), pred.ravel(), s=8, label=name, alpha=0.7)
    lo, hi = float(ref.min()), float(ref.max())
    axes[0].plot([lo, hi], [lo, hi], "k--", lw=0.8)
    axes[0].set(xlabel="GFN2-xTB alpha component (e·Å²/V)", ylabel="predicted (e·Å²/V)",
                title="test set, random orientations")
    axes[0].legend(fontsize=8)
    names = list(results)
    axes[1].bar(names, [results[n]["mae_e_a2_per_v"] for n in names], color=["grey", "C0", "C1"])
    axes[1].set(ylabel="MAE over 9 components (e·Å²/V)", title="test polarizability error")
    fig.tight_layout()
    fig.savefig(common.figure_path("polarizability_rotations"), dpi=120)
    common.log(f"wrote {common.figure_path('polarizability_rotations')} ({payload['seconds']} s)")


if __name__ == "__main__":
    main()
