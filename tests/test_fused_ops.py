"""The compiled message-passing ops (cpp/equiforce_ops.cpp): ``equiforce::tp_scatter`` and
``equiforce::radial_pairs``, against independent references.

* the PyTorch path of the same model (itself checked against e3nn in test_equivariant_core.py):
  energies, per-atom energies, forces and virial in float64 to 1e-12 relative;
* finite differences (``torch.autograd.gradcheck``, float64) for every input gradient of the op, and
  (``gradgradcheck``) for the second derivatives of its training wrapper ``tp_scatter_differentiable``;
  force-loss gradients of whole models through it equal the PyTorch path's to 1e-10 relative;
* LAMMPS (serial, ghost shell, 2 MPI ranks) and OpenMM running the fused exported file against
  the portable export of the same weights (the PyTorch path) called from Python.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import helpers

from equiforce.deploy.export import export_model, load_exported
from equiforce.model.forces import forces_virial_from_edge_grad
from equiforce.data.neighbors import neighbor_list
from equiforce.deploy.ops import ops_library_path
from equiforce.nn.tensor_product import EdgeTensorProduct, FusedTensorProduct, tp_scatter_differentiable
from equiforce.o3.irreps import Irreps, spherical_harmonics_irreps
from lammps_util import deck, parse_result, python_reference, read_dump, run_lmp, write_data
from lammps_util import assert_matches, bulk, triclinic

F64 = torch.float64
SPECIES = ["Si", "C"]
REL = 1e-12  # float64: fused vs PyTorch path, relative to the largest value

CONFIGS = {
    "natural-O3-l1": dict(lmax=1),
    "natural-O3-l2": dict(lmax=2),
    "natural-SE3-l2": dict(lmax=2, symmetry="SE3"),
    "both-O3-l1": dict(lmax=1, feature_parity="both"),
    "natural-O3-l3": dict(lmax=3, num_layers=2),
}


MODEL = dict(r_max=3.5, channels=6, lmax=2, num_layers=3, num_bessel=6, radial_hidden=12, avg_num_neighbors=12.0,
             scale=[1.5, 0.7], shift=[-3.0, -1.0])


def make_model(seed=0, **kw):
    return helpers.make_model(SPECIES, seed, **{**MODEL, **kw})


def structure(kind, seed=1):
    """(pos, species, cell, pbc): a periodic cell small enough that atoms see several images of
    the same neighbour (reverse-edge pairing must stay unambiguous), or an open cluster."""
    rng = np.random.default_rng(seed)
    if kind == "periodic":
        cell = torch.tensor([[4.1, 0.0, 0.0], [0.6, 4.3, 0.0], [-0.4, 0.5, 4.6]], dtype=F64)
        frac = torch.tensor(rng.random((9, 3)), dtype=F64)
        pos, pbc = frac @ cell, torch.tensor([True] * 3)
    elif kind == "small_cell":  # lattice vectors < r_max: every atom sees its own images (i -> i edges)
        cell = torch.tensor([[2.9, 0.0, 0.0], [0.4, 3.1, 0.0], [0.3, -0.2, 3.3]], dtype=F64)
        pos, pbc = torch.tensor([[0.2, 0.3, 0.1], [1.6, 1.4, 1.9]], dtype=F64), torch.tensor([True] * 3)
    elif kind == "large":  # 250 atoms, jittered grid
        g = torch.stack(torch.meshgrid(*[torch.arange(5.0)] * 2, torch.arange(10.0), indexing="ij"), -1).reshape(-1, 3)
        pos = (g * 2.2 + torch.tensor(rng.normal(0, 0.15, (250, 3)))).to(F64)
        cell, pbc = torch.diag(torch.tensor([11.0, 11.0, 22.0], dtype=F64)), torch.tensor([True] * 3)
    else:
        cell = torch.zeros(3, 3, dtype=F64)
        pos, pbc = torch.tensor(rng.random((14, 3)) * 5.0, dtype=F64), torch.tensor([False] * 3)
    species = torch.tensor(rng.integers(0, 2, len(pos)), dtype=torch.long)
    return pos, species, cell, pbc


def outputs(model, pos, species, cell, pbc, fused):
    model.use_fused_kernels(fused)
    idx, shift, _ = neighbor_list(pos, model.r_max, cell, pbc)
    ev = (pos[idx[1]] - pos[idx[0]] + shift @ cell).detach().requires_grad_(True)
    n = len(pos)
    ea = model(species, idx, ev, torch.zeros(n, dtype=torch.long), 1)
    g, = torch.autograd.grad(ea.sum(), ev)
    f, v = forces_virial_from_edge_grad(g, ev, idx, n, torch.zeros(idx.shape[1], dtype=torch.long), 1)
    return {"per_atom_energy": ea.detach(), "forces": f, "virial": v[0]}


def assert_close(a, b, rel):
    scale = max(1.0, float(a.abs().max()))
    assert float((a - b).abs().max()) <= rel * scale, (float((a - b).abs().max()), scale)


# ---- fused vs PyTorch path ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["periodic", "small_cell", "open"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_equals_pytorch_path_float64(name, kind):
    model = make_model(**CONFIGS[name])
    pos, species, cell, pbc = structure(kind)
    ref = outputs(model, pos, species, cell, pbc, fused=False)
    got = outputs(model, pos, species, cell, pbc, fused=True)
    for key in ref:
        assert_close(ref[key], got[key], REL)
    assert float(ref["forces"].abs().max()) > 1e-4  # the comparison is not between zeros


def test_fused_float32_agrees_with_float64():
    """float32 through the fused op vs the float64 PyTorch path: rounding only (5e-5 relative)."""
    model = make_model(lmax=2)
    pos, species, cell, pbc = structure("periodic")
    ref = outputs(model, pos, species, cell, pbc, fused=False)
    m32 = make_model(lmax=2).float()
    got = outputs(m32, pos.float(), species, cell.float(), pbc, fused=True)
    for key in ref:
        assert_close(ref[key], got[key].double(), 5e-5)


def test_results_do_not_depend_on_the_thread_count():
    """250 atoms (~6 000 edges: every pass is split into several chunks), 1 vs 4 threads: bitwise."""
    model = make_model(lmax=2, num_layers=2)
    pos, species, cell, pbc = structure("large")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = outputs(model, pos, species, cell, pbc, fused=True)
        torch.set_num_threads(4)
        four = outputs(model, pos, species, cell, pbc, fused=True)
    finally:
        torch.set_num_threads(before)
    for key in one:
        assert torch.equal(one[key], four[key]), key  # every row is summed by one thread, in one order
    ref = outputs(model, pos, species, cell, pbc, fused=False)
    for key in ref:
        assert_close(ref[key], one[key], REL)


def test_no_edges_gives_zero_messages():
    """E = 0: the op returns exact zeros (its output is torch.empty, zeroed row by row) and an
    exported model gives every atom its per-species shift."""
    tp, ftp, x, sh, w, windex, src, dst, n = op_inputs()
    none = torch.zeros(0, dtype=torch.long)
    out = torch.ops.equiforce.tp_scatter(x, sh[:0], w, none, none, none, n, ftp.groups, ftp.kpath,
                                         ftp.cg)
    assert out.shape[0] == n and out.shape[1] > 0 and torch.equal(out, torch.zeros_like(out))
    model = make_model(lmax=1).for_export()
    species = torch.tensor([0, 1, 1])
    e = model(species, torch.zeros((2, 0), dtype=torch.long), torch.zeros((0, 3), dtype=F64),
              torch.zeros(3, dtype=torch.long), 1)
    assert torch.allclose(e, torch.tensor([-3.0, -1.0, -1.0], dtype=F64), rtol=0, atol=1e-12)


# ---- the op itself: finite differences and bad input ----------------------------------------------

OP_IRREPS = {"natural": ("3x0e+2x1o+2x2e", "3x0e+2x1o+2x2e+2x1e"),
             # both parities: blocks of equal l merged along channels (one group for 1o and 1e, ...)
             "both": ("2x0e+2x0o+2x1o+3x1e", "2x0e+2x0o+2x1o+2x1e+2x2e+2x2o"),
             "natural-l1": ("2x0e+3x1o", "2x0e+2x1o")}


def op_inputs(seed=0, shared_rows=True, irreps="natural", lmax=2):
    """Random inputs for one layer's op (harmonics l <= lmax)."""
    g = torch.Generator().manual_seed(seed)
    irreps_in, irreps_out = OP_IRREPS[irreps]
    tp = EdgeTensorProduct(Irreps(irreps_in), spherical_harmonics_irreps(lmax, True),
                           {m.ir for m in Irreps(irreps_out)})
    n, e = 5, 14
    src = torch.randint(0, n, (e,), generator=g)
    dst = torch.randint(0, n, (e,), generator=g)
    ftp = FusedTensorProduct(tp).double()
    dx = sum(d * m for d, m in zip(ftp.set_dims, ftp.set_muls))
    x = torch.randn(n, dx, dtype=F64, generator=g)
    sh = torch.randn(e, tp.irreps_sh.dim, dtype=F64, generator=g)
    rows = e // 2 + 1 if shared_rows else e
    windex = torch.randint(0, rows, (e,), generator=g) if shared_rows else torch.arange(e)
    w = torch.randn(rows, tp.weight_numel, dtype=F64, generator=g)
    return tp, ftp, x, sh, w, windex, src, dst, n


