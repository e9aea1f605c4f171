"""The equivariant building blocks against e3nn (the independent oracle), float64 unless stated.

Tolerances: 1e-10 for float64 identities and equivariance, 1e-4 for float32 equivariance.
"""
import numpy as np
import pytest
import torch
from e3nn import o3

from equiforce.o3.clebsch_gordan import clebsch_gordan, wigner_D
from equiforce.nn.gate import Gate
from equiforce.o3.irreps import Irrep, Irreps, spherical_harmonics_irreps
from equiforce.nn.linear import Linear, SpeciesLinear
from equiforce.model.network import InteractionLayer
from equiforce.nn.radial import BesselBasis, polynomial_cutoff
from equiforce.o3.spherical_harmonics import SphericalHarmonics, spherical_harmonics
from equiforce.nn.tensor_product import EdgeTensorProduct

F64 = torch.float64


@pytest.fixture(autouse=True)
def e3nn_in_float64():
    """e3nn builds its Wigner D matrices in the default dtype; make that float64 so the oracle is exact."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def D_of(irreps: Irreps, R: torch.Tensor) -> torch.Tensor:
    """Block-diagonal representation matrix of ``irreps`` for an orthogonal R (e3nn's, parity included)."""
    return o3.Irreps(str(irreps)).D_from_matrix(R)


def random_orthogonal(seed: int, improper: bool, dtype=F64) -> torch.Tensor:
    torch.manual_seed(seed)
    R = o3.rand_matrix(dtype=torch.float64)
    return (-R if improper else R).to(dtype)


def test_irreps_parsing_and_layout():
    ir = Irreps("32x0e + 16x1o+8x2e")
    assert ir.dim == 32 + 48 + 40
    assert str(ir) == "32x0e + 16x1o + 8x2e"
    assert ir.slices() == [(0, 32), (32, 80), (80, 120)]
    assert list(Irrep(1, -1) * Irrep(1, -1)) == [Irrep(0, 1), Irrep(1, 1), Irrep(2, 1)]
    assert Irreps("2x1o + 3x1o + 0x0e").simplify() == Irreps("5x1o")
    assert o3.Irreps(str(ir)).dim == ir.dim
    with pytest.raises(ValueError, match="cannot parse"):
        Irreps("3x1q")


@pytest.mark.parametrize("lmax", [0, 1, 2, 3, 4, 6])
def test_spherical_harmonics_equal_e3nn(lmax):
    torch.manual_seed(lmax)
    vec = torch.randn(200, 3, dtype=F64) * 3.0
    ours = SphericalHarmonics(lmax)(vec)
    ref = o3.spherical_harmonics(list(range(lmax + 1)), vec, normalize=True, normalization="component")
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() < 1e-10
    # component normalisation: sum_m Y_lm^2 = 2l+1
    for l in range(lmax + 1):
        assert torch.allclose((ours[:, l * l:(l + 1) ** 2] ** 2).sum(1), torch.full((200,), 2.0 * l + 1, dtype=F64))


def test_spherical_harmonics_zero_vector_and_poles_are_finite():
    vec = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, -1.0, 0.0]], dtype=F64, requires_grad=True)
    y = SphericalHarmonics(3)(vec)
    assert torch.equal(y[0], torch.tensor([1.0] + [0.0] * 15, dtype=F64))
    ref = o3.spherical_harmonics(list(range(4)), vec[1:].detach(), normalize=True, normalization="component")
    assert (y[1:] - ref).abs().max() < 1e-12
    (g,) = torch.autograd.grad(y.sum(), vec)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("l", [0, 1, 2, 3, 4])
def test_wigner_D_equals_e3nn(l):
    R = random_orthogonal(l, improper=False)
    ref = o3.wigner_D(l, *o3.matrix_to_angles(R))
    assert np.abs(wigner_D(l, R.numpy()) - ref.numpy()).max() < 1e-10


def test_clebsch_gordan_equal_e3nn_up_to_documented_sign():
    worst = 0.0
    for l1 in range(5):
        for l2 in range(5):
            for l3 in range(abs(l1 - l2), min(l1 + l2, 5) + 1):
                ours = clebsch_gordan(l1, l2, l3)
                ref = o3.wigner_3j(l1, l2, l3, dtype=F64).numpy()
                worst = max(worst, min(np.abs(ours - ref).max(), np.abs(ours + ref).max()))
                # the convention that fixes our sign: largest entry (first among ties) positive
                flat = ours.reshape(-1)
                k = int(np.argmax(np.abs(flat) > np.abs(flat).max() - 1e-9))
                assert flat[k] > 0
    assert worst < 1e-10


