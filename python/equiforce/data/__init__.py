"""Data: extxyz structures and labels, graphs and batches, neighbour lists, GFN2-xTB reference data."""
