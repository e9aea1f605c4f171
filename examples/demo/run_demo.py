#!/usr/bin/env python3
"""The end-to-end demo behind `make demo`: reference data -> train -> export -> evaluate.

Steps (each timed; later issues append LAMMPS and OpenMM steps to STEPS):

1. data     GFN2-xTB Langevin MD of ethanol (equiforce.data.datagen; cached in data_cache/)
2. split    seeded split into train and held-out test frames (the test frames are never trained on)
3. train    `equiforce train` of a small model with a wall-clock limit
4. plot     `equiforce plot` learning curves (PNG)
5. export   `equiforce export` to one TorchScript file with metadata
6. eval     `equiforce eval --json` of the exported file on the held-out test frames

Every step calls the package through ``sys.executable -m ...`` so the demo runs the same before and
after `pip install -e .` (before, ``<repo>/python`` is put on PYTHONPATH for the child processes).
Outputs go to demo_out/ (git-ignored). Options: ``python examples/demo/run_demo.py --help``.
"""
import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Context:
    """What the steps share: options, output paths and results of earlier steps."""
    args: argparse.Namespace
    out: str
    env: Dict[str, str]
    results: Dict[str, object] = field(default_factory=dict)

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)


@dataclass
class Step:
    name: str
    description: str
    run: Callable[[Context], str]  # returns a one-line summary


def child_env() -> Dict[str, str]:
    """Environment for the child processes: the package importable, the venv's libraries found."""
    env = dict(os.environ)
    if importlib.util.find_spec("equiforce") is None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(REPO, "python"), env.get("PYTHONPATH")) if p)
    venv_lib = os.path.join(sys.prefix, "lib")
    if os.path.isfile(os.path.join(venv_lib, "libmpi.so.12")) and venv_lib not in env.get("LD_LIBRARY_PATH", ""):
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (venv_lib, env.get("LD_LIBRARY_PATH")) if p)
    return env


def run(cmd: Sequence[str], ctx: Context, capture: bool = False, env: Optional[Dict[str, str]] = None) -> str:
    """Run a command, echo it, stream or capture its output; raise on a non-zero exit status."""
    print("  $ " + " ".join(os.path.relpath(c, REPO) if os.path.isabs(c) and c.startswith(REPO) else c
                            for c in cmd), flush=True)
    proc = subprocess.run(list(cmd), cwd=REPO, env=env or ctx.env, text=True,
                          stdout=subprocess.PIPE if capture else None)
    if proc.returncode != 0:
        raise StepFailed(f"command failed with exit status {proc.returncode}: {' '.join(cmd)}")
    return proc.stdout if capture else ""


def equiforce(ctx: Context, *args: str, capture: bool = False) -> str:
    return run([sys.executable, "-m", "equiforce", *args], ctx, capture=capture)


