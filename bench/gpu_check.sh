#!/usr/bin/env bash
# The real-shape check on a GPU machine, in one short run (< 8 min on an H100/H200): the Wan2.1-1.3B
# transformer (random weights, real config) at the real latents of 17 and 81 frames at 480x832, one
# draw forward+backward with and without the kron hooks on all 300 Linear layers, float32 and
# bfloat16, and the real VAE encoding a 17x480x832 clip with and without tiling. Peak memory is
# torch.cuda.max_memory_allocated. Writes $OUT/real_shapes_gpu.json (or bench/results/).
#
#   bash bench/gpu_check.sh            # needs a CUDA torch, diffusers and this package importable
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT_DIR=${OUT:-bench/results}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
"$PY" -c "import carv_attrib" 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 460 "$PY" bench/real_shapes.py --device cuda --repeats 3 \
  --latents 16x5x60x104,16x21x60x104 --clip 17x480x832 --out "$OUT_DIR/real_shapes_gpu.json"
