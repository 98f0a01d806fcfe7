#!/usr/bin/env bash
# Serve a (merged) memory-builder model over vLLM's OpenAI-compatible API, for evaluation or as the
# expert/answer backend (llm_client.py with provider vllm and base_url http://HOST:PORT/v1).
#
#   MODEL=/path/to/hf_model bash scripts/launch_vllm_openai_server.sh [extra vllm serve flags...]
#   MODEL        HF model folder or hub id                                     (required)
#   SERVED_NAME  model name clients send (default: the folder's base name)
#   HOST (0.0.0.0), PORT (8000), TP tensor parallel size (1),
#   MAX_MODEL_LEN (26000 = 20000 prompt + 6000 response tokens), GPU_MEM_UTIL (0.9), DTYPE (bfloat16)
#   VLLM         the vllm executable (default: vllm on PATH)
set -euo pipefail

if [[ -z "${MODEL:-}" ]]; then
  echo "launch_vllm_openai_server.sh: MODEL is not set" >&2
  exit 2
fi
VLLM="${VLLM:-vllm}"
if ! command -v "$VLLM" >/dev/null 2>&1; then
  echo "launch_vllm_openai_server.sh: '$VLLM' not found (pip install vllm, or set VLLM=...)" >&2
  exit 2
fi
SERVED_NAME="${SERVED_NAME:-$(basename "${MODEL%/}")}"

exec "$VLLM" serve "$MODEL" \
  --served-model-name "$SERVED_NAME" \
  --host "${HOST:-0.0.0.0}" \
  --port "${PORT:-8000}" \
  --tensor-parallel-size "${TP:-1}" \
  --max-model-len "${MAX_MODEL_LEN:-26000}" \
  --gpu-memory-utilization "${GPU_MEM_UTIL:-0.9}" \
  --dtype "${DTYPE:-bfloat16}" \
  "$@"
