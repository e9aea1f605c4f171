// equiforce layer-by-layer evaluation with feature exchange between layers (LAMMPS `path exchange`).
//
// No LAMMPS dependency. The caller owns the atoms [0, n_local) and holds ghost copies
// [n_local, n_all) of atoms owned elsewhere (another MPI rank, or a periodic image); edges have a
// local receiver i = edge_index[0] and a neighbour j (local or ghost) with |x_j - x_i| < r_max.
// The file's per-layer entry points (metadata "exchange": true; python/equiforce/deploy/export.py,
// LayerEntryPoints) are stepped:
//
//   x_0 = embed(species)                                   all rows (no position dependence)
//   x_{k+1} = layer(k, x_k', ...)  [n_local, d_{k+1}]      k = 0 .. L-1
//   x_{k+1}' = local rows + ghost rows from forward(k+1)   k < L-1: a new autograd leaf
//   E = sum_i readout(x_L)_i                               local atoms only
//
// and the backward pass runs in reverse: g_L = dE/dx_L; for k = L-1 .. 0 one autograd::grad of
// layer k gives dE/dx_k' on all rows (k > 0) and the layer's dE/d edge_vec; reverse(k) adds the
// ghost rows of dE/dx_k' into their owners' local rows. Every call makes exactly L-1 forward and
// L-1 reverse exchanges, whatever n_local is (0 included), so ranks never wait on each other.
// Tensors live on the model's device; the exchange buffers are host float64 [n_all, width]
// (row-major), float32 features converted exactly.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "equiforce_model.h"

namespace equiforce {

// exchange(k, rows, width): rows is [n_all * width] host float64, local rows filled; forward: fill
// the ghost rows from their owners; reverse: add the ghost rows into their owners' rows.
using Exchange = std::function<void(int k, double *rows, int width)>;

struct LayerResult {
  double energy = 0.0;        // eV, sum over the local atoms
  torch::Tensor atom_energy;  // [n_local] eV (CPU, float64)
  torch::Tensor edge_grad;    // [E, 3] dE/d edge_vec (eV/Angstrom, CPU, float64), edge_vec = x_j - x_i
};

class LayerStepper {
 public:
  // Throws Error (naming the fix) when the file has no per-layer entry points.
  explicit LayerStepper(Model &model);

  // Empty when `model` has the entry points, else why not (for the caller's error message).
  static std::string unsupported_reason(const Model &model);

  const std::vector<int64_t> &layer_dims() const { return dims_; }  // [d0, ..., dL]
  int num_layers() const { return static_cast<int>(dims_.size()) - 1; }
  int widest() const;  // max over the exchanged widths d_1 .. d_{L-1} (at least 1)

  // pos [n_all, 3] float64 (any device; only differences x_j - x_i are used, formed in float64),
  // species [n_all] int, edge_index [2, E] int with edge_index[0] < n_local.
  LayerResult compute(const torch::Tensor &pos, const torch::Tensor &species, const torch::Tensor &edge_index,
                      int64_t n_local, const Exchange &forward, const Exchange &reverse);

 private:
  Model &model_;
  std::vector<int64_t> dims_;
};

}  // namespace equiforce
