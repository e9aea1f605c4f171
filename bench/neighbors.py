"""Neighbour-list speed: equiforce's cell list vs vesin vs ASE on fcc Cu (a = 3.61 Å), r_max 5 Å.

Columns (wall time of one full neighbour list, milliseconds, minimum over ``--repeat`` runs; the
machine may be shared, the minimum is the least disturbed run):

* ``cell_list``   the pure-torch cell list (what runs inside TorchScript), eager;
* ``cell_list_ts`` the same, ``torch.jit.script``-ed (the OpenMM module's path);
* ``vesin``       ``vesin.NeighborList(cutoff, full_list=True).compute(..., "ijS")`` alone;
* ``vesin_torch`` ``vesin.torch.NeighborList`` scripted (TorchScript build of vesin);
* ``equiforce``   ``equiforce.data.neighbors.neighbor_list`` from Python (vesin candidates + the
  exact test in the dtype of pos + the (i, j, shift) sort): what ASE, eval and training run;
* ``ase``         ``ase.neighborlist.neighbor_list("ijS", ...)``.

Also recorded: the number of pairs (all engines must agree), the load average before and after,
the CPU model and vector ISA (avx512f / avx2 from /proc/cpuinfo flags), torch threads.
Prints a Markdown table and writes JSON to ``bench/results/neighbors_<time>.json``.

    OMP_NUM_THREADS=1 python bench/neighbors.py [--sizes 512 4096 32768] [--repeat 5]
"""
import argparse
import json
import os
import platform
import time
from pathlib import Path

import ase.build
import numpy as np
import torch
import vesin
import vesin.torch
from ase.neighborlist import neighbor_list as ase_neighbor_list

from equiforce.data import neighbors

R_MAX = 5.0
# fcc conventional cells (4 atoms each) repeated to the requested atom count
REPEATS = {512: (4, 4, 8), 4096: (8, 8, 16), 32768: (16, 16, 32)}


def cpu_info() -> dict:
    flags, model = set(), platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    isa = "avx512f" if "avx512f" in flags else ("avx2" if "avx2" in flags else "other")
    return {"model": model, "isa": isa, "avx512f": "avx512f" in flags, "avx2": "avx2" in flags,
            "cores": os.cpu_count()}


class VesinTorch(torch.nn.Module):
    def __init__(self, cutoff: float):
        super().__init__()
        self.nl = vesin.torch.NeighborList(cutoff=cutoff, full_list=True)

    def forward(self, pos: torch.Tensor, box: torch.Tensor, pbc: torch.Tensor):
        return self.nl.compute(pos, box, pbc, "ijS", False)


def timed(fn, repeat: int):
    """(min ms, number of pairs) over ``repeat`` calls after one warm-up call."""
    count = fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3, count


def run(n: int, repeat: int, skip_ase_above: int) -> dict:
    atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True).repeat(REPEATS[n])
    assert len(atoms) == n
    rng = np.random.default_rng(0)
    atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)  # thermal noise: no ties at r_max
    pos = torch.tensor(atoms.positions, dtype=torch.float64)
    cell = torch.tensor(atoms.cell.array, dtype=torch.float64)
    pbc = torch.tensor([True, True, True])
    pbc_list = [True, True, True]
    scripted = torch.jit.script(neighbors._cell_list_candidates)
    vt = torch.jit.script(VesinTorch(R_MAX))

    def cell_list():
        i, j, s = neighbors._cell_list_candidates(pos, R_MAX, cell, pbc)
        return int(neighbors._exact_pairs(pos, R_MAX, cell, i, j, s)[0].shape[1])

    scripted_full = torch.jit.script(neighbors.neighbor_list)

    def cell_list_ts():
        return int(scripted_full(pos, R_MAX, cell, pbc)[0].shape[1])

    def vesin_np():
        i, j, s = vesin.NeighborList(cutoff=R_MAX, full_list=True).compute(atoms.positions, atoms.cell.array,
                                                                           pbc_list, quantities="ijS")
        return len(i)

    def vesin_ts():
        return int(vt(pos, cell, pbc)[0].shape[0])

    def ours():
        return int(neighbors.neighbor_list(pos, R_MAX, cell, pbc)[0].shape[1])

    def ase_nl():
        return len(ase_neighbor_list("ijS", atoms, R_MAX)[0])

    row = {"atoms": n}
    engines = [("cell_list", cell_list), ("cell_list_ts", cell_list_ts), ("vesin", vesin_np),
               ("vesin_torch", vesin_ts), ("equiforce", ours)]
    if n <= skip_ase_above:
        engines.append(("ase", ase_nl))
    counts = {}
    for name, fn in engines:
        reps = repeat if n < 32768 or name not in ("cell_list", "cell_list_ts", "ase") else max(1, repeat // 2)
        row[name + "_ms"], counts[name] = timed(fn, reps)
    row["pairs"] = counts
    if len(set(counts.values())) != 1:
        raise SystemExit(f"engines disagree on the number of pairs at {n} atoms: {counts}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 4096, 32768], choices=sorted(REPEATS))
    ap.add_argument("--repeat", type=int, default=5, help="timed calls per engine (minimum reported)")
    ap.add_argument("--skip-ase-above", type=int, default=10 ** 9, help="skip ASE above this many atoms")
    args = ap.parse_args()
    info = {"cpu": cpu_info(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "vesin": vesin.__version__, "ase": ase.__version__, "r_max": R_MAX,
            "load_before": os.getloadavg(), "repeat": args.repeat}
    rows = [run(n, args.repeat, args.skip_ase_above) for n in args.sizes]
    info["load_after"] = os.getloadavg()
    info["rows"] = rows
    cols = ["cell_list", "cell_list_ts", "vesin", "vesin_torch", "equiforce", "ase"]
    print(f"CPU {info['cpu']['model']} ({info['cpu']['isa']}), torch threads {info['torch_threads']}, "
          f"load average {info['load_before'][0]:.2f} -> {info['load_after'][0]:.2f}, min of {args.repeat}")
    print("| atoms | pairs | " + " | ".join(c + " ms" for c in cols) + " | cell_list / equiforce |")
    print("|" + "---|" * (len(cols) + 3))
    for r in rows:
        cells = [f"{r[c + '_ms']:.1f}" if c + "_ms" in r else "-" for c in cols]
        print(f"| {r['atoms']} | {r['pairs']['equiforce']} | " + " | ".join(cells)
              + f" | {r['cell_list_ms'] / r['equiforce_ms']:.1f}x |")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    path = out / time.strftime("neighbors_%Y%m%d_%H%M%S.json")
    path.write_text(json.dumps(info, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
