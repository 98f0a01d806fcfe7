#!/usr/bin/env bash
# MemBuilder SFT (paper §5): full fine-tune of Qwen3-4B-Instruct-2507 on the
# expert agent calls with LLaMA-Factory 0.9.5, DeepSpeed ZeRO-2, bf16.
#
# ---------------------------------------------------------------------------
# 0. Environment (separate venv; LLaMA-Factory pins a different transformers
#    than veRL):
#       bash scripts/setup_sft_env.sh          # -> .venv-sft (includes deepspeed 0.16.9)
#
# 1. Data. One sample per expert agent call, instruction = the exact prompt,
#    output = the expert's RAW JSON reply (not the post-action state):
#       python scripts/convert_trajectories_to_sft.py --output-file data/sft/membuilder_sft.json
#    writes data/sft/membuilder_sft.json, a JSON list of alpaca records
#       {"instruction": "<user prompt, exact>", "input": "", "output": "<expert raw JSON>",
#        "system": "<system prompt, exact; \"\" or absent if the prompt has none>"}
#    and registers it in data/sft/dataset_info.json (LLaMA-Factory 0.9.5 schema):
#       {"membuilder_sft": {"file_name": "membuilder_sft.json", "formatting": "alpaca",
#                           "columns": {"prompt": "instruction", "query": "input",
#                                       "response": "output", "system": "system"}}}
#    ("formatting" defaults to alpaca; "system" only if the records carry it.)
#    With "input" empty, LLaMA-Factory's user turn is exactly "instruction"; loss
#    is on the output only (train_on_prompt false). Samples over 20000 tokens
#    are dropped by the converter (--max-length); cutoff_len below matches.
#
# 2. Train (1 node, all GPUs):
#       bash training/sft/train_example.sh
#    Multi-GPU/multi-node goes through torchrun, which DeepSpeed requires even
#    on one GPU, so FORCE_TORCHRUN=1 is always exported; NPROC (GPUs per node,
#    default: all visible), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT are
#    passed to LLaMA-Factory's launcher.
#       DRY_RUN=1 bash training/sft/train_example.sh        # print config + command only
#       bash training/sft/train_example.sh num_train_epochs=1 save_steps=200
#    Extra key=value arguments override the generated YAML (OmegaConf syntax).
#
# Template: `qwen3_nothink`. With LLaMA-Factory 0.9.5 the `qwen3` template is a
# reasoning template that inserts an empty "<think>\n\n</think>\n\n" block before
# every response (and trains on it); Qwen3-4B-Instruct-2507 is a non-reasoning
# model whose chat template never emits think blocks, so the SFT targets must not
# contain them either. Override with TEMPLATE=... if you train a thinking model.
#
# Env (defaults = paper):
#   MODEL_PATH=Qwen/Qwen3-4B-Instruct-2507  DATASET_DIR=data/sft  DATASET_NAME=membuilder_sft
#   OUTPUT_DIR=outputs/sft/qwen3-4b-membuilder  TEMPLATE=qwen3_nothink
#   DEEPSPEED_CONFIG=training/sft/ds_z2_config.json  LR=5.0e-7  EPOCHS=10
#   PER_DEVICE_BS=2  GRAD_ACCUM=2  CUTOFF_LEN=20000  WARMUP_RATIO=0.1  MAX_GRAD_NORM=0.1
#   LR_SCHEDULER=cosine  SAVE_STRATEGY=epoch  SAVE_ONLY_MODEL=true  LOGGING_STEPS=10
#   OVERWRITE_OUTPUT_DIR=true (false: resume from the last checkpoint-N)
#   REPORT_TO=none  PREPROC_WORKERS=16  SEED=42  SFT_VENV=.venv-sft  CONFIG_FILE=<OUTPUT_DIR>/llamafactory_sft.yaml
# GPU machines: deepspeed==0.16.9 is pinned in requirements-sft.txt (it installs
# without a GPU; its ops are JIT-built on first use). If you install by hand:
#   pip install "deepspeed>=0.10.0,<=0.16.9"
# ---------------------------------------------------------------------------
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"

MODEL_PATH="${MODEL_PATH:-Qwen/Qwen3-4B-Instruct-2507}"
DATASET_DIR="${DATASET_DIR:-data/sft}"
DATASET_NAME="${DATASET_NAME:-membuilder_sft}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/sft/qwen3-4b-membuilder}"
TEMPLATE="${TEMPLATE:-qwen3_nothink}"
DEEPSPEED_CONFIG="${DEEPSPEED_CONFIG:-training/sft/ds_z2_config.json}"
LR="${LR:-5.0e-7}"  # "5.0e-7", not "5e-7": plain YAML 1.1 loaders read the latter as a string
EPOCHS="${EPOCHS:-10}"
PER_DEVICE_BS="${PER_DEVICE_BS:-2}"
GRAD_ACCUM="${GRAD_ACCUM:-2}"
CUTOFF_LEN="${CUTOFF_LEN:-20000}"
WARMUP_RATIO="${WARMUP_RATIO:-0.1}"
MAX_GRAD_NORM="${MAX_GRAD_NORM:-0.1}"
LR_SCHEDULER="${LR_SCHEDULER:-cosine}"
SAVE_STRATEGY="${SAVE_STRATEGY:-epoch}"
SAVE_ONLY_MODEL="${SAVE_ONLY_MODEL:-true}"
LOGGING_STEPS="${LOGGING_STEPS:-10}"
REPORT_TO="${REPORT_TO:-none}"
PREPROC_WORKERS="${PREPROC_WORKERS:-16}"
SEED="${SEED:-42}"
SFT_VENV="${SFT_VENV:-$REPO_ROOT/.venv-sft}"
CONFIG_FILE="${CONFIG_FILE:-$OUTPUT_DIR/llamafactory_sft.yaml}"
OVERWRITE_OUTPUT_DIR="${OVERWRITE_OUTPUT_DIR:-true}"
DRY_RUN="${DRY_RUN:-0}"

