// pair_style equiforce, committee uncertainty (`uncertainty yes`): settings, the per-atom and
// global values LAMMPS reads (extract_peratom / pvector / extract), the threshold and the frames
// written when it is passed. See pair_equiforce.h; the committee file: python/equiforce/deploy/committee.py.
#include "pair_equiforce.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

#include "atom.h"
#include "comm.h"
#include "domain.h"
#include "error.h"
#include "memory.h"
#include "update.h"
#include "utils.h"

using namespace LAMMPS_NS;

static constexpr int kMaxWarnings = 10;  // threshold warnings printed before the rest are only counted

/* ----------------------------------------------------------------------
   uncertainty yes|no, threshold F, on_exceed warn|stop, frames FILE: true (and iarg advanced) when
   arg[iarg] is one of these keywords
------------------------------------------------------------------------- */

bool PairEquiforce::parse_uncertainty_keyword(int narg, char **arg, int &iarg) {
  const char *key = arg[iarg];
  const bool known = strcmp(key, "uncertainty") == 0 || strcmp(key, "threshold") == 0 ||
                     strcmp(key, "on_exceed") == 0 || strcmp(key, "frames") == 0;
  if (!known) return false;
  const char *v = iarg + 1 < narg ? arg[iarg + 1] : "";
  if (strcmp(key, "uncertainty") == 0) {
    if (strcmp(v, "yes") != 0 && strcmp(v, "no") != 0)
      error->all(FLERR, "pair_style equiforce: 'uncertainty' needs yes (a committee file: report the members' "
                        "spread) or no (default)");
    uncertainty_ = strcmp(v, "yes") == 0;
  } else if (strcmp(key, "threshold") == 0) {
    char *end = nullptr;
    const double t = *v ? std::strtod(v, &end) : 0.0;
    if (!*v || *end != '\0' || !(t > 0.0) || !std::isfinite(t))
      error->all(FLERR, "pair_style equiforce: 'threshold' needs a positive number (eV/A, compared with the largest "
                        "per-atom force uncertainty), got '{}'", v);
    threshold_ = t;
  } else if (strcmp(key, "on_exceed") == 0) {
    if (strcmp(v, "warn") != 0 && strcmp(v, "stop") != 0)
      error->all(FLERR, "pair_style equiforce: 'on_exceed' needs warn (default: a warning, the run goes on) or stop "
                        "(the run ends with an error), got '{}'", v);
    stop_on_exceed_ = strcmp(v, "stop") == 0;
  } else {
    if (!*v) error->all(FLERR, "pair_style equiforce: 'frames' needs a file name (extxyz frames over the threshold)");
    frames_path_ = v;
  }
  iarg += 2;
  return true;
}

/* ---------------------------------------------------------------------- */

void PairEquiforce::init_uncertainty() {
  if (!uncertainty_) return;
  if (model_->metadata().committee_size < 1)
    error->all(FLERR, "pair_style equiforce: 'uncertainty yes' needs a committee file, but '{}' is a single model; "
                      "export several trained runs into one file (`equiforce export RUN_A RUN_B RUN_C -o "
                      "committee.pt`) or drop 'uncertainty yes'", model_->path());
  if (comm->me == 0)
    utils::logmesg(lmp, "pair equiforce: committee of {} members, uncertainty yes: per-atom force uncertainty "
                        "(eV/A) via 'fix ID all pair N equiforce force_uncertainty 0', max force / energy "
                        "uncertainty as c_ID[1] / c_ID[2] of 'compute ID all pair equiforce'{}\n",
                   model_->metadata().committee_size,
                   threshold_ > 0.0 ? fmt::format("; threshold {} eV/A, on_exceed {}{}", threshold_,
                                                  stop_on_exceed_ ? "stop" : "warn",
                                                  frames_path_.empty() ? "" : ", frames -> " + frames_path_)
                                    : "");
}

// per-atom storage for the local atoms (atom->nmax rows), zeroed at every force call
void PairEquiforce::grow_uncertainty() {
  if (atom->nmax > nmax_unc_) {
    memory->destroy(force_unc_);
    nmax_unc_ = atom->nmax;
    memory->create(force_unc_, nmax_unc_, "pair:force_uncertainty");
  }
  for (int i = 0; i < nmax_unc_; i++) force_unc_[i] = 0.0;
  // a step in which this style evaluates nothing (no atoms) reports no spread, not the last one
  max_force_unc_ = energy_unc_ = 0.0;
  pextra_[0] = pextra_[1] = 0.0;
}

/* ----------------------------------------------------------------------
   `fix ID all pair N equiforce force_uncertainty 0`: per-atom force uncertainty (eV/A)
------------------------------------------------------------------------- */

void *PairEquiforce::extract_peratom(const char *name, int &ncol) {
  ncol = 0;
  if (strcmp(name, "force_uncertainty") == 0) {
    if (!uncertainty_) return nullptr;
    if (!force_unc_) grow_uncertainty();  // fix pair asks before the first run
    return force_unc_;
  }
  return nullptr;
}

// library interface / Python: "max_force_uncertainty" (eV/A) and "energy_uncertainty" (eV), scalars
void *PairEquiforce::extract(const char *name, int &dim) {
  dim = 0;
  if (!uncertainty_) return nullptr;
  if (strcmp(name, "max_force_uncertainty") == 0) return &max_force_unc_;
  if (strcmp(name, "energy_uncertainty") == 0) return &energy_unc_;
  return nullptr;
}