def test_clebsch_gordan_is_invariant_under_e3nn_rotations():
    R = random_orthogonal(7, improper=False)
    a, b, c = o3.matrix_to_angles(R)
    for l1, l2, l3 in [(1, 1, 1), (1, 2, 3), (2, 2, 2), (3, 3, 2), (2, 3, 4)]:
        C = torch.from_numpy(clebsch_gordan(l1, l2, l3))
        rotated = torch.einsum("ijk,ia,jb,kc->abc", C, o3.wigner_D(l1, a, b, c), o3.wigner_D(l2, a, b, c),
                               o3.wigner_D(l3, a, b, c))
        assert (rotated - C).abs().max() < 1e-12
    assert np.abs(clebsch_gordan(1, 1, 3)).max() == 0.0  # not a triangle


def _check_equivariance(f, x, irreps_in, irreps_out, R, tol):
    out_of_rotated = f(x @ D_of(irreps_in, R).T.to(x.dtype))
    rotated_out = f(x) @ D_of(irreps_out, R).T.to(x.dtype)
    assert (out_of_rotated - rotated_out).abs().max() < tol


CASES = [(F64, 1e-10), (torch.float32, 1e-4)]


@pytest.mark.parametrize("dtype,tol", CASES)
@pytest.mark.parametrize("improper", [False, True])
def test_linear_and_species_linear_equivariant(dtype, tol, improper):
    irreps_in = Irreps("5x0e + 3x1o + 2x1e + 4x2e + 2x3o")
    irreps_out = Irreps("4x0e + 6x1o + 1x1e + 3x2e + 2x0o")
    R = random_orthogonal(1, improper)
    lin = Linear(irreps_in, irreps_out, bias=True).to(dtype)
    with torch.no_grad():
        lin.bias.normal_()
    x = torch.randn(7, irreps_in.dim, dtype=dtype)
    _check_equivariance(lin, x, irreps_in, irreps_out, R, tol)
    species = torch.tensor([0, 1, 2, 1, 0, 2, 2])
    sl = SpeciesLinear(irreps_in, irreps_out, 3).to(dtype)
    _check_equivariance(lambda v: sl(v, species), x, irreps_in, irreps_out, R, tol)
    # a 0o output block has no matching input here -> exactly zero
    assert lin(x)[:, -2:].abs().max() == 0


@pytest.mark.parametrize("dtype,tol", CASES)
@pytest.mark.parametrize("improper", [False, True])
def test_gate_equivariant(dtype, tol, improper):
    gate = Gate(Irreps("4x0e + 2x0o"), Irreps("3x1o + 2x2e + 1x1e")).to(dtype)
    R = random_orthogonal(2, improper)
    x = torch.randn(9, gate.irreps_in.dim, dtype=dtype)
    _check_equivariance(gate, x, gate.irreps_in, gate.irreps_out, R, tol)


@pytest.mark.parametrize("dtype,tol", CASES)
@pytest.mark.parametrize("improper", [False, True])
def test_edge_tensor_product_equivariant(dtype, tol, improper):
    irreps_in = Irreps("3x0e + 2x1o + 2x2e")
    irreps_sh = spherical_harmonics_irreps(3)
    allowed = {Irrep(0, 1), Irrep(1, -1), Irrep(1, 1), Irrep(2, 1), Irrep(3, -1), Irrep(0, -1)}
    tp = EdgeTensorProduct(irreps_in, irreps_sh, allowed).to(dtype)
    torch.manual_seed(3)
    vec = torch.randn(11, 3, dtype=dtype)
    x = torch.randn(11, irreps_in.dim, dtype=dtype)
    w = torch.randn(11, tp.weight_numel, dtype=dtype)
    R = random_orthogonal(3, improper, dtype)
    sh = SphericalHarmonics(3)
    out = tp(x @ D_of(irreps_in, R).T.to(dtype), sh(vec @ R.T), w)
    ref = tp(x, sh(vec), w) @ D_of(tp.irreps_out, R).T.to(dtype)
    assert (out - ref).abs().max() < tol


