#!/usr/bin/env bash
# The GPU check in one command, one JSON, < 8 min on an H100/H200: bench/gpu_check.py on CUDA at the
# real Wan2.1-1.3B configs (random weights), 17x480x832, bfloat16 and float32: VAE encode clips/s,
# featurize s/clip at K=8 with --draws-per-backward chosen from free memory, peak GPU memory, the
# kron / plain fwd+bwd ratio, and a faiss Flat search over 10^6 vectors (faiss-gpu when it can be
# installed or imported, else faiss-cpu, labelled). Writes $OUT/gpu_check.json (or bench/results/).
#
#   bash bench/gpu_check.sh            # needs a CUDA torch, diffusers, faiss and this package importable
#   REAL_SHAPES=1 bash ...             # also the older bench/real_shapes.py run (17 and 81 frames; +~6 min)
#
# Dry run on a CPU machine (reduced shapes, figures not GPU ones):
#   .venv/bin/python bench/gpu_check.py --device cpu --out bench/results/gpu_check_cpu_dryrun.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT_DIR=${OUT:-bench/results}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
"$PY" -c "import carv_attrib" 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader || true
# faiss-gpu beside the installed faiss-cpu, in its own directory, if pip can reach an index (30 s at most)
if ! "$PY" -c "import faiss, sys; sys.exit(0 if faiss.get_num_gpus() > 0 else 1)" 2>/dev/null; then
  if timeout 30 "$PY" -m pip install -q --retries 0 --timeout 10 --target /tmp/faiss_gpu faiss-gpu-cu12 2>/dev/null \
    && PYTHONPATH="/tmp/faiss_gpu:$PYTHONPATH" "$PY" -c "import faiss, sys; sys.exit(0 if faiss.get_num_gpus() > 0 else 1)"; then
    export PYTHONPATH="/tmp/faiss_gpu:$PYTHONPATH"
  else
    echo "faiss-gpu not installable here: the faiss case runs on faiss-cpu (labelled in the JSON)"
  fi
fi
timeout 440 "$PY" bench/gpu_check.py --device cuda --budget-s 360 --out "$OUT_DIR/gpu_check.json"
if [ "${REAL_SHAPES:-0}" = 1 ]; then
  timeout 460 "$PY" bench/real_shapes.py --device cuda --repeats 3 \
    --latents 16x5x60x104,16x21x60x104 --clip 17x480x832 --out "$OUT_DIR/real_shapes_gpu.json"
fi
