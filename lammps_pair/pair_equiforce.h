// pair_style equiforce: runs an exported equiforce model (see cpp/equiforce_model.h) in LAMMPS.
//
//   pair_style equiforce [device cpu|cuda|cuda:N|auto] [path auto|images|exchange|gather|ghost_shell]
//                        [check_masses yes|no] [uncertainty yes|no] [threshold F] [on_exceed warn|stop]
//                        [frames FILE]
//   pair_coeff * * model.pt El1 El2 ...     (one element per atom type, NULL = not this style)
//
// Committee files (python/equiforce/deploy/committee.py) run on every path like any file (their
// forward is the members' mean). `uncertainty yes` (committee files only; path_uncertainty.cpp)
// calls the file's `committee` method instead and reports the members' spread: per-atom force
// uncertainty (eV/A) through extract_peratom("force_uncertainty") for `fix ID all pair N equiforce
// force_uncertainty 0`, and two global values through `compute ID all pair equiforce`:
// c_ID[1] = max force uncertainty (eV/A), c_ID[2] = energy uncertainty (eV). `threshold F` (eV/A)
// compares the max with F at every force call: on_exceed warn (default) warns, stop ends the run
// with an error; `frames FILE` appends each such frame to FILE (extxyz). Needs the complete
// member forces of every atom on one rank: images path on one rank, gather path on several.
//
// Four exact evaluation paths, one file each (the Pair methods here hold settings, coeff,
// init_style, init_one, compute and the shared run_model / tally):
//  * images (path_images.cpp; `path auto` on one MPI rank): every ghost atom is a periodic image
//    of a local atom. The model sees only the local atoms; a neighbour-list edge (i, j) with j a
//    ghost becomes (i, owner(j)) with the Cartesian shift x[j] - x[owner(j)], owner = the local
//    atom with the same tag. Ghost cutoff r_max + skin; the model on N atoms, as in Python.
//  * exchange (path_exchange.cpp; `path auto` on several ranks for files with per-layer entry
//    points, metadata "exchange": true): the model is stepped layer by layer
//    (cpp/equiforce_layers.h) over the local atoms' edges (local receivers, local or ghost
//    neighbours with their own coordinates); after each layer the ghost rows' features come from
//    their owners by forward communication, and in the backward pass the ghost rows' feature
//    gradients go back by reverse communication. Ghost cutoff stays r_max + skin, no ghost
//    neighbour lists: every rank evaluates its local atoms plus one cutoff of ghosts. Per-atom
//    virial (compute stress/atom, heat/flux) from the per-edge forces.
//  * ghost shell (path_ghost_shell.cpp; `path auto` on several ranks for short-range files without
//    per-layer entry points, when a widened sub-domain is smaller than the box): the ghost cutoff is
//    widened to the receptive field (num_layers * r_max) + skin, ghosts get neighbour lists, every
//    rank evaluates its local atoms plus every ghost within num_layers hops, sums the energy of its
//    local atoms only; LAMMPS' reverse communication (newton on) adds ghost forces to the owners.
//  * gather (path_gather.cpp; `path auto` on several ranks for long-range models): every rank
//    gathers all atoms and their images-form edges and evaluates the whole system, keeping its own
//    atoms' forces.
#pragma once

