"""Benchmark worker: one process per backend, driven by bench/speed.py over a line-JSON protocol.

Run as ``<python> bench/worker.py BACKEND`` where BACKEND is ``equiforce-eager``,
``equiforce-ts`` (main venv), ``nequip`` or ``mace`` (their venvs under bench/.venvs/). The file
imports only the standard library, numpy and torch at module level, so it runs in every venv.

Protocol: the parent writes one JSON object per line on the worker's stdin; the worker answers
each with exactly one JSON line on its stdout (library prints are sent to stderr). Every answer
has ``"ok"``; failures carry ``"error"`` (a one-line message) and ``"trace"``.

=========  ==========================================================  ===============================
op         request fields                                              answer fields
=========  ==========================================================  ===============================
hello      threads, malloc ("tuned": glibc thresholds of               backend, versions, pid, threads,
           equiforce.deploy.allocator, for every backend alike; "default")    malloc
build      dtype ("float32"/"float64"), config (backend's settings),   num_params, description
           species (list of element symbols), avg_num_neighbors
time       structure (path to .npz: pos, cell, numbers, edge_index     times_s (one per repeat),
           [2,E] i->j, shift [E,3] Cartesian Å), dtype, warmup,        energy, max_force,
           repeats                                                     rss_before_mb, peak_rss_mb,
                                                                       num_atoms, num_edges
quit       -                                                           (worker exits)
=========  ==========================================================  ===============================

Edges are directed pairs (i, j) with r_ij = pos[j] - pos[i] + shift, both directions present.
Warm-up calls run only the first time a (structure, dtype) is seen; peak RSS (VmHWM) is reset
then (``/proc/self/clear_refs``), so ``peak_rss_mb - rss_before_mb`` is the memory the
evaluation of that structure needs.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

# the protocol owns the real stdout; everything else printed goes to stderr
_PROTO = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
sys.stdout = sys.stderr

import numpy as np  # noqa: E402
import torch  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ----------------------------------------------------------------------------- memory
def _status_kb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    return float("nan")


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _tune_malloc() -> bool:
    """equiforce.deploy.allocator.tune_malloc, loaded from its file (peer venvs do not have equiforce;
    the module needs only the standard library)."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python", "equiforce",
                        "deploy", "allocator.py")  # moved with the package layout (was equiforce/allocator.py)
    spec = importlib.util.spec_from_file_location("_equiforce_allocator", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return bool(mod.tune_malloc())


def _malloc_trim() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024.0


def peak_rss_mb() -> float:
    return _status_kb("VmHWM") / 1024.0


# ----------------------------------------------------------------------------- backends
class Backend:
    """Builds a model per dtype and evaluates energy + forces on a prepared structure."""

    def __init__(self):
        self.models = {}
        self.r_max = 5.0  # Å, cutoff of the end-to-end neighbour list (set by each "time" request)

    def versions(self) -> dict:
        return {"torch": torch.__version__, "aten_cpu_capability": torch.backends.cpu.get_cpu_capability()}

    def build(self, dtype: str, config: dict, species: list, avg_num_neighbors: float) -> dict:
        raise NotImplementedError

    def prepare(self, data: dict, dtype: str):
        """Tensors for one structure (built outside the timer)."""
        raise NotImplementedError

    def evaluate(self, prepared, dtype: str):
        """-> (energy tensor, forces tensor); timed."""
        raise NotImplementedError

    def evaluate_end_to_end(self, prepared, dtype: str):
        """-> (energy, forces) from positions and cell alone: the backend's own neighbour list
        (what a user of its ASE calculator runs) is built inside the timer; timed."""
        raise NotImplementedError(f"{type(self).__name__} has no end-to-end path")


def _num_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


class EquiforceBackend(Backend):
    def __init__(self, exported: bool):
        super().__init__()
        self.exported = exported
        import equiforce
        from equiforce.model.forces import energy_forces_virial
        self._efv = energy_forces_virial
        self._version = equiforce.__version__
        self._tmp = None

    def versions(self):
        v = super().versions()
        v["equiforce"] = self._version
        from equiforce.deploy.ops import load_ops
        if load_ops():
            v["equiforce_ops_isa"] = torch.ops.equiforce.cpu_isa()  # body of the fused op in use
        return v

    def build(self, dtype, config, species, avg_num_neighbors):
        from equiforce.model.network import EquiforceModel, ModelConfig
        cfg = ModelConfig.from_dict(dict(config, avg_num_neighbors=avg_num_neighbors))
        torch.manual_seed(0)  # eager and exported workers get the same random weights
        # cast first: for_export() evaluates the isolated-atom reference in the buffers' dtype
        model = EquiforceModel(cfg, list(species)).to(DTYPES[dtype]).for_export()
        nparams = _num_params(model)
        if self.exported:
            import tempfile
            from equiforce.deploy.export import export_model, load_exported
            if self._tmp is None:
                self._tmp = tempfile.mkdtemp(prefix="equiforce-bench-")
            path = os.path.join(self._tmp, f"model-{dtype}.pt")
            export_model(model, path, DTYPES[dtype], symmetry=cfg.symmetry)
            module, _ = load_exported(path)
            self.models[dtype] = module
            desc = f"exported TorchScript ({os.path.getsize(path)} bytes), optimized_execution(False)"
        else:
            self.models[dtype] = model.to(DTYPES[dtype]).eval()
            desc = "eager EquiforceModel + equiforce.model.forces.energy_forces_virial"
        return {"num_params": nparams, "description": desc}

    def prepare(self, data, dtype):
        dt = DTYPES[dtype]
        n = data["pos"].shape[0]
        species = torch.zeros(n, dtype=torch.long)  # a single element (Cu)
        return {
            "pos": torch.tensor(data["pos"], dtype=dt),
            "species": species,
            "edge_index": torch.tensor(data["edge_index"], dtype=torch.long),
            "shift": torch.tensor(data["shift"], dtype=dt),
            "cell": torch.tensor(data["cell"], dtype=dt),
            "batch": torch.zeros(n, dtype=torch.long),
        }

    def evaluate(self, p, dtype):
        model = self.models[dtype]
        if self.exported:
            with torch.jit.optimized_execution(False):
                energy, _, forces, _ = model(p["pos"], p["species"], p["edge_index"], p["shift"], p["cell"],
                                             int(p["pos"].shape[0]))
        else:
            energy, _, forces, _ = self._efv(model, p["pos"], p["species"], p["edge_index"], p["shift"],
                                             p["batch"], 1)
        return energy, forces


    def evaluate_end_to_end(self, p, dtype):
        # what the ASE calculator and `equiforce eval` run: equiforce.data.neighbors.neighbor_list
        # (vesin candidates, exact |r| < r_max test, sorted pairs), then the model
        from equiforce.data.neighbors import neighbor_list
        edge_index, shift, _ = neighbor_list(p["pos"], self.r_max, p["cell"], torch.ones(3, dtype=torch.bool))
        q = dict(p, edge_index=edge_index, shift=shift)
        return self.evaluate(q, dtype)


def make_backend(name: str) -> Backend:
    if name == "equiforce-eager":
        return EquiforceBackend(exported=False)
    if name == "equiforce-ts":
        return EquiforceBackend(exported=True)
    if name == "nequip":
        from peer_nequip import NequipBackend
        return NequipBackend(Backend)
    if name == "mace":
        from peer_mace import MaceBackend
        return MaceBackend(Backend)
    raise SystemExit(f"unknown backend {name!r}; use equiforce-eager, equiforce-ts, nequip or mace")


def profile(backend: Backend, req: dict) -> dict:
    """torch.profiler over ``calls`` energy+forces calls (after one warm-up): top ops by self CPU."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile
    with np.load(req["structure"]) as z:
        data = {k: z[k] for k in z.files}
    prepared = backend.prepare(data, req["dtype"])
    backend.evaluate(prepared, req["dtype"])
    calls = int(req.get("calls", 3))
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            backend.evaluate(prepared, req["dtype"])
    rows = []
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: int(req.get("rows", 25))]:
        rows.append({"name": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3 / calls,
                     "self_pct": 100.0 * e.self_cpu_time_total / total, "count": int(e.count // calls),
                     "cpu_total_ms": e.cpu_time_total / 1e3 / calls})
    return {"calls": calls, "top": rows, "total_self_cpu_ms": total / 1e3 / calls,
            "table": events.table(sort_by="self_cpu_time_total", row_limit=int(req.get("rows", 25)))}


# ----------------------------------------------------------------------------- loop
def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: worker.py BACKEND")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    name = sys.argv[1]
    backend = None
    init_error = None
    try:
        backend = make_backend(name)
    except Exception as exc:  # reported on the first request, the parent records it
        init_error = (f"{type(exc).__name__}: {exc}".splitlines()[0], traceback.format_exc())
    cache = {"key": None, "prepared": None}

    def reply(obj):
        _PROTO.write(json.dumps(obj) + "\n")
        _PROTO.flush()

    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "quit":
                reply({"ok": True})
                break
            if init_error is not None:
                reply({"ok": False, "error": f"{name} backend failed to start: {init_error[0]}",
                       "trace": init_error[1]})
                continue
            if op == "hello":
                threads = int(req.get("threads", 2))
                torch.set_num_threads(threads)
                malloc = "tuned" if req.get("malloc") == "tuned" and _tune_malloc() else "default"
                reply({"ok": True, "backend": name, "versions": backend.versions(), "pid": os.getpid(),
                       "threads": torch.get_num_threads(), "malloc": malloc})
            elif op == "build":
                out = backend.build(req["dtype"], req.get("config", {}), req["species"],
                                    float(req["avg_num_neighbors"]))
                reply(dict(out, ok=True))
            elif op == "time":
                key = (req["structure"], req["dtype"])
                first = cache["key"] != key
                if first:
                    cache["key"], cache["prepared"] = None, None
                    gc.collect()
                    _malloc_trim()  # hand freed heap back, so RSS-before is not inflated by the last cell
                    with np.load(req["structure"]) as z:
                        data = {k: z[k] for k in z.files}
                    rss0 = rss_mb()
                    reset_ok = reset_peak_rss()
                    cache["prepared"] = backend.prepare(data, req["dtype"])
                    cache["rss_before"], cache["reset_ok"] = rss0, reset_ok
                    cache["key"] = key
                    # warm-up calls; slow cells stop after warmup_budget_s (at least one call)
                    t_w = time.perf_counter()
                    for _ in range(int(req.get("warmup", 2))):
                        backend.evaluate(cache["prepared"], req["dtype"])
                        if time.perf_counter() - t_w > float(req.get("warmup_budget_s", 1e9)):
                            break
                times = []
                energy = forces = None
                # "bare": neighbour list given (built outside the timer); "end_to_end": built inside
                call = backend.evaluate_end_to_end if req.get("mode") == "end_to_end" else backend.evaluate
                backend.r_max = float(req.get("r_max", backend.r_max))
                if req.get("mode") == "end_to_end" and int(req.get("warmup", 0)):
                    call(cache["prepared"], req["dtype"])
                for _ in range(int(req["repeats"])):
                    t0 = time.perf_counter()
                    energy, forces = call(cache["prepared"], req["dtype"])
                    times.append(time.perf_counter() - t0)
                p = cache["prepared"]
                reply({"ok": True, "times_s": times, "energy": float(energy.detach().sum()),
                       "max_force": float(forces.detach().abs().max()),
                       "rss_before_mb": cache["rss_before"], "peak_rss_mb": peak_rss_mb(),
                       "peak_reset": cache["reset_ok"], "num_atoms": int(p["num_atoms"] if "num_atoms" in p
                                                                         else p["pos"].shape[0]),
                       "num_edges": int(p["num_edges"] if "num_edges" in p else p["edge_index"].shape[1])})
            elif op == "profile":
                reply(dict(profile(backend, req), ok=True))
            else:
                reply({"ok": False, "error": f"unknown op {op!r}"})
        except Exception as exc:
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
                   "trace": traceback.format_exc()[-4000:]})


if __name__ == "__main__":
    main()
