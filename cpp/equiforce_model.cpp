// equiforce C++ runtime, see equiforce_model.h.
#include "equiforce_model.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <memory>

#include <nlohmann/json.hpp>  // cpp/third_party/nlohmann (MIT, see LICENSE.MIT there)
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/cuda.h>

namespace equiforce {

namespace {

using Json = nlohmann::json;

// The value of `key` in the metadata object, which must be of the kind `is_kind` tests for
// (`kind` names it in the message). Throws Error naming the key and the fix.
const Json &require(const Json &root, const std::string &key, bool (Json::*is_kind)() const noexcept,
                    const char *kind, const std::string &path) {
  auto it = root.find(key);
  if (it == root.end())
    throw Error("model file '" + path + "': metadata has no '" + key +
                "'; re-export the model with `equiforce export`");
  if (!((*it).*is_kind)())
    throw Error("model file '" + path + "': metadata key '" + key + "' has the wrong type (expected " + kind +
                ", got " + it->type_name() + "); re-export the model with `equiforce export`");
  return *it;
}

std::string first_line(const std::string &s) {
  auto pos = s.find('\n');
  return pos == std::string::npos ? s : s.substr(0, pos);
}

void check_tensor(const torch::Tensor &t, const char *name, int64_t dim0, int64_t dim1, int ndim) {
  if (!t.defined()) throw Error(std::string("equiforce: '") + name + "' is undefined");
  if (t.dim() != ndim) throw Error(std::string("equiforce: '") + name + "' must have " +
                                   std::to_string(ndim) + " dimensions, got " + std::to_string(t.dim()));
  if (dim0 >= 0 && t.size(0) != dim0)
    throw Error(std::string("equiforce: '") + name + "' has first dimension " + std::to_string(t.size(0)) +
                ", expected " + std::to_string(dim0));
  if (ndim == 2 && dim1 >= 0 && t.size(1) != dim1)
    throw Error(std::string("equiforce: '") + name + "' has second dimension " + std::to_string(t.size(1)) +
                ", expected " + std::to_string(dim1));
}

}  // namespace

// ---- metadata -----------------------------------------------------------------------------------

Metadata parse_metadata(const std::string &json, const std::string &path) {
  Json root;
  try {
    root = Json::parse(json);
  } catch (const Json::parse_error &e) {
    throw Error("model file '" + path + "': metadata is not valid JSON (" + e.what() +
                "); re-export the model with `equiforce export`");
  }
  if (!root.is_object()) throw Error("model file '" + path + "': metadata is not a JSON object");
  Metadata m;
  m.json = json;
  m.format_version = static_cast<int>(
      require(root, "format_version", &Json::is_number, "a number", path).get<double>());
  if (m.format_version != kFormatVersion)
    throw Error("model file '" + path + "' has format_version " + std::to_string(m.format_version) +
                ", this equiforce runtime reads format_version " + std::to_string(kFormatVersion) +
                "; re-export the model with the equiforce version installed here (`equiforce export`)");
  for (const auto &v : require(root, "species", &Json::is_array, "a list of element names", path)) {
    if (!v.is_string()) throw Error("model file '" + path + "': metadata species must be strings");
    m.species.push_back(v.get<std::string>());
  }
  if (m.species.empty()) throw Error("model file '" + path + "': metadata lists no species");
  m.r_max = require(root, "r_max", &Json::is_number, "a number", path).get<double>();
  m.num_layers = static_cast<int>(require(root, "num_layers", &Json::is_number, "a number", path).get<double>());
  m.receptive_field = require(root, "receptive_field", &Json::is_number, "a number", path).get<double>();
  m.dtype = require(root, "dtype", &Json::is_string, "a string", path).get<std::string>();
  auto lr = root.find("long_range");
  m.long_range = lr != root.end() && lr->is_object();
  if (!(m.r_max > 0.0) || m.num_layers < 1 || m.receptive_field < m.r_max)
    throw Error("model file '" + path + "': inconsistent metadata (r_max " + std::to_string(m.r_max) +
                ", num_layers " + std::to_string(m.num_layers) + ", receptive_field " +
                std::to_string(m.receptive_field) + ")");
  if (m.dtype != "float32" && m.dtype != "float64")
    throw Error("model file '" + path + "': unsupported dtype '" + m.dtype + "' (float32 or float64)");
  if (root.contains("exchange"))
    m.exchange = require(root, "exchange", &Json::is_boolean, "true or false", path).get<bool>();
  if (root.contains("layer_dims"))
    for (const auto &v : require(root, "layer_dims", &Json::is_array, "a list of integers", path)) {
      if (!v.is_number_integer() || v.get<int64_t>() < 1)
        throw Error("model file '" + path + "': metadata layer_dims must be positive integers; re-export the "
                    "model with `equiforce export`");
      m.layer_dims.push_back(v.get<int64_t>());
    }
  if (root.contains("masses")) {
    for (const auto &v : require(root, "masses", &Json::is_array, "a list of numbers", path)) {
      if (!v.is_number() || !(v.get<double>() > 0.0))
        throw Error("model file '" + path + "': metadata masses must be positive numbers (amu); re-export the "
                    "model with `equiforce export`");
      m.masses.push_back(v.get<double>());
    }
    if (m.masses.size() != m.species.size())
      throw Error("model file '" + path + "': metadata lists " + std::to_string(m.masses.size()) +
                  " masses for " + std::to_string(m.species.size()) + " species; re-export the model with "
                  "`equiforce export`");
  }
  auto committee = root.find("committee");
  if (committee != root.end() && committee->is_object()) {
    auto size = committee->find("size");
    if (size == committee->end() || !size->is_number_integer() || size->get<int64_t>() < 1)
      throw Error("model file '" + path + "': metadata committee has no valid 'size' (number of members); re-export "
                  "the committee with `equiforce export RUN_A RUN_B ... -o committee.pt`");
    m.committee_size = static_cast<int>(size->get<int64_t>());
  }
  if (root.contains("min_distance")) {
    m.min_distance = require(root, "min_distance", &Json::is_number, "a number", path).get<double>();
    if (!(m.min_distance >= 0.0))
      throw Error("model file '" + path + "': metadata min_distance must be >= 0 Angstrom");
  }
  return m;
}

// ---- device -------------------------------------------------------------------------------------

torch::Device select_device(const std::string &request, int local_rank) {
  if (request == "cpu") return torch::Device(torch::kCPU);
  const bool have_cuda = torch::cuda::is_available();
  const int64_t ngpu = have_cuda ? static_cast<int64_t>(torch::cuda::device_count()) : 0;
  if (request == "auto") {
    if (ngpu == 0) return torch::Device(torch::kCPU);
    return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(local_rank % ngpu));
  }
  if (request == "cuda" || request.rfind("cuda:", 0) == 0) {
    if (ngpu == 0)
      throw Error("device '" + request +
                  "' requested but libtorch sees no CUDA GPU (no driver, no device, or a CPU-only torch); "
                  "use 'device cpu' or 'device auto'");
    int64_t index = local_rank % ngpu;
    if (request.size() > 5) {
      try {
        index = std::stoll(request.substr(5));
      } catch (const std::exception &) {
        throw Error("bad device '" + request + "': expected cuda:N with an integer N");
      }
      if (index < 0 || index >= ngpu)
        throw Error("device '" + request + "' does not exist: libtorch sees " + std::to_string(ngpu) +
                    " GPU(s), indices 0.." + std::to_string(ngpu - 1));
    }
    return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index));
  }
  throw Error("unknown device '" + request + "': use cpu, cuda, cuda:N or auto");
}

