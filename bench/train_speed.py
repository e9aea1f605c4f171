"""Training throughput: structures per second of training steps with a force loss, ours vs NequIP.

One training step = predict energies and forces of a batch (forces as -dE/dr with the graph kept,
``create_graph=True``), loss = MSE(energy) + MSE(forces) against fixed random targets, backward,
Adam step. Neighbour lists are built once, outside the timer (both codes precompute them in their
data pipelines). Two structure kinds, each a batch of ``--batch`` differently rattled copies:

* ``molecule``: an aspirin-sized cluster, 21 atoms (C9H8O4 composition, random positions at least
  1.1 Å apart in a 7 Å box, open boundaries);
* ``bulk``: fcc Cu, 64 atoms, periodic (a = 3.61 Å, rattled 0.05 Å).

Models at the matched size of ``bench/speed.py`` (NequIP 3 layers, 32 features, l_max 1,
parity; ours ``OURS_CONFIGS["nequip"]``, the same hidden irreps), float32, random weights; ours
twice: ``ours_fused`` (message passing through the compiled op with its second derivatives, what
training uses on the CPU by default, ``fused_kernels: true``) and ``ours`` (the PyTorch path,
``fused_kernels: false``). Each backend runs in its own
process (NequIP in ``bench/.venvs/nequip``, built by ``bench/peer_envs.py``), 1 torch thread,
alternating in ``--rounds`` rounds; reported: structures/s from the median step time, and from the
fastest step (less sensitive to other processes on a shared machine). Prints a
Markdown table, writes JSON to ``bench/results/train_speed_<time>.json``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/train_speed.py [--steps 5] [--batch 4]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
R_MAX = 5.0
SPECIES = {"molecule": ["C", "H", "O"], "bulk": ["Cu"]}


def make_structures(kind: str, batch: int, seed: int = 0):
    """List of (symbols, pos [N, 3] Å, cell [3, 3] Å or zeros, pbc)."""
    rng = np.random.default_rng(seed)
    out = []
    if kind == "molecule":
        symbols = ["C"] * 9 + ["H"] * 8 + ["O"] * 4
        base = []
        while len(base) < len(symbols):
            p = rng.uniform(0.0, 7.0, 3)
            if all(np.linalg.norm(p - q) >= 1.1 for q in base):
                base.append(p)
        base = np.array(base)
        for _ in range(batch):
            out.append((symbols, base + rng.normal(0, 0.05, base.shape), np.zeros((3, 3)), False))
    else:
        a = 3.61
        cells = np.array([[i, j, k] for i in range(2) for j in range(2) for k in range(4)], dtype=float)
        basis = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
        base = ((cells[:, None, :] + basis[None]).reshape(-1, 3) + 0.25) * a
        cell = np.diag([2 * a, 2 * a, 4 * a])
        for _ in range(batch):
            out.append((["Cu"] * 64, base + rng.normal(0, 0.05, base.shape), cell, True))
    return out


def neighbours(pos, cell, pbc):
    from ase.neighborlist import primitive_neighbor_list
    i, j, s = primitive_neighbor_list("ijS", [pbc] * 3, cell if pbc else np.eye(3) * 100.0, pos, R_MAX,
                                      self_interaction=False)
    return np.stack([i, j]), s.astype(np.float64)


def ours_step_fn(structs, species_names, config, fused=False):
    import torch

    from equiforce.model.forces import energy_forces_virial
    from equiforce.model.network import EquiforceModel, ModelConfig

    torch.manual_seed(0)
    model = EquiforceModel(ModelConfig.from_dict(dict(config, avg_num_neighbors=20.0)), species_names).float()
    model.train()
    if fused:
        model.use_fused_kernels(True, double_backward=True)
    pos, species, idx, shift, batch, offset = [], [], [], [], [], 0
    for g, (symbols, p, cell, pbc) in enumerate(structs):
        ei, s = neighbours(p, cell, pbc)
        pos.append(torch.tensor(p, dtype=torch.float32))
        species.append(torch.tensor([species_names.index(x) for x in symbols]))
        idx.append(torch.tensor(ei) + offset)
        shift.append(torch.tensor(s @ cell, dtype=torch.float32))
        batch.append(torch.full((len(p),), g, dtype=torch.long))
        offset += len(p)
    pos, species, idx = torch.cat(pos), torch.cat(species), torch.cat(idx, 1)
    shift, batch = torch.cat(shift), torch.cat(batch)
    e_ref = torch.randn(len(structs))
    f_ref = torch.randn(pos.shape)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad()
        energy, _, forces, _ = energy_forces_virial(model, pos, species, idx, shift, batch, len(structs),
                                                    create_graph=True)
        loss = ((energy - e_ref) ** 2).mean() + ((forces - f_ref) ** 2).mean()
        loss.backward()
        opt.step()
        return float(loss.detach())
    return step, sum(p.numel() for p in model.parameters())


def nequip_step_fn(structs, species_names, config):
    import torch
    from nequip.data import AtomicDataDict
    from nequip.model import NequIPGNNModel
    from nequip.utils.global_state import set_global_state

    set_global_state()
    model = NequIPGNNModel(seed=0, model_dtype="float32", type_names=list(species_names), avg_num_neighbors=20.0,
                           per_type_energy_scales=1.0, per_type_energy_shifts=0.0, **config)
    model.train()
    data = []
    for symbols, p, cell, pbc in structs:
        ei, s = neighbours(p, cell, pbc)
        d = {"pos": torch.tensor(p, dtype=torch.float64),
             "atom_types": torch.tensor([species_names.index(x) for x in symbols]),
             "edge_index": torch.tensor(ei), "edge_cell_shift": torch.tensor(s, dtype=torch.float64),
             "cell": torch.tensor(cell if pbc else np.eye(3) * 100.0, dtype=torch.float64).view(1, 3, 3),
             "pbc": torch.tensor([[pbc] * 3])}
        data.append(d)
    batch = AtomicDataDict.batched_from_list(data)
    n = batch["pos"].shape[0]
    e_ref = torch.randn(len(structs))
    f_ref = torch.randn((n, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad()
        out = model(dict(batch))
        loss = ((out["total_energy"].reshape(-1) - e_ref) ** 2).mean() + ((out["forces"] - f_ref) ** 2).mean()
        loss.backward()
        opt.step()
        return float(loss.detach())
    return step, sum(p.numel() for p in model.parameters())


def worker(backend: str, kind: str, batch: int, steps: int, rounds: int, config: dict) -> dict:
    import torch
    torch.set_num_threads(1)
    structs = make_structures(kind, batch)
    if backend == "nequip":
        step, nparams = nequip_step_fn(structs, SPECIES[kind], config)
    else:
        step, nparams = ours_step_fn(structs, SPECIES[kind], config, fused=backend == "ours_fused")
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return {"step_s": times, "loss": loss, "num_params": nparams, "torch": torch.__version__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kinds", nargs="+", default=["molecule", "bulk"])
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        backend, kind = args.worker
        res = worker(backend, kind, args.batch, args.steps, args.rounds, json.loads(args.config))
        print(json.dumps(res), flush=True)
        return 0

    sys.path.insert(0, str(HERE))
    import peer_envs
    from neighbors import cpu_info
    from speed import OURS_CONFIGS, PEER_CONFIGS

    nequip = peer_envs.ensure_peer_env("nequip")
    backends = {"ours_fused": (sys.executable, OURS_CONFIGS["nequip"], {}),
                "ours": (sys.executable, OURS_CONFIGS["nequip"], {})}
    if nequip.get("ok"):
        backends["nequip"] = (nequip["python"], PEER_CONFIGS["nequip"], peer_envs.peer_env_env("nequip"))
    rows = []
    for kind in args.kinds:
        times = {k: [] for k in backends}
        info = {}
        for rnd in range(args.rounds):
            for name, (python, config, extra_env) in backends.items():
                env = dict(os.environ, **extra_env)
                env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(HERE))
                load = os.getloadavg()
                proc = subprocess.run([python, __file__, "--steps", str(args.steps), "--batch", str(args.batch),
                                       "--worker", name, kind, "--config", json.dumps(config)],
                                      capture_output=True, text=True, env=env, timeout=3600)
                if proc.returncode != 0:
                    raise SystemExit(f"{name} {kind} failed:\n{proc.stderr[-3000:]}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                times[name] += res["step_s"]
                info[name] = dict(res, load_before=load, load_after=os.getloadavg())
                print(f"{kind} {name} round {rnd}: median step {statistics.median(res['step_s']) * 1e3:.1f} ms",
                      flush=True)
        n_atoms = len(make_structures(kind, 1)[0][0])
        row = {"kind": kind, "atoms": n_atoms, "batch": args.batch}
        for name in backends:
            med = statistics.median(times[name])
            row[name] = {"median_step_s": med, "structures_per_s": args.batch / med,
                         "min_step_s": min(times[name]), "best_structures_per_s": args.batch / min(times[name]),
                         "num_params": info[name]["num_params"], "steps": len(times[name]),
                         "load": [info[name]["load_before"][0], info[name]["load_after"][0]]}
        rows.append(row)
    import torch
    from equiforce.deploy.ops import load_ops
    load_ops()
    out = {"cpu": cpu_info(), "op_isa": torch.ops.equiforce.cpu_isa(), "rows": rows, "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "nequip_env": nequip}
    path = HERE / "results" / time.strftime("train_speed_%Y%m%d_%H%M%S.json", time.gmtime())
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"\nCPU {out['cpu']['model']} ({out['cpu']['isa']}; op body {out['op_isa']}), 1 torch thread, float32, batch {args.batch}, "
          f"{out['time']}\n")
    print("| structures | atoms | ours, fused op (structures/s) | ours, PyTorch path | NequIP | "
          "fused / NequIP | PyTorch path / NequIP | params ours / NequIP |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = r["ours_fused"]["structures_per_s"]
        o = r["ours"]["structures_per_s"]
        q = r.get("nequip", {}).get("structures_per_s")
        print(f"| {r['kind']} | {r['atoms']} | {f:.1f} | {o:.1f} | {q and f'{q:.1f}' or '-'} | "
              f"{q and f'{f / q:.2f}x' or '-'} | {q and f'{o / q:.2f}x' or '-'} | "
              f"{r['ours']['num_params']} / {r.get('nequip', {}).get('num_params', '-')} |")
    # the fastest step of each backend: less sensitive to other processes on a shared machine
    print("\nBest step (structures/s): | structures | fused | PyTorch path | NequIP | fused / NequIP |")
    for r in rows:
        f, o = r["ours_fused"]["best_structures_per_s"], r["ours"]["best_structures_per_s"]
        q = r.get("nequip", {}).get("best_structures_per_s")
        print(f"| {r['kind']} | {f:.1f} | {o:.1f} | {q and f'{q:.1f}' or '-'} | {q and f'{f / q:.2f}x' or '-'} |")
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
