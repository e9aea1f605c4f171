// pair_style equiforce: runs an exported equiforce model (see cpp/equiforce_model.h) in LAMMPS.
//
//   pair_style equiforce [device cpu|cuda|cuda:N|auto]
//   pair_coeff * * model.pt El1 El2 ...     (one element per atom type, NULL = not this style)
//
// Multi-layer message passing is made exact under MPI by widening the ghost shell to the model's
// receptive field (num_layers * r_max, plus the neighbour skin) and building neighbour lists for
// ghost atoms too: every rank evaluates the model on its local atoms plus all ghosts that can
// influence them, sums the energy of its local atoms only, and LAMMPS' reverse communication
// (newton on) adds the forces that land on ghost atoms to their owners.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "pair.h"

namespace equiforce {
class Model;
}

namespace LAMMPS_NS {

class PairEquiforce : public Pair {
 public:
  PairEquiforce(class LAMMPS *);
  ~PairEquiforce() override;
  void compute(int, int) override;
  void settings(int, char **) override;
  void coeff(int, char **) override;
  void init_style() override;
  double init_one(int, int) override;

 protected:
  void allocate();
  void dump_edges(const std::vector<int> &atoms, const std::vector<int64_t> &edges, int n_local);

  std::unique_ptr<equiforce::Model> model_;
  std::string device_request_ = "auto";
  std::vector<std::string> type_elements_;  // [ntypes+1], "NULL" for unmapped types
  double r_max_ = 0.0;
  double receptive_field_ = 0.0;
  int num_layers_ = 0;
  int local_rank_ = 0, local_size_ = 1;
  std::string dump_path_;  // EQUIFORCE_DUMP_EDGES
};

}  // namespace LAMMPS_NS