def test_edge_tensor_product_equals_explicit_cg_contraction():
    """Each path equals w * sqrt(2l3+1) * sum_ij C_ij^k x_i Y_j, with C from e3nn (up to its sign)."""
    irreps_in = Irreps("2x1o + 1x2e")
    tp = EdgeTensorProduct(irreps_in, spherical_harmonics_irreps(2), {Irrep(l, p) for l in range(4) for p in (1, -1)})  # drops l3=4
    torch.manual_seed(4)
    vec = torch.randn(5, 3, dtype=F64)
    x = torch.randn(5, irreps_in.dim, dtype=F64)
    w = torch.randn(5, tp.weight_numel, dtype=F64)
    y = SphericalHarmonics(2)(vec)
    out = tp(x, y, w)
    col, wcol = 0, 0
    sh_sl = spherical_harmonics_irreps(2).slices()
    for (mul, ir1), (a, b) in zip(irreps_in, irreps_in.slices()):
        for l2 in range(3):
            for ir3 in ir1 * Irrep(l2, (-1) ** l2):
                if ir3.l > 3:
                    continue
                C = o3.wigner_3j(ir1.l, l2, ir3.l, dtype=F64)
                xb = x[:, a:b].reshape(5, mul, ir1.dim)
                ref = torch.einsum("eui,ej,ijk->euk", xb, y[:, sh_sl[l2][0]:sh_sl[l2][1]], C) * (2 * ir3.l + 1) ** 0.5
                ref = ref * w[:, wcol:wcol + mul].unsqueeze(-1)
                got = out[:, col:col + mul * ir3.dim].reshape(5, mul, ir3.dim)
                assert min((got - ref).abs().max(), (got + ref).abs().max()) < 1e-12
                col += mul * ir3.dim
                wcol += mul
    assert col == out.shape[1] and wcol == tp.weight_numel


@pytest.mark.parametrize("dtype,tol", CASES)
@pytest.mark.parametrize("improper", [False, True])
def test_interaction_layer_equivariant(dtype, tol, improper):
    torch.manual_seed(5)
    irreps_in = Irreps("4x0e + 4x1o + 4x2e")
    layer = InteractionLayer(irreps_in, irreps_in, spherical_harmonics_irreps(2), 2, [8, 16], 3.0, True).to(dtype)
    n = 6
    pos = torch.randn(n, 3, dtype=dtype) * 1.5
    edge_index = torch.tensor([[i, j] for i in range(n) for j in range(n) if i != j]).T
    species = torch.tensor([0, 1, 0, 1, 1, 0])
    basis = BesselBasis(4.0, 8).to(dtype)

    def run(p, x):
        vec = p[edge_index[1]] - p[edge_index[0]]
        r = vec.norm(dim=1)
        return layer(x, species, edge_index, SphericalHarmonics(2)(vec), basis(r), polynomial_cutoff(r, 4.0))

    R = random_orthogonal(6, improper, dtype)
    x = torch.randn(n, irreps_in.dim, dtype=dtype)
    out = run(pos @ R.T, x @ D_of(irreps_in, R).T.to(dtype))
    ref = run(pos, x) @ D_of(layer.irreps_out, R).T.to(dtype)
    assert (out - ref).abs().max() < tol


def test_bessel_basis_finite_at_zero_and_matches_closed_form():
    b = BesselBasis(5.0, 4).double()
    r = torch.tensor([0.0, 1.3, 4.9], dtype=F64)
    got = b(r)
    n = torch.arange(1, 5, dtype=F64)
    ref = (2 / 5.0) ** 0.5 * torch.sin(n * np.pi * r[1:, None] / 5.0) / r[1:, None]
    assert (got[1:] - ref).abs().max() < 1e-12
    assert torch.allclose(got[0], (2 / 5.0) ** 0.5 * n * np.pi / 5.0)


def test_polynomial_cutoff_smooth_at_rmax():
    r = torch.tensor([4.999999, 5.0, 5.5], dtype=F64, requires_grad=True)
    env = polynomial_cutoff(r, 5.0)
    (g,) = torch.autograd.grad(env.sum(), r)
    # (1 - r/r_max)^p behaviour up to float64 cancellation in the polynomial
    assert env[0] < 1e-12 and env[1] == 0 and env[2] == 0
    assert g.abs().max() < 1e-8
    assert polynomial_cutoff(torch.tensor([0.0], dtype=F64), 5.0) == 1.0
