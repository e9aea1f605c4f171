#!/usr/bin/env python3
"""How well a committee's uncertainty tells its true error, on held-out GFN2-xTB data.

    python examples/active_learning/measure.py COMMITTEE.pt [MORE.pt ...] [--test-frames 40] [--json out.json]

Test set: the fixed held-out set of run.py (ethanol, GFN2-xTB, 40 frames at 300 K + 40 at 1200 K;
made once and cached in data_cache/). For each committee file:

* Spearman rank correlation between the predicted force uncertainty and the true force error
  |F_mean - F_xTB|, per atom (all atoms of all frames) and per frame (max over the frame's atoms of each);
* for thresholds T (eV/Å): a frame is BAD when its largest per-atom true force error exceeds T and
  FLAGGED when its max force uncertainty exceeds T (the threshold of `pair_style equiforce ...
  threshold T`); recall = flagged bad frames / bad frames, false alarms = flagged good frames / good frames.
"""
import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
THRESHOLDS = [0.05, 0.1, 0.2, 0.3, 0.5, 1.0]


def test_set(n: int, hot_K: float = 1200.0, seed: int = 0):
    import ase.io

    from equiforce.data.datagen import make_md_dataset

    cache = os.path.join(REPO, "data_cache")
    cold = make_md_dataset("CH3CH2OH", n, 300.0, seed=seed + 2, cache_dir=cache)
    hot = make_md_dataset("CH3CH2OH", n, hot_K, seed=seed + 3, cache_dir=cache)
    frames = []
    for a in ase.io.read(cold, ":") + ase.io.read(hot, ":"):
        e, f = a.get_potential_energy(), a.get_forces()
        a = a.copy()
        a.info["ref_energy"], a.arrays["ref_forces"] = float(e), np.array(f)
        frames.append(a)
    return frames


def measure(committee: str, frames):
    from scipy.stats import spearmanr

    from equiforce.ase import EquiforceCalculator

    calc = EquiforceCalculator(committee)
    err_atom, unc_atom, err_frame, unc_frame = [], [], [], []
    for atoms in frames:
        a = atoms.copy()
        a.calc = calc
        err = np.linalg.norm(a.get_forces() - atoms.arrays["ref_forces"], axis=1)
        err_atom.append(err)
        unc_atom.append(calc.results["force_uncertainty"])
        err_frame.append(err.max())
        unc_frame.append(calc.results["max_force_uncertainty"])
    err_atom, unc_atom = np.concatenate(err_atom), np.concatenate(unc_atom)
    err_frame, unc_frame = np.array(err_frame), np.array(unc_frame)
    out = {"committee": committee, "frames": len(frames), "atoms": int(err_atom.size),
           "spearman_per_atom": float(spearmanr(unc_atom, err_atom).statistic),
           "spearman_per_frame": float(spearmanr(unc_frame, err_frame).statistic),
           "median_ratio_error_to_uncertainty": float(np.median(err_atom / np.maximum(unc_atom, 1e-12))),
           "thresholds": []}
    for t in THRESHOLDS:
        bad, flagged = err_frame > t, unc_frame > t
        out["thresholds"].append({
            "threshold": t, "bad": int(bad.sum()), "flagged": int(flagged.sum()),
            "recall": float((bad & flagged).sum() / bad.sum()) if bad.any() else None,
            "false_alarms": float((flagged & ~bad).sum() / (~bad).sum()) if (~bad).any() else None})
    return out


def fmt(x):
    return "-" if x is None else f"{x:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("committees", nargs="+")
    p.add_argument("--test-frames", type=int, default=40)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.join(REPO, "python"))
    frames = test_set(args.test_frames)
    results = [measure(c, frames) for c in args.committees]
    for r in results:
        print(f"\n{r['committee']}: {r['frames']} frames, {r['atoms']} atoms; Spearman per atom "
              f"{r['spearman_per_atom']:.3f}, per frame {r['spearman_per_frame']:.3f}; median error / uncertainty "
              f"{r['median_ratio_error_to_uncertainty']:.2f}")
        print("| threshold (eV/Å) | bad frames | flagged | recall | false alarms |\n|---|---|---|---|---|")
        for t in r["thresholds"]:
            print(f"| {t['threshold']} | {t['bad']} | {t['flagged']} | {fmt(t['recall'])} | {fmt(t['false_alarms'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
