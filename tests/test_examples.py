"""The shipped examples run as documented: `lmp -in examples/lammps/in.nve` from the repository root
with nothing else, and its first energy equals the ASE calculator on the same structure and model."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from ase.io import read

from equiforce.ase import EquiforceCalculator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(sys.prefix, "bin")


@pytest.mark.lammps
def test_lammps_nve_example_runs_and_matches_python():
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(["lmp", "-in", "examples/lammps/in.nve", "-var", "steps", "100", "-log", "none"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.search(r"equiforce NVE: 100 steps of 0.0005 ps, total-energy drift per atom = \S+ eV", proc.stdout)
    assert "serial-images path" in proc.stdout
    # thermo line of step 0: step temp pe ke etotal
    step0 = next(line.split() for line in proc.stdout.splitlines() if re.match(r"^\s+0\s", line))
    pe_lammps = float(step0[2])
    atoms = read(os.path.join(REPO, "examples", "lammps", "ethanol.data"), format="lammps-data",
                 atom_style="atomic")
    atoms.set_chemical_symbols([["H", "C", "O"][t - 1] for t in atoms.get_array("type")])
    atoms.pbc = False
    atoms.calc = EquiforceCalculator(os.path.join(REPO, "examples", "lammps", "ethanol_demo.pt"))
    assert abs(atoms.get_potential_energy() - pe_lammps) < 1e-8 * len(atoms)
    assert np.isfinite(atoms.get_forces()).all()
