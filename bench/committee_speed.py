"""Slowdown of a 3-member committee file over a single model in LAMMPS (target <= 2.5x).

Model and structures as bench/lammps_speed.py (fcc Cu-like crystals, EquiforceModel channels 32,
lmax 1, 3 layers, r_max 5 Å, random weights; members differ by their seed), float64, 1 MPI rank
(serial-images path), one torch thread. For each size, `lmp` NVE steps/s (LAMMPS' own loop time
of a timed run after a warm-up run) of

* the single model (member 1's own file),
* the committee file with `pair_style equiforce` (forward = mean of the members),
* the committee file with `uncertainty yes` (the file's committee method: per-atom spread every step),

and the slowdowns against the single model: wall time (LAMMPS' loop time; best of interleaved
rounds) and CPU time per step (difference of two run lengths; robust against other jobs on a shared
machine, which slow wall-time runs by up to 2x). Prints a table and writes bench/results/committee_speed.json.

    .venv/bin/python bench/committee_speed.py [--sizes 64 512] [--members 3]
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from lammps_speed import fcc, lmp_steps_per_s, write_data  # noqa: E402
from neighbors import cpu_info  # noqa: E402


def member_model(seed: int):
    from equiforce.model.network import EquiforceModel, ModelConfig

    torch.manual_seed(seed)
    cfg = ModelConfig(r_max=5.0, channels=32, lmax=1, num_layers=3, avg_num_neighbors=42.0)
    return EquiforceModel(cfg, ["Cu"]).double().for_export()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 512])
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the best of each is reported (3)")
    args = p.parse_args(argv)
    from equiforce.deploy.committee import export_committee
    from equiforce.deploy.export import export_model

    steps = {64: 40, 512: 6, 4096: 1}
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="eqf_committee_bench_") as tmp:
        models = [member_model(s) for s in range(args.members)]
        single = os.path.join(tmp, "single.pt")
        export_model(models[0], single, torch.float64, symmetry="O3")
        committee = os.path.join(tmp, "committee.pt")
        export_committee(models, committee, torch.float64, symmetries=["O3"] * args.members)
        for n in args.sizes:
            pos, cell = fcc(n)
            data = os.path.join(tmp, f"fcc{n}.data")
            write_data(data, pos, cell)
            k = steps.get(n, 1)
            runs = {"single": [], "committee": [], "uncertainty": []}
            cpu = {"single": [], "committee": [], "uncertainty": []}
            files = {"single": (single, "auto"), "committee": (committee, "auto"),
                     "uncertainty": (committee, "auto uncertainty yes")}
            # interleaved rounds, best of each: on a shared machine another job slows a run by up to 2x
            for _ in range(args.rounds):
                for name, (model, path) in files.items():
                    runs[name].append(lmp_steps_per_s(tmp, data, model, 1, k, path=path)["steps_per_s"])
                    cpu[name].append(cpu_seconds_per_step(tmp, data, model, path, k))
            row = {"atoms": n, "timed_steps": k, "rounds_steps_per_s": runs, "rounds_cpu_s_per_step": cpu}
            for name in files:
                row[f"{name}_steps_per_s"] = max(runs[name])
                row[f"{name}_cpu_s_per_step"] = min(cpu[name])
            row["slowdown_mean"] = row["single_steps_per_s"] / row["committee_steps_per_s"]
            row["slowdown_uncertainty"] = row["single_steps_per_s"] / row["uncertainty_steps_per_s"]
            row["cpu_slowdown_mean"] = row["committee_cpu_s_per_step"] / row["single_cpu_s_per_step"]
            row["cpu_slowdown_uncertainty"] = row["uncertainty_cpu_s_per_step"] / row["single_cpu_s_per_step"]
            rows.append(row)
            print(f"{n:6d} atoms: single {row['single_steps_per_s']:.2f} steps/s, committee {row['committee_steps_per_s']:.2f} "
                  f"({row['slowdown_mean']:.2f}x), with uncertainty {row['uncertainty_steps_per_s']:.2f} "
                  f"({row['slowdown_uncertainty']:.2f}x); CPU time per step: {row['cpu_slowdown_mean']:.2f}x / "
                  f"{row['cpu_slowdown_uncertainty']:.2f}x", flush=True)
    load_after = os.getloadavg()
    print(f"\n| atoms | single (steps/s) | {args.members}-member committee (steps/s) | slowdown | "
          "+ uncertainty yes (steps/s) | slowdown | CPU s/step single / committee / + uncertainty | CPU slowdown |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['atoms']} | {r['single_steps_per_s']:.2f} | {r['committee_steps_per_s']:.2f} | "
              f"{r['slowdown_mean']:.2f}x | {r['uncertainty_steps_per_s']:.2f} | {r['slowdown_uncertainty']:.2f}x | "
              f"{r['single_cpu_s_per_step']:.4f} / {r['committee_cpu_s_per_step']:.4f} / "
              f"{r['uncertainty_cpu_s_per_step']:.4f} | {r['cpu_slowdown_mean']:.2f}x / "
              f"{r['cpu_slowdown_uncertainty']:.2f}x |")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; ISA {cpu_info()['isa']}; 1 MPI rank, "
          "OMP_NUM_THREADS=1, float64")
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "committee_speed.json"), "w") as f:
        json.dump({"rows": rows, "members": args.members, "load_before": load_before, "load_after": load_after,
                   "isa": cpu_info()["isa"], "cpu": platform.processor(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
                  f, indent=1)
    return 0


def cpu_seconds_per_step(tmp, data, model, path, steps):
    """CPU time (user + system) of one MD step of `lmp`: the difference of two runs of `steps` and
    3 x `steps` timed steps over 2 x `steps` (start-up and warm-up cancel). Unlike wall time it is
    hardly changed by other jobs sharing the cores."""
    import resource

    def cpu(k):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        lmp_steps_per_s(tmp, data, model, 1, k, path=path)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    return (cpu(3 * steps) - cpu(steps)) / (2 * steps)


if __name__ == "__main__":
    sys.exit(main())
