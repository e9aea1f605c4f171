"""`equiforce check`: the symmetry audit passes on real exported models and fails on broken ones."""
import torch

from equiforce.nn.activations import NormalizedSiLU
from equiforce.deploy.audit import format_table, run_checks
from equiforce.deploy.export import export_model
from equiforce.nn.gate import Gate
from equiforce.model.network import EquiforceModel, ModelConfig


class PointwiseGate(torch.nn.Module):
    """A deliberately wrong gate: SiLU applied to every vector component (breaks equivariance)."""

    def __init__(self, gate: Gate):
        super().__init__()
        self.gate = gate
        self.silu = NormalizedSiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.silu(self.gate(x))


def _export(tmp_path, name, symmetry="O3", broken=False, dtype=torch.float64):
    torch.manual_seed(0)
    model = EquiforceModel(ModelConfig(r_max=3.0, channels=6, lmax=2, num_layers=2, radial_hidden=12,
                                       symmetry=symmetry, avg_num_neighbors=3.0), ["H", "C", "O"])
    if broken:
        for layer in model.layers:
            layer.gate = PointwiseGate(layer.gate)
    path = str(tmp_path / name)
    export_model(model.to(dtype).for_export(), path, dtype, symmetry=symmetry)
    return path


def test_check_passes_on_real_models(tmp_path):
    for symmetry in ("O3", "SE3"):
        meta, results = run_checks(_export(tmp_path, f"{symmetry}.pt", symmetry))
        table = format_table(meta, results)
        assert all(r.passed for r in results), table
        assert "all checks passed" in table
        refl = next(r for r in results if r.name == "reflection")
        assert refl.applicable == (symmetry == "O3")
        fd = next(r for r in results if r.name == "finite-difference forces")
        assert fd.worst < 1e-7


def test_check_passes_float32(tmp_path):
    meta, results = run_checks(_export(tmp_path, "f32.pt", dtype=torch.float32))
    assert all(r.passed for r in results), format_table(meta, results)


def test_check_fails_on_a_model_that_breaks_equivariance(tmp_path):
    meta, results = run_checks(_export(tmp_path, "broken.pt", broken=True))
    failed = {r.name for r in results if not r.passed}
    assert "rotation" in failed, format_table(meta, results)
    assert "SOME CHECKS FAILED" in format_table(meta, results)
    # still translation/permutation invariant and conservative: those lines pass
    assert not {"translation", "permutation", "finite-difference forces"} & failed


def test_check_on_a_direct_force_model_reports_non_conservative_forces(tmp_path):
    torch.manual_seed(1)
    model = EquiforceModel(ModelConfig(r_max=3.0, channels=6, lmax=1, num_layers=2, radial_hidden=12,
                                       direct_forces=True, avg_num_neighbors=3.0), ["H", "C", "O"])
    path = str(tmp_path / "direct.pt")
    export_model(model.double().for_export(), path, torch.float64, symmetry="O3")
    meta, results = run_checks(path)
    fd = next(r for r in results if r.name == "finite-difference forces")
    assert meta["conservative"] is False
    assert not fd.applicable and fd.worst > 1e-3  # forces with curl: far from -dE/dr
    assert all(r.passed for r in results if r.name != "finite-difference forces"), format_table(meta, results)
    assert "direct-force model" in format_table(meta, results)
