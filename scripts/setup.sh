#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine: LLVM 22 (for inkwell's NVPTX back end) and,
# in a project-local virtualenv, ptxas/cuobjdump from NVIDIA's pinned CUDA 13.0 wheels so that
# emitted PTX can be assembled and disassembled without a GPU. Each step is skipped when done.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need_apt=()
for pkg in llvm-22-dev libpolly-22-dev zlib1g-dev libzstd-dev; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
else
  echo "setup: LLVM 22 packages present"
fi

if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
tools=.venv/lib/python3*/site-packages/nvidia/cu13/bin
if ! ls $tools/ptxas >/dev/null 2>&1; then
  # Pin the companions too, or pip pulls newer ones than the GPU machine's 13.0 driver stack.
  echo "setup: installing ptxas (CUDA 13.0 wheels) into .venv"
  .venv/bin/pip install -q 'nvidia-cuda-nvcc==13.0.*' 'nvidia-nvvm==13.0.*' 'nvidia-cuda-crt==13.0.*' \
    'nvidia-cuda-runtime==13.0.*'
else
  echo "setup: ptxas present"
fi
if ! ls $tools/nvdisasm >/dev/null 2>&1; then
  # nvdisasm turns ptxas's cubins into SASS for the tests that look for HGMMA and local-memory
  # traffic. Its wheels start at 13.2; any of them reads sm_90a code. --no-deps keeps the
  # pinned 13.0 companions above.
  echo "setup: installing nvdisasm into .venv"
  .venv/bin/pip install -q --no-deps 'nvidia-cuda-nvdisasm==13.2.*'
else
  echo "setup: nvdisasm present"
fi
ls $tools/ptxas $tools/nvdisasm >/dev/null
echo "setup: done"