@pytest.mark.parametrize("irreps", list(OP_IRREPS))
@pytest.mark.parametrize("shared_rows", [False, True])
def test_tp_scatter_gradients_equal_finite_differences(shared_rows, irreps):
    tp, ftp, x, sh, w, windex, src, dst, n = op_inputs(shared_rows=shared_rows, irreps=irreps)
    if irreps == "both":
        assert any(len(blocks) > 1 for blocks in tp.gather_sets)  # merged groups are exercised
    cg = ftp.cg

    def f(x_, sh_, w_):
        return torch.ops.equiforce.tp_scatter(x_, sh_, w_, windex, src, dst, n, ftp.groups, ftp.kpath, cg)

    args = tuple(t.clone().requires_grad_(True) for t in (x, sh, w))
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("irreps,lmax", [("natural", 1), ("natural", 2), ("both", 2)])
@pytest.mark.parametrize("shared_rows", [False, True])
def test_differentiable_tp_scatter_first_and_second_derivatives(shared_rows, irreps, lmax):
    """The training wrapper (tp_scatter_differentiable: tp_scatter + tp_scatter_backward, derivatives
    of every order) against finite differences: gradcheck and gradgradcheck, float64."""
    if lmax == 1:
        irreps = "natural-l1"
    tp, ftp, x, sh, w, windex, src, dst, n = op_inputs(shared_rows=shared_rows, irreps=irreps, lmax=lmax)
    cg = ftp.cg

    def f(x_, sh_, w_):
        return tp_scatter_differentiable(x_, sh_, w_, windex, src, dst, n, ftp.groups, ftp.kpath, cg)

    args = tuple(t.clone().requires_grad_(True) for t in (x, sh, w))
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-8, rtol=1e-6)
    assert torch.autograd.gradgradcheck(f, args, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_tp_scatter_backward_op_equals_autograd_of_the_op():
    tp, ftp, x, sh, w, windex, src, dst, n = op_inputs()
    args = tuple(t.clone().requires_grad_(True) for t in (x, sh, w))
    out = torch.ops.equiforce.tp_scatter(*args, windex, src, dst, n, ftp.groups, ftp.kpath, ftp.cg)
    gout = torch.randn_like(out)
    ref = torch.autograd.grad(out, args, gout)
    got = torch.ops.equiforce.tp_scatter_backward(x, sh, w, windex, src, dst, n, ftp.groups, ftp.kpath, ftp.cg,
                                                  gout, True, True, True)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    part = torch.ops.equiforce.tp_scatter_backward(x, sh, w, windex, src, dst, n, ftp.groups, ftp.kpath, ftp.cg,
                                                   gout, False, True, False)
    assert part[0].numel() == 0 and part[2].numel() == 0 and torch.equal(part[1], ref[1])


def force_loss_gradients(model, kind, fused):
    """d(loss)/d(parameters) for a loss on energy, forces and virial (forces through create_graph)."""
    if fused:
        model.use_fused_kernels(True, double_backward=True)
    else:
        model.use_fused_kernels(False)
    pos, species, cell, pbc = structure(kind)
    idx, shift, _ = neighbor_list(pos, model.r_max, cell, pbc)
    ev = (pos[idx[1]] - pos[idx[0]] + shift @ cell).detach().requires_grad_(True)
    n = len(pos)
    ea = model(species, idx, ev, torch.zeros(n, dtype=torch.long), 1)
    g, = torch.autograd.grad(ea.sum(), ev, create_graph=True)
    f, v = forces_virial_from_edge_grad(g, ev, idx, n, torch.zeros(idx.shape[1], dtype=torch.long), 1)
    loss = ea.sum() ** 2 + (f ** 2).sum() + (v ** 2).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("kind", ["periodic", "open"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_force_loss_gradients_fused_equal_pytorch_path(name, kind):
    """Training through the fused op (double_backward, radial pairing on): the gradient of a force +
    virial + energy loss with respect to every parameter equals the PyTorch path's to 1e-10 relative
    (per parameter tensor, float64)."""
    model = make_model(**CONFIGS[name])
    ref = force_loss_gradients(model, kind, fused=False)
    got = force_loss_gradients(model, kind, fused=True)
    nonzero = 0
    for a, b in zip(ref, got):
        if a is None:
            assert b is None or float(b.abs().max()) == 0.0
            continue
        scale = float(a.abs().max())
        nonzero += scale > 0
        assert float((a - b).abs().max()) <= 1e-10 * max(scale, 1e-30), (float((a - b).abs().max()), scale)
    assert nonzero >= len(ref) // 2


@pytest.mark.parametrize("irreps", list(OP_IRREPS))
def test_tp_scatter_forward_equals_gather_product_scatter(irreps):
    tp, ftp, x, sh, w, windex, src, dst, n = op_inputs(irreps=irreps)
    out = ftp(split_sets(ftp, x), sh, w, windex, src, dst, n)
    xs = [h.index_select(0, src) for h in split_sets(ftp, x)]
    msgs = tp.forward_merged(xs, sh, w.index_select(0, windex))
    for a, m in zip(out, msgs):
        ref = torch.zeros((n,) + m.shape[1:], dtype=F64).index_add(0, dst, m)
        assert_close(ref, a, REL)


def split_sets(ftp, x):
    sizes = [d * m for d, m in zip(ftp.set_dims, ftp.set_muls)]
    return [b.reshape(x.shape[0], d, m) for b, d, m in zip(torch.split(x, sizes, dim=1), ftp.set_dims, ftp.set_muls)]


def _supported_isas():
    """The bodies of tp_scatter this CPU can run (cpp/equiforce_ops.cpp: avx512, avx2 + fma, sse2)."""
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    isas = ["sse2"]
    if {"avx2", "fma"} <= flags:
        isas.append("avx2")
        if "avx512f" in flags:
            isas.append("avx512")
    return isas


# run in a process whose tp_scatter body is the one named by EQUIFORCE_CPU_ISA: the fused path vs the
# PyTorch path of the same model (energies, forces, virial through all three passes of the op)
_ISA_PROBE = """
import sys, json, torch
sys.path.insert(0, {here!r})
import helpers
from equiforce.data.neighbors import neighbor_list
from equiforce.model.forces import forces_virial_from_edge_grad
cell = torch.tensor([[4.1, 0.0, 0.0], [0.6, 4.3, 0.0], [-0.4, 0.5, 4.6]], dtype=torch.float64)
pos = torch.rand((9, 3), dtype=torch.float64, generator=torch.Generator().manual_seed(1)) @ cell
species = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1])
worst, fmax = 0.0, 0.0
for extra in ({{"lmax": 2}}, {{"lmax": 1, "feature_parity": "both"}}):
    model = helpers.make_model(["Si", "C"], 0, **{{**{model!r}, **extra}})
    idx, shift, _ = neighbor_list(pos, model.r_max, cell, torch.tensor([True] * 3))
    res = []
    for fused in (False, True):
        model.use_fused_kernels(fused)
        ev = (pos[idx[1]] - pos[idx[0]] + shift @ cell).detach().requires_grad_(True)
        ea = model(species, idx, ev, torch.zeros(9, dtype=torch.long), 1)
        g, = torch.autograd.grad(ea.sum(), ev)
        f, v = forces_virial_from_edge_grad(g, ev, idx, 9, torch.zeros(idx.shape[1], dtype=torch.long), 1)
        res.append(torch.cat([ea.detach().reshape(-1), f.reshape(-1), v.reshape(-1)]))
    worst = max(worst, float((res[0] - res[1]).abs().max()) / max(1.0, float(res[0].abs().max())))
    fmax = max(fmax, float(res[0].abs().max()))
print(json.dumps({{"isa": torch.ops.equiforce.cpu_isa(), "rel": worst, "max": fmax}}))
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "sse2"])
def test_every_instruction_set_body_equals_the_pytorch_path(isa):
    """EQUIFORCE_CPU_ISA names the body the passes run (what an AVX2-only or older CPU picks by
    itself): each one reports itself through equiforce::cpu_isa and gives the PyTorch path's
    per-atom energies, forces and virial (float64, 1e-12 relative; lmax 2, and lmax 1 with both
    parities: merged groups)."""
    import json
    if isa not in _supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} body")
    env = dict(os.environ, EQUIFORCE_CPU_ISA=isa, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    code = _ISA_PROBE.format(here=os.path.dirname(os.path.abspath(__file__)), model=MODEL)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["isa"] == isa
    assert res["max"] > 1e-3  # not a comparison of zeros
    assert res["rel"] <= REL, res


def test_unknown_instruction_set_is_a_clear_error():
    env = dict(os.environ, EQUIFORCE_CPU_ISA="avx9", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-c", "import equiforce.deploy.ops as o, torch; o.load_ops(); "
                           "torch.ops.equiforce.cpu_isa()"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "EQUIFORCE_CPU_ISA='avx9' is not one of avx512, avx2, sse2; unset it" in proc.stderr


def test_second_derivative_is_refused_with_a_clear_message():
    model = make_model(lmax=1).use_fused_kernels(True)
    pos, species, cell, pbc = structure("periodic")
    idx, shift, _ = neighbor_list(pos, model.r_max, cell, pbc)
    ev = (pos[idx[1]] - pos[idx[0]] + shift @ cell).requires_grad_(True)
    e = model(species, idx, ev, torch.zeros(len(pos), dtype=torch.long), 1).sum()
    with pytest.raises(RuntimeError, match="no second derivative.*use_fused_kernels\\(False\\)"):
        torch.autograd.grad(e, ev, create_graph=True)


@pytest.mark.parametrize("what", ["src", "dst", "windex", "dtype", "kpath", "groups"])
def test_tp_scatter_bad_input_is_a_clear_error(what):
    tp, ftp, x, sh, w, windex, src, dst, n = op_inputs()
    match = {"src": "src index 7 of edge 0 is outside", "dst": "dst index -1 of edge 0 is outside",
             "windex": "windex index 99 of edge 0 is outside", "dtype": "must share one dtype",
             "kpath": "group weights outside w", "groups": "group input block outside x"}[what]
    groups, kpath = ftp.groups, ftp.kpath
    if what == "kpath":
        kpath = kpath.clone(); kpath[-1] = 50
    elif what == "groups":
        groups = groups.clone(); groups[-1, 0] = x.shape[1]
    elif what == "src":
        src = src.clone(); src[0] = 7
    elif what == "dst":
        dst = dst.clone(); dst[0] = -1
    elif what == "windex":
        windex = windex.clone(); windex[0] = 99
    else:
        sh = sh.float()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.equiforce.tp_scatter(x, sh, w, windex, src, dst, n, groups, kpath, ftp.cg)


# ---- reverse-edge pairing ------------------------------------------------------------------------

def test_radial_pairs_pairs_only_exact_reverse_edges():
    pos, species, cell, pbc = structure("periodic")
    idx, shift, _ = neighbor_list(pos, 3.5, cell, pbc)
    ev = pos[idx[1]] - pos[idx[0]] + shift @ cell
    reps, index = torch.ops.equiforce.radial_pairs(idx, ev, len(pos))
    e = idx.shape[1]
    # every edge points at a representative; a representative points at itself
    assert torch.equal(index[reps], torch.arange(len(reps)))
    counts = torch.bincount(index, minlength=len(reps))
    assert int(counts.max()) <= 2 and int(counts.sum()) == e
    assert len(reps) < 0.55 * e  # a full neighbour list: (nearly) every edge has its reverse
    for a in range(e):
        r = int(reps[index[a]])
        if r != a:  # paired: the exact reverse edge
            assert int(idx[0, a]) == int(idx[1, r]) and int(idx[1, a]) == int(idx[0, r])
            assert torch.equal(ev[a], -ev[r])
    # a duplicated edge makes its pair ambiguous: the three edges involved stay unpaired
    a0 = int(reps[torch.nonzero(counts == 2)[0, 0]])
    idx2 = torch.cat([idx, idx[:, a0:a0 + 1]], dim=1)
    ev2 = torch.cat([ev, ev[a0:a0 + 1]])
    reps2, index2 = torch.ops.equiforce.radial_pairs(idx2, ev2, len(pos))
    assert len(reps2) == len(reps) + 2
    partner = [b for b in range(e) if b != a0 and int(index[b]) == int(index[a0])][0]
    for b in (a0, partner, e):
        assert int(torch.bincount(index2)[index2[b]]) == 1


# ---- exported files: metadata, portability, engines -----------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The same weights exported fused (default) and portable, float64."""
    d = tmp_path_factory.mktemp("fused_models")
    model = make_model(lmax=2, r_max=4.0, num_layers=2)
    paths = {}
    for name, fused in (("fused", True), ("portable", False)):
        paths[name] = str(d / f"{name}.pt")
        export_model(model.for_export(fused=fused), paths[name], dtype=F64, symmetry="O3")
    return paths


def test_metadata_names_the_custom_ops(exported):
    assert load_exported(exported["fused"])[1]["custom_ops"] == ["equiforce::tp_scatter", "equiforce::radial_pairs"]
    assert load_exported(exported["portable"])[1]["custom_ops"] == []


@pytest.mark.slow
def test_portable_file_loads_in_plain_torch_and_fused_file_names_the_missing_op(exported):
    """A process that never imports equiforce: the portable file runs, the fused one fails naming
    the op (the fix: load libequiforce_ops.so, which the LAMMPS plugin and equiforce do)."""
    body = ("torch.manual_seed(0); m = torch.jit.load(sys.argv[1]); pos = torch.rand(4, 3, dtype=torch.float64) * 2; "
            "ei = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]]); "
            "e = m(pos, torch.zeros(4, dtype=torch.long), ei, torch.zeros(4, 3, dtype=torch.float64), "
            "torch.zeros(3, 3, dtype=torch.float64), 4)[0]; print('energy', repr(float(e)))")
    plain = "import sys, torch; " + body
    ok = subprocess.run([sys.executable, "-c", plain, exported["portable"]], capture_output=True, text=True)
    assert ok.returncode == 0 and "energy" in ok.stdout, ok.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", plain, exported["fused"]], capture_output=True, text=True)
    assert bad.returncode != 0 and "Unknown builtin op: equiforce::" in bad.stderr, bad.stderr[-2000:]
    lib = ops_library_path()
    assert lib and os.path.isfile(lib)
    with_lib = f"import sys, torch; torch.ops.load_library({lib!r}); " + body
    good = subprocess.run([sys.executable, "-c", with_lib, exported["fused"]], capture_output=True, text=True)
    assert good.returncode == 0 and "energy" in good.stdout, good.stderr[-2000:]
    e_portable, e_fused = float(ok.stdout.split()[-1]), float(good.stdout.split()[-1])
    assert abs(e_portable - e_fused) < 1e-12 * max(1.0, abs(e_portable))


@pytest.mark.lammps
@pytest.mark.mpi
@pytest.mark.parametrize("name,nprocs,style", [
    ("bulk", 1, "pair_style equiforce device cpu"),
    ("triclinic", 1, "pair_style equiforce path ghost_shell"),
    ("bulk", 2, "pair_style equiforce device cpu"),
])
def test_lammps_runs_the_fused_file(exported, tmp_path, name, nprocs, style):
    """LAMMPS with the fused file vs Python with the portable file (PyTorch path) on the same
    structure: energy 1e-10 eV/atom, forces 1e-9 eV/Å, per-atom energies, pressure 1e-8."""
    s = {"bulk": bulk, "triclinic": triclinic}[name]()
    data = str(tmp_path / "s.data")
    write_data(data, s, SPECIES)
    ref = python_reference(exported["portable"], s)
    proc = run_lmp(deck(data, exported["fused"], SPECIES, s.pbc, processors="2 1 1" if nprocs == 2 else "",
                        pair_style=style), str(tmp_path), nprocs=nprocs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    energy, press6 = parse_result(proc.stdout)
    fr = read_dump(str(tmp_path / "dump.out"))[0]
    assert_matches(s, ref, energy, press6, fr["id"].astype(int), np.stack([fr["fx"], fr["fy"], fr["fz"]], 1),
                   fr["c_pea"])
    assert float(np.abs(ref["forces"]).max()) > 1e-3


@pytest.mark.openmm
@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_openmm_runs_the_fused_file(exported, platform):
    """OpenMM (periodic box, nm and kJ/mol) with the fused file vs the portable file from Python."""
    import openmm
    from openmm import app, unit

    from equiforce.openmm import EV_TO_KJ_PER_MOL, NM_TO_ANGSTROM, create_force

    s = triclinic()
    ref = python_reference(exported["portable"], s)
    top = app.Topology()
    chain = top.addChain()
    for sym in s.symbols:
        res = top.addResidue("X", chain)
        top.addAtom(sym, app.Element.getBySymbol(sym), res)
    system = openmm.System()
    for sym in s.symbols:
        system.addParticle(app.Element.getBySymbol(sym).mass)
    system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in s.cell / NM_TO_ANGSTROM])
    system.addForce(create_force(exported["fused"], elements=s.symbols, periodic=True))
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.0005), openmm.Platform.getPlatformByName(platform))
    ctx.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in s.cell / NM_TO_ANGSTROM])
    ctx.setPositions(s.positions / NM_TO_ANGSTROM)
    state = ctx.getState(getEnergy=True, getForces=True)
    e = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    f = np.asarray(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
    assert abs(e - ref["energy"] * EV_TO_KJ_PER_MOL) < 1e-7 * max(1.0, abs(e))
    np.testing.assert_allclose(f, ref["forces"] * EV_TO_KJ_PER_MOL * NM_TO_ANGSTROM, rtol=0, atol=1e-6)
