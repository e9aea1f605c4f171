"""Where the LAMMPS plugin lives.

``pip install`` builds ``equiforceplugin.so`` (``pair_style equiforce``) and installs it in the
``equiforce`` package directory (the parent of this subpackage). The ``lmp`` launcher of the lammps wheel calls every ``lammps.plugins`` entry point
and loads each ``*plugin.so`` in the returned directories, so ``lmp -in deck`` finds the style
with no ``plugin load`` line. In a Python ``lammps`` session use
``lmp.command(f"plugin load {plugin_path()}")``.

This module must stay cheap to import (the ``lmp`` launcher imports it at every start): no torch.
"""
import importlib.util
import os
from typing import List, Optional

PLUGIN_NAME = "equiforceplugin.so"


def _candidate_dirs() -> List[str]:
    # the package directory equiforce/ (this file is equiforce/integrations/lammps.py)
    dirs = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    # editable installs (scikit-build-core "redirect" mode) keep compiled files in site-packages
    # while the Python sources stay in the checkout: ask the import system where the compiled
    # runtime module of this package is, without importing it (no torch load here)
    try:
        spec = importlib.util.find_spec("equiforce._runtime")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        dirs.append(os.path.dirname(os.path.abspath(spec.origin)))
    return dirs


def plugin_path() -> Optional[str]:
    """Full path of the installed ``equiforceplugin.so``, or None when it was not built."""
    for d in _candidate_dirs():
        path = os.path.join(d, PLUGIN_NAME)
        if os.path.isfile(path):
            return path
    return None


def plugin_dir() -> str:
    """Directory holding ``equiforceplugin.so`` (the ``lammps.plugins`` entry point).

    Returns the package directory when the plugin was not built (LAMMPS then finds no plugin
    there and ``pair_style equiforce`` reports an unknown style).
    """
    path = plugin_path()
    return os.path.dirname(path) if path else _candidate_dirs()[0]


def torch_cpu_library() -> Optional[str]:
    """Path of libtorch's CPU library (the one with MKL's BLAS inside), None if not found."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "lib", "libtorch_cpu.so")
    return path if os.path.isfile(path) else None


def lammps_launcher_entry() -> str:
    """The ``lammps.plugins`` entry point: run by the ``lmp`` launcher of the lammps wheel before it
    starts the LAMMPS binary. Returns :func:`plugin_dir` and prepends libtorch's CPU library to
    ``LD_PRELOAD`` for that binary.

    Why: ``liblammps.so`` exports its own reference BLAS (``dgemm_``, ``dgemv_``, ``ddot_``), and
    it comes before libtorch in the process's symbol lookup, so libtorch's float64 matrix
    products bind to it instead of MKL: float64 models ran 2x slower in LAMMPS than in Python.
    Preloading libtorch puts MKL first (LAMMPS' own BLAS calls then use MKL too, same interface).
    ``EQUIFORCE_NO_PRELOAD=1`` skips it; the pair style warns at start-up when the override is
    in effect (custom launchers, the lammps Python module).
    """
    lib = torch_cpu_library()
    if lib and os.environ.get("EQUIFORCE_NO_PRELOAD") != "1":
        current = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
        if lib not in current:
            os.environ["LD_PRELOAD"] = ":".join([lib] + current)
    return plugin_dir()
