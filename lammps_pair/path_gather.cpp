// pair_style equiforce, gather path (`path gather`, the multi-rank path of long-range models):
// every rank gathers all atoms and edges and evaluates the whole system. See pair_equiforce.h.
#include "pair_equiforce.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <unordered_map>
#include <vector>

#include "atom.h"
#include "comm.h"
#include "domain.h"
#include "error.h"
#include "neigh_list.h"

using namespace LAMMPS_NS;

/* ----------------------------------------------------------------------
   gather path: all ranks exchange their local atoms and their edges (images-path form: the
   neighbour is the owner's global index plus the image shift) and evaluate the whole system
------------------------------------------------------------------------- */

void PairEquiforce::compute_gathered() {
  double **x = atom->x;
  int *type = atom->type;
  tagint *tag = atom->tag;
  const int nprocs = comm->nprocs;

  // this rank's atoms of this style, in LAMMPS order
  std::vector<int> atoms, compact;
  const int n_mine = select_local(atoms, compact);

  // atom counts and offsets (rank order); a rank owning no atoms still takes part
  std::vector<int> counts(nprocs), displs(nprocs + 1, 0);
  MPI_Allgather(&n_mine, 1, MPI_INT, counts.data(), 1, MPI_INT, world);
  for (int r = 0; r < nprocs; r++) {
    if (static_cast<int64_t>(displs[r]) + counts[r] > INT32_MAX / 3)
      error->all(FLERR, "pair equiforce: too many atoms for the gather path; use 'path ghost_shell' (short-range "
                        "models only)");
    displs[r + 1] = displs[r] + counts[r];
  }
  const int n_all = displs[nprocs];
  if (n_all == 0) return;
  const int offset = displs[comm->me];

  std::vector<tagint> my_tag(n_mine);
  std::vector<int> my_species(n_mine);
  std::vector<double> my_x(3 * static_cast<size_t>(n_mine));
  for (int k = 0; k < n_mine; k++) {
    const int i = atoms[k];
    my_tag[k] = tag[i];
    my_species[k] = map[type[i]];
    for (int d = 0; d < 3; d++) my_x[3 * k + d] = x[i][d];
  }
  std::vector<tagint> all_tag(n_all);
  std::vector<int> all_species(n_all);
  auto pos = torch::empty({n_all, 3}, torch::kFloat64);
  double *all_x = pos.data_ptr<double>();
  MPI_Allgatherv(my_tag.data(), n_mine, MPI_LMP_TAGINT, all_tag.data(), counts.data(), displs.data(),
                 MPI_LMP_TAGINT, world);
  MPI_Allgatherv(my_species.data(), n_mine, MPI_INT, all_species.data(), counts.data(), displs.data(), MPI_INT,
                 world);
  {
    std::vector<int> c3(nprocs), d3(nprocs);
    for (int r = 0; r < nprocs; r++) {
      c3[r] = 3 * counts[r];
      d3[r] = 3 * displs[r];
    }
    MPI_Allgatherv(my_x.data(), 3 * n_mine, MPI_DOUBLE, all_x, c3.data(), d3.data(), MPI_DOUBLE, world);
  }
  std::unordered_map<tagint, int> index_of_tag;
  index_of_tag.reserve(static_cast<size_t>(n_all) * 2);
  for (int k = 0; k < n_all; k++) index_of_tag.emplace(all_tag[k], k);

  // this rank's edges: (global index of i, global index of the owner of j) + shift x_j - x_owner
  std::vector<int64_t> my_edges;
  std::vector<double> my_shifts;
  image_edges(compact, offset, index_of_tag, all_x, my_edges, my_shifts,
              "pair equiforce: neighbour atom with ID {} is owned by no rank (duplicate or missing atom IDs?)");
  const int64_t my_ne = static_cast<int64_t>(my_edges.size() / 2);
  std::vector<int64_t> ne_counts(nprocs);
  MPI_Allgather(&my_ne, 1, MPI_INT64_T, ne_counts.data(), 1, MPI_INT64_T, world);
  int64_t ne_all = 0;
  for (auto c : ne_counts) ne_all += c;
  if (3 * ne_all > INT32_MAX)
    error->all(FLERR, "pair equiforce: too many edges ({}) for the gather path; use 'path ghost_shell' "
                      "(short-range models only)", ne_all);
  std::vector<int> c2(nprocs), d2(nprocs), c3(nprocs), d3(nprocs);
  for (int r = 0, acc = 0; r < nprocs; r++) {
    c2[r] = static_cast<int>(2 * ne_counts[r]);
    c3[r] = static_cast<int>(3 * ne_counts[r]);
    d2[r] = 2 * acc;
    d3[r] = 3 * acc;
    acc += static_cast<int>(ne_counts[r]);
  }
  std::vector<int64_t> edges(2 * ne_all);
  std::vector<double> shifts(3 * ne_all);
  MPI_Allgatherv(my_edges.data(), c2[comm->me], MPI_INT64_T, edges.data(), c2.data(), d2.data(), MPI_INT64_T,
                 world);
  MPI_Allgatherv(my_shifts.data(), c3[comm->me], MPI_DOUBLE, shifts.data(), c3.data(), d3.data(), MPI_DOUBLE,
                 world);

  auto species = torch::empty({n_all}, torch::kInt64);
  int64_t *sp = species.data_ptr<int64_t>();
  for (int k = 0; k < n_all; k++) sp[k] = all_species[k];
  std::vector<int64_t> tags64(all_tag.begin(), all_tag.end());
  equiforce::Result res = run_model(pos, species, edges, shifts, n_all, tags64);

  // each rank keeps its own atoms; rank 0 tallies the global energy and virial
  tally(res, atoms, offset, n_mine, n_mine, comm->me == 0);
}
