"""The compiled ops of equiforce (``libequiforce_ops.so``, source ``cpp/equiforce_ops.cpp``).

``torch.ops.equiforce.tp_scatter``: one interaction layer's gather, Clebsch-Gordan tensor product
and scatter-sum, fused on the CPU with its first derivatives (see the C++ file for the layout).
Exported files of models with fused kernels on (:meth:`equiforce.model.network.EquiforceModel.use_fused_kernels`,
the default of :meth:`~equiforce.model.network.EquiforceModel.for_export`) call it, so whatever loads such a
file must have the op registered: ``import equiforce`` modules that run models do it
(:func:`load_ops`); the LAMMPS plugin and the ``equiforce._runtime`` module link the library; other
C++ programs link or ``dlopen`` :func:`ops_library_path` before ``torch::jit::load``.
"""
import os
from typing import Optional

import torch

LIBRARY_NAME = "libequiforce_ops.so"
_loaded: Optional[bool] = None
_error: str = ""


def load_ops() -> bool:
    """Register the compiled ops (once per process); False when the library was not built."""
    global _loaded, _error
    if _loaded is None:
        try:
            # the pybind module links libequiforce_ops.so: importing it registers the ops once, at the
            # path the LAMMPS plugin also links (a second registration of the namespace would fail)
            from .. import _runtime  # noqa: F401
            _loaded = hasattr(torch.ops.equiforce, "tp_scatter")
            if not _loaded:
                _error = "equiforce._runtime imported but equiforce::tp_scatter is not registered"
        except (ImportError, OSError, RuntimeError) as exc:
            _loaded = False
            _error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return bool(_loaded)


def ops_error() -> str:
    """Why :func:`load_ops` failed ('' when it did not)."""
    return _error


def ops_library_path() -> Optional[str]:
    """Full path of the installed ``libequiforce_ops.so`` (None when it was not built)."""
    if not load_ops():
        return None
    from .. import _runtime
    path = os.path.join(os.path.dirname(os.path.abspath(_runtime.__file__)), LIBRARY_NAME)
    return path if os.path.isfile(path) else None
