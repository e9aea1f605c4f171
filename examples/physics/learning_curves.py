"""Demo 2: data efficiency -- force MAE vs training-set size for invariant and equivariant models.

    python examples/physics/learning_curves.py [--quick]

Data: GFN2-xTB Langevin MD of ethanol (800 K). A fixed test set; training sets of growing size
drawn from the rest. Three models, same trainer, the same number of optimiser steps per run
(batches of min(size, 16) structures, cosine learning-rate decay):

* invariant: lmax = 0 (distance-only, SchNet-like messages), conservative forces -dE/dr;
* invariant + rotation augmentation: the same, every training structure randomly rotated each time
  it is used (``rotation_augmentation: true``);
* equivariant: lmax = 1, the same channels and layers.

Expected physics: the invariant model's energy is exactly rotation-invariant and its forces exactly
equivariant, so augmentation changes nothing but round-off (the two curves coincide) -- augmentation
only helps models that do not have the symmetry built in. What separates the curves is the
expressiveness of the messages: equivariant (directional) messages learn the same data better.
"""
import argparse
import time

import numpy as np

import common


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer steps")
    args = p.parse_args()
    t_start = time.perf_counter()
    sizes = [8, 16, 32, 64] if args.quick else [10, 20, 40, 80, 160]
    steps = 300 if args.quick else 800
    n_test = 60
    raw = common.make_data("CH3CH2OH", n_frames=max(sizes) + n_test, temperature_K=800.0, seed=2, stride=20)
    frames = common.read_frames(raw)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(frames))
    test = [frames[k] for k in order[:n_test]]
    pool = [frames[k] for k in order[n_test:]]
    base = {"r_max": 4.0, "channels": 16, "num_layers": 2, "radial_hidden": 16, "num_bessel": 6}
    variants = {
        "invariant": ({**base, "lmax": 0}, False),
        "invariant+augmentation": ({**base, "lmax": 0}, True),
        "equivariant": ({**base, "lmax": 1}, False),
    }
    curves = {name: [] for name in variants}
    for size in sizes:
        data = common.write_frames(f"{common.WORK}/curves/train_{size}.extxyz", pool[:size])
        batch = min(size, 16)  # per-step cost is overhead-bound on CPU: larger batches are ~free
        epochs = max(1, int(round(steps / -(-size // batch))))
        for name, (model, augment) in variants.items():
            path = common.train_model(f"curve_{name.replace('+', '_')}_{size}", data, model, epochs,
                                      rotation_augmentation=augment, val_fraction=0.0, batch_size=batch,
                                      early_stopping_patience=0, scheduler="cosine", lr=0.01)
            err = common.errors(common.Exported(path), test)
            curves[name].append(err)
            common.log(f"size {size:4d} {name:24s} force MAE {err['force_mae_mev_per_a']:.1f} meV/Å")
    payload = {"molecule": "CH3CH2OH", "method": "GFN2-xTB", "sizes": sizes, "n_test": n_test,
               "optimizer_steps_per_run": steps, "quick": args.quick, "model": base,
               "force_mae_mev_per_a": {n: [e["force_mae_mev_per_a"] for e in c] for n, c in curves.items()},
               "energy_mae_mev_per_atom": {n: [e["energy_mae_mev_per_atom"] for e in c] for n, c in curves.items()},
               "seconds": round(time.perf_counter() - t_start, 1)}
    common.save_json("learning_curves", payload)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    styles = {"invariant": "o-", "invariant+augmentation": "x--", "equivariant": "s-"}
    for name, vals in payload["force_mae_mev_per_a"].items():
        ax.loglog(sizes, vals, styles[name], label=name)
    ax.set(xlabel="training structures", ylabel="test force MAE (meV/Å)", title="ethanol, GFN2-xTB")
    ax.legend()
    fig.tight_layout()
    fig.savefig(common.figure_path("learning_curves"), dpi=120)
    common.log(f"wrote {common.figure_path('learning_curves')} ({payload['seconds']} s)")


if __name__ == "__main__":
    main()
