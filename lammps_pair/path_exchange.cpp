// pair_style equiforce, exchange path (`path exchange`; `path auto` on several MPI ranks for files
// with per-layer entry points): the model is stepped layer by layer over the local atoms' edges
// (cpp/equiforce_layers.h, equiforce::LayerStepper); between layers the ghost rows' features come
// from their owners by LAMMPS' forward communication, and in the backward pass the ghost rows'
// feature gradients go back to their owners by reverse communication (added). Ghost cutoff
// r_max + skin, no ghost neighbour lists. Forces from the per-edge gradients (f_i += dE/dr,
// f_j -= dE/dr; ghost forces go home by the usual newton-on reverse communication), virial
// -sum_e r_e (x) dE/dr_e over this rank's edges, per-atom virial half of that to each end.
// See pair_equiforce.h.
#include "pair_equiforce.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "atom.h"
#include "comm.h"
#include "error.h"
#include "force.h"
#include "neigh_list.h"
#include "neighbor.h"

using namespace LAMMPS_NS;

/* ----------------------------------------------------------------------
   the widest exchanged feature block sets the per-atom size of both communications (called from
   init_style, before Comm::init sizes its buffers from force->pair). Under pair_style hybrid,
   force->pair is the hybrid style, which took its sizes from the sub-styles in its settings(),
   before this model was loaded: raise them there too.
------------------------------------------------------------------------- */

void PairEquiforce::init_exchange() {
  comm_forward = comm_reverse = stepper_->widest();
  Pair *top = force->pair;
  if (top && top != this) {
    top->comm_forward = std::max(top->comm_forward, comm_forward);
    top->comm_reverse = std::max(top->comm_reverse, comm_reverse);
  }
}

/* ---------------------------------------------------------------------- */

