// equiforce C++ runtime: loads an exported equiforce TorchScript file and evaluates it.
//
// No LAMMPS dependency: used by the LAMMPS pair style (lammps_pair/) and, through pybind11
// (equiforce._runtime), by the Python tests. Units: positions/cell/shifts in Angstrom,
// energies in eV, forces in eV/Angstrom, virial in eV (virial = -sum_e r_e (x) dE/dr_e).
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

#include <torch/script.h>

namespace equiforce {

// Version of the exported-file contract this runtime reads (python/equiforce/__init__.py).
constexpr int kFormatVersion = 1;
constexpr const char *kMetadataFile = "equiforce_metadata.json";
// str attribute of the exported top-level module holding exactly the text of kMetadataFile
// (python/equiforce/deploy/export.py); a mismatch means the extra file was edited after export.
constexpr const char *kMetadataAttribute = "equiforce_metadata";
// Model::compute evaluates positions relative to their mean rounded to a multiple of this (Angstrom).
constexpr double kReferenceGrid = 64.0;

// Every failure of the runtime (bad file, bad input shapes, device problems) is one of these,
// with a message that names the problem and the fix.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string &msg) : std::runtime_error(msg) {}
};

struct Metadata {
  int format_version = -1;
  std::vector<std::string> species;  // model species names, index = species id
  double r_max = 0.0;                // cutoff of one message-passing layer (Angstrom)
  int num_layers = 0;
  double receptive_field = 0.0;      // distance an atom's energy depends on (Angstrom)
  std::string dtype;                 // "float32" or "float64"
  bool long_range = false;           // electrostatics over all atoms given (needs every atom, n_local = N)
  // optional keys (files exported before they existed lack them):
  bool exchange = false;             // per-layer entry points embed/layer/readout (LAMMPS path exchange)
  std::vector<int64_t> layer_dims;   // feature widths [d0, ..., dL] of the per-layer entry points
  double min_distance = 0.5;         // closest approach (Angstrom) the model is valid for (units.MIN_DISTANCE)
  std::vector<double> masses;        // standard atomic mass (amu) of each species, same order as species
  int committee_size = 0;            // members of a committee file ("committee": {"size": M}), 0 otherwise
  std::string json;                  // the raw metadata text
};

// Parse the metadata JSON (nlohmann/json; only the keys above are read, the optional ones when present). Throws Error naming a
// missing or mistyped key.
Metadata parse_metadata(const std::string &json, const std::string &path);

// Pick the torch device for a request "cpu", "cuda", "cuda:N" or "auto".
// local_rank (rank within the node) spreads ranks over the node's GPUs for "cuda"/"auto".
// Throws Error when CUDA is requested but not available or the index does not exist.
torch::Device select_device(const std::string &request, int local_rank = 0);

struct Result {
  double energy = 0.0;        // eV, sum over the first n_local atoms
  torch::Tensor atom_energy;  // [N] eV (CPU, float64)
  torch::Tensor forces;       // [N, 3] eV/Angstrom (CPU, float64), -dE/dpos on every atom given
  torch::Tensor virial;       // [3, 3] eV (CPU, float64)
};

// A committee file's members (python/equiforce/deploy/committee.py) and their spread.
struct CommitteeResult {
  Result mean;                   // the members' mean: exactly what the file's forward returns
  torch::Tensor energies;        // [M] eV (CPU, float64)
  torch::Tensor forces;          // [M, N, 3] eV/Angstrom (CPU, float64)
  double energy_uncertainty = 0.0;  // eV: standard deviation of the members' energies (population form)
  torch::Tensor force_uncertainty;  // [N] eV/Angstrom: per atom, RMS deviation of the members' force vectors
                                    // from their mean, sqrt(mean_m |F_m,i - mean F_i|^2)
};

class Model {
 public:
  // Load `path` onto `device`. Throws Error for a missing file, a file that is not TorchScript,
  // a TorchScript file without equiforce metadata, metadata changed after export (it differs
  // from the module's `equiforce_metadata` attribute; files without the attribute load
  // unchecked), or an unsupported format_version.
  Model(const std::string &path, const torch::Device &device);

  const Metadata &metadata() const { return meta_; }
  const torch::Device &device() const { return device_; }
  torch::Dtype dtype() const { return dtype_; }
  const std::string &path() const { return path_; }
  // The loaded TorchScript module (for engines that call its other methods, e.g. LayerStepper).
  torch::jit::Module &module() { return module_; }
  // Index of an element name in the model's species list, -1 if absent.
  int species_index(const std::string &name) const;

  // Evaluate. Inputs may live on any device and have any floating dtype; they are moved/cast.
  //   pos [N,3], species [N] (int, values in [0, n_species)), edge_index [2,E] (int),
  //   edge_shift [E,3] or undefined (zeros: ghosts carry their own image positions),
  //   cell [3,3] or undefined (zeros), n_local: the first n_local atoms count for the energy.
  // pos is taken relative to its mean (rounded to kReferenceGrid) in float64 before the cast to the
  // model dtype: float32 models keep their precision far from the origin (translation invariance).
  Result compute(const torch::Tensor &pos, const torch::Tensor &species, const torch::Tensor &edge_index,
                 const torch::Tensor &edge_shift, const torch::Tensor &cell, int64_t n_local);

  // A committee file (metadata committee_size > 0): every member on the same inputs (one call of
  // the file's `committee` method, same arguments as compute) with their mean and spread. Throws
  // Error for a file that is not a committee.
  CommitteeResult compute_committee(const torch::Tensor &pos, const torch::Tensor &species,
                                    const torch::Tensor &edge_index, const torch::Tensor &edge_shift,
                                    const torch::Tensor &cell, int64_t n_local);

 private:
  // checked, cast and re-referenced arguments of forward / committee (see compute)
  std::vector<torch::jit::IValue> prepare_inputs(const torch::Tensor &pos, const torch::Tensor &species,
                                                 const torch::Tensor &edge_index, const torch::Tensor &edge_shift,
                                                 const torch::Tensor &cell, int64_t n_local);

  // Throws Error when the module's kMetadataAttribute differs from the extra file's text `json`.
  void check_metadata_attribute(const std::string &json) const;

  std::string path_;
  torch::Device device_;
  torch::Dtype dtype_ = torch::kFloat64;
  Metadata meta_;
  torch::jit::Module module_;
};

}  // namespace equiforce
