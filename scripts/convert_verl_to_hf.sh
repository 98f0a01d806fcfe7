#!/usr/bin/env bash
# Merge a veRL FSDP actor checkpoint into a Hugging Face model folder (veRL 0.9.1's model merger).
#
#   bash scripts/convert_verl_to_hf.sh CKPT_DIR TARGET_DIR
#   CKPT_DIR    .../global_step_N/actor  (or .../global_step_N; "actor" is appended when present), holding
#               model_world_size_W_rank_R.pt, fsdp_config.json and huggingface/
#   TARGET_DIR  where config.json, tokenizer files and the safetensors weights are written
#   PYTHON      interpreter with veRL (default .venv-rl/bin/python)
#
# Runs: python -m verl.model_merger merge --backend fsdp --local_dir CKPT_DIR --target_dir TARGET_DIR
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv-rl/bin/python}"

if [[ $# -ne 2 ]]; then
  echo "usage: convert_verl_to_hf.sh CKPT_DIR TARGET_DIR" >&2
  exit 2
fi
ckpt="$1"
target="$2"
if [[ -d "$ckpt/actor" ]]; then
  ckpt="$ckpt/actor"
fi
if [[ ! -f "$ckpt/fsdp_config.json" ]]; then
  echo "convert_verl_to_hf.sh: $ckpt is not a veRL FSDP checkpoint (no fsdp_config.json)" >&2
  exit 2
fi
if [[ ! -x "$PYTHON" ]]; then
  echo "convert_verl_to_hf.sh: $PYTHON not found; run scripts/setup_rl_env.sh first" >&2
  exit 2
fi

mkdir -p "$target"
"$PYTHON" -m verl.model_merger merge --backend fsdp --local_dir "$ckpt" --target_dir "$target"
echo "convert_verl_to_hf.sh: merged $ckpt -> $target"
