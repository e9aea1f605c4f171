"""equiforce.data.neighbors.neighbor_list against ASE's neighbour list (an independent implementation).

From Python the candidates come from vesin, inside TorchScript from the pure-torch cell list; the
tests below run both (``scripted()``, and the two engines side by side on random cells).

Edges are compared as sets of (i, j, cell_shift). In float64 the sets must be identical; in float32
they may differ only by pairs whose float64 distance is within 1e-4 Å of the cutoff (the distance
test runs in the dtype of the positions).
"""
import ase
import numpy as np
import pytest
import torch
from ase.neighborlist import neighbor_list as ase_neighbor_list

from equiforce.data import neighbors
from equiforce.data.neighbors import neighbor_list
from helpers import random_triclinic_cell

DTYPES = [torch.float64, torch.float32]
BORDER = 1e-4  # Å; float32 may disagree with ASE only this close to the cutoff

_scripted = None


def scripted():
    global _scripted
    if _scripted is None:
        _scripted = torch.jit.script(neighbor_list)
    return _scripted


def run_ours(atoms, r_max, dtype, cell=None, fn=neighbor_list):
    pos = torch.tensor(atoms.positions, dtype=dtype)
    c = torch.tensor(atoms.cell.array if cell is None else cell, dtype=dtype)
    pbc = torch.tensor([bool(p) for p in atoms.pbc])
    return fn(pos, r_max, c, pbc)


def edge_set(i, j, s):
    return set(zip(np.asarray(i).tolist(), np.asarray(j).tolist(), map(tuple, np.asarray(s).tolist())))


_ase_cache = {}


def ase_edges(atoms, r_max):
    """ASE's (i, j, S) set, cached so the float32 and float64 variants of a test pay for it once."""
    key = (atoms.positions.tobytes(), atoms.cell.array.tobytes(), tuple(atoms.pbc), r_max)
    if key not in _ase_cache:
        _ase_cache[key] = edge_set(*ase_neighbor_list("ijS", atoms, r_max))
    return _ase_cache[key]


def check_against_ase(atoms, r_max, dtype, cell=None):
    """Compare with ASE, check invariants of the output; returns our (edge_index, edge_shift, cell_shift)."""
    edge_index, edge_shift, cell_shift = run_ours(atoms, r_max, dtype, cell)
    assert edge_index.dtype == torch.long and cell_shift.dtype == torch.long and edge_shift.dtype == dtype
    assert edge_index.shape[0] == 2 and edge_shift.shape == (edge_index.shape[1], 3) == cell_shift.shape
    ref = ase_edges(atoms, r_max)
    got = edge_set(edge_index[0], edge_index[1], cell_shift)
    assert len(got) == edge_index.shape[1], "duplicate edges"
    full_cell = np.asarray(atoms.cell.complete())
    diff = ref ^ got
    if dtype == torch.float64:
        assert not diff, f"{len(ref - got)} pairs missing, {len(got - ref)} extra (of {len(ref)})"
    else:
        for a, b, sh in diff:
            d = np.linalg.norm(atoms.positions[b] - atoms.positions[a] + np.array(sh) @ full_cell)
            assert abs(d - r_max) < BORDER, f"pair {(a, b, sh)} at {d} Å disagrees with ASE away from the cutoff"
    # exact geometry: edge_shift = cell_shift @ cell, |pos[j] - pos[i] + shift| < r_max
    c = torch.tensor(atoms.cell.array if cell is None else cell, dtype=torch.float64)
    pbc = torch.tensor([bool(p) for p in atoms.pbc])
    assert not bool((cell_shift[:, ~pbc] != 0).any()), "image shift along a non-periodic direction"
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(edge_shift.double().numpy(), (cell_shift.double() @ c).numpy(),
                               atol=tol * 10 * max(1.0, float(c.abs().max())))
    pos = torch.tensor(atoms.positions, dtype=dtype)
    vec = pos[edge_index[1]] - pos[edge_index[0]] + edge_shift
    assert bool((vec.norm(dim=1) < r_max).all())
    # no self pair at zero shift; sorted by (i, j, shift)
    assert not bool(((edge_index[0] == edge_index[1]) & (cell_shift == 0).all(1)).any())
    keys = [tuple(k) for k in torch.cat([edge_index.T, cell_shift], 1).tolist()]
    assert keys == sorted(keys)
    return edge_index, edge_shift, cell_shift


