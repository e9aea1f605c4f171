"""O(3) maths: irreps, real spherical harmonics, Clebsch-Gordan coefficients, rotations (plain torch)."""
