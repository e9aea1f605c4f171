"""ASE interface (the public path): ``from equiforce.ase import EquiforceCalculator``.

The code lives in :mod:`equiforce.integrations.ase`.
"""
from .integrations.ase import EquiforceCalculator  # noqa: F401