def displaced(atoms, rng, lattice_steps=2):
    """Move atoms by random whole lattice vectors (plus pbc-free noise stays inside): tests unwrapped input."""
    atoms = atoms.copy()
    steps = rng.integers(-lattice_steps, lattice_steps + 1, size=(len(atoms), 3)) * atoms.pbc
    atoms.positions += steps @ atoms.cell.array
    return atoms


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_triclinic(seed, dtype):
    rng = np.random.default_rng(seed)
    cell = random_triclinic_cell(rng, length=7.0, skew=0.35)
    n = int(rng.integers(5, 40))
    atoms = ase.Atoms("H" * n, scaled_positions=rng.random((n, 3)), cell=cell, pbc=True)
    check_against_ase(displaced(atoms, rng), float(rng.uniform(2.5, 5.0)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pbc", [[True, True, True], [True, True, False]])
def test_strongly_skewed_cell(pbc, dtype):
    """Plane spacings 1-2 Å with a 4 Å cutoff (the internal basis reduction changes the images)."""
    rng = np.random.default_rng(7)
    cell = np.array([[6.0, 0.0, 0.0], [5.6, 1.5, 0.0], [-5.2, 1.1, 2.0]])
    atoms = ase.Atoms("H" * 60, scaled_positions=rng.random((60, 3)), cell=cell, pbc=pbc)
    edge_index, _, cell_shift = check_against_ase(displaced(atoms, rng), 4.0, dtype)
    assert int(cell_shift.abs().max()) >= 3  # many images needed


@pytest.mark.parametrize("dtype", DTYPES)
def test_cell_smaller_than_cutoff(dtype):
    cell = np.array([[2.0, 0.0, 0.0], [0.4, 1.8, 0.0], [0.2, 0.3, 2.2]])
    atoms = ase.Atoms("H2", positions=[[0.1, 0.2, 0.3], [1.2, 1.0, 1.1]], cell=cell, pbc=True)
    edge_index, _, cell_shift = check_against_ase(atoms, 5.0, dtype)
    self_images = (edge_index[0] == edge_index[1])
    assert int(self_images.sum()) > 50  # an atom sees many of its own images


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pbc", [[True, True, False], [False, True, False], [True, False, True]])
def test_mixed_pbc(pbc, dtype):
    rng = np.random.default_rng(11)
    cell = random_triclinic_cell(rng, length=5.0, skew=0.2)
    atoms = ase.Atoms("H" * 30, scaled_positions=rng.random((30, 3)), cell=cell, pbc=pbc)
    atoms = displaced(atoms, rng)
    atoms.positions += (rng.normal(size=(30, 3)) * ~atoms.pbc) @ cell * 0.6  # spread along non-periodic vectors
    check_against_ase(atoms, 4.0, dtype)
    # the cell rows of non-periodic directions are not used: zeros give the same edges
    zero_rows = cell * np.array(pbc)[:, None]
    check_against_ase(atoms, 4.0, dtype, cell=zero_rows)


@pytest.mark.parametrize("dtype", DTYPES)
def test_isolated_molecule_and_lonely_atom(dtype):
    rng = np.random.default_rng(3)
    pos = rng.normal(size=(20, 3)) * 1.5
    pos = np.vstack([pos, [[40.0, 0.0, 0.0]]])  # atom 20 has no neighbours
    atoms = ase.Atoms("H" * 21, positions=pos)  # pbc False, cell zeros
    edge_index, _, cell_shift = check_against_ase(atoms, 3.0, dtype)
    assert not bool((edge_index == 20).any())
    assert not bool(cell_shift.any())


def test_single_atom_and_empty():
    for pbc in ([False] * 3, [True] * 3):
        atoms = ase.Atoms("H", positions=[[0.5, 0.5, 0.5]], cell=np.eye(3) * 10.0, pbc=pbc)
        edge_index, _, _ = check_against_ase(atoms, 3.0, torch.float64)
        assert edge_index.shape == (2, 0)
    ei, es, cs = neighbor_list(torch.zeros((0, 3)), 3.0, torch.eye(3), torch.tensor([True] * 3))
    assert ei.shape == (2, 0) and es.shape == (0, 3) and cs.shape == (0, 3)


def test_two_atoms_at_same_position():
    pos = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    ei, es, cs = neighbor_list(pos, 2.0, torch.zeros(3, 3, dtype=torch.float64), torch.tensor([False] * 3))
    assert ei.tolist() == [[0, 1], [1, 0]]
    assert float(es.abs().max()) == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_cutoff_is_strict(dtype):
    pos = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.9990234375, 0.0]], dtype=dtype)
    ei, _, _ = neighbor_list(pos, 2.0, torch.zeros(3, 3, dtype=dtype), torch.tensor([False] * 3))
    assert ei.tolist() == [[0, 2], [2, 0]]  # distance exactly r_max is out, just below is in
    # periodic: an atom's own image at exactly r_max is out
    ei, _, _ = neighbor_list(pos[:1], 2.0, torch.eye(3, dtype=dtype) * 2.0, torch.tensor([True] * 3))
    assert ei.shape[1] == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_system_cell_list(dtype):
    """2000 atoms in a triclinic cell much larger than the cutoff: the binned path, exact vs ASE."""
    rng = np.random.default_rng(5)
    cell = np.array([[24.0, 0.0, 0.0], [5.0, 23.0, 0.0], [-4.0, 3.0, 22.0]])
    n = 2000
    atoms = ase.Atoms("H" * n, scaled_positions=rng.random((n, 3)), cell=cell, pbc=True)
    edge_index, _, _ = check_against_ase(displaced(atoms, rng, 1), 3.5, dtype)
    assert edge_index.shape[1] > 20 * n


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_slab_and_cluster(dtype):
    """Binning along non-periodic directions (slab, then a cluster with no cell)."""
    rng = np.random.default_rng(6)
    n = 800
    cell = np.array([[18.0, 0.0, 0.0], [6.0, 17.0, 0.0], [0.0, 0.0, 0.0]])
    frac = rng.random((n, 3))
    pos = frac[:, :2] @ cell[:2] + 0.0
    pos = np.hstack([pos[:, :2], rng.uniform(-8.0, 8.0, size=(n, 1))])
    slab = ase.Atoms("H" * n, positions=pos, cell=cell + np.diag([0, 0, 1.0]), pbc=[True, True, False])
    check_against_ase(slab, 3.5, dtype, cell=cell)
    cluster = ase.Atoms("H" * n, positions=rng.normal(size=(n, 3)) * 6.0)
    check_against_ase(cluster, 3.0, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scripted_matches_eager(dtype):
    rng = np.random.default_rng(9)
    tri = random_triclinic_cell(rng, 6.0)
    cases = [
        (ase.Atoms("H" * 30, scaled_positions=rng.random((30, 3)), cell=tri, pbc=True), 4.0),
        (ase.Atoms("H" * 300, scaled_positions=rng.random((300, 3)), cell=np.eye(3) * 14.0, pbc=[True, False, True]),
         3.0),
        (ase.Atoms("H" * 25, positions=rng.normal(size=(25, 3)) * 2.0), 2.5),
    ]
    for atoms, r_max in cases:
        eager = run_ours(atoms, r_max, dtype)
        script = run_ours(atoms, r_max, dtype, fn=scripted())
        for a, b in zip(eager, script):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_bad_input_raises():
    pos = torch.zeros((2, 3), dtype=torch.float64)
    cell = torch.eye(3, dtype=torch.float64) * 5.0
    pbc = torch.tensor([True, True, True])
    with pytest.raises(ValueError, match="r_max"):
        neighbor_list(pos, 0.0, cell, pbc)
    with pytest.raises(ValueError, match="r_max"):
        neighbor_list(pos, -1.0, cell, pbc)
    with pytest.raises(ValueError, match=r"shape \[N, 3\]"):
        neighbor_list(torch.zeros((2, 2), dtype=torch.float64), 3.0, cell, pbc)
    with pytest.raises(ValueError, match=r"cell must have shape"):
        neighbor_list(pos, 3.0, torch.eye(2, dtype=torch.float64), pbc)
    with pytest.raises(ValueError, match=r"pbc must have shape"):
        neighbor_list(pos, 3.0, cell, torch.tensor([True, True]))
    with pytest.raises(ValueError, match="zero length"):
        neighbor_list(pos, 3.0, torch.zeros(3, 3, dtype=torch.float64), pbc)
    degenerate = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 5.0, 0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="degenerate"):
        neighbor_list(pos, 3.0, degenerate, pbc)
    with pytest.raises(ValueError, match="parallel"):
        neighbor_list(pos, 3.0, torch.tensor([[5.0, 0, 0], [10.0, 0, 0], [0, 0, 0]], dtype=torch.float64),
                      torch.tensor([True, True, False]))
    with pytest.raises(ValueError, match="NaN"):
        neighbor_list(torch.full((2, 3), float("nan"), dtype=torch.float64), 3.0, cell, pbc)
    # the same checks hold in TorchScript (raised as torch.jit.Error carrying the message)
    with pytest.raises(Exception, match="r_max"):
        scripted()(pos, 0.0, cell, pbc)


