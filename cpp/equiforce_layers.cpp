// equiforce layer-by-layer evaluation, see equiforce_layers.h.
#include "equiforce_layers.h"

#include <algorithm>

#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/jit/runtime/graph_executor.h>

namespace equiforce {

std::string LayerStepper::unsupported_reason(const Model &model) {
  const auto &meta = model.metadata();
  if (meta.long_range) return "it has long-range electrostatics (needs every atom in one call)";
  if (!meta.exchange || meta.layer_dims.size() != static_cast<size_t>(meta.num_layers) + 1)
    return "it has no per-layer entry points (metadata 'exchange' is not true: a direct-force model, or a file "
           "exported before they existed)";
  auto &mod = const_cast<Model &>(model).module();
  for (const char *name : {"embed", "layer", "readout"})
    if (!mod.find_method(name)) return std::string("it has no '") + name + "' method";
  return "";
}

LayerStepper::LayerStepper(Model &model) : model_(model) {
  const std::string why = unsupported_reason(model);
  if (!why.empty())
    throw Error("model file '" + model.path() + "' cannot be evaluated layer by layer: " + why +
                "; re-export a short-range conservative model with this equiforce (`equiforce export`), or use "
                "another path");
  dims_ = model.metadata().layer_dims;
}

int LayerStepper::widest() const {
  int64_t w = 1;
  for (size_t k = 1; k + 1 < dims_.size(); ++k) w = std::max(w, dims_[k]);
  return static_cast<int>(w);
}

LayerResult LayerStepper::compute(const torch::Tensor &pos, const torch::Tensor &species,
                                  const torch::Tensor &edge_index, int64_t n_local, const Exchange &forward,
                                  const Exchange &reverse) {
  const int L = num_layers();
  const int64_t n_all = pos.size(0);
  if (species.size(0) != n_all || n_local < 0 || n_local > n_all || edge_index.dim() != 2 || edge_index.size(0) != 2)
    throw Error("equiforce: LayerStepper::compute got inconsistent shapes");
  const int64_t ne = edge_index.size(1);
  const auto dev = model_.device();
  const auto fopt = torch::TensorOptions().dtype(model_.dtype()).device(dev);
  const auto cpu64 = torch::TensorOptions().dtype(torch::kFloat64).device(torch::kCPU);
  if (ne > 0) {
    auto ei = edge_index.to(torch::kCPU);
    if (ei[0].max().item<int64_t>() >= n_local || ei.min().item<int64_t>() < 0 || ei[1].max().item<int64_t>() >= n_all)
      throw Error("equiforce: LayerStepper edges must have a local receiver (edge_index[0] < n_local) and a "
                  "neighbour in [0, n_all)");
  }
  const bool work = n_local > 0;  // a rank without local atoms only takes part in the exchanges
  torch::jit::Module &mod = model_.module();
  torch::AutoGradMode grad_mode(true);
  torch::jit::GraphOptimizerEnabledGuard no_reoptimisation(false);  // as Model::compute

  torch::Tensor sp, ei, ev;
  if (work) {
    sp = species.to(torch::TensorOptions().dtype(torch::kInt64).device(dev)).contiguous();
    ei = edge_index.to(torch::TensorOptions().dtype(torch::kInt64).device(dev)).contiguous();
    auto p64 = pos.to(torch::TensorOptions().dtype(torch::kFloat64).device(dev));
    ev = (p64.index_select(0, ei[1]) - p64.index_select(0, ei[0])).to(fopt).detach().requires_grad_(true);
  }
  std::vector<torch::Tensor> inputs(L), outputs(L);  // layer k's input leaf and its output rows
  std::vector<double> buf;
  LayerResult res;
  try {
    torch::Tensor x;
    if (work) x = mod.run_method("embed", sp).toTensor().to(fopt).detach();
    for (int k = 0; k < L; ++k) {
      if (k > 0) {
        // refresh the ghost rows of x_k from their owners
        const int64_t d = dims_[k];
        buf.assign(static_cast<size_t>(n_all * d), 0.0);
        if (work) {
          auto host = outputs[k - 1].detach().to(cpu64).contiguous();
          std::copy(host.data_ptr<double>(), host.data_ptr<double>() + n_local * d, buf.begin());
        }
        forward(k, buf.data(), static_cast<int>(d));
        if (work)
          x = torch::from_blob(buf.data(), {n_all, d}, cpu64).to(fopt).clone().requires_grad_(true);
      }
      if (!work) continue;
      inputs[k] = x;
      outputs[k] = mod.run_method("layer", k, x, sp, ei, ev, n_local).toTensor();
    }
    torch::Tensor g;  // dE/d(output of the current layer) [n_local, d]
    torch::Tensor edge_grad;
    if (work) {
      auto xl = outputs[L - 1].detach().requires_grad_(true);
      auto ea = mod.run_method("readout", xl, sp.narrow(0, 0, n_local)).toTensor();
      auto energy = ea.sum();
      g = torch::autograd::grad({energy}, {xl})[0];
      res.energy = energy.detach().to(cpu64).item<double>();
      res.atom_energy = ea.detach().to(cpu64).contiguous();
      edge_grad = torch::zeros({ne, 3}, fopt);
    }
    for (int k = L - 1; k >= 0; --k) {
      torch::Tensor gx;
      if (work && outputs[k].requires_grad()) {
        std::vector<torch::Tensor> wrt = {ev};
        if (k > 0) wrt.insert(wrt.begin(), inputs[k]);
        auto grads = torch::autograd::grad({outputs[k]}, wrt, {g}, /*retain_graph=*/false, /*create_graph=*/false,
                                           /*allow_unused=*/true);
        if (grads.back().defined()) edge_grad = edge_grad + grads.back();
        if (k > 0) gx = grads[0];
      }
      outputs[k] = torch::Tensor();
      inputs[k] = torch::Tensor();
      if (k == 0) break;
      // ghost rows of dE/dx_k go home and are added to their owners' rows
      const int64_t d = dims_[k];
      buf.assign(static_cast<size_t>(n_all * d), 0.0);
      if (work && gx.defined()) {
        auto host = gx.detach().to(cpu64).contiguous();
        std::copy(host.data_ptr<double>(), host.data_ptr<double>() + n_all * d, buf.begin());
      }
      reverse(k, buf.data(), static_cast<int>(d));
      if (work) g = torch::from_blob(buf.data(), {n_local, d}, cpu64).to(fopt).clone();
    }
    res.edge_grad = work ? edge_grad.detach().to(cpu64).contiguous() : torch::zeros({0, 3}, cpu64);
    if (!work) res.atom_energy = torch::zeros({0}, cpu64);
  } catch (const Error &) {
    throw;
  } catch (const std::exception &e) {
    const std::string what = e.what();
    throw Error("equiforce: evaluating model '" + model_.path() + "' layer by layer failed: " +
                what.substr(0, what.find('\n')));
  }
  return res;
}

}  // namespace equiforce
