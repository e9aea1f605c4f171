"""Data-parallel training with torch.distributed: the process group, batch shards, reductions.

Launch (the usual way; torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``)::

    torchrun --nproc_per_node 2 -m equiforce train --data data.extxyz --out run/ ...
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint HOST:29500 -m equiforce train ...

Without those variables (a plain ``equiforce train``) :func:`setup` returns a one-process context
and nothing here talks to other processes. Backends: NCCL for ``--device cuda`` (each process
takes ``cuda:LOCAL_RANK``), gloo on the CPU.

How one optimiser step is split so that N processes take exactly the step of one process with the
same global batch (``batch_size`` is the GLOBAL batch; the tests check the weights to 1e-6):

* every process draws the same global batches (seeded shuffle), and process ``r`` takes the fixed
  contiguous slice :func:`shard` ``r`` of each (a shard of every epoch);
* the loss of a shard is normalised by the counts of the whole global batch
  (:func:`global_counts`), so the shard losses add up to the one-process loss;
* DistributedDataParallel averages gradients over the N processes, so each process backpropagates
  ``N * shard loss`` and the averaged gradient is the gradient of the one-process loss;
* a process whose shard is empty (a last batch with fewer structures than processes) runs its
  model on one structure with a zero weight, so every process joins every gradient reduction.

Metrics and the per-step flags (loss, time limit) are reduced with :func:`gather_sum`: an
all-gather summed in rank order, so every process holds bit-identical values and takes the same
decisions (learning-rate schedule, best checkpoint, early stopping, time limit). The model,
optimiser and EMA states are identical on every process, so rank 0 alone writes files (checkpoints,
metrics.csv) and a run may be resumed with any number of processes.

When one process fails (an error on rank 0 while writing a checkpoint, a bad input), it exits with
its error message; torchrun's agent then stops the other processes and reports which rank failed.
A process that waits for a peer that is gone stops after ``EQUIFORCE_DIST_TIMEOUT_S`` seconds
(default 600) with torch.distributed's timeout error instead of hanging.
"""
import datetime
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError

DEFAULT_TIMEOUT_S = 600.0


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, its ``device``."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_distributed() -> bool:
    """True when this process was started by torchrun (or another launcher) with WORLD_SIZE > 1."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def process_rank() -> int:
    """This process's rank from the launcher's environment (0 without a launcher)."""
    return int(os.environ.get("RANK", "0") or 0)


def setup(device: str) -> DistContext:
    """Join the process group of a torchrun launch (or return the one-process context).

    ``device``: the configured device ('cpu', 'cuda' or 'cuda:N'); with several processes 'cuda'
    becomes ``cuda:LOCAL_RANK`` (NCCL), 'cpu' uses gloo."""
    if not launched_distributed():
        return DistContext(device=torch.device(device))
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is not None:
            raise ConfigError(f"--device {device} names one GPU, but {world} processes need one each; use --device "
                              "cuda (process LOCAL_RANK takes cuda:LOCAL_RANK)")
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but CUDA is not available; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"process {rank} has LOCAL_RANK {local_rank} but this node has "
                              f"{torch.cuda.device_count()} GPU(s); start at most that many processes per node "
                              "(torchrun --nproc_per_node)")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        timeout = float(os.environ.get("EQUIFORCE_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout),
                                **({"device_id": dev} if backend == "nccl" else {}))
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend)


def teardown(ctx: DistContext) -> None:
    """Leave the process group (after a finished or failed run).

    The DistributedDataParallel wrapper of a finished run (and its reducer) may sit in a reference
    cycle that holds the process group: ``destroy_process_group`` only drops torch's own references,
    and a gloo process group freed later, during interpreter finalisation, can abort the process
    (SIGABRT, "terminate called without an active exception", seen once on rank 1 of a finished
    2-process run). So the cycles are collected first, while the interpreter is fully alive."""
    if ctx.enabled:
        import gc

        import torch.distributed as dist

        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
        gc.collect()


def shard(items: Sequence[int], rank: int, world_size: int) -> List[int]:
    """Process ``rank``'s contiguous slice of ``items`` (sizes differ by at most one; the first
    ``len % world_size`` slices are one longer; empty when there are fewer items than processes)."""
    n = len(items)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return list(items[start:stop])


def global_counts(natoms: Sequence[int], has_stress: Sequence[bool], has_dipole: Sequence[bool],
                  has_polarizability: Sequence[bool] = ()) -> Dict[str, int]:
    """Loss normalisers of a whole global batch: structures, force components (3 per atom), stress
    components (9 per labelled structure), dipole components (3 per labelled structure),
    polarizability components (9 per labelled structure)."""
    return {"energy": len(natoms), "forces": 3 * int(sum(int(n) for n in natoms)),
            "stress": 9 * int(sum(bool(s) for s in has_stress)), "dipole": 3 * int(sum(bool(d) for d in has_dipole)),
            "polarizability": 9 * int(sum(bool(a) for a in has_polarizability))}


def gather_sum(ctx: DistContext, values: Tensor) -> Tensor:
    """Sum of ``values`` (any shape, float64) over all processes, added in rank order, so every
    process gets bit-identical results. The input itself without several processes."""
    if not ctx.enabled:
        return values
    import torch.distributed as dist

    local = values.detach().to(device=ctx.device, dtype=torch.float64).contiguous()
    parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(parts, local)
    total = parts[0].clone()
    for p in parts[1:]:
        total = total + p
    return total.cpu()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def wrap_model(ctx: DistContext, step_module: nn.Module) -> nn.Module:
    """``step_module`` in DistributedDataParallel (initial weights broadcast from rank 0) with several
    processes, itself otherwise."""
    if not ctx.enabled:
        return step_module
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(step_module, device_ids=ids, broadcast_buffers=False, find_unused_parameters=True)


def split_for_rank(n: int, ctx: DistContext) -> List[int]:
    """The indices ``range(n)`` this process evaluates (validation): its contiguous shard."""
    return shard(list(range(n)), ctx.rank, ctx.world_size)


def gather_accumulator_sums(ctx: DistContext, sums: Dict[str, list]) -> Dict[str, list]:
    """:class:`equiforce.training.metrics.ErrorAccumulator` sums (quantity -> [count, sum |e|, sum e^2])
    added over all processes."""
    keys = sorted(sums)
    local = torch.tensor(np.array([sums[k] for k in keys], dtype=np.float64))
    total = gather_sum(ctx, local).numpy()
    return {k: [int(round(total[i, 0])), float(total[i, 1]), float(total[i, 2])] for i, k in enumerate(keys)}