void PairEquiforce::compute_exchange() {
  double **x = atom->x;
  double **f = atom->f;
  int *type = atom->type;
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;

  // edges (local receiver i, neighbour j) within r_max, LAMMPS indices
  std::vector<int64_t> src, dst;  // dst = receiver (edge_index[0]), src = neighbour (edge_index[1])
  dst.reserve(static_cast<size_t>(list->inum) * 48);
  src.reserve(static_cast<size_t>(list->inum) * 48);
  std::vector<char> used(nall - nlocal, 0);  // ghosts that neighbour a local atom
  for_each_local_edge([&](int i, int j) {
    dst.push_back(i);
    src.push_back(j);
    if (j >= nlocal) used[j - nlocal] = 1;
  });
  const int64_t ne = static_cast<int64_t>(dst.size());

  // compact rows: this style's local atoms (LAMMPS order), then the ghosts within r_max of one
  // (the others, in the skin, feed no message this step and are not evaluated)
  std::vector<int> compact(nall, -1), atoms;
  atoms.reserve(nall);
  for (int i = 0; i < nlocal; i++)
    if (map[type[i]] >= 0) {
      compact[i] = static_cast<int>(atoms.size());
      atoms.push_back(i);
    }
  const int n_local = static_cast<int>(atoms.size());
  for (int i = nlocal; i < nall; i++)
    if (used[i - nlocal]) {
      compact[i] = static_cast<int>(atoms.size());
      atoms.push_back(i);
    }
  const int n_rows = static_cast<int>(atoms.size());
  for (int64_t e = 0; e < ne; e++) {
    dst[e] = compact[dst[e]];
    src[e] = compact[src[e]];
  }

  auto pos = torch::empty({n_rows, 3}, torch::kFloat64);
  auto species = torch::empty({n_rows}, torch::kInt64);
  {
    double *p = pos.data_ptr<double>();
    int64_t *sp = species.data_ptr<int64_t>();
    for (int c = 0; c < n_rows; c++) {
      const int i = atoms[c];
      for (int d = 0; d < 3; d++) p[3 * c + d] = x[i][d];
      sp[c] = map[type[i]];
    }
  }
  auto edge_index = torch::empty({2, ne}, torch::kInt64);
  if (ne) {
    std::copy(dst.begin(), dst.end(), edge_index.data_ptr<int64_t>());
    std::copy(src.begin(), src.end(), edge_index.data_ptr<int64_t>() + ne);
  }

  // the exchanges: compact rows <-> a buffer over all LAMMPS atoms, moved by this pair's comm
  std::vector<double> big;
  auto forward = [&](int, double *rows, int w) {
    big.assign(static_cast<size_t>(nall) * w, 0.0);
    for (int c = 0; c < n_local; c++) std::copy(rows + (size_t)c * w, rows + (size_t)(c + 1) * w, &big[(size_t)atoms[c] * w]);
    xrows_ = big.data();
    xwidth_ = w;
    comm->forward_comm(this, w);
    for (int c = n_local; c < n_rows; c++)
      std::copy(&big[(size_t)atoms[c] * w], &big[(size_t)(atoms[c] + 1) * w], rows + (size_t)c * w);
    xrows_ = nullptr;
  };
  auto reverse = [&](int, double *rows, int w) {
    big.assign(static_cast<size_t>(nall) * w, 0.0);
    for (int c = n_local; c < n_rows; c++)
      std::copy(rows + (size_t)c * w, rows + (size_t)(c + 1) * w, &big[(size_t)atoms[c] * w]);
    xrows_ = big.data();
    xwidth_ = w;
    comm->reverse_comm(this, w);
    for (int c = 0; c < n_local; c++) {
      const double *b = &big[(size_t)atoms[c] * w];
      double *r = rows + (size_t)c * w;
      for (int m = 0; m < w; m++) r[m] += b[m];
    }
    xrows_ = nullptr;
  };

  equiforce::LayerResult res;
  try {
    res = stepper_->compute(pos, species, edge_index, n_local, forward, reverse);
  } catch (const std::exception &e) {
    error->one(FLERR, std::string("pair equiforce: ") + e.what());
  }

  // forces, virial and per-atom virial from dE/dr_e (r_e = x_j - x_i)
  const double *g = res.edge_grad.data_ptr<double>();
  double v[6] = {0, 0, 0, 0, 0, 0};
  for (int64_t e = 0; e < ne; e++) {
    const int i = atoms[dst[e]], j = atoms[src[e]];
    const double *ge = g + 3 * e;
    for (int d = 0; d < 3; d++) {
      f[i][d] += ge[d];
      f[j][d] -= ge[d];
    }
    if (vflag_either) {
      const double r[3] = {x[j][0] - x[i][0], x[j][1] - x[i][1], x[j][2] - x[i][2]};
      const double ve[6] = {-r[0] * ge[0], -r[1] * ge[1], -r[2] * ge[2],
                            -r[0] * ge[1], -r[0] * ge[2], -r[1] * ge[2]};
      for (int m = 0; m < 6; m++) v[m] += ve[m];
      if (vflag_atom)
        for (int m = 0; m < 6; m++) {
          vatom[i][m] += 0.5 * ve[m];
          vatom[j][m] += 0.5 * ve[m];
        }
    }
  }
  if (eflag_global) eng_vdwl += res.energy;
  if (eflag_atom) {
    const double *ea = res.atom_energy.data_ptr<double>();
    for (int c = 0; c < n_local; c++) eatom[atoms[c]] += ea[c];
  }
  if (vflag_global)
    for (int m = 0; m < 6; m++) virial[m] += v[m];
}

/* ----------------------------------------------------------------------
   communication of the current block of xwidth_ values per atom (xrows_, LAMMPS indices)
------------------------------------------------------------------------- */

int PairEquiforce::pack_forward_comm(int n, int *list, double *buf, int /*pbc_flag*/, int * /*pbc*/) {
  int m = 0;
  for (int k = 0; k < n; k++) {
    const double *r = xrows_ + static_cast<size_t>(list[k]) * xwidth_;
    for (int c = 0; c < xwidth_; c++) buf[m++] = r[c];
  }
  return m;
}

void PairEquiforce::unpack_forward_comm(int n, int first, double *buf) {
  int m = 0;
  for (int k = 0; k < n; k++) {
    double *r = xrows_ + static_cast<size_t>(first + k) * xwidth_;
    for (int c = 0; c < xwidth_; c++) r[c] = buf[m++];
  }
}

int PairEquiforce::pack_reverse_comm(int n, int first, double *buf) {
  int m = 0;
  for (int k = 0; k < n; k++) {
    const double *r = xrows_ + static_cast<size_t>(first + k) * xwidth_;
    for (int c = 0; c < xwidth_; c++) buf[m++] = r[c];
  }
  return m;
}

void PairEquiforce::unpack_reverse_comm(int n, int *list, double *buf) {
  int m = 0;
  for (int k = 0; k < n; k++) {
    double *r = xrows_ + static_cast<size_t>(list[k]) * xwidth_;
    for (int c = 0; c < xwidth_; c++) r[c] += buf[m++];
  }
}
