"""glibc allocator setting for force calls on large systems.

glibc gives every block above its mmap threshold (dynamic, at most 32 MB) a fresh mapping that is
faulted in and zeroed again at every call; with per-edge tensors of 100+ MB (thousands of atoms)
that costs a third of a call. :func:`tune_malloc` raises the mmap threshold to 1 GB and the trim
threshold to 2 GB, so freed blocks stay in the heap for the next call (the process keeps its peak
size). The LAMMPS plugin does the same at start-up, and so do the Python entry points that run an
exported file (:class:`equiforce.deploy.runner.ExportedRunner`: the ASE calculator, ``equiforce
eval``/``check``) and the OpenMM helpers (``equiforce.openmm.create_module`` and everything built
on it: ``create_force``, ``create_system``, ``create_mixed_system``; ``deserialize_system``); the
setting is process-wide, so the same opt-out applies everywhere: ``EQUIFORCE_MALLOC_TUNING=0``, or
glibc's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set before starting Python (then
those win).
"""
import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30      # bytes
TRIM_THRESHOLD = 2**31 - 1    # bytes (mallopt takes an int)


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds; True when applied. Does nothing (False) on a C
    library without ``mallopt``, when ``EQUIFORCE_MALLOC_TUNING=0``, or when the user already set
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``."""
    if os.environ.get("EQUIFORCE_MALLOC_TUNING") == "0":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
