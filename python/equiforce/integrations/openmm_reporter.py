"""OpenMM reporter for committee files: logs the members' spread during a simulation.

A committee file (``equiforce export RUN_A RUN_B RUN_C -o committee.pt``) runs in OpenMM through
the same ``TorchForce`` as any file (:func:`equiforce.openmm.create_force`): its forward is the
members' mean, which OpenMM integrates. ``TorchForce`` returns only energy and forces, so the
reporter evaluates the file's ``committee`` method on the reported states (every
``report_interval`` steps) through :class:`equiforce.deploy.runner.ExportedRunner`, the one Python
path for exported files::

    from equiforce.openmm import CommitteeReporter
    simulation.reporters.append(CommitteeReporter("uncertainty.csv", 100, "committee.pt",
                                                  elements=["C", "C", "O", "H", ...], threshold=0.5))

Columns (CSV): ``step, time_ps, energy_eV, energy_uncertainty_eV, max_force_uncertainty_eV_per_A,
mean_force_uncertainty_eV_per_A, worst_atom`` (OpenMM particle index). Units are the model's (eV,
Å): the uncertainty is a property of the model, compared with thresholds in eV/Å as in LAMMPS.
With ``threshold`` (eV/Å on the largest per-atom force uncertainty): ``on_exceed="warn"`` warns
(:class:`UncertaintyWarning`) and goes on, ``"stop"`` raises :class:`UncertaintyThresholdExceeded`
out of ``simulation.step``; ``frames=PATH`` appends each such state to an extxyz file (positions Å,
mean forces eV/Å, per-atom ``force_uncertainty``) ready for labelling.
"""
import os
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np

from ..deploy.runner import ExportedRunner
from .openmm_module import NM_TO_ANGSTROM


class UncertaintyWarning(UserWarning):
    """The committee's force uncertainty passed the reporter's threshold (on_exceed="warn")."""


class UncertaintyThresholdExceeded(RuntimeError):
    """The committee's force uncertainty passed the reporter's threshold (on_exceed="stop")."""


def _symbol(element) -> str:
    return element if isinstance(element, str) else getattr(element, "symbol", str(element))


