"""equiforce: E(3)-equivariant interatomic potentials, trained in Python, run in LAMMPS and OpenMM.

Units everywhere inside the package: energies in eV, lengths in Å, forces in eV/Å,
stress in eV/Å^3 (ASE sign convention: stress = (1/V) dE/dstrain), virial in eV.
"""

__version__ = "0.1.0"

# Version of the exported-file contract (see equiforce/export.py). Engines refuse files
# whose format_version they do not know.
FORMAT_VERSION = 1
