// pair_style equiforce, ghost-shell path (`path ghost_shell`): local atoms plus every ghost within
// num_layers hops, ghost cutoff widened to the receptive field + skin. See pair_equiforce.h.
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
   ghost-shell path: local atoms plus every ghost within num_layers hops of a local atom, ghosts
   being explicit images with their own coordinates (no shifts)
------------------------------------------------------------------------- */

void PairEquiforce::compute_ghost_shell(std::vector<int> &atoms, std::vector<int64_t> &kept, int &n_local) {
  double **x = atom->x;
  int *type = atom->type;
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  const double cutsq_model = r_max_ * r_max_;

  const int inum = list->inum;
  const int ntot = list->inum + list->gnum;  // local then ghost atoms with neighbour lists
  int *ilist = list->ilist;
  int *numneigh = list->numneigh;
  int **firstneigh = list->firstneigh;

  // edges (i, j) with |x_j - x_i| < r_max between atoms of mapped types
  std::vector<int> estart(nall + 1, 0);
  std::vector<int> enb;
  std::vector<int> ecount(nall, 0);
  std::vector<int64_t> edges;  // pairs (i, j), LAMMPS indices
  edges.reserve(static_cast<size_t>(ntot) * 32);
  for (int ii = 0; ii < ntot; ii++) {
    const int i = ilist[ii];
    if (map[type[i]] < 0) continue;
    const int *jlist = firstneigh[i];
    for (int jj = 0; jj < numneigh[i]; jj++) {
      const int j = jlist[jj] & NEIGHMASK;
      if (map[type[j]] < 0) continue;
      const double dx = x[j][0] - x[i][0], dy = x[j][1] - x[i][1], dz = x[j][2] - x[i][2];
      if (dx * dx + dy * dy + dz * dz < cutsq_model) {
        edges.push_back(i);
        edges.push_back(j);
        ecount[i]++;
      }
    }
  }
  const size_t nedge_all = edges.size() / 2;
  for (int i = 0; i < nall; i++) estart[i + 1] = estart[i] + ecount[i];
  enb.resize(nedge_all);
  {
    std::vector<int> fill(estart.begin(), estart.end() - 1);
    for (size_t e = 0; e < nedge_all; e++) enb[fill[edges[2 * e]]++] = static_cast<int>(edges[2 * e + 1]);
  }

  // keep atoms within num_layers hops of a local atom: the only ones a local energy depends on
  std::vector<int> hop(nall, -1);
  std::vector<int> frontier;
  for (int ii = 0; ii < inum; ii++) {
    const int i = ilist[ii];
    if (i < nlocal && map[type[i]] >= 0) {
      hop[i] = 0;
      frontier.push_back(i);
    }
  }
  for (int layer = 1; layer <= num_layers_ && !frontier.empty(); layer++) {
    std::vector<int> next;
    for (int i : frontier)
      for (int k = estart[i]; k < estart[i + 1]; k++)
        if (hop[enb[k]] < 0) {
          hop[enb[k]] = layer;
          next.push_back(enb[k]);
        }
    frontier.swap(next);
  }
  // compact numbering: local atoms first (LAMMPS stores locals before ghosts)
  std::vector<int> compact(nall, -1);
  n_local = 0;
  for (int i = 0; i < nall; i++)
    if (hop[i] >= 0) {
      compact[i] = static_cast<int>(atoms.size());
      atoms.push_back(i);
      if (i < nlocal) n_local++;
    }
  if (n_local == 0) return;

  kept.reserve(edges.size());
  for (size_t e = 0; e < nedge_all; e++) {
    const int ci = compact[edges[2 * e]], cj = compact[edges[2 * e + 1]];
    if (ci >= 0 && cj >= 0) {
      kept.push_back(ci);
      kept.push_back(cj);
    }
  }
}
