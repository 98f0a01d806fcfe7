#!/usr/bin/env bash
# ADRPO training of the memory agents with veRL 0.9.1 on NNODES nodes (PAPER §5).
#
# Run the same command on every node; NODE_RANK=0 starts the Ray head and the trainer, the other
# ranks join HEAD_ADDR and block until the head goes away:
#
#   NODE_RANK=0 NNODES=4 HEAD_ADDR=10.0.0.1 MODEL_PATH=... TRAIN_DATA=... VAL_DATA=... \
#     bash scripts/run_memory_grpo_multinode.sh [extra hydra overrides...]
#
# Environment:
#   MODEL_PATH           SFT checkpoint (HF format) to start from                  (required)
#   TRAIN_DATA, VAL_DATA veRL parquet files from scripts/prepare_rl_data.py        (required)
#   NNODES (1), GPUS_PER_NODE (8), NODE_RANK (0), HEAD_ADDR (head node IP, 127.0.0.1), RAY_PORT (6379)
#   REWARD_CONFIG        reward settings and reward-side ablations (length penalty, alpha, sparse reward);
#                        default training/reward_server/reward_config.json. Passed to the reward function
#                        as reward_kwargs.config_path and exported as MEMBUILDER_REWARD_CONFIG.
#   REWARD_SERVER_URL    when set, overrides the config's memory_api_url (reward_kwargs.memory_api_url)
#   ADRPO_ENABLE_ATTRIBUTION (True), ADRPO_ATTRIBUTION_BOOST_FACTOR (unset: the alpha the reward returned)
#   ROLLOUT_TP (1), GPU_MEM_UTIL (0.6), EXPERIMENT_NAME (adrpo), CKPT_DIR, SAVE_FREQ (20),
#   TEST_FREQ (-1), VAL_BEFORE_TRAIN (False), LOGGER ('["console"]'), PYTHON (.venv-rl/bin/python)
#   PRINT_OVERRIDES=1    print the Hydra overrides one per line and exit (nothing is started)
#
# Trainer-side ablations: ADRPO_* above, or extra overrides such as algorithm.adrpo.enable_attribution=False
# (no "+": this script already adds the key). REWARD_CONFIG, MEMBUILDER_REWARD_CONFIG and REWARD_SERVER_URL
# are also forwarded to every Ray worker by training/rl/adrpo.py.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

NNODES="${NNODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
NODE_RANK="${NODE_RANK:-0}"
HEAD_ADDR="${HEAD_ADDR:-127.0.0.1}"
RAY_PORT="${RAY_PORT:-6379}"
PYTHON="${PYTHON:-$ROOT/.venv-rl/bin/python}"

export REWARD_CONFIG="${REWARD_CONFIG:-$ROOT/training/reward_server/reward_config.json}"
export MEMBUILDER_REWARD_CONFIG="$REWARD_CONFIG"

MAX_PROMPT=20000
MAX_RESPONSE=6000
# 32 prompts per node = 8 sessions x 4 agents; the 4 agent rows of a session must share a batch, so
# the data stays in file order (prepare_rl_data.py writes a session's four agent rows next to each other).
TRAIN_BATCH=$((32 * NNODES))
MAX_TOKENS_PER_GPU=$((MAX_PROMPT + MAX_RESPONSE))