# ---- the two engines (vesin from Python, the cell list in TorchScript) -------------------------------

def _both_engines(atoms, r_max, dtype, cell=None):
    """(vesin result or None, cell-list result), each as neighbor_list returns it."""
    pos = torch.tensor(atoms.positions, dtype=dtype)
    c = torch.tensor(atoms.cell.array if cell is None else cell, dtype=dtype)
    pbc = torch.tensor([bool(p) for p in atoms.pbc])
    frame = neighbors._complement_frame(c.double(), pbc)
    found = neighbors._vesin_candidates(pos, r_max, frame, pbc)
    via_vesin = None if found is None else neighbors._exact_pairs(pos, r_max, c, *found)
    via_cells = neighbors._exact_pairs(pos, r_max, c, *neighbors._cell_list_candidates(pos, r_max, c.double(), pbc))
    return via_vesin, via_cells


@pytest.mark.parametrize("seed", range(24))
def test_vesin_matches_ase_and_cell_list(seed):
    """Random triclinic cells (some thinner than the cutoff), every pbc combination, unwrapped
    positions, spread along non-periodic directions, zero or given non-periodic cell rows: the
    vesin-backed edges equal ASE's exactly in float64, and equal the cell list's bit for bit (the
    TorchScript path) in float64 and float32."""
    rng = np.random.default_rng(100 + seed)
    pbc = [bool(b) for b in rng.integers(0, 2, 3)] if seed >= 2 else [[True] * 3, [False] * 3][seed]
    length = float(rng.choice([1.8, 3.0, 5.0, 8.0]))
    cell = random_triclinic_cell(rng, length=length, skew=float(rng.uniform(0.0, 0.4)))
    n = int(rng.integers(1, 60))
    r_max = float(rng.uniform(2.0, 5.5))
    atoms = ase.Atoms("H" * n, scaled_positions=rng.random((n, 3)), cell=cell, pbc=pbc)
    atoms = displaced(atoms, rng)
    atoms.positions += (rng.normal(size=(n, 3)) * ~atoms.pbc) @ cell * 1.5
    given = None if seed % 3 else cell * np.array(pbc)[:, None]  # zeros on non-periodic rows
    check_against_ase(atoms, r_max, torch.float64, cell=given)  # neighbor_list itself (vesin here)
    for dtype in DTYPES:
        via_vesin, via_cells = _both_engines(atoms, r_max, dtype, cell=given)
        assert via_vesin is not None, "vesin not used for an ordinary structure"
        for a, b in zip(via_vesin, via_cells):
            assert a.dtype == b.dtype and torch.equal(a, b)


