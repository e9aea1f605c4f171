// equiforce._runtime: the C++ model runtime exposed to Python (numpy in, numpy out), so tests can
// compare it with the Python exported module on the same inputs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>

#include "equiforce_layers.h"
#include "equiforce_model.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

using F64 = py::array_t<double, py::array::c_style | py::array::forcecast>;
using I64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

torch::Tensor to_tensor(const F64 &a) {
  std::vector<int64_t> shape(a.shape(), a.shape() + a.ndim());
  return torch::from_blob(const_cast<double *>(a.data()), shape, torch::kFloat64).clone();
}

torch::Tensor to_tensor(const I64 &a) {
  std::vector<int64_t> shape(a.shape(), a.shape() + a.ndim());
  return torch::from_blob(const_cast<int64_t *>(a.data()), shape, torch::kInt64).clone();
}

py::array_t<double> to_numpy(const torch::Tensor &t) {
  auto c = t.to(torch::kCPU, torch::kFloat64).contiguous();
  std::vector<py::ssize_t> shape(c.sizes().begin(), c.sizes().end());
  py::array_t<double> out(shape);
  if (c.numel()) std::memcpy(out.mutable_data(), c.data_ptr<double>(), sizeof(double) * c.numel());
  return out;
}

}  // namespace

PYBIND11_MODULE(_runtime, m) {
  m.doc() = "equiforce C++ model runtime (libtorch), the engine behind the LAMMPS pair style";
  m.attr("FORMAT_VERSION") = equiforce::kFormatVersion;
  py::register_exception<equiforce::Error>(m, "ModelError", PyExc_ValueError);

  m.def(
      "select_device", [](const std::string &request, int local_rank) {
        return equiforce::select_device(request, local_rank).str();
      },
      "request"_a, "local_rank"_a = 0,
      "Device string the runtime picks for 'cpu', 'cuda', 'cuda:N' or 'auto' (ModelError if unavailable).");

  py::class_<equiforce::Model>(m, "Model")
      .def(py::init([](const std::string &path, const std::string &device) {
             return std::make_unique<equiforce::Model>(path, equiforce::select_device(device, 0));
           }),
           "path"_a, "device"_a = "cpu", "Load an exported equiforce file (ModelError on bad files).")
      .def_property_readonly("device", [](const equiforce::Model &mdl) { return mdl.device().str(); })
      .def_property_readonly("metadata",
                             [](const equiforce::Model &mdl) {
                               const auto &md = mdl.metadata();
                               py::dict d;
                               d["format_version"] = md.format_version;
                               d["species"] = md.species;
                               d["r_max"] = md.r_max;
                               d["num_layers"] = md.num_layers;
                               d["receptive_field"] = md.receptive_field;
                               d["dtype"] = md.dtype;
                               d["json"] = md.json;
                               return d;
                             })
      .def("species_index", &equiforce::Model::species_index, "name"_a)
      .def(
          "compute",
          [](equiforce::Model &mdl, const F64 &pos, const I64 &species, const I64 &edge_index,
             const py::object &edge_shift, const py::object &cell, py::object n_local) {
            torch::Tensor tpos = to_tensor(pos), tsp = to_tensor(species), tei = to_tensor(edge_index);
            if (tei.dim() == 1 && tei.numel() == 0) tei = tei.reshape({2, 0});
            torch::Tensor tshift, tcell;
            if (!edge_shift.is_none()) tshift = to_tensor(edge_shift.cast<F64>());
            if (!cell.is_none()) tcell = to_tensor(cell.cast<F64>());
            int64_t nl = n_local.is_none() ? tpos.size(0) : n_local.cast<int64_t>();
            equiforce::Result r;
            {
              py::gil_scoped_release release;
              r = mdl.compute(tpos, tsp, tei, tshift, tcell, nl);
            }
            return py::make_tuple(r.energy, to_numpy(r.atom_energy), to_numpy(r.forces), to_numpy(r.virial));
          },
          "pos"_a, "species"_a, "edge_index"_a, "edge_shift"_a = py::none(), "cell"_a = py::none(),
          "n_local"_a = py::none(),
          "Evaluate: pos [N,3] (Angstrom), species [N], edge_index [2,E], edge_shift [E,3] or None, "
          "cell [3,3] or None, n_local (default N) -> (energy eV, per_atom_energy [N] eV, "
          "forces [N,3] eV/Angstrom, virial [3,3] eV).");

  // the layer-by-layer stepper of LAMMPS' `path exchange`, with ghosts that are copies of local rows
  // (ghost_owner[g] = the local row of ghost n_local + g): the exchanges run inside this process
  py::class_<equiforce::LayerStepper>(m, "LayerStepper")
      .def(py::init([](equiforce::Model &mdl) { return std::make_unique<equiforce::LayerStepper>(mdl); }),
           "model"_a, py::keep_alive<1, 2>(), "ModelError when the file has no per-layer entry points.")
      .def_static("unsupported_reason", &equiforce::LayerStepper::unsupported_reason, "model"_a)
      .def_property_readonly("layer_dims", &equiforce::LayerStepper::layer_dims)
      .def_property_readonly("widest", &equiforce::LayerStepper::widest)
      .def(
          "compute",
          [](equiforce::LayerStepper &st, const F64 &pos, const I64 &species, const I64 &edge_index, int64_t n_local,
             const I64 &ghost_owner) {
            torch::Tensor tpos = to_tensor(pos), tsp = to_tensor(species), tei = to_tensor(edge_index);
            if (tei.dim() == 1 && tei.numel() == 0) tei = tei.reshape({2, 0});
            std::vector<int64_t> owner(ghost_owner.data(), ghost_owner.data() + ghost_owner.size());
            const int64_t n_all = tpos.size(0);
            if (static_cast<int64_t>(owner.size()) != n_all - n_local)
              throw equiforce::Error("ghost_owner must have one entry per ghost (n_all - n_local)");
            for (auto o : owner)
              if (o < 0 || o >= n_local) throw equiforce::Error("ghost_owner entries must be local rows");
            int n_forward = 0, n_reverse = 0;
            auto fwd = [&](int, double *rows, int w) {
              ++n_forward;
              for (int64_t g = 0; g < n_all - n_local; ++g)
                std::copy(rows + owner[g] * w, rows + (owner[g] + 1) * w, rows + (n_local + g) * w);
            };
            auto rev = [&](int, double *rows, int w) {
              ++n_reverse;
              for (int64_t g = 0; g < n_all - n_local; ++g)
                for (int c = 0; c < w; ++c) rows[owner[g] * w + c] += rows[(n_local + g) * w + c];
            };
            equiforce::LayerResult r;
            {
              py::gil_scoped_release release;
              r = st.compute(tpos, tsp, tei, n_local, fwd, rev);
            }
            return py::make_tuple(r.energy, to_numpy(r.atom_energy), to_numpy(r.edge_grad), n_forward, n_reverse);
          },
          "pos"_a, "species"_a, "edge_index"_a, "n_local"_a, "ghost_owner"_a,
          "Layer by layer with ghost rows refreshed from their owners: pos [n_all,3] (Angstrom), species "
          "[n_all], edge_index [2,E] (receivers local), n_local, ghost_owner [n_all - n_local] -> (energy eV, "
          "per_atom_energy [n_local] eV, dE/d edge_vec [E,3] eV/Angstrom, forward exchanges, reverse exchanges).");
}
