#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build, run the CUDA-relevant tests, and time
# `pair_style equiforce device cuda` on 1 and 2 MPI ranks sharing one GPU (exchange, ghost shell,
# gather; 4096-atom Cu, float32 and float64), and data-parallel training on 1 and 2 GPUs (NCCL,
# bench/train_scaling.py; 1 GPU only when one is visible). Fails clearly (exit 2) when no GPU is visible;
# without a GPU everything else (make install, make test) builds and passes as usual.
#
#   bench/gpu_check.sh            results in bench/results/lammps_scaling_gpu.json, train_scaling_gpu.json
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=.venv/bin/python

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU visible (nvidia-smi missing or lists none); run this on a GPU machine" >&2
  exit 2
fi
make install
if ! "$VPY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: nvidia-smi sees a GPU but torch $("$VPY" -c 'import torch; print(torch.__version__)') cannot use it" \
       "(CPU-only wheel or driver too old for its CUDA); install a CUDA torch build" >&2
  exit 2
fi
nvidia-smi -L
export OMP_NUM_THREADS=1
# CUDA-relevant tests: the runtime's device selection and the exchange path on the GPU vs the CPU
"$VPY" -m pytest -q tests/test_runtime_cpp.py -k cuda
"$VPY" -m pytest -q tests/test_lammps_exchange.py -k cuda
# timing: 1 and 2 ranks on one GPU
"$VPY" bench/lammps_scaling.py --device cuda --sizes 4096 --count-ranks 2 \
  --out bench/results/lammps_scaling_gpu.json
# training (issue 16): 1 and 2 GPUs, one process each (torchrun, NCCL), structures/s and the speed-up
NGPU=$(nvidia-smi -L | grep -c '^GPU')
if [ "$NGPU" -ge 2 ]; then
  "$VPY" bench/train_scaling.py --device cuda --procs 1 2 --structures 2048 --batch-size 64 --epochs 4 --rounds 1 \
    --out bench/results/train_scaling_gpu.json
else
  echo "gpu_check: $NGPU GPU visible: timing 1-GPU training only (the 2-GPU NCCL speed-up needs 2 GPUs)" >&2
  "$VPY" bench/train_scaling.py --device cuda --procs 1 --structures 2048 --batch-size 64 --epochs 4 --rounds 1 \
    --out bench/results/train_scaling_gpu.json
fi