class CommitteeReporter:
    """Log a committee file's energy and force uncertainty every ``report_interval`` steps.

    Args:
        file: CSV path (replaced, or continued with ``append=True``) or an open text stream.
        report_interval: steps between reports.
        model_path: the committee file the simulation's ``TorchForce`` runs.
        elements: element of each ML atom (symbols or ``openmm.app.Element``), in the order of ``atoms``.
        atoms: OpenMM particle indices of the ML atoms; None: every particle, in order.
        periodic: use the state's periodic box (as ``create_force(periodic=...)``).
        threshold: eV/Å on the largest per-atom force uncertainty; None: log only.
        on_exceed: "warn" or "stop" (see the module docstring).
        frames: extxyz path the states over the threshold are appended to.
        append: continue an existing CSV (a simulation restarted from a checkpoint) instead of
            replacing it; the header is written only when the file is new or empty.

    ``last`` holds the latest report (dict with the CSV columns plus ``force_uncertainty`` [N]).
    """

    def __init__(self, file, report_interval: int, model_path: str, elements: Sequence,
                 atoms: Optional[Iterable[int]] = None, periodic: bool = False, threshold: Optional[float] = None,
                 on_exceed: str = "warn", frames: Optional[str] = None, append: bool = False):
        if not (isinstance(report_interval, int) and report_interval >= 1):
            raise ValueError(f"CommitteeReporter: report_interval={report_interval!r} must be a positive number of steps")
        if on_exceed not in ("warn", "stop"):
            raise ValueError(f"CommitteeReporter: on_exceed={on_exceed!r}; use 'warn' or 'stop'")
        if threshold is not None and not (float(threshold) > 0.0 and np.isfinite(float(threshold))):
            raise ValueError(f"CommitteeReporter: threshold={threshold!r} must be a positive force uncertainty in eV/Å")
        if (on_exceed == "stop" or frames) and threshold is None:
            raise ValueError("CommitteeReporter: on_exceed='stop' and frames= need a threshold (eV/Å)")
        self.runner = ExportedRunner(os.fspath(model_path), owner="CommitteeReporter")
        if not self.runner.committee_size:
            raise ValueError(f"CommitteeReporter: '{model_path}' is a single model, not a committee, so it has no "
                             "uncertainty; export several runs into one file: `equiforce export RUN_A RUN_B RUN_C "
                             "-o committee.pt`")
        self.symbols: List[str] = [_symbol(e) for e in elements]
        self.runner.species_indices(self.symbols)  # unknown elements: one line now, not at the first report
        self.atoms = None if atoms is None else [int(a) for a in atoms]
        if self.atoms is not None and len(self.atoms) != len(self.symbols):
            raise ValueError(f"CommitteeReporter: {len(self.atoms)} atoms but {len(self.symbols)} elements; give one "
                             "element per ML atom")
        self.interval = report_interval
        self.periodic = bool(periodic)
        self.threshold = None if threshold is None else float(threshold)
        self.stop = on_exceed == "stop"
        self.frames = frames
        self.exceeded = 0
        self.last: Dict[str, Any] = {}
        self._own = not hasattr(file, "write")
        continued = self._own and append and os.path.isfile(file) and os.path.getsize(file) > 0
        self._out = open(file, "a" if append else "w") if self._own else file
        if not continued:
            self._out.write("step,time_ps,energy_eV,energy_uncertainty_eV,max_force_uncertainty_eV_per_A,"
                            "mean_force_uncertainty_eV_per_A,worst_atom\n")
            self._out.flush()

    def describeNextReport(self, simulation):
        steps = self.interval - simulation.currentStep % self.interval
        return {"steps": steps, "periodic": False, "include": ["positions"]}

    def report(self, simulation, state):
        from openmm import unit

        pos = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)) * NM_TO_ANGSTROM
        if self.atoms is not None:
            pos = pos[self.atoms]
        cell, pbc = None, (False, False, False)
        if self.periodic:
            cell = np.asarray(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer)) * NM_TO_ANGSTROM
            pbc = (True, True, True)
        step = int(simulation.currentStep)
        where = f"the state at step {step}"
        mean, c = self.runner.run_committee(self.runner.inputs(pos, self.symbols, cell, pbc, where))
        k = int(np.argmax(c.force_uncertainty))
        worst = self.atoms[k] if self.atoms is not None else k
        self.last = {"step": step, "time_ps": float(state.getTime().value_in_unit(unit.picosecond)),
                     "energy_eV": mean.energy, "energy_uncertainty_eV": c.energy_uncertainty,
                     "max_force_uncertainty_eV_per_A": c.max_force_uncertainty,
                     "mean_force_uncertainty_eV_per_A": float(c.force_uncertainty.mean()), "worst_atom": worst,
                     "force_uncertainty": c.force_uncertainty}
        self._out.write(",".join(repr(self.last[key]) if isinstance(self.last[key], float) else str(self.last[key])
                                 for key in ("step", "time_ps", "energy_eV", "energy_uncertainty_eV",
                                             "max_force_uncertainty_eV_per_A", "mean_force_uncertainty_eV_per_A",
                                             "worst_atom")) + "\n")
        self._out.flush()
        if self.threshold is None or c.max_force_uncertainty <= self.threshold:
            return
        self.exceeded += 1
        if self.frames:
            self._write_frame(pos, cell, pbc, mean, c, step)
        msg = (f"CommitteeReporter: committee force uncertainty {c.max_force_uncertainty:.4g} eV/Å on particle "
               f"{worst} at step {step} exceeds the threshold {self.threshold:g} eV/Å (energy uncertainty "
               f"{c.energy_uncertainty:.4g} eV)" + (f"; frame appended to {self.frames}" if self.frames else ""))
        if self.stop:
            raise UncertaintyThresholdExceeded(msg + " (on_exceed='stop'): the model is extrapolating; label such "
                                               "frames with the reference method and retrain, or raise the threshold")
        warnings.warn(msg, UncertaintyWarning, stacklevel=2)

    def _write_frame(self, pos, cell, pbc, mean, c, step):
        import ase
        import ase.io
        from ase.calculators.singlepoint import SinglePointCalculator

        atoms = ase.Atoms(self.symbols, positions=pos, cell=cell if cell is not None else np.zeros((3, 3)), pbc=pbc)
        atoms.arrays["force_uncertainty"] = c.force_uncertainty.copy()
        atoms.info.update({"step": step, "energy_uncertainty": c.energy_uncertainty,
                           "max_force_uncertainty": c.max_force_uncertainty})
        atoms.calc = SinglePointCalculator(atoms, energy=mean.energy, forces=mean.forces)
        ase.io.write(self.frames, atoms, format="extxyz", append=True)

    def close(self):
        if self._own and not self._out.closed:
            self._out.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