#include <memory>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "equiforce_layers.h"  // equiforce::LayerStepper (libtorch)
#include "equiforce_model.h"   // equiforce::Model, equiforce::Result (libtorch)
#include "atom.h"
#include "neigh_list.h"
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
  // exchange path: feature rows of the current layer (forward) and their gradients (reverse)
  int pack_forward_comm(int, int *, double *, int, int *) override;
  void unpack_forward_comm(int, int, double *) override;
  int pack_reverse_comm(int, int, double *) override;
  void unpack_reverse_comm(int, int *, double *) override;
  // committee uncertainty (path_uncertainty.cpp)
  void *extract_peratom(const char *, int &) override;
  void *extract(const char *, int &) override;

 protected:
  void allocate();
  void tune_malloc();
  static bool blas_overridden(std::string &torch_path);  // LAMMPS' BLAS shadows libtorch's MKL
  // coeff() steps
  torch::Device pick_device();
  void load_model(const char *file, const torch::Device &device);
  void map_types(int ntypes, char **elements, const char *file);
  void share_threads(const torch::Device &device);
  void warn_blas(const torch::Device &device);
  void log_model(const char *file, const torch::Device &device);
  void check_masses();        // error->all when a type's mass is not its element's (type order mix-up)
  void check_min_distance();
  // visit(i, j) for every local atom i of this style and each neighbour j (local or ghost) of this
  // style closer than r_max: the edges (receiver i) the images and exchange paths start from
  template <typename Visit> void for_each_local_edge(Visit &&visit) const {
    double **x = atom->x;
    const int *type = atom->type;
    const int nlocal = atom->nlocal;
    const double cutsq_model = r_max_ * r_max_;
    for (int ii = 0; ii < list->inum; ii++) {
      const int i = list->ilist[ii];
      if (i >= nlocal || map[type[i]] < 0) continue;
      const int *jlist = list->firstneigh[i];
      for (int jj = 0; jj < list->numneigh[i]; jj++) {
        const int j = jlist[jj] & NEIGHMASK;
        if (map[type[j]] < 0) continue;
        const double dx = x[j][0] - x[i][0], dy = x[j][1] - x[i][1], dz = x[j][2] - x[i][2];
        if (dx * dx + dy * dy + dz * dz < cutsq_model) visit(i, j);
      }
    }
  }  // error->one naming the two atoms closer than min_distance_
  // init_style() steps
  void choose_path();
  void log_path();

  // images path (path_images.cpp): edges (i, j) in compact numbering for the local atoms
  void compute_images(std::vector<int> &atoms, std::vector<int64_t> &edges, std::vector<double> &shifts,
                      int &n_local);
  int select_local(std::vector<int> &atoms, std::vector<int> &compact);
  void lattice_shift(double *s) const;
  void image_edges(const std::vector<int> &compact, int row0, const std::unordered_map<tagint, int> &row_of_tag,
                   const double *row_x, std::vector<int64_t> &edges, std::vector<double> &shifts,
                   const std::string &missing);
  // ghost-shell path (path_ghost_shell.cpp)
  void compute_ghost_shell(std::vector<int> &atoms, std::vector<int64_t> &edges, int &n_local);
  // gather path (path_gather.cpp)
  void compute_gathered();
  // exchange path (path_exchange.cpp)
  void compute_exchange();
  void init_exchange();

  void evaluate(const std::vector<int> &atoms, std::vector<int64_t> &edges, std::vector<double> &shifts,
                int n_local);
  // the model on pos [N,3] / species [N] / edges (pairs) / shifts ([E*3] or empty); the box from domain
  equiforce::Result run_model(const torch::Tensor &pos, const torch::Tensor &species, std::vector<int64_t> &edges,
                              std::vector<double> &shifts, int n_local, const std::vector<int64_t> &tags);
  void tally(const equiforce::Result &res, const std::vector<int> &atoms, int row0, int n_forces, int n_eatom,
             bool global);
  // committee uncertainty (path_uncertainty.cpp)
  bool parse_uncertainty_keyword(int narg, char **arg, int &iarg);
  void init_uncertainty();
  void grow_uncertainty();
  void check_uncertainty(const equiforce::CommitteeResult &c, const torch::Tensor &pos, const torch::Tensor &species,
                         const std::vector<int64_t> &tags, int n_local);
  void write_frame(const equiforce::CommitteeResult &c, const torch::Tensor &pos, const torch::Tensor &species,
                   const std::vector<int64_t> &tags, int n_local, int worst);
  void dump_edges(const torch::Tensor &pos, const std::vector<int64_t> &tags, const std::vector<int64_t> &edges,
                  const std::vector<double> &shifts, int n_local);

  std::unique_ptr<equiforce::Model> model_;
  std::unique_ptr<equiforce::LayerStepper> stepper_;  // exchange path; null when the file lacks entry points
  std::string exchange_unsupported_;                  // why there is no stepper (for error messages)
  std::string device_request_ = "auto";
  std::vector<std::string> type_elements_;  // [ntypes+1], "NULL" for unmapped types
  double r_max_ = 0.0;
  bool check_masses_ = true;   // `check_masses yes|no`: type masses must match the mapped elements
  double min_distance_ = 0.5;  // Angstrom, metadata "min_distance" (equiforce.units.MIN_DISTANCE)
  double receptive_field_ = 0.0;
  int num_layers_ = 0;
  int local_rank_ = 0, local_size_ = 1;
  enum Path { AUTO, IMAGES, GATHER, GHOST_SHELL, EXCHANGE };
  Path path_request_ = AUTO;        // `path ...` keyword
  Path path_ = AUTO;                // the path of this run (set in init_style)
  bool long_range_ = false;         // the model sums electrostatics over every atom it is given
  int logged_path_ = -1;            // path last reported in the log
  std::string auto_reason_;         // why `path auto` chose gather or ghost shell (for the log)
  std::string dump_path_;  // EQUIFORCE_DUMP_EDGES
  bool malloc_tuned_ = false;  // glibc mmap/trim thresholds raised (see tune_malloc)
  // exchange path: the rows being communicated ([nall * xwidth_], host) and their width
  double *xrows_ = nullptr;
  int xwidth_ = 0;
  // committee uncertainty (`uncertainty yes`, path_uncertainty.cpp)
  bool uncertainty_ = false;
  double threshold_ = 0.0;          // eV/A on the max force uncertainty; 0 = no threshold
  bool stop_on_exceed_ = false;     // on_exceed stop (else warn)
  std::string frames_path_;         // extxyz file the frames over the threshold are appended to
  double *force_unc_ = nullptr;     // [nmax] per-atom force uncertainty (eV/A) of the local atoms
  int nmax_unc_ = 0;
  double pextra_[2] = {0.0, 0.0};   // pvector: max force uncertainty, energy uncertainty (rank 0; 0 elsewhere)
  double max_force_unc_ = 0.0;      // the last call's values, the same on every rank (extract)
  double energy_unc_ = 0.0;
  torch::Tensor unc_rows_;          // [rows] force uncertainty of the rows of the last model call
  int warnings_ = 0;                // threshold warnings printed so far
  bigint exceeded_ = 0;             // force calls over the threshold
};

}  // namespace LAMMPS_NS