// ---- model --------------------------------------------------------------------------------------

Model::Model(const std::string &path, const torch::Device &device) : path_(path), device_(device) {
  {
    std::ifstream f(path, std::ios::binary);
    if (!f.good())
      throw Error("model file '" + path + "' does not exist or cannot be read; give the path of a file "
                  "written by `equiforce export`");
  }
  torch::jit::ExtraFilesMap extra{{kMetadataFile, ""}};
  try {
    module_ = torch::jit::load(path, device_, extra);
  } catch (const std::exception &e) {
    throw Error("model file '" + path + "' is not a TorchScript file (" + first_line(e.what()) +
                "); export a trained run with `equiforce export RUN_DIR -o model.pt`");
  }
  if (extra[kMetadataFile].empty())
    throw Error("model file '" + path + "' is a TorchScript file but not an equiforce export (no " +
                std::string(kMetadataFile) + "); export it with `equiforce export`");
  meta_ = parse_metadata(extra[kMetadataFile], path);
  check_metadata_attribute(extra[kMetadataFile]);
  dtype_ = meta_.dtype == "float32" ? torch::kFloat32 : torch::kFloat64;
  module_.eval();
}

void Model::check_metadata_attribute(const std::string &json) const {
  if (!module_.hasattr(kMetadataAttribute)) return;  // exported before the check existed
  const auto attr = module_.attr(kMetadataAttribute);
  if (!attr.isString() || attr.toStringRef() != json)
    throw Error("metadata of '" + path_ +
                "' was changed after export (species / r_max / ... no longer match the model); "
                "re-export it with `equiforce export`");
}

