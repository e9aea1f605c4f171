"""ASE interface: ``from equiforce.ase import EquiforceCalculator``."""
from .ase_calculator import EquiforceCalculator  # noqa: F401
