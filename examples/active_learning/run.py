#!/usr/bin/env python3
"""Active learning with a committee, from one command: ``python examples/active_learning/run.py``.

Loop (ethanol, GFN2-xTB through tblite; everything small enough for a 2-core laptop):

0. data      a little GFN2-xTB data: ``--initial`` frames of Langevin MD at 300 K (the training pool)
             and a FIXED held-out test set: ``--test`` frames at 300 K and ``--test`` frames at
             ``--md-temperature`` (the region the loop should learn; never trained on);
1. train     ``--members`` models on the pool (`equiforce train`, different --seed: different
             initial weights and train/validation split), exported as ONE committee file
             (`equiforce export RUN_A RUN_B RUN_C -o committee.pt`);
2. explore   Langevin MD at ``--md-temperature`` driven by the committee mean (ASE
             EquiforceCalculator), one candidate frame every ``--stride`` steps with its
             ``max_force_uncertainty``;
3. select    the candidates whose max force uncertainty lies between ``--threshold`` and ``--upper``
             eV/Å (DP-GEN's trust window: above the upper level the trajectory has left physical
             structures and such frames teach the model nothing useful), at most ``--per-iteration``
             of them, spread evenly over the trajectory;
4. label     them with GFN2-xTB and add them to the pool; back to 1 (``--iterations`` times).

After every training the committee is evaluated on the fixed test set: force MAE / RMSE of the
mean against xTB, and the uncertainty measurements of README "Committee models" -- Spearman rank
correlation of predicted force uncertainty with the true force error per atom and per frame, and
the recall / false-alarm rates of the threshold (a frame is "bad" when its largest per-atom force
error exceeds ``--bad-error``, "flagged" when its max force uncertainty exceeds ``--threshold``).

Writes ``<out>/results.json`` and ``<out>/active_learning.png`` (test error and pool size per
iteration); data, runs and committee files go under ``<out>/work`` (default out:
examples/active_learning/results, work files git-ignored by *.pt / not committed).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "examples", "active_learning", "results"))
    p.add_argument("--iterations", type=int, default=3, help="train/explore/select/label rounds after the first training (3)")
    p.add_argument("--members", type=int, default=3, help="committee size (3)")
    p.add_argument("--initial", type=int, default=30, help="initial 300 K training frames (30)")
    p.add_argument("--test", type=int, default=40, help="test frames per temperature (40 at 300 K + 40 hot)")
    p.add_argument("--md-temperature", type=float, default=1200.0, help="exploration / hot test temperature, K (1200)")
    p.add_argument("--md-steps", type=int, default=600, help="exploration MD steps of 0.5 fs per iteration (600)")
    p.add_argument("--stride", type=int, default=10, help="MD steps between candidate frames (10)")
    p.add_argument("--threshold", type=float, default=0.3,
                   help="lower trust level: max force uncertainty (eV/Å) above which a frame is labelled (0.3)")
    p.add_argument("--upper", type=float, default=1.0,
                   help="upper trust level (eV/Å): frames more uncertain than this are left out, as DP-GEN does "
                        "(the model has already broken down there: bonds torn, atoms overlapping) (1.0)")
    p.add_argument("--bad-error", type=float, default=0.5,
                   help="true max per-atom force error (eV/Å) that makes a test frame 'bad' for recall (0.5)")
    p.add_argument("--per-iteration", type=int, default=20, help="most frames labelled per iteration (20)")
    p.add_argument("--epochs", type=int, default=60, help="training epochs per member (60)")
    p.add_argument("--max-minutes", type=float, default=1.5, help="wall-clock cap per member training (1.5)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def env() -> Dict[str, str]:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONPATH"] = os.path.join(REPO, "python") + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def equiforce(*argv) -> None:
    cmd = [sys.executable, "-m", "equiforce.cli", *map(str, argv)]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"active learning: `equiforce {' '.join(map(str, argv[:2]))} ...` failed:\n{r.stderr[-2000:]}")


def train_committee(pool: str, work: str, it: int, args) -> str:
    runs = []
    for m in range(args.members):
        run = os.path.join(work, f"iter{it}", f"member{m}")
        shutil.rmtree(run, ignore_errors=True)
        equiforce("train", "--data", pool, "--out", run, "--seed", args.seed + 101 * m + 1, "--epochs", args.epochs,
                  "--max-minutes", args.max_minutes, "--r-max", 4.0, "--channels", 8, "--lmax", 1, "--layers", 2,
                  "--dtype", "float64", "--val-fraction", 0.15, "--threads", 1, "--no-progress")
        runs.append(run)
    committee = os.path.join(work, f"iter{it}", "committee.pt")
    equiforce("export", *runs, "-o", committee)
    return committee


def evaluate(committee: str, test_frames, args) -> Dict[str, float]:
    """Errors of the committee mean and the quality of its uncertainty on the fixed test set."""
    from scipy.stats import spearmanr

    from equiforce.ase import EquiforceCalculator

    calc = EquiforceCalculator(committee)
    err_atom, unc_atom, err_frame, unc_frame, e_err, comp = [], [], [], [], [], []
    for atoms in test_frames:
        a = atoms.copy()
        a.calc = calc
        f = a.get_forces()
        r = calc.results
        ref_f = atoms.arrays["ref_forces"]
        err = np.linalg.norm(f - ref_f, axis=1)  # per-atom force error, eV/Å
        comp.append(np.abs(f - ref_f).ravel())
        err_atom.append(err)
        unc_atom.append(r["force_uncertainty"])
        err_frame.append(err.max())
        unc_frame.append(r["max_force_uncertainty"])
        e_err.append(abs(r["energy"] - atoms.info["ref_energy"]) / len(atoms))
    err_atom, unc_atom = np.concatenate(err_atom), np.concatenate(unc_atom)
    err_frame, unc_frame = np.array(err_frame), np.array(unc_frame)
    bad = err_frame > args.bad_error
    flagged = unc_frame > args.threshold
    return {
        "force_mae_eV_per_A": float(np.mean(np.concatenate(comp))),
        "force_rmse_eV_per_A": float(np.sqrt(np.mean(err_atom ** 2) / 3.0)),
        "energy_mae_meV_per_atom": float(1000 * np.mean(e_err)),
        "spearman_per_atom": float(spearmanr(unc_atom, err_atom).statistic),
        "spearman_per_frame": float(spearmanr(unc_frame, err_frame).statistic),
        "bad_frames": int(bad.sum()),
        "flagged_frames": int(flagged.sum()),
        "recall": float((bad & flagged).sum() / bad.sum()) if bad.any() else float("nan"),
        "false_alarm_rate": float((flagged & ~bad).sum() / (~bad).sum()) if (~bad).any() else float("nan"),
        "mean_max_force_uncertainty_eV_per_A": float(unc_frame.mean()),
    }


def with_reference(atoms):
    """The frame without its calculator, its xTB labels in info["ref_energy"] / arrays["ref_forces"]
    (ASE's extxyz reader turns the labels into a SinglePointCalculator)."""
    e, f = atoms.get_potential_energy(), atoms.get_forces()
    a = atoms.copy()
    a.calc = None
    a.info["ref_energy"] = float(e)
    a.arrays["ref_forces"] = np.array(f)
    return a


def explore(committee: str, start, args, seed: int):
    """Langevin MD at --md-temperature on the committee mean: candidate frames and their max uncertainty."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    from equiforce.ase import EquiforceCalculator

    atoms = start.copy()
    atoms.calc = EquiforceCalculator(committee)
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=args.md_temperature, rng=rng)
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=args.md_temperature, friction=0.01 / units.fs, rng=rng,
                   fixcm=False)
    candidates = []
    for _ in range(args.md_steps // args.stride):
        try:
            dyn.run(args.stride)
        except ValueError as exc:  # atoms closer than the model's minimum distance: the model broke down
            print(f"    MD stopped: {exc}")
            break
        atoms.get_potential_energy()
        frame = atoms.copy()
        frame.calc = None
        candidates.append((float(atoms.calc.results["max_force_uncertainty"]), frame))
    return candidates


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, os.path.join(REPO, "python"))
    import ase.io

    from equiforce.data.datagen import label_structure, make_md_dataset

    out = os.path.abspath(args.out)
    work = os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[0] GFN2-xTB data: {args.initial} training frames at 300 K, test set {args.test} at 300 K + "
          f"{args.test} at {args.md_temperature:g} K")
    cache = os.path.join(REPO, "data_cache")
    init = make_md_dataset("CH3CH2OH", args.initial, 300.0, seed=args.seed + 1, isolated_atoms=True, cache_dir=cache)
    test_cold = make_md_dataset("CH3CH2OH", args.test, 300.0, seed=args.seed + 2, cache_dir=cache)
    test_hot = make_md_dataset("CH3CH2OH", args.test, args.md_temperature, seed=args.seed + 3, cache_dir=cache)
    test_frames = [with_reference(a) for a in ase.io.read(test_cold, ":") + ase.io.read(test_hot, ":")]
    pool_frames = ase.io.read(init, ":")
    pool = os.path.join(work, "pool.extxyz")
    history: List[Dict] = []
    start = next(a for a in pool_frames if len(a) > 1)
    for it in range(args.iterations + 1):
        ase.io.write(pool, pool_frames, format="extxyz")
        n_pool = sum(len(a) > 1 for a in pool_frames)
        print(f"[{it}] train {args.members} members on {n_pool} frames ({time.perf_counter() - t0:.0f} s)")
        committee = train_committee(pool, work, it, args)
        metrics = evaluate(committee, test_frames, args)
        metrics.update({"iteration": it, "training_frames": n_pool})
        history.append(metrics)
        print(f"    test: force MAE {1000 * metrics['force_mae_eV_per_A']:.1f} meV/Å, RMSE "
              f"{1000 * metrics['force_rmse_eV_per_A']:.1f} meV/Å, energy MAE {metrics['energy_mae_meV_per_atom']:.2f} "
              f"meV/atom; Spearman atom {metrics['spearman_per_atom']:.2f} frame {metrics['spearman_per_frame']:.2f}; "
              f"recall {metrics['recall']:.2f} false alarms {metrics['false_alarm_rate']:.2f}")
        if it == args.iterations:
            break
        candidates = explore(committee, start, args, seed=args.seed + 1000 + it)
        over = [c for c in candidates if args.threshold < c[0] <= args.upper]
        picks = np.unique(np.linspace(0, len(over) - 1, min(len(over), args.per_iteration)).round().astype(int))
        chosen = [over[k] for k in picks] if over else []
        print(f"    explore {args.md_temperature:g} K: {len(candidates)} candidates, {len(over)} in the trust window "
              f"({args.threshold}, {args.upper}] eV/Å, {sum(c[0] > args.upper for c in candidates)} above it; "
              f"labelling {len(chosen)} with GFN2-xTB")
        metrics["selected"] = len(chosen)
        metrics["candidates_over_threshold"] = len(over)
        pool_frames += [label_structure(frame, periodic=False) for _, frame in chosen]
    result = {"settings": vars(args), "history": history, "wall_s": time.perf_counter() - t0}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(history, os.path.join(out, "active_learning.png"), args)
    print(f"done in {time.perf_counter() - t0:.0f} s: {out}/results.json, {out}/active_learning.png")
    return 0


def plot(history, path, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [h["iteration"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(it, [1000 * h["force_mae_eV_per_A"] for h in history], "o-", label="force MAE")
    ax[0].plot(it, [1000 * h["force_rmse_eV_per_A"] for h in history], "s-", label="force RMSE")
    ax[0].set_xlabel("active-learning iteration")
    ax[0].set_ylabel("test error (meV/Å)")
    ax[0].set_title(f"fixed test set: 300 K + {args.md_temperature:g} K ethanol (GFN2-xTB)", fontsize=9)
    ax[0].legend()
    ax[1].plot(it, [h["training_frames"] for h in history], "o-", color="C2", label="training frames")
    ax[1].plot(it, [h["spearman_per_frame"] * 100 for h in history], "^-", color="C3",
               label="Spearman per frame x100")
    ax[1].set_xlabel("active-learning iteration")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
