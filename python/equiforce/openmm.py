"""OpenMM interface (the public path): ``from equiforce.openmm import create_force, create_system, ...``.

The code lives in :mod:`equiforce.integrations.openmm`.
"""
from .integrations.openmm import *  # noqa: F401,F403
from .integrations.openmm import __all__  # noqa: F401
