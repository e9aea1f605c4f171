"""Equivariant building blocks: linear maps, gates, radial bases, tensor products, output heads, electrostatics."""
