#!/usr/bin/env bash
# Create / update the separate SFT virtual environment `.venv-sft` (LLaMA-Factory 0.9.5).
#
# Idempotent: a stamp file inside the venv records the sha256 of
# requirements-sft.txt (and of the torch pin); when it matches and the venv still
# imports, nothing is done. Safe to call from CI on every run.
#
#   bash scripts/setup_sft_env.sh            # create or reuse .venv-sft
#   SFT_VENV=/path/venv bash scripts/setup_sft_env.sh
#   FORCE=1 bash scripts/setup_sft_env.sh    # rebuild from scratch
#
# Env: PYTHON (default python3; needs >= 3.11 for llamafactory 0.9.5),
#      SFT_VENV (default <repo>/.venv-sft), TORCH_SPEC (default torch==2.13.0).
#
# Order matters: torch is installed FIRST (on CPU machines /etc/pip.conf
# find-links supplies a local CPU wheel; an unpinned torch would pull GBs of
# CUDA packages), then the fully pinned closure with --no-deps (see the
# comments in requirements-sft.txt for why).
# GPU users: the same script works; deepspeed is pinned in requirements-sft.txt.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${SFT_VENV:-$REPO_ROOT/.venv-sft}"
REQ="$REPO_ROOT/requirements-sft.txt"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
STAMP="$VENV/.membuilder-sft-stamp"

log() { echo "[setup_sft_env] $*" >&2; }

# Hide pip's one-line-per-package noise about the optional local file indexes,
# keep everything else and pip's exit status.
pip_quiet() {
    local st
    set +e
    "$VENV/bin/pip" "$@" --disable-pip-version-check --progress-bar off 2>&1 \
        | grep -v -E "^WARNING: Location 'file://.*' is ignored"
    st=("${PIPESTATUS[@]}")
    set -e
    return "${st[0]}"
}

want_stamp="$( { sha256sum "$REQ" | cut -d' ' -f1; echo "$TORCH_SPEC"; } | sha256sum | cut -d' ' -f1)"

# quick: files and installed versions only (no heavy imports)
venv_present() {
    [[ -x "$VENV/bin/python" && -x "$VENV/bin/llamafactory-cli" ]] || return 1
    "$VENV/bin/python" - <<'PY' >/dev/null 2>&1
import importlib.metadata as md
assert md.version("llamafactory") == "0.9.5"
md.version("torch")
PY
}

# thorough: the packages really import (after an install)
venv_ok() {
    venv_present || return 1
    "$VENV/bin/python" -c "import torch, torchaudio, transformers, llamafactory.train.tuner" >/dev/null 2>&1
}

if [[ "${FORCE:-0}" != "1" && -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]] && venv_present; then
    log "up to date: $VENV (stamp $want_stamp)"
    exit 0
fi

start=$(date +%s)
if [[ "${FORCE:-0}" == "1" ]]; then
    log "FORCE=1: removing $VENV"
    rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
rm -f "$STAMP"

log "step 1/3: $TORCH_SPEC"
pip_quiet install --no-compile "$TORCH_SPEC"

log "step 2/3: pinned closure from requirements-sft.txt (--no-deps)"
pip_quiet install --no-compile --no-deps -r "$REQ"

log "step 3/3: torchaudio fix-up"
"$VENV/bin/python" - <<'PY'
# PyPI's newest torchaudio for this torch line (2.11.0) is a CUDA build linked
# against libtorch_cuda; with the CPU-only torch its extension cannot load and
# `import torchaudio` raises. LLaMA-Factory imports torchaudio at module level
# (data/mm_plugin.py) but only calls it for audio inputs, and torchaudio treats
# a missing extension as "not built", so drop the extension libraries.
import glob, os, importlib, importlib.util, sys
import torch
spec = importlib.util.find_spec("torchaudio")
if spec is None:
    raise SystemExit("torchaudio missing")
try:
    import torchaudio  # noqa: F401
    print("[setup_sft_env] torchaudio imports fine; nothing to do")
except (OSError, ImportError, RuntimeError) as exc:
    libdir = os.path.join(os.path.dirname(spec.origin), "lib")
    for so in glob.glob(os.path.join(libdir, "*.so")):
        os.remove(so)
    for name in [m for m in sys.modules if m == "torchaudio" or m.startswith("torchaudio.")]:
        del sys.modules[name]
    importlib.import_module("torchaudio")
    kind = "CPU" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
    print(f"[setup_sft_env] torch {torch.__version__} ({kind}): torchaudio's extension did not load "
          f"({exc.__class__.__name__}); removed it (audio I/O unused by text SFT)")
PY

if ! venv_ok; then
    log "ERROR: the venv does not import llamafactory/torch/transformers; see output above"
    "$VENV/bin/python" -c "import torch, torchaudio, transformers, llamafactory" || true
    exit 1
fi
echo "$want_stamp" > "$STAMP"
log "done in $(( $(date +%s) - start )) s: $("$VENV/bin/python" -c 'import torch, transformers, llamafactory; print(f"torch {torch.__version__}, transformers {transformers.__version__}, llamafactory {llamafactory.__version__}")' 2>/dev/null)"
