// equiforce._runtime: the C++ model runtime exposed to Python (numpy in, numpy out), so tests can
// compare it with the Python exported module on the same inputs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>

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
}