# Prefer the SFT venv. Its bin/ goes first on PATH because LLaMA-Factory's
# launcher runs a bare `torchrun`, which must be the venv's.
if [[ -x "$SFT_VENV/bin/llamafactory-cli" ]]; then
    export PATH="$SFT_VENV/bin:$PATH"
    export VIRTUAL_ENV="$SFT_VENV"
    CLI="$SFT_VENV/bin/llamafactory-cli"
else
    CLI="llamafactory-cli"
    if [[ "$DRY_RUN" != "1" ]] && ! command -v "$CLI" >/dev/null 2>&1; then
        echo "llamafactory-cli not found: run scripts/setup_sft_env.sh (or set SFT_VENV)" >&2
        exit 1
    fi
fi

# DeepSpeed training must be launched through torchrun (LLaMA-Factory raises
# "Please use FORCE_TORCHRUN=1 to launch DeepSpeed training" otherwise).
export FORCE_TORCHRUN=1
if [[ -n "${NPROC:-}" ]]; then
    export NPROC_PER_NODE="$NPROC"
fi
for v in NNODES NODE_RANK MASTER_ADDR MASTER_PORT; do
    if [[ -n "${!v:-}" ]]; then export "${v?}"; fi
done

CONFIG_YAML="$(cat <<EOF
### model
model_name_or_path: ${MODEL_PATH}
trust_remote_code: false  # Qwen3 is native in transformers

### method
stage: sft
do_train: true
finetuning_type: full
deepspeed: ${DEEPSPEED_CONFIG}

### dataset
dataset: ${DATASET_NAME}
dataset_dir: ${DATASET_DIR}
template: ${TEMPLATE}
cutoff_len: ${CUTOFF_LEN}
overwrite_cache: true
preprocessing_num_workers: ${PREPROC_WORKERS}
dataloader_num_workers: 4

### output
output_dir: ${OUTPUT_DIR}
logging_steps: ${LOGGING_STEPS}
save_strategy: ${SAVE_STRATEGY}
save_only_model: ${SAVE_ONLY_MODEL}
plot_loss: true
overwrite_output_dir: ${OVERWRITE_OUTPUT_DIR}
report_to: ${REPORT_TO}

### train
per_device_train_batch_size: ${PER_DEVICE_BS}
gradient_accumulation_steps: ${GRAD_ACCUM}
learning_rate: ${LR}
num_train_epochs: ${EPOCHS}
lr_scheduler_type: ${LR_SCHEDULER}
warmup_ratio: ${WARMUP_RATIO}
max_grad_norm: ${MAX_GRAD_NORM}
bf16: true
ddp_timeout: 180000000
seed: ${SEED}
EOF
)"

CMD=("$CLI" train "$CONFIG_FILE" "$@")

if [[ "$DRY_RUN" == "1" ]]; then
    echo "# ---- config ($CONFIG_FILE) ----"
    echo "$CONFIG_YAML"
    echo "# ---- environment ----"
    echo "FORCE_TORCHRUN=$FORCE_TORCHRUN NPROC_PER_NODE=${NPROC_PER_NODE:-<all visible GPUs>} NNODES=${NNODES:-1} NODE_RANK=${NODE_RANK:-0} MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} MASTER_PORT=${MASTER_PORT:-<free port>}"
    echo "# ---- command ----"
    printf '%q ' "${CMD[@]}"
    echo
    exit 0
fi

# The dataset must be registered beside the data file.
if [[ ! -f "$DATASET_DIR/dataset_info.json" ]]; then
    echo "missing $DATASET_DIR/dataset_info.json: run scripts/convert_trajectories_to_sft.py first" >&2
    exit 1
fi
if ! grep -q "\"$DATASET_NAME\"" "$DATASET_DIR/dataset_info.json"; then
    echo "dataset '$DATASET_NAME' is not registered in $DATASET_DIR/dataset_info.json" >&2
    exit 1
fi

mkdir -p "$(dirname "$CONFIG_FILE")"
printf '%s\n' "$CONFIG_YAML" > "$CONFIG_FILE"
echo "[train_example] config: $CONFIG_FILE" >&2
printf '[train_example] running:' >&2; printf ' %q' "${CMD[@]}" >&2; echo >&2
exec "${CMD[@]}"
