"""The ``equiforce`` command line.

    equiforce train --data train.extxyz --out run/ [--config c.yaml] [flags overriding the YAML]
    equiforce train ... [--dipole direct|charges|both] [--direct-forces] [--rotation-augmentation] [--lmax 0]
    equiforce train ... --polarizability [--polarizability-key KEY] [--polarizability-weight W]
    equiforce train --out run/ --resume [--epochs N] [--max-minutes M]
    torchrun --nproc_per_node N -m equiforce train ...   (data-parallel, equiforce.training.distributed)
    equiforce preprocess data.extxyz -o data.eqd --r-max 5   (graph store; train --data data.eqd)
    equiforce export run/ -o model.pt [--dtype float64] [--checkpoint best|last]
    equiforce info model.pt
    equiforce eval model.pt data.extxyz [--json]        (dipole / polarizability MAE too, for such models)
    equiforce plot run/ [-o curves.png]
    equiforce check model.pt
    equiforce lammps-plugin-dir

Every mistake in the user's input ends with one line ``equiforce: error: ...`` on stderr and exit
status 2, without a traceback. Subcommands are registered in :data:`COMMANDS`
(name -> (help, add_arguments, run)); a new one is one function pair and one entry there.
"""
import argparse
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

from . import __version__

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line with exit status 2 (argparse's own convention)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
def _bool(text: str) -> bool:
    """argparse type for true/false settings (true, false, yes, no, 1, 0)."""
    value = str(text).strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# flag -> (config key, type, help): every setting of TrainConfig / ModelConfig has a flag (or a
# switch below) except those in TRAIN_YAML_ONLY; tests/test_cli.py checks that none is missing
TRAIN_FLAGS: List[Tuple[str, str, type, str]] = [
    ("--data", "data", str, "extxyz file with energies and forces, or a graph store from `equiforce preprocess`"),
    ("--val-fraction", "val_fraction", float, "fraction of structures held out for validation (0.1)"),
    ("--test-fraction", "test_fraction", float, "fraction held out as a test set, never trained on (0)"),
    ("--epochs", "epochs", int, "number of epochs (100)"),
    ("--max-minutes", "max_minutes", float, "wall-clock limit; stops cleanly keeping the best checkpoint"),
    ("--batch-size", "batch_size", int, "structures per batch (4)"),
    ("--lr", "lr", float, "learning rate (5e-3)"),
    ("--r-max", "model.r_max", float, "cutoff radius in Å (5.0)"),
    ("--channels", "model.channels", int, "channels per irrep (32)"),
    ("--lmax", "model.lmax", int, "highest rotation order (2)"),
    ("--layers", "model.num_layers", int, "interaction layers (3)"),
    ("--symmetry", "model.symmetry", str, "O3 (mirror images equal) or SE3 (chiral)"),
    ("--dtype", "dtype", str, "float32 or float64 (float32)"),
    ("--device", "device", str, "cpu, cuda or cuda:N (cpu)"),
    ("--threads", "num_threads", int, "CPU threads (torch default); 1 is fastest for small models"),
    ("--max-data-mb", "max_data_mb", float,
     "graph stores (equiforce preprocess): resident memory of the mapped data, MiB (256)"),
    ("--init-from", "init_from", str,
     "fine-tune: start from the weights and model settings of this run directory (best.pt) or checkpoint"),
    ("--init-shifts", "init_shifts", str,
     "fine-tune: per-species energy shifts refit (least squares on the new data) or keep (refit)"),
    ("--fused-kernels", "fused_kernels", _bool,
     "CPU: message passing through the compiled op, also for the force loss: true or false (true)"),
    ("--seed", "seed", int, "random seed for the split and the initial weights (0)"),
    ("--energy-key", "energy_key", str, "name of the energy label (energy)"),
    ("--forces-key", "forces_key", str, "name of the forces label (forces)"),
    ("--stress-key", "stress_key", str, "name of the stress label (stress)"),
    ("--dipole", "model.dipole", str, "dipole head: none, direct, charges or both (none); label --dipole-key"),
    ("--dipole-key", "dipole_key", str, "name of the dipole label in e·Å (dipole)"),
    ("--polarizability-key", "polarizability_key", str,
     "name of the polarizability label in e·Å²/V, 3x3 / 9 / 6 Voigt numbers (polarizability)"),
    ("--polarizability-weight", "polarizability_weight", float,
     "loss weight of the polarizability per 3x3 component, (e·Å²/V)^2 (1)"),
    ("--charge-key", "charge_key", str, "name of a structure's total charge label in e (charge; 0 when absent)"),
    ("--optimizer", "optimizer", str, "adam or adamw (adam)"),
    ("--weight-decay", "weight_decay", float, "weight decay of the optimiser (0)"),
    ("--scheduler", "scheduler", str, "learning-rate schedule: plateau, cosine or none (plateau)"),
    ("--plateau-factor", "plateau_factor", float, "plateau: factor the lr is multiplied by (0.5)"),
    ("--plateau-patience", "plateau_patience", int, "plateau: epochs without improvement before lowering lr (10)"),
    ("--min-lr", "min_lr", float, "lowest learning rate of the schedules (1e-6)"),
    ("--ema-decay", "ema_decay", float, "exponential moving average of the weights; 0 disables (0.99)"),
    ("--early-stopping-patience", "early_stopping_patience", int,
     "epochs without validation improvement before stopping; 0 disables (50)"),
    ("--grad-clip", "grad_clip", float, "max gradient norm; 0 disables (10)"),
    ("--energy-weight", "energy_weight", float, "loss weight of the energy per atom, (eV/atom)^2 (1)"),
    ("--forces-weight", "forces_weight", float, "loss weight of the forces, (eV/Å)^2 (10)"),
    ("--stress-weight", "stress_weight", float, "loss weight of the stress, (eV/Å^3)^2 (1)"),
    ("--dipole-weight", "dipole_weight", float, "loss weight of the dipole per component, (e·Å)^2 (1)"),
    ("--num-bessel", "model.num_bessel", int, "radial Bessel basis functions (8)"),
    ("--cutoff-p", "model.cutoff_p", int, "polynomial cutoff envelope exponent (6)"),
    ("--radial-hidden", "model.radial_hidden", int, "width of the radial MLP (64)"),
    ("--radial-layers", "model.radial_layers", int, "hidden layers of the radial MLP (2)"),
    ("--feature-parity", "model.feature_parity", str,
     "O3: natural (l with parity (-1)^l) or both (even and odd copies of every l) (natural)"),
    ("--resnet", "model.resnet", _bool, "residual update when a layer's irreps in == out: true or false (true)"),
    ("--long-range", "model.long_range", str, "none, ewald or pme: electrostatics of learned charges (none)"),
    ("--long-range-accuracy", "model.long_range_accuracy", float, "relative accuracy (default: ewald 1e-6, pme 1e-4)"),
    ("--long-range-cutoff", "model.long_range_cutoff", float, "real-space cutoff of the electrostatics in Å (10)"),
    ("--long-range-damping", "model.long_range_damping", float,
     "Coulomb kernel erf(r/w)/r of width w in Å; 0: plain 1/r (0)"),
]
# flag -> (config key, help): switches that are true when given
TRAIN_SWITCHES: List[Tuple[str, str, str]] = [
    ("--direct-forces", "model.direct_forces", "forces from a per-atom l=1 head, not -dE/dr (non-conservative baseline)"),
    ("--rotation-augmentation", "rotation_augmentation", "rotate every training structure randomly"),
    ("--polarizability", "model.polarizability",
     "polarizability head: symmetric 3x3 (e·Å²/V) from l = 0 + 2 outputs; label --polarizability-key"),
]


# settings that only a YAML configuration can set, and why
TRAIN_YAML_ONLY: Dict[str, str] = {
    "atomic_energies": "a mapping of element to isolated-atom energy in eV, e.g. {H: -13.6, O: -2041.3}",
    "model.avg_num_neighbors": "set from the training data by the trainer",
}


def _add_train(p: argparse.ArgumentParser) -> None:
    p.epilog = ("YAML-only settings (--config FILE): "
                + "; ".join(f"{k}: {why}" for k, why in TRAIN_YAML_ONLY.items())
                + ". Flags override the YAML file; see equiforce.training.config for the layout.")
    p.add_argument("config_file", nargs="?", help="YAML configuration (same as --config)")
    p.add_argument("--config", help="YAML configuration; flags override its settings")
    p.add_argument("--out", help="run directory for checkpoints, metrics.csv and plots (run)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for flag, key, typ, help_ in TRAIN_FLAGS:
        p.add_argument(flag, dest=key.replace(".", "__"), type=typ, help=help_, metavar=key.split(".")[-1].upper())
    for flag, key, help_ in TRAIN_SWITCHES:
        p.add_argument(flag, dest=key.replace(".", "__"), action="store_const", const=True, default=None, help=help_)


def _run_train(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .training.config import build_config, read_yaml
    from .training.loop import check_run_directory, train

    if args.config and args.config_file and args.config != args.config_file:
        raise ConfigError("give the configuration once (either positional or --config)")
    yaml_path = args.config or args.config_file
    overrides = {key: getattr(args, key.replace(".", "__")) for _, key, _, _ in TRAIN_FLAGS}
    overrides.update({key: getattr(args, key.replace(".", "__")) for _, key, _ in TRAIN_SWITCHES})
    if args.out is not None:
        overrides["out"] = args.out
    if args.resume and getattr(args, "init_from", None):
        raise ConfigError("--init-from starts a new run and --resume continues one; give only one of them")
    if args.resume:
        out = args.out or (read_yaml(yaml_path).get("out") if yaml_path else None)
        if not out:
            raise ConfigError("--resume needs the run directory: pass --out RUN_DIR")
        # flags equal to the run's saved settings are fine; train() refuses changed ones (not RESUMABLE)
        given = {k: v for k, v in overrides.items() if v is not None and k != "out"}
        config = build_config(None, {"out": out})
        check_run_directory(config.out)
        train(config, resume=True, progress=not args.no_progress, resume_overrides=given)
        return 0
    config = build_config(yaml_path, overrides)
    # the settings the user named (flags and YAML keys): with --init-from each must match the checkpoint
    explicit = [k for k, v in overrides.items() if v is not None]
    if yaml_path:
        y = read_yaml(yaml_path)
        explicit += list(y) + [f"model.{k}" for k in (y.get("model") or {})]
    train(config, progress=not args.no_progress, explicit=explicit)
    return 0


# ---------------------------------------------------------------------------------------------
# preprocess
# ---------------------------------------------------------------------------------------------
def _add_preprocess(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="extxyz file with energies and forces (read one structure at a time)")
    p.add_argument("-o", "--output", required=True, help="graph store directory to write, e.g. data.eqd")
    p.add_argument("--r-max", type=float, required=True, help="cutoff radius in Å of the neighbour lists "
                   "(the model's --r-max)")
    for key in ("energy", "forces", "stress", "dipole", "charge", "polarizability"):
        p.add_argument(f"--{key}-key", default=key, help=f"name of the {key} label ({key})")


def _run_preprocess(args: argparse.Namespace) -> int:
    import time

    from .data.graphstore import preprocess

    t0 = time.monotonic()
    meta = preprocess(args.data, args.output, args.r_max, args.energy_key, args.forces_key, args.stress_key,
                      args.dipole_key, args.charge_key, args.polarizability_key)
    size = sum(os.path.getsize(os.path.join(args.output, f)) for f in os.listdir(args.output))
    print(f"wrote {args.output}: {meta['num_structures']} structures, {meta['num_atoms']} atoms, {meta['num_edges']} "
          f"edges (r_max {meta['r_max']:g} Å), elements {meta['elements']}, {size / 2**20:.1f} MiB in "
          f"{time.monotonic() - t0:.1f} s; train with --data {args.output} --r-max {meta['r_max']:g}")
    return 0


# ---------------------------------------------------------------------------------------------
# export / info / eval / plot / check / lammps-plugin-dir
# ---------------------------------------------------------------------------------------------
def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="+",
                   help="run directory written by `equiforce train` (or a checkpoint file); several give ONE "
                        "committee file (mean + uncertainty; same species and r_max)")
    p.add_argument("-o", "--output", required=True, help="exported TorchScript file to write, e.g. model.pt")
    p.add_argument("--dtype", choices=["float32", "float64"], help="dtype of the exported model (training dtype)")
    p.add_argument("--portable", action="store_true",
                   help="no compiled equiforce ops in the file (slower on the CPU): for programs that load it "
                        "with plain libtorch, without equiforce's LAMMPS plugin or Python package")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best",
                   help="which checkpoint of the run to export (best)")
    p.add_argument("--total-charge", type=float, default=0.0,
                   help="long-range models: total charge (e) the learned charges add up to in the exported "
                        "file (default 0, a neutral system)")


def _run_export(args: argparse.Namespace) -> int:
    if len(args.run_dir) > 1:
        return _run_export_committee(args)
    from .deploy.export import export_model
    from .training.checkpoints import load_checkpoint, model_from_checkpoint
    from .units import dtype_from_name

    path = args.run_dir[0]
    if os.path.isdir(path):
        path = os.path.join(path, f"{args.checkpoint}.pt")
    state = load_checkpoint(path)
    model, config = model_from_checkpoint(state, use_ema=True)
    dtype_name = args.dtype or config.dtype
    dtype = dtype_from_name(dtype_name)
    ex = state.get("example_structure")
    check = None
    if ex is not None:
        check = (ex["pos"], ex["species"], ex["edge_index"], ex["edge_shift"], ex["cell"])
    metrics = state.get("metrics", {})
    # strict JSON for the C++ readers: no NaN (a metric without data is null)
    val = {k: (None if v != v else float(v)) for k, v in metrics.get("val", {}).items()}
    extra = {"training": {"epoch": int(state["epoch"]), "best_epoch": int(state.get("best_epoch", state["epoch"])),
                          "val_metrics": val, "data": os.path.basename(config.data),
                          "trained_dtype": config.dtype},
             "model_config": config.model.to_dict()}
    from .errors import UserError

    if args.total_charge != 0.0 and config.model.long_range == "none":
        raise UserError(f"--total-charge {args.total_charge:g}: the model of '{path}' has no long-range "
                        "electrostatics (model.long_range = 'none'), so a total charge would not change it; "
                        "drop --total-charge")
    meta = export_model(model.for_export(fused=not args.portable), args.output, dtype, symmetry=config.model.symmetry,
                        model_type="equiforce", extra_metadata=extra, check_structure=check,
                        total_charge=args.total_charge)
    print(f"exported {path} (epoch {state['epoch']}, EMA weights) to {args.output}: species {meta['species']}, "
          f"r_max {meta['r_max']} Å, {meta['num_layers']} layers, {meta['dtype']}, symmetry {meta['symmetry']}"
          + ("" if meta["custom_ops"] else ", portable (no compiled ops)"))
    return 0


def _run_export_committee(args: argparse.Namespace) -> int:
    """`equiforce export RUN_A RUN_B ... -o committee.pt`: one committee file (deploy/committee.py)."""
    from .deploy.committee import export_committee
    from .errors import UserError
    from .training.checkpoints import load_checkpoint, model_from_checkpoint
    from .units import dtype_from_name

    if args.total_charge != 0.0:
        raise UserError("--total-charge applies to long-range models, which a committee cannot hold; drop it")
    models, symmetries, sources, infos, dtypes = [], [], [], [], []
    check = None
    for run in args.run_dir:
        path = os.path.join(run, f"{args.checkpoint}.pt") if os.path.isdir(run) else run
        state = load_checkpoint(path)
        model, config = model_from_checkpoint(state, use_ema=True)
        models.append(model.for_export(fused=not args.portable))
        symmetries.append(config.model.symmetry)
        sources.append(run)
        dtypes.append(config.dtype)
        infos.append({"epoch": int(state["epoch"]), "data": os.path.basename(config.data),
                      "model_config": config.model.to_dict()})
        ex = state.get("example_structure")
        if check is None and ex is not None:
            check = (ex["pos"], ex["species"], ex["edge_index"], ex["edge_shift"], ex["cell"])
    if args.dtype is None and len(set(dtypes)) > 1:
        raise UserError(f"the runs were trained in different dtypes ({', '.join(sorted(set(dtypes)))}); a committee "
                        "file has one: choose it with --dtype float32 or --dtype float64")
    dtype = dtype_from_name(args.dtype or dtypes[0])
    meta = export_committee(models, args.output, dtype, symmetries=symmetries, sources=sources,
                            member_metadata=infos, check_structure=check)
    print(f"exported a committee of {len(models)} models ({', '.join(sources)}) to {args.output}: species "
          f"{meta['species']}, r_max {meta['r_max']} Å, {meta['dtype']}; forward = members' mean, "
          "method committee() = each member (energy/force uncertainty in ASE, LAMMPS, OpenMM)")
    return 0


def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="exported model file")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")


