"""Separate virtual environments for the benchmark peers (bench/.venvs/<peer>).

The peers (mace-torch, nequip) are never dependencies of equiforce. They need different e3nn
releases (mace-torch pins e3nn==0.4.4; nequip >= 0.7 needs e3nn >= 0.6), so each gets its own venv,
installed with ``pip install -r bench/requirements-<peer>.txt -c bench/constraints.txt`` so that
pip cannot replace torch 2.9.1 while it resolves the peer's dependencies.

A venv is (re)built only when its stamp file is missing or records other requirement/constraint
file contents; a failed install is reported (with the tail of pip's output) and never raised, so the
benchmark goes on with the other peer and with equiforce.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

BENCH_DIR = Path(__file__).resolve().parent
VENVS_DIR = BENCH_DIR / ".venvs"
CONSTRAINTS = BENCH_DIR / "constraints.txt"
PEERS = ("nequip", "mace")

# a one-line import check run inside the venv after installing; prints the versions as JSON
_CHECK = (
    "import json, importlib.metadata as m, torch, e3nn; "
    "print(json.dumps({'torch': torch.__version__, 'e3nn': e3nn.__version__, "
    "'peer': m.version(%r)}))"
)
_DIST = {"nequip": "nequip", "mace": "mace-torch"}


def requirements_file(peer: str) -> Path:
    return BENCH_DIR / f"requirements-{peer}.txt"


def venv_python(peer: str) -> Path:
    return VENVS_DIR / peer / "bin" / "python"


def _digest(peer: str) -> str:
    h = hashlib.sha256()
    for p in (requirements_file(peer), CONSTRAINTS):
        h.update(p.read_bytes())
    h.update(sys.version.encode())
    return h.hexdigest()


def _base_python() -> str:
    """The interpreter the peer venvs are made from (same Python as the one running the bench)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return base


def peer_env_env(peer: str) -> Dict[str, str]:
    """Environment for processes run with a peer venv's python."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # never let equiforce's source tree leak into a peer venv
    env.pop("VIRTUAL_ENV", None)
    # e3nn 0.4.4 (MACE) calls torch.load on its bundled constants: needs the pre-2.6 default
    env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    env["PYTHONNOUSERSITE"] = "1"
    return env


def ensure_peer_env(peer: str, log=print) -> dict:
    """Create / verify bench/.venvs/<peer>. Returns a status dict (never raises on pip failures):
    {"ok": bool, "python": str, "versions": {...}, "install_seconds": float|None,
     "reused": bool, "error": str|None}."""
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; choose from {PEERS}")
    venv = VENVS_DIR / peer
    py = venv_python(peer)
    stamp = venv / ".equiforce-bench.stamp"
    status = {"ok": False, "python": str(py), "versions": None, "install_seconds": None,
              "reused": False, "error": None}
    digest = _digest(peer)
    env = peer_env_env(peer)

    if stamp.exists() and py.exists():
        try:
            info = json.loads(stamp.read_text())
        except ValueError:
            info = {}
        if info.get("digest") == digest:
            chk = subprocess.run([str(py), "-c", _CHECK % _DIST[peer]], env=env,
                                 capture_output=True, text=True)
            if chk.returncode == 0:
                status.update(ok=True, reused=True, versions=json.loads(chk.stdout.strip().splitlines()[-1]),
                              install_seconds=info.get("install_seconds"))
                return status
            log(f"[bench] {peer} venv exists but fails its import check; rebuilding")

    t0 = time.perf_counter()
    if venv.exists():
        shutil.rmtree(venv)
    VENVS_DIR.mkdir(parents=True, exist_ok=True)
    log(f"[bench] creating {venv} (pip install -r {requirements_file(peer).name} -c constraints.txt)")
    steps: List[List[str]] = [
        [_base_python(), "-m", "venv", str(venv)],
        [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q",
         "-r", str(requirements_file(peer)), "-c", str(CONSTRAINTS)],
    ]
    logfile = VENVS_DIR / f"{peer}-install.log"
    with open(logfile, "w") as fh:
        for cmd in steps:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            r = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
            if r.returncode != 0:
                fh.close()
                lines = logfile.read_text().splitlines()
                errs = [ln for ln in lines if ln.startswith("ERROR")] or lines[-3:]
                status["error"] = (f"`{' '.join(cmd[:4])} ...` failed (exit {r.returncode}): "
                                   f"{' | '.join(errs)[-1500:]} (full log: {logfile})")
                status["install_seconds"] = time.perf_counter() - t0
                return status
    chk = subprocess.run([str(py), "-c", _CHECK % _DIST[peer]], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    status["install_seconds"] = elapsed
    if chk.returncode != 0:
        status["error"] = f"import check failed after install: {chk.stderr[-2000:]}"
        return status
    status["versions"] = json.loads(chk.stdout.strip().splitlines()[-1])
    status["ok"] = True
    stamp.write_text(json.dumps({"digest": digest, "install_seconds": elapsed,
                                 "versions": status["versions"]}))
    log(f"[bench] {peer} venv ready in {elapsed:.0f} s: {status['versions']}")
    return status


if __name__ == "__main__":
    wanted = sys.argv[1:] or list(PEERS)
    for p in wanted:
        print(json.dumps({p: ensure_peer_env(p)}, indent=1))