int Model::species_index(const std::string &name) const {
  for (size_t k = 0; k < meta_.species.size(); ++k)
    if (meta_.species[k] == name) return static_cast<int>(k);
  return -1;
}

std::vector<torch::jit::IValue> Model::prepare_inputs(const torch::Tensor &pos, const torch::Tensor &species,
                                                     const torch::Tensor &edge_index, const torch::Tensor &edge_shift,
                                                     const torch::Tensor &cell, int64_t n_local) {
  check_tensor(pos, "pos", -1, 3, 2);
  const int64_t n = pos.size(0);
  check_tensor(species, "species", n, -1, 1);
  check_tensor(edge_index, "edge_index", 2, -1, 2);
  const int64_t ne = edge_index.size(1);
  if (edge_shift.defined()) check_tensor(edge_shift, "edge_shift", ne, 3, 2);
  if (cell.defined()) check_tensor(cell, "cell", 3, 3, 2);
  if (n_local < 0 || n_local > n)
    throw Error("equiforce: n_local = " + std::to_string(n_local) + " outside [0, " + std::to_string(n) + "]");
  if (n > 0) {
    auto sp = species.to(torch::kCPU);
    int64_t lo = sp.min().item<int64_t>(), hi = sp.max().item<int64_t>();
    if (lo < 0 || hi >= static_cast<int64_t>(meta_.species.size()))
      throw Error("equiforce: species index out of range [0, " + std::to_string(meta_.species.size()) + ")");
  }
  if (ne > 0) {
    auto ei = edge_index.to(torch::kCPU);
    int64_t lo = ei.min().item<int64_t>(), hi = ei.max().item<int64_t>();
    if (lo < 0 || hi >= n)
      throw Error("equiforce: edge_index refers to atom " + std::to_string(lo < 0 ? lo : hi) + " but there are " +
                  std::to_string(n) + " atoms");
  }

  auto fopt = torch::TensorOptions().dtype(dtype_).device(device_);
  auto iopt = torch::TensorOptions().dtype(torch::kInt64).device(device_);
  std::vector<torch::jit::IValue> inputs;
  inputs.reserve(6);
  // Positions relative to a reference point, formed in float64 before the cast to the model dtype,
  // so a float32 model far from the origin keeps its precision (energy, forces and virial are
  // translation invariant; edge shifts and cell are unchanged). The reference is the mean position
  // rounded to a multiple of kReferenceGrid Angstrom: the subtraction is exact, the coordinates the
  // model sees stay within kReferenceGrid / 2 + the structure's extent, and a structure near the
  // origin (reference 0) is evaluated bit for bit as before and as the exported module called directly.
  auto pos64 = pos.to(torch::TensorOptions().dtype(torch::kFloat64).device(device_));
  if (n > 0) {
    auto ref = torch::round(pos64.mean(0, /*keepdim=*/true) / kReferenceGrid) * kReferenceGrid;
    pos64 = pos64 - ref;
  }
  inputs.emplace_back(pos64.to(fopt).contiguous());
  inputs.emplace_back(species.to(iopt).contiguous());
  inputs.emplace_back(edge_index.to(iopt).contiguous());
  inputs.emplace_back(edge_shift.defined() ? edge_shift.to(fopt).contiguous() : torch::zeros({ne, 3}, fopt));
  inputs.emplace_back(cell.defined() ? cell.to(fopt).contiguous() : torch::zeros({3, 3}, fopt));
  inputs.emplace_back(n_local);

  return inputs;
}