def _run_info(args: argparse.Namespace) -> int:
    from .deploy.export import read_metadata

    meta = read_metadata(args.model)
    if args.json:
        print(json.dumps(meta, indent=1))
        return 0
    for key, value in meta.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        print(f"{key:<20}{value}")
    return 0


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="exported model file")
    p.add_argument("data", help="extxyz file with reference energies and forces")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--energy-key", default="energy")
    p.add_argument("--forces-key", default="forces")
    p.add_argument("--stress-key", default="stress")
    p.add_argument("--dipole-key", default="dipole", help="dipole label (e·Å); MAE reported for dipole models")
    p.add_argument("--charge-key", default="charge", help="total-charge label (e); 0 when absent")
    p.add_argument("--polarizability-key", default="polarizability",
                   help="polarizability label (e·Å²/V); MAE reported for polarizability models")


def _run_eval(args: argparse.Namespace) -> int:
    from .deploy.evaluate import evaluate_exported, format_metrics

    metrics = evaluate_exported(args.model, args.data, args.energy_key, args.forces_key, args.stress_key,
                                args.dipole_key, args.charge_key, args.polarizability_key)
    print(json.dumps(metrics, indent=1) if args.json else format_metrics(metrics))
    return 0


def _add_plot(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory holding metrics.csv")
    p.add_argument("-o", "--output", help="PNG to write (RUN_DIR/learning_curves.png)")


def _run_plot(args: argparse.Namespace) -> int:
    from .training.plot import plot_run

    _check_metrics_file(os.path.join(args.run_dir, "metrics.csv"))
    print(plot_run(args.run_dir, args.output))
    return 0


def _check_metrics_file(path: str) -> None:
    """UserError when ``path`` exists but is not a metrics.csv written by `equiforce train`
    (binary data, or a header without an 'epoch' column)."""
    import csv

    from .errors import UserError

    if not os.path.isfile(path):
        return  # plot_run names the missing run directory or file
    problem = None
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            text = fh.read()
    except UnicodeDecodeError:
        problem = "it is not UTF-8 text"
    else:
        header = next(csv.reader(text.splitlines()[:1]), [])
        if "\0" in text:
            problem = "it holds binary data"
        elif "epoch" not in [h.strip() for h in header]:
            problem = "its first line has no 'epoch' column"
    if problem:
        raise UserError(f"'{path}' is not a metrics file written by `equiforce train` ({problem}); give the "
                        "run directory of a training run, or remove the file and train again")


def _add_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="exported model file")
    p.add_argument("--seed", type=int, default=0)


