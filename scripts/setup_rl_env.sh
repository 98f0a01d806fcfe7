#!/usr/bin/env bash
# Create or refresh the veRL environment .venv-rl (repository root, gitignored) from requirements-rl.txt.
#
#   bash scripts/setup_rl_env.sh          # idempotent: a no-op when the stamp matches and veRL imports
#   RL_VENV=/path/to/venv PYTHON=python3.11 bash scripts/setup_rl_env.sh
#
# Order matters: torch==2.13.0 goes in FIRST (pip finds the local CPU wheel through /etc/pip.conf
# find-links; an unpinned torch would pull GBs of CUDA wheels), then requirements-rl.txt with
# torch==2.13.0 as a constraint, so no dependency can swap torch for another build.
#
# The stamp file holds the sha256 of requirements-rl.txt plus the torch pin; change either and the next
# run installs again. On a GPU machine, add the rollout engine afterwards, e.g.
#   .venv-rl/bin/pip install vllm==<the version matching your torch/CUDA>
# (veRL 0.9.1's own [vllm] extra pins torch==2.11.0 and vllm==0.24.0).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RL_VENV:-$ROOT/.venv-rl}"
REQ="$ROOT/requirements-rl.txt"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
STAMP="$VENV/.requirements-rl.sha256"

if [[ ! -f "$REQ" ]]; then
  echo "setup_rl_env.sh: $REQ not found" >&2
  exit 2
fi

want="$( (cat "$REQ"; echo "$TORCH_SPEC") | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] \
  && "$VENV/bin/python" -c "import verl, torch" >/dev/null 2>&1; then
  echo "setup_rl_env.sh: $VENV is up to date"
  exit 0
fi

pick_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.11 python3; do
    [[ -n "$candidate" ]] || continue
    if command -v "$candidate" >/dev/null 2>&1 \
      && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

# Two jobs on one machine must not install into one venv at once (the lock lives outside the tree).
if command -v flock >/dev/null 2>&1; then
  exec 9>"${TMPDIR:-/tmp}/setup_rl_env.$(echo "$VENV" | sha256sum | cut -c1-16).lock"
  flock 9
fi

start=$SECONDS
if [[ ! -x "$VENV/bin/python" ]]; then
  if ! PY="$(pick_python)"; then
    echo "setup_rl_env.sh: Python 3.11 is required (set PYTHON=...)" >&2
    exit 2
  fi
  echo "setup_rl_env.sh: creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "$TORCH_SPEC" >"$constraints"

echo "setup_rl_env.sh: installing $TORCH_SPEC"
"${PIP[@]}" install "$TORCH_SPEC"
echo "setup_rl_env.sh: installing requirements-rl.txt (constraint: $TORCH_SPEC)"
"${PIP[@]}" install -r "$REQ" -c "$constraints"
"${PIP[@]}" check

"$VENV/bin/python" - "$TORCH_SPEC" <<'PY'
import sys
from importlib.metadata import version

torch_pin = sys.argv[1].split("==", 1)[1]
got = {name: version(name) for name in ("verl", "torch")}
assert got["verl"] == "0.9.1", got
assert got["torch"].split("+")[0] == torch_pin, got
print("setup_rl_env.sh: verl", got["verl"], "torch", got["torch"])
PY

echo "$want" >"$STAMP.tmp" && mv "$STAMP.tmp" "$STAMP"
echo "setup_rl_env.sh: done in $((SECONDS - start)) s"
