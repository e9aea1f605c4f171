"""Engines: the ASE calculator, the OpenMM TorchForce helpers, the LAMMPS plugin locator."""