def _run_check(args: argparse.Namespace) -> int:
    from .deploy.audit import format_table, run_checks

    meta, results = run_checks(args.model, seed=args.seed)
    print(format_table(meta, results))
    return 0 if all(r.passed for r in results) else 1


def _add_datagen(p: argparse.ArgumentParser) -> None:
    from .data.datagen import build_parser as datagen_parser

    datagen_parser(p)


def _run_datagen(args: argparse.Namespace) -> int:
    from .errors import UserError
    from .errors import DatagenError
    from .data.datagen import run_from_args

    try:
        run_from_args(args)
    except DatagenError as exc:
        raise UserError(str(exc)) from None
    return 0


def _add_nothing(p: argparse.ArgumentParser) -> None:
    pass


def _run_lammps_plugin_dir(args: argparse.Namespace) -> int:
    try:
        from .integrations.lammps import plugin_dir
    except ImportError:
        from .errors import UserError
        raise UserError("this equiforce installation has no LAMMPS plugin (equiforce.integrations.lammps is missing); "
                        "reinstall with the C++ parts built") from None
    print(plugin_dir())
    return 0


COMMANDS: Dict[str, Tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "datagen": ("make a GFN2-xTB reference data set by molecular dynamics (extxyz)", _add_datagen, _run_datagen),
    "train": ("train a model on an extxyz data set", _add_train, _run_train),
    "preprocess": ("write a data set's graphs to an on-disk store read lazily by train", _add_preprocess,
                   _run_preprocess),
    "export": ("export a trained run to one TorchScript file", _add_export, _run_export),
    "info": ("print the metadata of an exported model", _add_info, _run_info),
    "eval": ("errors of an exported model on an extxyz data set", _add_eval, _run_eval),
    "plot": ("draw learning curves of a run (PNG)", _add_plot, _run_plot),
    "check": ("symmetry audit of an exported model", _add_check, _run_check),
    "lammps-plugin-dir": ("print the directory holding the LAMMPS plugin", _add_nothing, _run_lammps_plugin_dir),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="equiforce", description="E(3)-equivariant interatomic potentials for LAMMPS and OpenMM")
    parser.add_argument("--version", action="version", version=f"equiforce {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_, add, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``equiforce`` script; returns the exit status."""
    from .errors import UserError
    from .errors import ModelFileError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    # under torchrun every process reports its own errors; ranks other than 0 say which they are
    rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else "0"
    who = "equiforce" if rank == "0" else f"equiforce (rank {rank})"
    try:
        return int(args._run(args) or 0)
    except (UserError, ModelFileError) as exc:
        print(f"{who}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # a path that cannot be used (a file where a directory is needed, no space, ...)
        where = f" '{exc.filename}'" if exc.filename else ""
        print(f"{who}: error: cannot use{where}: {exc.strerror or exc}; check the paths given "
              "(an existing file where a directory is needed, or the reverse; permissions; free space)",
              file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("equiforce: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
