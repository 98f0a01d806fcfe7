#!/usr/bin/env bash
# Start the MemBuilder reward server (one process; see docs/interfaces.md, "Reward server").
#
#   training/reward_server/start_server.sh [--host H] [--port P] [--state-root DIR] [--token T]
#       [--provider openai|vllm|offline] [--model M] [--judge-provider P] [--judge-model M]
#       [--base-url URL] [--max-in-flight N] [-- any other server flag]
#
# Defaults come from the environment: REWARD_SERVER_HOST (127.0.0.1), REWARD_SERVER_PORT (8765),
# MEMBUILDER_STATE_ROOT (.), REWARD_SERVER_TOKEN (none: no token), ANSWER_PROVIDER (openai), ANSWER_MODEL
# (gpt-4.1-mini), JUDGE_PROVIDER (= answer provider), JUDGE_MODEL (gpt-4.1), OPENAI_BASE_URL, OPENAI_API_KEY,
# REWARD_MAX_IN_FLIGHT (32), PYTHON (the interpreter to run: default the active venv's python ($VIRTUAL_ENV),
# else python3, else python, from PATH).
# The token reaches the server through the environment, never the command line (which `ps` shows to everyone).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

HOST="${REWARD_SERVER_HOST:-127.0.0.1}"
PORT="${REWARD_SERVER_PORT:-8765}"
STATE_ROOT="${MEMBUILDER_STATE_ROOT:-.}"
PROVIDER="${ANSWER_PROVIDER:-openai}"
MODEL="${ANSWER_MODEL:-gpt-4.1-mini}"
JUDGE_PROVIDER="${JUDGE_PROVIDER:-}"
JUDGE_MODEL="${JUDGE_MODEL:-gpt-4.1}"
BASE_URL="${OPENAI_BASE_URL:-}"
MAX_IN_FLIGHT="${REWARD_MAX_IN_FLIGHT:-32}"
EXTRA=()

need() { [[ $# -ge 2 ]] || { echo "start_server.sh: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --host) need "$@"; HOST="$2"; shift 2 ;;
    --port) need "$@"; PORT="$2"; shift 2 ;;
    --state-root) need "$@"; STATE_ROOT="$2"; shift 2 ;;
    --token) need "$@"; REWARD_SERVER_TOKEN="$2"; shift 2 ;;
    --provider) need "$@"; PROVIDER="$2"; shift 2 ;;
    --model) need "$@"; MODEL="$2"; shift 2 ;;
    --judge-provider) need "$@"; JUDGE_PROVIDER="$2"; shift 2 ;;
    --judge-model) need "$@"; JUDGE_MODEL="$2"; shift 2 ;;
    --base-url) need "$@"; BASE_URL="$2"; shift 2 ;;
    --max-in-flight) need "$@"; MAX_IN_FLIGHT="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; EXTRA+=("$@"); break ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done

ARGS=(--host "$HOST" --port "$PORT" --state-root "$STATE_ROOT" --provider "$PROVIDER" --model "$MODEL"
      --judge-model "$JUDGE_MODEL" --max-in-flight "$MAX_IN_FLIGHT")
[[ -n "$JUDGE_PROVIDER" ]] && ARGS+=(--judge-provider "$JUDGE_PROVIDER")
[[ -n "$BASE_URL" ]] && ARGS+=(--base-url "$BASE_URL")
if [[ -n "${REWARD_SERVER_TOKEN:-}" ]]; then
  export REWARD_SERVER_TOKEN
else
  echo "start_server.sh: no REWARD_SERVER_TOKEN: the server accepts requests without a token" >&2
fi

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    PYTHON="$VIRTUAL_ENV/bin/python"
  else
    PYTHON="$(command -v python3 || command -v python || true)"
  fi
fi
[[ -n "$PYTHON" ]] || { echo "start_server.sh: no python found; set PYTHON" >&2; exit 2; }

exec "$PYTHON" -m training.reward_server.server "${ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