OVERRIDES=(
  # ADRPO
  algorithm.adv_estimator=adrpo
  algorithm.norm_adv_by_std_in_grpo=True
  algorithm.use_kl_in_reward=False
  "++algorithm.adrpo.enable_attribution=${ADRPO_ENABLE_ATTRIBUTION:-True}"
  "++algorithm.adrpo.attribution_boost_factor=${ADRPO_ATTRIBUTION_BOOST_FACTOR:-null}"
  trainer.use_v1=True
  trainer.v1.trainer_mode=adrpo_sync
  # data
  "data.train_files=${TRAIN_DATA:-}"
  "data.val_files=${VAL_DATA:-}"
  data.prompt_key=prompt
  data.train_batch_size=${TRAIN_BATCH}
  data.max_prompt_length=${MAX_PROMPT}
  data.max_response_length=${MAX_RESPONSE}
  data.shuffle=False
  data.filter_overlong_prompts=False
  data.truncation=error
  # policy
  "actor_rollout_ref.model.path=${MODEL_PATH:-}"
  actor_rollout_ref.model.use_remove_padding=True
  actor_rollout_ref.model.enable_gradient_checkpointing=True
  actor_rollout_ref.actor.strategy=fsdp
  actor_rollout_ref.actor.fsdp_config.dtype=bfloat16
  actor_rollout_ref.actor.optim.lr=1e-6
  actor_rollout_ref.actor.ppo_mini_batch_size=${TRAIN_BATCH}
  actor_rollout_ref.actor.ppo_epochs=1
  actor_rollout_ref.actor.use_dynamic_bsz=True
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=${MAX_TOKENS_PER_GPU}
  actor_rollout_ref.actor.use_kl_loss=True
  actor_rollout_ref.actor.kl_loss_coef=0.02
  actor_rollout_ref.actor.kl_loss_type=low_var_kl
  actor_rollout_ref.actor.entropy_coeff=0
  actor_rollout_ref.actor.clip_ratio=0.2
  actor_rollout_ref.actor.clip_ratio_low=0.2
  actor_rollout_ref.actor.clip_ratio_high=0.2
  actor_rollout_ref.ref.fsdp_config.dtype=bfloat16
  # rollout
  actor_rollout_ref.rollout.name=vllm
  actor_rollout_ref.rollout.mode=async
  actor_rollout_ref.rollout.dtype=bfloat16
  actor_rollout_ref.rollout.n=8
  actor_rollout_ref.rollout.temperature=0.8
  actor_rollout_ref.rollout.top_p=0.9
  "actor_rollout_ref.rollout.tensor_model_parallel_size=${ROLLOUT_TP:-1}"
  "actor_rollout_ref.rollout.gpu_memory_utilization=${GPU_MEM_UTIL:-0.6}"
  actor_rollout_ref.rollout.max_model_len=${MAX_TOKENS_PER_GPU}
  actor_rollout_ref.rollout.max_num_batched_tokens=${MAX_TOKENS_PER_GPU}
  # reward: veRL 0.9.1 reads reward.custom_reward_function (the top-level key is legacy)
  "reward.custom_reward_function.path=${ROOT}/training/reward_server/reward_function.py"
  reward.custom_reward_function.name=compute_score
  "+reward.custom_reward_function.reward_kwargs.config_path=${REWARD_CONFIG}"
  reward.reward_manager.name=naive
  # trainer
  trainer.nnodes=${NNODES}
  trainer.n_gpus_per_node=${GPUS_PER_NODE}
  trainer.total_epochs=5
  trainer.critic_warmup=0
  "trainer.logger=${LOGGER:-[console]}"
  trainer.project_name=membuilder
  "trainer.experiment_name=${EXPERIMENT_NAME:-adrpo}"
  "trainer.default_local_dir=${CKPT_DIR:-$ROOT/outputs/checkpoints/${EXPERIMENT_NAME:-adrpo}}"
  "trainer.save_freq=${SAVE_FREQ:-20}"
  "trainer.test_freq=${TEST_FREQ:--1}"
  "trainer.val_before_train=${VAL_BEFORE_TRAIN:-False}"
)

if [[ -n "${REWARD_SERVER_URL:-}" ]]; then
  export REWARD_SERVER_URL
  OVERRIDES+=("+reward.custom_reward_function.reward_kwargs.memory_api_url=${REWARD_SERVER_URL}")
fi

if [[ "${PRINT_OVERRIDES:-0}" == "1" ]]; then
  printf '%s\n' "${OVERRIDES[@]}"
  exit 0
fi

for var in MODEL_PATH TRAIN_DATA VAL_DATA; do
  if [[ -z "${!var:-}" ]]; then
    echo "run_memory_grpo_multinode.sh: $var is not set" >&2
    exit 2
  fi
done
if [[ ! -x "$PYTHON" ]]; then
  echo "run_memory_grpo_multinode.sh: $PYTHON not found; run scripts/setup_rl_env.sh first" >&2
  exit 2
fi
RAY="$(dirname "$PYTHON")/ray"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ "$NODE_RANK" != "0" ]]; then
  echo "node $NODE_RANK: joining the Ray head at $HEAD_ADDR:$RAY_PORT"
  exec "$RAY" start --address="$HEAD_ADDR:$RAY_PORT" --num-gpus="$GPUS_PER_NODE" --block
fi

"$RAY" start --head --node-ip-address="$HEAD_ADDR" --port="$RAY_PORT" --num-gpus="$GPUS_PER_NODE" \
  --dashboard-host=0.0.0.0
trap '"$RAY" stop' EXIT

echo "waiting for $NNODES Ray node(s) ..."
for _ in $(seq 1 120); do
  alive="$("$PYTHON" -c 'import ray; ray.init(address="auto", logging_level="ERROR"); print(sum(n["Alive"] for n in ray.nodes()))')"
  [[ "$alive" -ge "$NNODES" ]] && break
  sleep 10
done
if [[ "$alive" -lt "$NNODES" ]]; then
  echo "run_memory_grpo_multinode.sh: only $alive of $NNODES nodes joined" >&2
  exit 1
fi

export RAY_ADDRESS="$HEAD_ADDR:$RAY_PORT"
"$PYTHON" -m training.rl.adrpo "${OVERRIDES[@]}" "$@"