Result Model::compute(const torch::Tensor &pos, const torch::Tensor &species, const torch::Tensor &edge_index,
                      const torch::Tensor &edge_shift, const torch::Tensor &cell, int64_t n_local) {
  auto inputs = prepare_inputs(pos, species, edge_index, edge_shift, cell, n_local);
  const int64_t n = pos.size(0);
  torch::jit::IValue out;
  try {
    torch::AutoGradMode grad_mode(true);  // the module takes autograd forces inside
    // The profiling executor specialises the graph on the first calls' shapes and re-optimises
    // when they change (every neighbour-list rebuild); run the graph as scripted instead. Scoped
    // to this call: a process-wide switch would change other TorchScript users in the process
    // (openmm-torch in the same Python process fails to run nested modules without it).
    torch::jit::GraphOptimizerEnabledGuard no_reoptimisation(false);
    out = module_.forward(inputs);
  } catch (const std::exception &e) {
    throw Error("equiforce: evaluating model '" + path_ + "' failed: " + first_line(e.what()));
  }
  auto tup = out.toTuple();
  if (tup->elements().size() != 4)
    throw Error("equiforce: model '" + path_ + "' returned " + std::to_string(tup->elements().size()) +
                " outputs, expected (energy, per_atom_energy, forces, virial)");
  auto cpu64 = torch::TensorOptions().dtype(torch::kFloat64).device(torch::kCPU);
  Result r;
  r.energy = tup->elements()[0].toTensor().to(cpu64).item<double>();
  r.atom_energy = tup->elements()[1].toTensor().detach().to(cpu64).contiguous();
  r.forces = tup->elements()[2].toTensor().detach().to(cpu64).contiguous();
  r.virial = tup->elements()[3].toTensor().detach().to(cpu64).contiguous();
  if (r.atom_energy.numel() != n || r.forces.numel() != 3 * n || r.virial.numel() != 9)
    throw Error("equiforce: model '" + path_ + "' returned outputs of unexpected shape");
  return r;
}

CommitteeResult Model::compute_committee(const torch::Tensor &pos, const torch::Tensor &species,
                                         const torch::Tensor &edge_index, const torch::Tensor &edge_shift,
                                         const torch::Tensor &cell, int64_t n_local) {
  if (meta_.committee_size < 1)
    throw Error("equiforce: model '" + path_ + "' is a single model, not a committee, so it has no uncertainty; "
                "export several runs into one file (`equiforce export RUN_A RUN_B RUN_C -o committee.pt`)");
  auto inputs = prepare_inputs(pos, species, edge_index, edge_shift, cell, n_local);
  const int64_t n = pos.size(0);
  torch::jit::IValue out;
  try {
    torch::AutoGradMode grad_mode(true);
    torch::jit::GraphOptimizerEnabledGuard no_reoptimisation(false);  // as in compute()
    out = module_.get_method("committee")(inputs);
  } catch (const std::exception &e) {
    throw Error("equiforce: evaluating the committee of model '" + path_ + "' failed: " + first_line(e.what()));
  }
  auto tup = out.toTuple();
  if (tup->elements().size() != 4)
    throw Error("equiforce: committee of model '" + path_ + "' returned " + std::to_string(tup->elements().size()) +
                " outputs, expected (energy[M], per_atom_energy[M, N], forces[M, N, 3], virial[M, 3, 3])");
  auto cpu64 = torch::TensorOptions().dtype(torch::kFloat64).device(torch::kCPU);
  // the mean in the model dtype on the model device, as the file's forward takes it
  auto mean_of = [&](int k) { return tup->elements()[k].toTensor().detach().mean(0).to(cpu64).contiguous(); };
  CommitteeResult c;
  c.mean.energy = mean_of(0).item<double>();
  c.mean.atom_energy = mean_of(1);
  c.mean.forces = mean_of(2);
  c.mean.virial = mean_of(3);
  c.energies = tup->elements()[0].toTensor().detach().to(cpu64).contiguous();
  c.forces = tup->elements()[2].toTensor().detach().to(cpu64).contiguous();
  const int64_t m = c.energies.numel();
  if (m != meta_.committee_size || c.forces.dim() != 3 || c.forces.size(0) != m || c.forces.size(1) != n ||
      c.forces.size(2) != 3 || c.mean.atom_energy.numel() != n || c.mean.virial.numel() != 9)
    throw Error("equiforce: committee of model '" + path_ + "' returned outputs of unexpected shape");
  // deviations from the first member, var = mean(d^2) - mean(d)^2 (as committee_uncertainty in
  // Python): the spread about the mean, and exactly 0 for identical members
  auto de = c.energies - c.energies[0];
  const double var_e = (de * de).mean().item<double>() - std::pow(de.mean().item<double>(), 2);
  c.energy_uncertainty = std::sqrt(std::max(var_e, 0.0));
  auto df = c.forces - c.forces.narrow(0, 0, 1);
  auto mean_df = df.mean(0);
  auto var_f = (df * df).sum(2).mean(0) - (mean_df * mean_df).sum(1);
  c.force_uncertainty = var_f.clamp_min(0.0).sqrt().contiguous();
  return c;
}

}  // namespace equiforce
