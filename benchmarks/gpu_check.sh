#!/usr/bin/env bash
# One-shot GPU measurements for benchmarks/README.md: random weights, generated data, nothing downloaded; about
# 6-8 minutes on one H100/H200. Run from the repository root after `make install`:
#   bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
# 1. PixelCLIP ViT-B/16 training step at batch 12, 640x640 crops from 750x1125 SA-1B-sized images (100 masks),
#    float32 (TF32 matmuls, the authors' setting) and bf16 autocast, parts timed with synchronisation;
# 2. the share of the step the GPU waits for data with N loader workers (bf16);
# 3. MaskCLIP ViT-B/16 evaluation images/s under each shipped protocol, and the dense-path numbers.
set -uo pipefail
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
run() {
  echo "+ $*"
  timeout "${LIMIT:-150}" "$@" 2>&1 | grep -v "No pretrained weights"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "(exit $rc: failed or timed out)"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
STEP=(benchmarks/bench_pixelclip.py step --model vitb16 --device cuda --batch 12 --crop 640 --size 750x1125
      --masks 100 --resize-short 1024 --images 48)
for precision in fp32 bf16; do
  run "$PY" "${STEP[@]}" --steps 8 --precision "$precision"
done
for workers in 2 4 8; do
  run "$PY" "${STEP[@]}" --steps 12 --precision bf16 --workers "$workers"
done
LIMIT=200 run "$PY" benchmarks/bench_inference.py --models vitb16 --device cuda --protocols
