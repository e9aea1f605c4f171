"""Side-by-side speed benchmark: equiforce vs NequIP and MACE at matched model size (issue 5).

    python bench/speed.py            # full run: 64, 512, 4096 atoms; scaling 512 .. 32768 atoms
    python bench/speed.py --quick    # 64 and 512 atoms, fewer repeats, scaling 512 .. 4096
    python bench/speed.py --skip-peers --sizes 512,4096 --threads 2

Run it with the project's venv python (``make bench`` does). What it does:

1. Creates / reuses one venv per peer under ``bench/.venvs/`` (``bench/peer_envs.py``; torch pinned by
   ``bench/constraints.txt``). A peer that fails to install or import is recorded with the reason
   in the JSON and the run goes on.
2. Builds rattled fcc Cu supercells (a = 3.61 Å) and their neighbour lists (ASE, r_max 5 Å, 42
   neighbours per atom) outside every timer (``bench/structures.py``).
3. Starts one worker process per backend (``bench/worker.py``; a peer's worker runs with the peer
   venv's python) and times energy + forces: warm-up, then the repeats are split into rounds and
   the backends take turns round by round, so a change in machine load hits all of them alike.
   The figure is the median over all repeats. Equiforce is timed as the eager model and as the
   exported TorchScript file (run under ``torch.jit.optimized_execution(False)``).
4. Size scaling of equiforce alone (time per atom), and a torch.profiler table of the eager model
   for 512 atoms in float32.
5. Prints tables and writes ``bench/results/speed.json``.

Numbers are atom-evaluations per second (atoms / median seconds per energy+forces call); a ratio
> 1 means equiforce is faster. Peak RSS per atom is (VmHWM - RSS before the structure was loaded)
/ atoms in the worker process.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import peer_envs  # noqa: E402  (standard library only)

R_MAX = 5.0
AVG_NUM_NEIGHBORS = 42.0  # rattled fcc Cu at 5 Å

# ---------------------------------------------------------------------------------------------
# Matched hyper-parameters. Peers: the settings of issue 5. Equiforce: the closest configuration.
PEER_CONFIGS = {
    "nequip": {"num_layers": 3, "num_features": 32, "l_max": 1, "parity": True, "num_bessels": 8,
               "radial_mlp_depth": 2, "radial_mlp_width": 64, "r_max": R_MAX, "polynomial_cutoff_p": 6},
    "mace": {"hidden_irreps": "64x0e + 64x1o", "max_ell": 3, "correlation": 3, "num_interactions": 2,
             "num_bessel": 8, "radial_MLP": [64, 64, 64], "r_max": R_MAX, "num_polynomial_cutoff": 5,
             "MLP_irreps": "16x0e"},
}
OURS_CONFIGS = {
    # NequIP: 3 layers, 32 channels, l <= 1 with parity, 8 Bessel, radial MLP 2x64. NequIP's parity=True
    # hidden features are 32x0e+32x0o+32x1o+32x1e: equiforce's feature_parity "both" (its default,
    # "natural", keeps 32x0e+32x1o only and is about twice as fast).
    "nequip": {"r_max": R_MAX, "channels": 32, "lmax": 1, "num_layers": 3, "num_bessel": 8,
               "radial_hidden": 64, "radial_layers": 2, "symmetry": "O3", "cutoff_p": 6,
               "feature_parity": "both"},
    # MACE: 64x0e+64x1o features, sh l <= 3, body order 4 (correlation 3), 2 interactions, radial
    # MLP 3x64. Equiforce uses one lmax for features and edge harmonics and two-body messages, so the
    # closest match is 64 channels, 2 layers, radial MLP 3x64 and lmax 2 (features 64x0e+64x1o+64x2e,
    # harmonics l <= 2): more feature irreps than MACE, fewer harmonic orders, no many-body product.
    "mace": {"r_max": R_MAX, "channels": 64, "lmax": 2, "num_layers": 2, "num_bessel": 8,
             "radial_hidden": 64, "radial_layers": 3, "symmetry": "O3", "cutoff_p": 6},
}
MAPPING_NOTES = {
    "nequip": "same layers/channels/lmax/basis/MLP (3 layers, 32 channels, lmax 1, 8 Bessel, radial MLP "
              "2x64, r_max 5, p=6) and the same hidden irreps 32x0e+32x0o+32x1o+32x1e (NequIP parity=True, "
              "equiforce feature_parity 'both'). Remaining differences: NequIP's self-connection and "
              "linear layers are species-dependent in different places, so parameter counts differ.",
    "mace": "closest expressible: channels 64, lmax 2 (features 64x0e+64x1o+64x2e, sh l<=2), "
            "2 layers, 8 Bessel, radial MLP 3x64, r_max 5. MACE's sh l<=3 and correlation-3 "
            "many-body product have no counterpart (equiforce messages are two-body CG products).",
}


# ---------------------------------------------------------------------------------------------
class WorkerError(RuntimeError):
    pass


class Worker:
    """A backend process speaking the line-JSON protocol of bench/worker.py."""

    def __init__(self, label: str, backend: str, python: str, env: Dict[str, str], max_rss_mb: float):
        self.label, self.backend, self.python, self.env = label, backend, python, env
        self.max_rss_mb = max_rss_mb
        self.error: Optional[str] = None
        self.proc = None
        self.stderr_path = REPO / "bench" / "results" / f"worker-{label}.log"
        self.start()

    def start(self):
        self.stderr_path.parent.mkdir(parents=True, exist_ok=True)
        self._err = open(self.stderr_path, "a")
        self.proc = subprocess.Popen([self.python, str(BENCH_DIR / "worker.py"), self.backend],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                     env=self.env, text=True, bufsize=1, cwd=str(BENCH_DIR))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _rss_mb(self) -> float:
        try:
            with open(f"/proc/{self.proc.pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        return float(line.split()[1]) / 1024.0
        except OSError:
            pass
        return 0.0

    def request(self, obj: dict, timeout: float = 3600.0) -> dict:
        """Send one request; returns the answer dict. Raises WorkerError when the worker died, ran
        past ``timeout`` or above the memory cap (it is then killed; restart() gives a fresh one)."""
        if not self.alive():
            raise WorkerError(f"worker {self.label} is not running")
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()
        t0 = time.monotonic()
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    raise WorkerError(f"worker {self.label} exited (code {self.proc.wait()}); "
                                      f"see {self.stderr_path}")
                return json.loads(line)
            if self.proc.poll() is not None:
                raise WorkerError(f"worker {self.label} exited (code {self.proc.returncode}); see {self.stderr_path}")
            rss = self._rss_mb()
            if rss > self.max_rss_mb:
                self.kill()
                raise WorkerError(f"worker {self.label} killed: RSS {rss:.0f} MB above the cap "
                                  f"{self.max_rss_mb:.0f} MB (--max-rss-gb)")
            if time.monotonic() - t0 > timeout:
                self.kill()
                raise WorkerError(f"worker {self.label} killed: no answer within {timeout:.0f} s")

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self):
        self.kill()
        self.start()

    def close(self):
        if self.alive():
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self._err.close()


# ---------------------------------------------------------------------------------------------
def machine_info(threads: int) -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    flags = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = "avx512f" if "avx512f" in flags else ("avx2" if "avx2" in flags else "other")
    return {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": platform.node(), "cpu": cpu, "cpu_isa": isa, "cpu_flags_avx": sorted(f for f in flags
                                                                                       if f.startswith("avx")),
            "cpu_count": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), "git_commit": commit,
            "load_average_start": list(os.getloadavg())}


def worker_env(threads: int, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(extra if extra is not None else os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    return env


def ours_env(threads: int) -> Dict[str, str]:
    env = worker_env(threads)
    env["PYTHONPATH"] = str(REPO / "python") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def median(xs: List[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt_rate(x: Optional[float]) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:,.0f}"


def fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}x"


# ---------------------------------------------------------------------------------------------
def run_timings(workers: Dict[str, Worker], structures: List[dict], dtypes: List[str], args,
                results: dict, log, mode: str = "bare") -> None:
    """Alternate the backends round by round on every (structure, dtype). ``mode`` "bare": the
    neighbour list is given (built outside the timer), results under ``timings``; "end_to_end":
    each backend builds its own neighbour list inside the timer, results under ``timings_end_to_end``."""
    store = "timings" if mode == "bare" else "timings_end_to_end"
    results.setdefault(store, {})
    built: Dict[str, set] = {k: set() for k in workers}
    for st in structures:
        for dtype in dtypes:
            cell_key = f"{st['num_atoms']}/{dtype}"
            times: Dict[str, List[float]] = {k: [] for k in workers}
            info: Dict[str, dict] = {}
            active = [k for k in workers if workers[k].error is None]
            # build per dtype (once per worker)
            for k in list(active):
                w = workers[k]
                if dtype in built[k]:
                    continue
                try:
                    ans = w.request({"op": "build", "dtype": dtype, "config": w.config, "species": ["Cu"],
                                     "avg_num_neighbors": AVG_NUM_NEIGHBORS}, timeout=args.timeout)
                except WorkerError as exc:
                    ans = {"ok": False, "error": str(exc)}
                    w.restart(); built[k] = set(); _hello(w, args)
                if not ans.get("ok"):
                    results["backends"][k].setdefault("errors", {})[f"build/{dtype}"] = ans.get("error")
                    log(f"  ! {k} build {dtype}: {ans.get('error')}")
                    if ans.get("trace"):
                        log(ans["trace"])
                    active.remove(k)
                    continue
                built[k].add(dtype)
                results["backends"][k].setdefault("num_params", ans.get("num_params"))
                results["backends"][k].setdefault("description", ans.get("description"))
            # round 0: warm-up + 1 timed call; it sets how many more repeats fit in the budget
            plan: Dict[str, int] = {}
            for k in list(active):
                w = workers[k]
                try:
                    ans = w.request({"op": "time", "structure": st["path"], "dtype": dtype,
                                     "mode": mode, "r_max": R_MAX, "warmup": args.warmup,
                                     "warmup_budget_s": args.budget / 2, "repeats": 1}, timeout=args.timeout)
                except WorkerError as exc:
                    ans = {"ok": False, "error": str(exc)}
                    w.restart(); built[k] = set(); _hello(w, args)
                if not ans.get("ok"):
                    results["backends"][k].setdefault("errors", {})[cell_key] = ans.get("error")
                    log(f"  ! {k} {cell_key}: {ans.get('error')}")
                    active.remove(k)
                    continue
                times[k] += ans["times_s"]
                info[k] = ans
                t = ans["times_s"][0]
                plan[k] = int(max(args.min_repeats - 1, min(args.repeats - 1, args.budget / max(t, 1e-6))))
            rounds = max(1, args.rounds)
            for r in range(rounds):
                order = active[r % len(active):] + active[:r % len(active)] if active else []
                for k in order:
                    n_here = plan[k] // rounds + (1 if r < plan[k] % rounds else 0)
                    if n_here <= 0 or k not in info:
                        continue
                    try:
                        ans = workers[k].request({"op": "time", "structure": st["path"], "dtype": dtype,
                                                  "mode": mode, "r_max": R_MAX, "warmup": 0, "repeats": n_here},
                                                 timeout=args.timeout)
                    except WorkerError as exc:
                        ans = {"ok": False, "error": str(exc)}
                        workers[k].restart(); built[k] = set(); _hello(workers[k], args)
                    if not ans.get("ok"):
                        results["backends"][k].setdefault("errors", {})[cell_key] = ans.get("error")
                        log(f"  ! {k} {cell_key}: {ans.get('error')}")
                        info.pop(k, None)
                        continue
                    times[k] += ans["times_s"]
                    info[k]["peak_rss_mb"] = max(info[k]["peak_rss_mb"], ans["peak_rss_mb"])
            for k, ans in info.items():
                med = median(times[k])
                n = st["num_atoms"]
                rec = {"median_s": med, "min_s": min(times[k]), "times_s": times[k], "repeats": len(times[k]),
                       "atom_evals_per_s": n / med, "us_per_atom": 1e6 * med / n,
                       "energy_eV": ans["energy"], "max_force": ans["max_force"],
                       "rss_before_mb": ans["rss_before_mb"], "peak_rss_mb": ans["peak_rss_mb"],
                       "peak_rss_kb_per_atom": 1024.0 * (ans["peak_rss_mb"] - ans["rss_before_mb"]) / n,
                       "peak_reset": ans.get("peak_reset"), "load_average": list(os.getloadavg())}
                results[store].setdefault(k, {})[cell_key] = rec
                log(f"  {k:<18s} {cell_key:>12s} {mode:>10s}  median {med * 1e3:9.2f} ms  "
                    f"{n / med:10,.0f} atom-evals/s  ({len(times[k])} repeats, peak "
                    f"{rec['peak_rss_kb_per_atom']:.1f} kB/atom)")


def _hello(w: Worker, args) -> dict:
    try:
        return w.request({"op": "hello", "threads": args.threads, "malloc": args.malloc}, timeout=600)
    except WorkerError as exc:
        w.error = str(exc)
        return {"ok": False, "error": str(exc)}


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="64 and 512 atoms, fewer repeats, scaling to 4096")
    p.add_argument("--sizes", help="comma-separated atom counts (multiples of 4), default 64,512,4096; "
                                     "'none' runs only the scaling and the profile")
    p.add_argument("--dtypes", default="float32,float64", help="comma-separated: float32,float64")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker (default 2)")
    p.add_argument("--skip-peers", action="store_true", help="time equiforce only (no peer venvs)")
    p.add_argument("--peers", default="nequip,mace", help="which peers (default nequip,mace)")
    p.add_argument("--repeats", type=int, help="max timed repeats per cell (default 20; quick 8)")
    p.add_argument("--min-repeats", type=int, default=3, help="min timed repeats per cell (default 3)")
    p.add_argument("--warmup", type=int, help="warm-up calls per cell (default 3; quick 2)")
    p.add_argument("--rounds", type=int, default=4, help="alternation rounds per cell (default 4)")
    p.add_argument("--budget", type=float, help="seconds of timed calls per backend and cell "
                                                "(default 20; quick 6); caps the repeats of slow cells")
    p.add_argument("--scaling-sizes", help="equiforce-only size scaling, default 512,4096,32768 "
                                           "(quick 512,4096); 'none' to skip")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler table")
    p.add_argument("--no-end-to-end", action="store_true",
                   help="skip the end-to-end timings (each backend's own neighbour list inside the timer)")
    p.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                   help="glibc allocator of every worker, peers included: 'tuned' (equiforce.deploy.allocator."
                        "tune_malloc: freed blocks stay in the heap, what the LAMMPS plugin does) or "
                        "'default' (default tuned)")
    p.add_argument("--max-rss-gb", type=float, help="kill a worker above this RSS (default 70%% of "
                                                    "MemAvailable at start)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker request")
    p.add_argument("--out", default=str(BENCH_DIR / "results" / "speed.json"), help="JSON output path")
    args = p.parse_args(argv)

    def fail(msg):
        p.error(msg)

    def ints(s, what):
        try:
            v = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            fail(f"{what} must be comma-separated integers such as 64,512,4096, got {s!r}")
        for n in v:
            if n < 4 or n % 4:
                fail(f"{what}: {n} is not a positive multiple of 4 (fcc cells hold 4 atoms); e.g. 64,512,4096")
        return v

    if args.sizes == "none":
        sizes = []  # size scaling / profile only
    else:
        sizes = ints(args.sizes, "--sizes") if args.sizes else ([64, 512] if args.quick else [64, 512, 4096])
    if args.scaling_sizes == "none":
        scaling = []
    elif args.scaling_sizes:
        scaling = ints(args.scaling_sizes, "--scaling-sizes")
    else:
        scaling = [512, 4096] if args.quick else [512, 4096, 32768]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in ("float32", "float64"):
            fail(f"--dtypes: unknown dtype {d!r}; use float32 and/or float64")
    if args.threads < 1:
        fail(f"--threads must be >= 1, got {args.threads}")
    peers = [] if args.skip_peers else [x.strip() for x in args.peers.split(",") if x.strip()]
    for x in peers:
        if x not in peer_envs.PEERS:
            fail(f"--peers: unknown peer {x!r}; choose from {','.join(peer_envs.PEERS)}")
    args.repeats = args.repeats or (8 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    args.budget = args.budget or (6.0 if args.quick else 20.0)
    args.min_repeats = min(args.min_repeats, args.repeats)
    if args.max_rss_gb is None:
        avail = 0.0
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = float(line.split()[1]) / 1024.0
        max_rss_mb = 0.7 * avail if avail else 8192.0
    else:
        max_rss_mb = args.max_rss_gb * 1024.0
    try:
        import torch  # noqa: F401
        import ase  # noqa: F401
        import equiforce  # noqa: F401
        from structures import make_structure
    except ImportError as exc:
        print(f"bench/speed.py must run with the project's venv python (import failed: {exc}); "
              "use `make bench` or `.venv/bin/python bench/speed.py`", file=sys.stderr)
        return 2

    t_start = time.perf_counter()
    log = lambda s: print(s, flush=True)  # noqa: E731
    results: dict = {"machine": machine_info(args.threads), "settings": {
        "sizes": sizes, "dtypes": dtypes, "quick": args.quick, "max_repeats": args.repeats,
        "min_repeats": args.min_repeats, "warmup": args.warmup, "rounds": args.rounds,
        "budget_s": args.budget, "r_max": R_MAX, "avg_num_neighbors": AVG_NUM_NEIGHBORS,
        "max_rss_mb": max_rss_mb, "scaling_sizes": scaling, "malloc": args.malloc},
        "configs": {"peers": PEER_CONFIGS, "equiforce": OURS_CONFIGS, "mapping": MAPPING_NOTES},
        "peers": {}, "backends": {}, "timings": {}, "structures": {}}
    la = results["machine"]["load_average_start"]
    log(f"[bench] {results['machine']['date']}  {results['machine']['cpu']}  threads {args.threads}  "
        f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")

    # 1. peer venvs
    for peer in peers:
        try:
            st = peer_envs.ensure_peer_env(peer, log=log)
        except Exception as exc:  # never fatal
            st = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        results["peers"][peer] = st
        if not st["ok"]:
            log(f"[bench] peer {peer} unavailable: {st['error'][:300]}")
    for peer in peer_envs.PEERS:
        if peer not in peers:
            results["peers"][peer] = {"ok": False, "error": "skipped (--skip-peers / --peers)"}

    # 2. structures
    struct_dir = BENCH_DIR / "results" / "structures"
    all_sizes = sorted(set(sizes) | set(scaling))
    structs = {}
    for n in all_sizes:
        structs[n] = make_structure(n, R_MAX, struct_dir)
        results["structures"][str(n)] = structs[n]
    log("[bench] structures: " + ", ".join(f"{n} atoms ({s['neighbors_per_atom']:.1f} nbrs/atom)"
                                           for n, s in structs.items()))

    # 3. workers: equiforce matched to each peer (eager + exported), and the peers
    workers: Dict[str, Worker] = {}
    # the equiforce models matched to the peers named by --peers (both with --skip-peers alone)
    named = [x.strip() for x in args.peers.split(",") if x.strip()]
    groups = [g for g in ("nequip", "mace") if g in named] or ["nequip", "mace"]
    for g in groups:
        for mode in ("eager", "ts"):
            k = f"equiforce@{g}-{mode}"
            workers[k] = Worker(k, f"equiforce-{mode}", sys.executable, ours_env(args.threads), max_rss_mb)
            workers[k].config = OURS_CONFIGS[g]
        if g in peers and results["peers"][g]["ok"]:
            workers[g] = Worker(g, g, results["peers"][g]["python"],
                                worker_env(args.threads, peer_envs.peer_env_env(g)), max_rss_mb)
            workers[g].config = PEER_CONFIGS[g]
    for k, w in workers.items():
        ans = _hello(w, args)
        results["backends"][k] = {"backend": w.backend, "config": w.config, "malloc": ans.get("malloc"),
                                  "versions": ans.get("versions"), "ok": bool(ans.get("ok"))}
        if not ans.get("ok"):
            w.error = ans.get("error")
            results["backends"][k]["errors"] = {"start": ans.get("error")}
            if k in results["peers"]:
                results["peers"][k]["ok"] = False
                results["peers"][k]["error"] = ans.get("error")
            log(f"[bench] {k} failed to start: {ans.get('error')}")
    try:
        log(f"[bench] timing {len([w for w in workers.values() if w.error is None])} backends, "
            f"alternating in {args.rounds} rounds")
        run_timings(workers, [structs[n] for n in sizes], dtypes, args, results, log)
        if not args.no_end_to_end:
            e2e = {k: w for k, w in workers.items() if k.endswith("-ts") or k in peers}
            log(f"[bench] end to end (neighbour list inside the timer): {', '.join(e2e)}")
            run_timings(e2e, [structs[n] for n in sizes], dtypes, args, results, log, mode="end_to_end")
        # 4. scaling (equiforce only, exported file, NequIP-matched size)
        results["scaling"] = {}
        if scaling and "equiforce@nequip-ts" in workers:
            sc = {k: workers[k] for k in ("equiforce@nequip-ts",)}
            sc_dtypes = ["float32"] if args.quick else dtypes
            log(f"[bench] size scaling, equiforce@nequip exported, {sc_dtypes}: {scaling}")
            sub = {"backends": {k: dict(results["backends"][k]) for k in sc}, "timings": {}}
            sargs = argparse.Namespace(**vars(args))
            sargs.min_repeats, sargs.repeats, sargs.rounds = 2, min(args.repeats, 5), 1
            run_timings(sc, [structs[n] for n in scaling], sc_dtypes, sargs, sub, log)
            results["scaling"] = {"backend": "equiforce@nequip-ts", "timings": sub["timings"],
                                  "errors": sub["backends"]["equiforce@nequip-ts"].get("errors")}
            for dt in sc_dtypes:
                rec = sub["timings"].get("equiforce@nequip-ts", {})
                pts = [(n, rec[f"{n}/{dt}"]["us_per_atom"]) for n in scaling if f"{n}/{dt}" in rec]
                if pts:
                    ref = pts[0][1]
                    results["scaling"][f"summary/{dt}"] = {
                        "us_per_atom": {str(n): v for n, v in pts}, "largest_measured": pts[-1][0],
                        "max_deviation_from_smallest": max(abs(v / ref - 1) for _, v in pts),
                        "flat_within_20pct": all(abs(v / ref - 1) <= 0.2 for _, v in pts)}
        # 5. profile
        if not args.no_profile:
            prof_n = 512 if 512 in structs else min(structs)
            results["profile"] = {}
            for g in groups:
                k = f"equiforce@{g}-eager"
                if workers[k].error is not None:
                    continue
                try:
                    ans = workers[k].request({"op": "profile", "structure": structs[prof_n]["path"],
                                              "dtype": "float32", "calls": 3, "rows": 25}, timeout=args.timeout)
                except WorkerError as exc:
                    ans = {"ok": False, "error": str(exc)}
                results["profile"][f"{k}/{prof_n}/float32"] = ans
    finally:
        for w in workers.values():
            w.close()
    results["machine"]["load_average_end"] = list(os.getloadavg())
    results["machine"]["wall_s"] = time.perf_counter() - t_start
    print_report(results, sizes, dtypes, peers)  # also fills results["ratios"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    log(f"[bench] wrote {out} ({results['machine']['wall_s']:.0f} s)")
    return 0


def print_report(results: dict, sizes: List[int], dtypes: List[str], peers: List[str]) -> None:
    m = results["machine"]
    la0, la1 = m["load_average_start"][0], m["load_average_end"][0]
    noisy = max(la0, la1) > 1.5
    print()
    print(f"equiforce speed benchmark  {m['date']}  {m['cpu']} ({m['cpu_count']} cores, vector ISA "
          f"{m.get('cpu_isa', '?')}), {m['threads']} threads")
    print(f"load average (1 min) start {la0:.2f} / end {la1:.2f}" + ("  -- NOISY: shared machine under load"
                                                                    if noisy else ""))
    print("energy + forces, atom-evals/s (higher is better); ratio = equiforce exported / peer")
    print()
    if not sizes:
        print("(no side-by-side sizes requested: --sizes none)")
    print("parameters:")
    for g in ("nequip", "mace"):
        ours = results["backends"].get(f"equiforce@{g}-eager", {}).get("num_params")
        peer = results["backends"].get(g, {}).get("num_params")
        print(f"  {g:<7s} peer {peer if peer is not None else '-':>9}   equiforce matched {ours if ours is not None else '-':>9}"
              f"\n          {MAPPING_NOTES[g]}")
    print()
    tm = results["timings"]
    hdr = (f"| atoms | dtype | NequIP | ours@NequIP eager | ours@NequIP TS | ratio | MACE | ours@MACE eager "
           f"| ours@MACE TS | ratio | vs fastest peer | peak RSS kB/atom (ours TS / NequIP / MACE) |")
    if sizes:
        print(hdr)
        print("|" + "---|" * 12)
    for n in sizes:
        for dt in dtypes:
            key = f"{n}/{dt}"

            def rate(k):
                return tm.get(k, {}).get(key, {}).get("atom_evals_per_s")

            def mem(k):
                v = tm.get(k, {}).get(key, {}).get("peak_rss_kb_per_atom")
                return "-" if v is None else f"{v:.0f}"

            rn, rm = rate("nequip"), rate("mace")
            on_e, on_t = rate("equiforce@nequip-eager"), rate("equiforce@nequip-ts")
            om_e, om_t = rate("equiforce@mace-eager"), rate("equiforce@mace-ts")
            ratio_n = on_t / rn if (on_t and rn) else None
            ratio_m = om_t / rm if (om_t and rm) else None
            fastest = None
            if rn or rm:
                fp = "nequip" if (rn or 0) >= (rm or 0) else "mace"
                ours_fp = on_t if fp == "nequip" else om_t
                fastest = ours_fp / max(rn or 0, rm or 0) if ours_fp else None
            results.setdefault("ratios", {})[key] = {"ours_ts_vs_nequip": ratio_n, "ours_ts_vs_mace": ratio_m,
                                                      "ours_vs_fastest_peer": fastest}
            print(f"| {n} | {dt} | {fmt_rate(rn)} | {fmt_rate(on_e)} | {fmt_rate(on_t)} | {fmt_ratio(ratio_n)} "
                  f"| {fmt_rate(rm)} | {fmt_rate(om_e)} | {fmt_rate(om_t)} | {fmt_ratio(ratio_m)} "
                  f"| {fmt_ratio(fastest)} | {mem('equiforce@nequip-ts')} / {mem('nequip')} / {mem('mace')} |")
    te = results.get("timings_end_to_end") or {}
    if sizes and te:
        print("\nend to end (each backend's own neighbour list inside the timer: ours equiforce.data.neighbors "
              "(vesin), NequIP and MACE their own), atom-evals/s; ratio = ours / peer; e2e/bare = ours end to "
              "end / ours bare call")
        print("| atoms | dtype | NequIP | ours@NequIP TS | ratio | MACE | ours@MACE TS | ratio | ours@NequIP e2e/bare |")
        print("|" + "---|" * 9)
        for n in sizes:
            for dt in dtypes:
                key = f"{n}/{dt}"

                def erate(k):
                    return te.get(k, {}).get(key, {}).get("atom_evals_per_s")

                en, em = erate("nequip"), erate("mace")
                on, om = erate("equiforce@nequip-ts"), erate("equiforce@mace-ts")
                bare = tm.get("equiforce@nequip-ts", {}).get(key, {}).get("atom_evals_per_s")
                rn = on / en if (on and en) else None
                rm = om / em if (om and em) else None
                frac = bare / on if (bare and on) else None
                results.setdefault("ratios_end_to_end", {})[key] = {"ours_ts_vs_nequip": rn, "ours_ts_vs_mace": rm,
                                                                    "ours_e2e_over_bare_time": frac}
                print(f"| {n} | {dt} | {fmt_rate(en)} | {fmt_rate(on)} | {fmt_ratio(rn)} | {fmt_rate(em)} | "
                      f"{fmt_rate(om)} | {fmt_ratio(rm)} | {fmt_ratio(frac)} |")
    for peer, st in results["peers"].items():
        if not st.get("ok"):
            print(f"  peer {peer}: not timed -- {str(st.get('error'))[:200]}")
    for k, b in results["backends"].items():
        for where, err in (b.get("errors") or {}).items():
            print(f"  {k} {where}: {str(err)[:200]}")
    sc = results.get("scaling") or {}
    for key, s in sc.items():
        if not key.startswith("summary/"):
            continue
        pts = ", ".join(f"{n}: {v:.1f}" for n, v in s["us_per_atom"].items())
        print(f"\nsize scaling (equiforce@NequIP exported, {key.split('/')[1]}), us per atom: {pts}; largest "
              f"measured {s['largest_measured']} atoms; max deviation from the smallest "
              f"{100 * s['max_deviation_from_smallest']:.0f}% ({'within' if s['flat_within_20pct'] else 'OUTSIDE'} +-20%)")
    if sc.get("errors"):
        print(f"  scaling errors: {sc['errors']}")
    for k, prof in (results.get("profile") or {}).items():
        if prof.get("ok"):
            print(f"\ntorch.profiler {k} (self CPU time, {prof['calls']} calls):")
            for r in prof["top"][:15]:
                print(f"  {r['self_cpu_ms']:9.2f} ms {r['self_pct']:5.1f}%  {r['count']:6d}x  {r['name']}")
        else:
            print(f"\nprofile {k} failed: {prof.get('error')}")


if __name__ == "__main__":
    sys.exit(main())