/* ----------------------------------------------------------------------
   after a committee call on the images (one rank) or gather (every rank, whole system) path:
   the rows [0, n_local) are complete atoms, so the max over them is the global max and is the
   same on every rank. pvector on rank 0 only (compute pair sums it over ranks).
------------------------------------------------------------------------- */

void PairEquiforce::check_uncertainty(const equiforce::CommitteeResult &c, const torch::Tensor &pos,
                                      const torch::Tensor &species, const std::vector<int64_t> &tags, int n_local) {
  unc_rows_ = c.force_uncertainty;
  energy_unc_ = c.energy_uncertainty;
  max_force_unc_ = 0.0;
  int worst = -1;
  const double *u = c.force_uncertainty.data_ptr<double>();
  for (int k = 0; k < n_local; k++)
    if (worst < 0 || u[k] > max_force_unc_ || std::isnan(u[k])) {
      max_force_unc_ = u[k];
      worst = k;
    }
  if (comm->nprocs > 1) {
    // gather path: every rank evaluated the whole system, but GPU reductions may differ in the last
    // bits between ranks; one decision for all (rank 0's values), so that error->all is reached by
    // every rank or by none
    double v[3] = {max_force_unc_, energy_unc_, static_cast<double>(worst)};
    MPI_Bcast(v, 3, MPI_DOUBLE, 0, world);
    max_force_unc_ = v[0];
    energy_unc_ = v[1];
    worst = static_cast<int>(v[2]);
  }
  pextra_[0] = comm->me == 0 ? max_force_unc_ : 0.0;
  pextra_[1] = comm->me == 0 ? energy_unc_ : 0.0;
  if (threshold_ <= 0.0 || n_local == 0) return;
  if (max_force_unc_ <= threshold_) return;  // a NaN spread counts as over the threshold
  exceeded_++;
  if (!frames_path_.empty() && comm->me == 0) write_frame(c, pos, species, tags, n_local, worst);
  const std::string what =
      fmt::format("committee force uncertainty {:.4g} eV/A on atom {} at step {} exceeds the threshold {} eV/A "
                  "(energy uncertainty {:.4g} eV){}", max_force_unc_, worst >= 0 ? tags[worst] : -1,
                  update->ntimestep, threshold_, energy_unc_,
                  frames_path_.empty() ? "" : "; frame appended to " + frames_path_);
  if (stop_on_exceed_)
    error->all(FLERR, "pair equiforce: {} (on_exceed stop): the model is extrapolating. Label such frames with the "
                      "reference method and retrain, or raise the threshold", what);
  if (comm->me == 0 && warnings_ < kMaxWarnings) {
    warnings_++;
    error->warning(FLERR, "pair equiforce: {}{}", what,
                   warnings_ == kMaxWarnings ? " (further threshold warnings are not printed; c_ID[1] of 'compute "
                                               "ID all pair equiforce' keeps reporting the value)" : "");
  }
}

/* ----------------------------------------------------------------------
   append the frame (every atom of the call, LAMMPS positions relative to the box origin) to
   frames_path_ as extended XYZ: species, pos (A), mean forces (eV/A), force_uncertainty (eV/A), id
------------------------------------------------------------------------- */

void PairEquiforce::write_frame(const equiforce::CommitteeResult &c, const torch::Tensor &pos,
                                const torch::Tensor &species, const std::vector<int64_t> &tags, int n_local,
                                int worst) {
  FILE *fp = fopen(frames_path_.c_str(), "a");
  if (!fp) {
    error->warning(FLERR, "pair equiforce: cannot append to frames file '{}': {}", frames_path_, utils::getsyserror());
    return;
  }
  const auto &names = model_->metadata().species;
  const double *p = pos.data_ptr<double>();
  const int64_t *s = species.data_ptr<int64_t>();
  const double *f = c.mean.forces.data_ptr<double>();
  const double *u = c.force_uncertainty.data_ptr<double>();
  const double *lo = domain->boxlo;
  const bool pbc[3] = {domain->xperiodic != 0, domain->yperiodic != 0, domain->zperiodic != 0};
  fmt::print(fp, "{}\n", n_local);
  fmt::print(fp,
             "Lattice=\"{:.17g} 0 0 {:.17g} {:.17g} 0 {:.17g} {:.17g} {:.17g}\" "
             "Properties=species:S:1:pos:R:3:forces:R:3:force_uncertainty:R:1:id:I:1 pbc=\"{} {} {}\" "
             "step={} energy={:.17g} energy_uncertainty={:.17g} max_force_uncertainty={:.17g} worst_atom_id={} "
             "threshold={:.17g}\n",
             domain->xprd, domain->xy, domain->yprd, domain->xz, domain->yz, domain->zprd, pbc[0] ? "T" : "F",
             pbc[1] ? "T" : "F", pbc[2] ? "T" : "F", update->ntimestep, c.mean.energy, energy_unc_, max_force_unc_,
             tags[worst], threshold_);
  for (int k = 0; k < n_local; k++)
    fmt::print(fp, "{} {:.17g} {:.17g} {:.17g} {:.17g} {:.17g} {:.17g} {:.17g} {}\n", names[s[k]], p[3 * k] - lo[0],
               p[3 * k + 1] - lo[1], p[3 * k + 2] - lo[2], f[3 * k], f[3 * k + 1], f[3 * k + 2], u[k], tags[k]);
  fclose(fp);
}
