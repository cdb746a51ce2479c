#!/usr/bin/env bash
# GPU training MFU at GPT-2 small's shape (124M, context 1024): bf16 autocast, flash SDPA, torch.compile and
# fused AdamW, against the bf16 matmul rate measured in the same run. Under 5 minutes on one H100/H200.
# Usage (a machine with CUDA torch and the data mirror): LLMMO_DATA_DIR=../shared/data bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(0))"
"$PY" -m benchmarks.train_speed --shape 124M --device cuda --dtype bf16 --compile --steps 10 --windows 3 | tee "${OUT:-/tmp}/gpu_mfu.json"
"$PY" -m benchmarks.train_speed --shape 124M --device cuda --dtype bf16 --steps 10 --windows 3 | tee "${OUT:-/tmp}/gpu_mfu_eager.json"