class StepFailed(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------
# the steps
# ------------------------------------------------------------------------------------------------
def step_data(ctx: Context) -> str:
    a = ctx.args
    data = os.path.join(REPO, "data_cache", f"demo_{a.molecule}_{a.frames}f_{a.temperature:g}K_s{a.seed}_iso.extxyz")
    env = dict(ctx.env, OMP_NUM_THREADS="1")  # xTB of a 9-atom molecule gains nothing from threads
    run([sys.executable, "-m", "equiforce.data.datagen", "--molecule", a.molecule, "--frames", str(a.frames),
         "--temperature", str(a.temperature), "--seed", str(a.seed), "--isolated-atoms", "-o", data, "--quiet"],
        ctx, capture=True, env=env)
    ctx.results["data"] = data
    with open(data + ".json") as fh:
        info = json.load(fh)
    return (f"{a.frames} frames of {a.molecule} ({info['n_atoms']} atoms) at {a.temperature:g} K + isolated-atom "
            f"references, GFN2-xTB; generated in {info['seconds']} s (cached: {os.path.relpath(data, REPO)})")


def step_split(ctx: Context) -> str:
    import numpy as np
    from ase.io import read
    sys.path.insert(0, os.path.join(REPO, "python"))  # only for the split helper (no torch import)
    from equiforce.data.datagen import split_dataset

    train, test = split_dataset(ctx.results["data"], ctx.args.test_fraction, seed=ctx.args.seed,
                                out_dir=ctx.path("data"))
    ctx.results.update(train=train, test=test)
    test_frames = read(test, index=":")
    forces = np.concatenate([f.get_forces() for f in test_frames])
    ctx.results["test_force_mean_abs_mev"] = 1000 * float(np.abs(forces).mean())
    n_train = len(read(train, index=":"))
    return (f"{n_train} train(+val) / {len(test_frames)} test frames; test set mean |F component| = "
            f"{ctx.results['test_force_mean_abs_mev']:.0f} meV/Å (the error of predicting zero forces)")


def step_train(ctx: Context) -> str:
    a = ctx.args
    run_dir = ctx.path("run")
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # a fresh run every time: the demo shows training from scratch
    equiforce(ctx, "train", "--data", ctx.results["train"], "--out", run_dir, "--val-fraction", str(a.val_fraction),
              "--epochs", str(a.epochs), "--max-minutes", str(a.max_minutes), "--r-max", str(a.r_max),
              "--channels", str(a.channels), "--lmax", str(a.lmax), "--layers", str(a.layers),
              "--symmetry", a.symmetry, "--dtype", a.dtype, "--seed", str(a.seed), "--no-progress")
    ctx.results["run_dir"] = run_dir
    return f"run directory {os.path.relpath(run_dir, REPO)}"


def step_plot(ctx: Context) -> str:
    png = equiforce(ctx, "plot", ctx.results["run_dir"], capture=True).strip().splitlines()[-1]
    ctx.results["plot"] = png
    return f"learning curves: {os.path.relpath(os.path.abspath(png), REPO)}"


def step_export(ctx: Context) -> str:
    model = ctx.path("model.pt")
    equiforce(ctx, "export", ctx.results["run_dir"], "-o", model)
    ctx.results["model"] = model
    return f"exported {os.path.relpath(model, REPO)} ({os.path.getsize(model) / 1e6:.2f} MB)"


def step_eval(ctx: Context) -> str:
    out = equiforce(ctx, "eval", ctx.results["model"], ctx.results["test"], "--json", capture=True)
    metrics = json.loads(out)
    ctx.results["metrics"] = metrics
    with open(ctx.path("test_metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=1)
    return (f"held-out test set ({metrics['n_structures']} structures, exported model): "
            f"energy MAE {metrics['energy_mae_mev_per_atom']:.2f} meV/atom, "
            f"force MAE {metrics['force_mae_mev_per_a']:.1f} meV/Å, "
            f"force RMSE {metrics['force_rmse_mev_per_a']:.1f} meV/Å")


def step_openmm(ctx: Context) -> str:
    # start from a held-out reference geometry (inside the training distribution), 300 K Langevin
    out = run([sys.executable, os.path.join(REPO, "examples", "openmm", "run_md.py"), "--model", ctx.results["model"],
               "--structure", ctx.results["test"], "--steps", str(ctx.args.openmm_steps),
               "--report-every", str(max(1, ctx.args.openmm_steps // 4))], ctx, capture=True)
    print(out.rstrip())
    speed = [line for line in out.splitlines() if "steps/s" in line]
    return speed[-1].strip() if speed else "OpenMM run finished"


def step_lammps(ctx: Context) -> str:
    # float64 copy of the trained model for energy conservation; the deck's default structure is ethanol
    model64 = ctx.path("model_float64.pt")
    equiforce(ctx, "export", ctx.results["run_dir"], "-o", model64, "--dtype", "float64")
    env = dict(ctx.env, OMP_NUM_THREADS="1")
    out = run(["lmp", "-in", os.path.join("examples", "lammps", "in.nve"), "-var", "model", model64,
               "-var", "steps", str(ctx.args.lammps_steps), "-log", ctx.path("log.lammps")],
              ctx, capture=True, env=env)
    drift = [line for line in out.splitlines() if line.startswith("equiforce NVE:")]
    speed = [line for line in out.splitlines() if "timesteps/s" in line]
    if speed:
        print("  " + speed[-1].strip())
    return (drift[-1] if drift else "LAMMPS NVE finished") + (f" | {speed[-1].strip()}" if speed else "")


STEPS: List[Step] = [
    Step("data", "GFN2-xTB reference data (Langevin MD, cached)", step_data),
    Step("split", "train / held-out test split", step_split),
    Step("train", "train a small equivariant model", step_train),
    Step("plot", "learning curves", step_plot),
    Step("export", "export to TorchScript with metadata", step_export),
    Step("eval", "evaluate the exported model on the test frames", step_eval),
    Step("lammps", "NVE of the molecule in LAMMPS (pair_style equiforce plugin), energy drift", step_lammps),
    Step("openmm", "Langevin MD of the molecule in OpenMM with the exported model", step_openmm),
]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "demo_out"), help="output folder")
    p.add_argument("--molecule", default="CH3CH2OH", help="ase.build.molecule name")
    p.add_argument("--frames", type=int, default=300, help="xTB frames (train + val + test)")
    p.add_argument("--temperature", type=float, default=800.0, help="MD temperature (K)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="held-out test frames")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share of the training frames")
    p.add_argument("--epochs", type=int, default=1000, help="epoch limit (the time limit usually ends training)")
    p.add_argument("--max-minutes", type=float, default=8.0, help="training wall-clock limit (min)")
    p.add_argument("--r-max", type=float, default=4.0, help="cutoff (Å)")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--lmax", type=int, default=1)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--symmetry", default="O3", choices=["O3", "SE3"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lammps-steps", type=int, default=2000, help="LAMMPS NVE steps (0.5 fs)")
    p.add_argument("--openmm-steps", type=int, default=2000, help="OpenMM MD steps (0.5 fs)")
    p.add_argument("--only", nargs="+", metavar="STEP", choices=[s.name for s in STEPS],
                   help="run only these steps (earlier outputs must exist in --out)")
    return p.parse_args(argv)


def _restore_results(ctx: Context) -> None:
    """Paths of a previous demo run, so `--only eval` etc. can reuse them."""
    saved = ctx.path("results.json")
    if os.path.isfile(saved):
        with open(saved) as fh:
            ctx.results.update(json.load(fh))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    ctx = Context(args=args, out=os.path.abspath(args.out), env=child_env())
    os.makedirs(ctx.out, exist_ok=True)
    if args.only:
        _restore_results(ctx)
    steps = [s for s in STEPS if not args.only or s.name in args.only]
    timings = []
    t_all = time.perf_counter()
    for i, step in enumerate(steps, 1):
        print(f"\n[{i}/{len(steps)}] {step.name}: {step.description}", flush=True)
        t0 = time.perf_counter()
        try:
            summary = step.run(ctx)
        except (StepFailed, KeyError, OSError) as exc:
            what = f"missing result {exc} (run the earlier steps first)" if isinstance(exc, KeyError) else str(exc)
            print(f"\ndemo: step '{step.name}' failed after {time.perf_counter() - t0:.1f} s: {what}",
                  file=sys.stderr)
            return 1
        seconds = time.perf_counter() - t0
        timings.append((step.name, seconds))
        with open(ctx.path("results.json"), "w") as fh:
            json.dump(ctx.results, fh, indent=1)
        print(f"  -> {summary}\n  ({step.name}: {seconds:.1f} s)", flush=True)

    print("\n=== equiforce demo summary ===")
    for name, seconds in timings:
        print(f"  {name:<10}{seconds:8.1f} s")
    print(f"  {'total':<10}{time.perf_counter() - t_all:8.1f} s")
    m = ctx.results.get("metrics")
    if m:
        print(f"  test set ({m['n_structures']} held-out structures, exported model): "
              f"E MAE {m['energy_mae_mev_per_atom']:.2f} meV/atom | F MAE {m['force_mae_mev_per_a']:.1f} meV/Å | "
              f"F RMSE {m['force_rmse_mev_per_a']:.1f} meV/Å "
              f"(zero-force baseline {ctx.results.get('test_force_mean_abs_mev', float('nan')):.0f} meV/Å)")
    if ctx.results.get("plot"):
        print(f"  learning curves: {ctx.results['plot']}")
    if ctx.results.get("model"):
        print(f"  model: {ctx.results['model']}")
    print(f"  outputs: {ctx.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
