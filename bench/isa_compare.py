"""The fused CPU ops and the whole model call per instruction set: AVX-512 vs AVX2 on one machine.

On an AVX-512 CPU the AVX2 path can be measured by naming it: ``EQUIFORCE_CPU_ISA=avx2`` picks the
AVX2 + FMA bodies of ``equiforce::tp_scatter`` (``cpp/equiforce_ops.cpp``), ``ATEN_CPU_CAPABILITY=avx2``
PyTorch's own AVX2 kernels and ``MKL_ENABLE_INSTRUCTIONS=AVX2`` MKL's (the radial-MLP and per-atom
matrix products). Each variant runs in its own process:

* ``avx512``   the AVX-512 bodies (the default on an Intel AVX-512 CPU; AMD ones default to AVX2);
* ``avx2``     everything restricted to AVX2 (+ FMA): what an AVX2-only CPU (AMD Zen 1-3, Intel
  Haswell to Comet Lake) runs;
* ``label=path`` (``--library``, repeatable) the ``avx2`` variant with another build of
  ``libequiforce_ops.so`` preloaded (``LD_PRELOAD``; its soname is the same), e.g. a build of an
  earlier commit.

Per variant: the bare exported call (energy, forces, virial; neighbour list given; graph optimiser
off), fcc Cu (``bench/lammps_speed.py``'s bench model: 32 channels, lmax 1, 3 layers, r_max 5 Å),
one torch thread, minimum CPU time (``time.process_time``) over ``--repeat`` calls; and the fused op
alone (its recorded inputs of every layer, forward and backward timed separately, minimum CPU time). Prints a
Markdown table, writes JSON (load average, CPU model, flags) to ``bench/results/isa_compare_<time>.json``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/isa_compare.py [--sizes 512] [--dtypes float32 float64]
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

AVX2_ENV = {"EQUIFORCE_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def fused_op_seconds(dtype_name: str, pos, cell, repeat: int) -> dict:
    """CPU seconds of the fused op alone, summed over the model's layers: the inputs of every
    ``equiforce::tp_scatter`` call of one eager call of the bench model (fused kernels on) are
    recorded, then each call is timed forward, and backward (gradients of x, sh and w for a fixed
    random output gradient); minimum over ``repeat`` rounds."""
    import torch

    from equiforce.data.neighbors import neighbor_list
    from equiforce.model.forces import energy_forces_virial
    from equiforce.model.network import EquiforceModel, ModelConfig

    dt = getattr(torch, dtype_name)
    torch.manual_seed(0)
    cfg = ModelConfig(r_max=5.0, channels=32, lmax=1, num_layers=3, avg_num_neighbors=42.0)
    model = EquiforceModel(cfg, ["Cu"]).to(dt).for_export()
    namespace = torch.ops.equiforce
    op = namespace.tp_scatter
    calls = []

    def record(*args):
        calls.append(tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args))
        return op(*args)

    p = torch.tensor(pos, dtype=dt)
    c = torch.tensor(cell, dtype=dt)
    edge_index, shift, _ = neighbor_list(p, 5.0, c, torch.tensor([True, True, True]))
    n = p.shape[0]
    setattr(namespace, "tp_scatter", record)
    try:
        energy_forces_virial(model, p, torch.zeros(n, dtype=torch.long), edge_index, shift,
                             torch.zeros(n, dtype=torch.long), 1)
    finally:
        setattr(namespace, "tp_scatter", op)
    g = torch.Generator().manual_seed(0)
    fwd, bwd = [], []
    for _ in range(repeat):
        t_f = t_b = 0.0
        for args in calls:
            x, sh, w = (a.clone().requires_grad_(True) for a in args[:3])
            t0 = time.process_time()
            out = op(x, sh, w, *args[3:])
            t1 = time.process_time()
            gout = torch.randn(out.shape, dtype=out.dtype, generator=g)
            t2 = time.process_time()
            torch.autograd.grad(out, (x, sh, w), gout)
            t3 = time.process_time()
            t_f += t1 - t0
            t_b += t3 - t2
        fwd.append(t_f)
        bwd.append(t_b)
    return {"fused_forward_s": min(fwd), "fused_backward_s": min(bwd), "fused_calls": len(calls)}


def worker(model: str, n: int, dtype_name: str, repeat: int) -> dict:
    import torch

    from equiforce.data.neighbors import neighbor_list
    from equiforce.deploy.export import load_exported
    from lammps_speed import fcc

    torch.set_num_threads(1)
    module, meta = load_exported(model)
    dt = getattr(torch, dtype_name)
    pos, cell = fcc(n)
    p = torch.tensor(pos, dtype=dt)
    c = torch.tensor(cell, dtype=dt)
    edge_index, shift, _ = neighbor_list(p, float(meta["r_max"]), c, torch.tensor([True, True, True]))
    species = torch.zeros(n, dtype=torch.long)
    times = []
    with torch.jit.optimized_execution(False):
        for k in range(repeat + 2):
            t0 = time.process_time()
            energy = module(p, species, edge_index, shift, c, n)[0]
            if k >= 2:
                times.append(time.process_time() - t0)
    ops = fused_op_seconds(dtype_name, pos, cell, repeat)
    try:
        ops_isa = torch.ops.equiforce.cpu_isa()
    except (AttributeError, RuntimeError):  # a build from before cpu_isa existed (target_clones)
        ops_isa = "?"
    return {"call_s": min(times), "energy": float(energy), "ops_isa": ops_isa,
            "aten_capability": torch.backends.cpu.get_cpu_capability(), **ops}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--library", action="append", default=[], help="label=path of another libequiforce_ops.so")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        model, n, dtype_name = args.worker
        print(json.dumps(worker(model, int(n), dtype_name, args.repeat)), flush=True)
        return 0

    import torch

    from lammps_speed import export_bench_model
    from neighbors import cpu_info

    variants = [("avx512", {"EQUIFORCE_CPU_ISA": "avx512"}), ("avx2", dict(AVX2_ENV))]
    for spec in args.library:
        label, path = spec.split("=", 1)
        variants.append((label, dict(AVX2_ENV, LD_PRELOAD=os.path.abspath(path))))
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    rows = []
    for dtype_name in args.dtypes:
        model = str(out_dir / f"isa_compare_model_{dtype_name}.pt")
        export_bench_model(model, getattr(torch, dtype_name))
        for n in args.sizes:
            for rnd in range(2):  # two rounds, alternating the variants; the minimum is reported
                for label, extra in variants:
                    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
                    load = os.getloadavg()
                    proc = subprocess.run([sys.executable, __file__, "--repeat", str(args.repeat), "--worker", model,
                                           str(n), dtype_name], capture_output=True, text=True, env=env, timeout=3600)
                    if proc.returncode != 0:
                        raise SystemExit(f"worker {label} {n} {dtype_name} failed:\n{proc.stderr[-2000:]}")
                    res = json.loads(proc.stdout.strip().splitlines()[-1])
                    res.update(variant=label, atoms=n, dtype=dtype_name, round=rnd, load_before=load,
                               load_after=os.getloadavg())
                    rows.append(res)
                    print(f"{n} {dtype_name} {label} round {rnd}: {res['call_s'] * 1e3:.1f} ms "
                          f"(ops {res['ops_isa']}, aten {res['aten_capability']})", flush=True)
    info = {"cpu": cpu_info(), "rows": rows, "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    path = out_dir / time.strftime("isa_compare_%Y%m%d_%H%M%S.json", time.gmtime())
    path.write_text(json.dumps(info, indent=1))
    print(f"\nCPU {info['cpu']['model']} ({info['cpu']['isa']}), 1 torch thread, {info['time']}; "
          "minimum CPU time over both rounds\n")
    print("| atoms | dtype | variant | ops ISA | ATen | bare call ms | fused fwd ms | fused bwd ms | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    keys = []
    for r in rows:
        if (r["atoms"], r["dtype"], r["variant"]) not in keys:
            keys.append((r["atoms"], r["dtype"], r["variant"]))
    for key in keys:
        sel = [r for r in rows if (r["atoms"], r["dtype"], r["variant"]) == key]
        best = min(sel, key=lambda r: r["call_s"])
        fwd = min(r["fused_forward_s"] for r in sel)
        bwd = min(r["fused_backward_s"] for r in sel)
        loads = [r["load_before"][0] for r in sel] + [r["load_after"][0] for r in sel]
        print(f"| {key[0]} | {key[1]} | {key[2]} | {best['ops_isa']} | {best['aten_capability']} | "
              f"{best['call_s'] * 1e3:.1f} | {fwd * 1e3:.1f} | {bwd * 1e3:.1f} | {min(loads):.1f}-{max(loads):.1f} |")
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