def _brute_force(pos, r_max, cell, pbc, reach):
    """All (i, j, S) with |pos[j] - pos[i] + S @ cell| < r_max, images up to ``reach`` cells along
    periodic directions (numpy, O(N^2 * images)): the reference for the cases ASE cannot bin."""
    ranges = [range(-reach, reach + 1) if p else range(1) for p in pbc]
    out = set()
    for sx in ranges[0]:
        for sy in ranges[1]:
            for sz in ranges[2]:
                s = np.array([sx, sy, sz])
                d = pos[None, :, :] - pos[:, None, :] + s @ cell
                i, j = np.nonzero((d * d).sum(-1) < r_max * r_max)
                for a, b in zip(i.tolist(), j.tolist()):
                    if a != b or s.any():
                        out.add((a, b, (sx, sy, sz)))
    return out


@pytest.mark.parametrize("case", ["plane_1e5", "slab_1e3", "wire_1e4", "sparse_periodic_1e6", "far_unwrapped"])
def test_vesin_guard(case):
    """Geometries where vesin 0.6.2 must not be called: SIGFPE (a cell count truncates to 0 when it
    caps its cells for a very anisotropic box), minutes of search (mixed pbc with a large vacuum),
    int32 cell indices. neighbor_list gives the exact edges there (vesin padded, or the cell list),
    without crashing; a brute-force all-pairs search is the reference."""
    base = np.array([[0.0, 0.0, 0.0], [1.0, 0.2, 0.0], [2.5, -0.3, 0.4]])
    cell = np.diag([10.0, 10.0, 10.0])
    if case == "plane_1e5":
        pos, pbc = np.vstack([base, base + [1e5, 1e5, 0.0]]), [False] * 3
    elif case == "slab_1e3":
        pos, pbc = np.vstack([base, base + [0.0, 0.0, 1e3]]), [True, True, False]
    elif case == "wire_1e4":
        pos, pbc = np.vstack([base, base + [3e3, 1e4, 0.0]]), [False, False, True]
    elif case == "sparse_periodic_1e6":
        cell = np.diag([1e6, 1e6, 3.0])
        pos, pbc = np.vstack([base, base + [5e5, 0.0, 0.0]]), [True] * 3
    else:
        pos, pbc = np.vstack([base, base + 4.0]) + [3e7, 0.0, 0.0], [True] * 3
    r_max = 3.0
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    ei, es, cs = neighbor_list(t(pos), r_max, t(cell), torch.tensor(pbc))
    got = edge_set(ei[0], ei[1], cs)
    ref = _brute_force(pos, r_max, cell, pbc, reach=2)
    assert got == ref and len(ref) > 0
    np.testing.assert_allclose(es.numpy(), cs.double().numpy() @ cell, atol=0)
    # the guard is what keeps vesin away from the crashing geometries
    if case in ("plane_1e5", "sparse_periodic_1e6", "far_unwrapped"):
        frame = neighbors._complement_frame(t(cell), torch.tensor(pbc))
        assert neighbors._vesin_box(t(pos), r_max, frame, torch.tensor(pbc)) is None
