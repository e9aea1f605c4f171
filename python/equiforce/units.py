"""Units and dtype names, in one place.

Inside equiforce: energies in eV, lengths in Å, forces in eV/Å, stress in eV/Å^3 (ASE sign
convention: stress = (1/V) dE/dstrain), virial in eV, charges in e, dipoles in e·Å. Engines convert
at their boundary only: OpenMM works in kJ/mol and nm (:mod:`equiforce.integrations.openmm_module`),
LAMMPS runs ``units metal`` (eV, Å: no conversion), ASE uses eV and Å.
"""
import torch

# CODATA 2018: 1 eV = 96.48533212331002 kJ/mol (e * N_A / 1000)
EV_TO_KJ_PER_MOL = 96.48533212331002
NM_TO_ANGSTROM = 10.0
# Coulomb constant e^2 / (4 pi eps0) in eV·Å/e^2
COULOMB_CONSTANT = 14.399645

# Polarizability: equiforce uses e·Å²/V (dipole e·Å per field V/Å). The polarizability VOLUME
# alpha / (4 pi eps0) in Å^3 is alpha[e·Å²/V] * COULOMB_CONSTANT; one atomic unit (bohr^3 as a
# volume) is 0.529177210903^3 Å^3 = 0.148184711 Å^3.
POLARIZABILITY_VOLUME_A3 = COULOMB_CONSTANT  # Å^3 per e·Å²/V
BOHR3_IN_A3 = 0.529177210903 ** 3

# model dtypes by the names used in configuration files and exported metadata
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def dtype_from_name(name: str) -> torch.dtype:
    """``torch.float32`` / ``torch.float64`` for ``"float32"`` / ``"float64"``; ValueError otherwise."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype '{name}'; use one of {sorted(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """``"float32"`` / ``"float64"`` for the torch dtype; ValueError for any other dtype."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported model dtype {dtype}; use torch.float32 or torch.float64")


# Closest approach (Å) any structure may have: training data with a pair closer than this is
# refused, and every engine stops with an error naming the atoms (two atoms on top of each other
# give a finite, plausible energy in a message-passing model, so MD would never notice).
# Exported files record it as metadata["min_distance"].
MIN_DISTANCE = 0.5
