"""OpenMM interface (the public path): ``from equiforce.openmm import create_force, create_system, ...``.

The code lives in :mod:`equiforce.integrations.openmm`; the committee reporter (energy and force
uncertainty of a committee file during a simulation) in :mod:`equiforce.integrations.openmm_reporter`.
"""
from .integrations.openmm import *  # noqa: F401,F403
from .integrations.openmm import __all__ as _base_all
from .integrations.openmm_reporter import CommitteeReporter, UncertaintyThresholdExceeded, UncertaintyWarning

__all__ = list(_base_all) + ["CommitteeReporter", "UncertaintyThresholdExceeded", "UncertaintyWarning"]
