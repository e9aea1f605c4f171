// pair_style equiforce: runs an exported equiforce model (see cpp/equiforce_model.h) in LAMMPS.
//
//   pair_style equiforce [device cpu|cuda|cuda:N|auto] [path auto|images|gather|ghost_shell]
//   pair_coeff * * model.pt El1 El2 ...     (one element per atom type, NULL = not this style)
//
// Three exact evaluation paths (`path auto`: images on one rank; on several ranks gather for a
// long-range model, and for a short-range one whichever evaluates fewer atoms per rank: ghost
// shell when a sub-domain widened by receptive field + skin is smaller than the box, else gather;
// `ghost_shell yes` is kept as `path ghost_shell`):
//  * serial images (one MPI rank, the default there): every ghost atom is a periodic image of a
//    local atom. The model sees only the local atoms; a neighbour-list edge (i, j) with j a ghost
//    becomes (i, owner(j)) with the Cartesian shift x[j] - x[owner(j)], owner = the local atom with
//    the same tag. The ghost cutoff stays r_max + skin, forces come back summed over images, the
//    virial comes from the model. Cost: the model on N atoms, as in Python.
//  * ghost shell (several ranks, or `path ghost_shell`): multi-layer message passing is made exact
//    by widening the ghost shell to the model's receptive field (num_layers * r_max, plus the
//    neighbour skin) and building neighbour lists for ghost atoms too: every rank evaluates the
//    model on its local atoms plus all ghosts that can influence them, sums the energy of its local
//    atoms only, and LAMMPS' reverse communication (newton on) adds the forces that land on ghost
//    atoms to their owners.
#pragma once

#include <memory>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "equiforce_model.h"  // equiforce::Model, equiforce::Result (libtorch)
#include "pair.h"

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
  void tune_malloc();
  static bool blas_overridden(std::string &torch_path);  // LAMMPS' BLAS shadows libtorch's MKL
  // edges (i, j) in compact numbering for the atoms `atoms` (LAMMPS indices, locals first)
  void compute_images(std::vector<int> &atoms, std::vector<int64_t> &edges, std::vector<double> &shifts,
                      int &n_local);
  int select_local(std::vector<int> &atoms, std::vector<int> &compact);
  void lattice_shift(double *s) const;
  void image_edges(const std::vector<int> &compact, int row0, const std::unordered_map<tagint, int> &row_of_tag,
                   const double *row_x, std::vector<int64_t> &edges, std::vector<double> &shifts,
                   const std::string &missing);
  void compute_ghost_shell(std::vector<int> &atoms, std::vector<int64_t> &edges, int &n_local);
  void compute_gathered();
  void evaluate(const std::vector<int> &atoms, std::vector<int64_t> &edges, std::vector<double> &shifts,
                int n_local);
  // the model on pos [N,3] / species [N] / edges (pairs) / shifts ([E*3] or empty); the box from domain
  equiforce::Result run_model(const torch::Tensor &pos, const torch::Tensor &species, std::vector<int64_t> &edges,
                              std::vector<double> &shifts, int n_local, const std::vector<int64_t> &tags);
  void tally(const equiforce::Result &res, const std::vector<int> &atoms, int row0, int n_forces, int n_eatom,
             bool global);
  void dump_edges(const torch::Tensor &pos, const std::vector<int64_t> &tags, const std::vector<int64_t> &edges,
                  const std::vector<double> &shifts, int n_local);

  std::unique_ptr<equiforce::Model> model_;
  std::string device_request_ = "auto";
  std::vector<std::string> type_elements_;  // [ntypes+1], "NULL" for unmapped types
  double r_max_ = 0.0;
  double receptive_field_ = 0.0;
  int num_layers_ = 0;
  int local_rank_ = 0, local_size_ = 1;
  enum Path { AUTO, IMAGES, GATHER, GHOST_SHELL };
  Path path_request_ = AUTO;        // `path ...` keyword
  Path path_ = AUTO;                // the path of this run (set in init_style)
  bool long_range_ = false;         // the model sums electrostatics over every atom it is given
  int logged_path_ = -1;            // path last reported in the log
  std::string auto_reason_;         // why `path auto` chose gather or ghost shell (for the log)
  std::string dump_path_;  // EQUIFORCE_DUMP_EDGES
  bool malloc_tuned_ = false;  // glibc mmap/trim thresholds raised (see tune_malloc)
};

}  // namespace LAMMPS_NS
