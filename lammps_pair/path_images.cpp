// pair_style equiforce, serial-images path (`path images`, the default on one MPI rank): the model
// sees the local atoms only; a neighbour-list edge (i, j) with j a ghost becomes (i, owner(j)) with
// the Cartesian shift x[j] - x[owner(j)]. image_edges() / select_local() / lattice_shift() also
// serve the gather path (path_gather.cpp). See pair_equiforce.h.
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
   serial-images path: the local atoms only; an edge to a ghost j becomes an edge to the local
   atom with the same tag, shifted by x[j] - x[owner] (a lattice vector)
------------------------------------------------------------------------- */

void PairEquiforce::compute_images(std::vector<int> &atoms, std::vector<int64_t> &edges,
                                   std::vector<double> &shifts, int &n_local) {
  double **x = atom->x;
  tagint *tag = atom->tag;
  std::vector<int> compact;
  n_local = select_local(atoms, compact);
  if (n_local == 0) return;

  // tag -> local row, built per call (tags need not be contiguous; no atom map required)
  std::unordered_map<tagint, int> row_of_tag;
  row_of_tag.reserve(static_cast<size_t>(n_local) * 2);
  std::vector<double> row_x(3 * static_cast<size_t>(n_local));
  for (int k = 0; k < n_local; k++) {
    row_of_tag.emplace(tag[atoms[k]], k);
    for (int d = 0; d < 3; d++) row_x[3 * k + d] = x[atoms[k]][d];
  }
  image_edges(compact, 0, row_of_tag, row_x.data(), edges, shifts,
              "pair equiforce: ghost atom with ID {} has no local owner on this single rank; "
              "use 'pair_style equiforce path gather'");
}

/* ----------------------------------------------------------------------
   the local atoms of this style, in LAMMPS order: atoms[k] = LAMMPS index, compact[i] = k (or -1)
------------------------------------------------------------------------- */

int PairEquiforce::select_local(std::vector<int> &atoms, std::vector<int> &compact) {
  int *type = atom->type;
  const int nlocal = atom->nlocal;
  compact.assign(nlocal, -1);
  for (int i = 0; i < nlocal; i++)
    if (map[type[i]] >= 0) {
      compact[i] = static_cast<int>(atoms.size());
      atoms.push_back(i);
    }
  return static_cast<int>(atoms.size());
}

/* ----------------------------------------------------------------------
   edges of the local atoms (images form, used by the images and gather paths): for each pair
   (i, j) within r_max, (row0 + compact[i], row of the owner of j) and the shift x_j - x_owner,
   a lattice vector for a ghost, zero for a local j. row_of_tag maps an atom ID to its row in the
   model's atom list, row_x [rows*3] holds the rows' positions; `missing` (with {} for the ID) is
   the error for a neighbour whose ID has no row. Owners of ghosts are looked up once per ghost.
------------------------------------------------------------------------- */

void PairEquiforce::image_edges(const std::vector<int> &compact, int row0,
                                const std::unordered_map<tagint, int> &row_of_tag, const double *row_x,
                                std::vector<int64_t> &edges, std::vector<double> &shifts,
                                const std::string &missing) {
  double **x = atom->x;
  tagint *tag = atom->tag;
  const int nlocal = atom->nlocal;
  std::vector<int> ghost_row(atom->nghost, -1);

  edges.reserve(static_cast<size_t>(list->inum) * 64);
  shifts.reserve(static_cast<size_t>(list->inum) * 96);
  for_each_local_edge([&](int i, int j) {
    int row = j < nlocal ? row0 + compact[j] : ghost_row[j - nlocal];
    if (row < 0) {
      auto it = row_of_tag.find(tag[j]);
      if (it == row_of_tag.end()) error->one(FLERR, missing, tag[j]);
      row = ghost_row[j - nlocal] = it->second;
    }
    edges.push_back(row0 + compact[i]);
    edges.push_back(row);
    double s[3] = {x[j][0] - row_x[3 * row], x[j][1] - row_x[3 * row + 1], x[j][2] - row_x[3 * row + 2]};
    if (j >= nlocal) lattice_shift(s);
    shifts.insert(shifts.end(), s, s + 3);
  });
}

/* ----------------------------------------------------------------------
   replace a ghost's shift x_ghost - x_owner (a lattice vector up to the rounding of LAMMPS' image
   coordinates) by n_a a + n_b b + n_c c computed from the integers, so that the two directions of
   an edge across the boundary get shifts that are exact negatives of each other: the model then
   pairs them and evaluates their radial weights once (equiforce::radial_pairs). A shift that is not
   within 1e-6 box lengths of a lattice vector is kept as it is.
------------------------------------------------------------------------- */

void PairEquiforce::lattice_shift(double *s) const {
  const double xprd = domain->xprd, yprd = domain->yprd, zprd = domain->zprd;
  const double xy = domain->xy, xz = domain->xz, yz = domain->yz;
  const double nc = domain->zperiodic ? std::nearbyint(s[2] / zprd) : 0.0;
  const double nb = domain->yperiodic ? std::nearbyint((s[1] - nc * yz) / yprd) : 0.0;
  const double na = domain->xperiodic ? std::nearbyint((s[0] - nb * xy - nc * xz) / xprd) : 0.0;
  const double exact[3] = {na * xprd + nb * xy + nc * xz, nb * yprd + nc * yz, nc * zprd};
  const double tol = 1e-6 * std::max(xprd, std::max(yprd, zprd));
  for (int d = 0; d < 3; d++)
    if (std::fabs(exact[d] - s[d]) > tol) return;
  for (int d = 0; d < 3; d++) s[d] = exact[d];
}
