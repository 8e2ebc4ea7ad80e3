#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv, llama-cpp-python from a wheel cache outside the repo
# (built from source once, about 5-10 minutes on 2 cores), then this package in editable mode.
#
# Environment knobs:
#   PYTHON            interpreter to build the venv with (default: python3)
#   AVIS_VENV         venv location (default: <repo>/.venv)
#   AVIS_CACHE_DIR    wheel cache (default: ${XDG_CACHE_HOME:-~/.cache}/avis-llamacpp)
#   AVIS_SYSTEM_SITE  1 (default): the venv sees system site-packages (reuses an installed llama-cpp-python); 0: isolated
#   CMAKE_ARGS        passed to the llama.cpp build, e.g. "-DGGML_CUDA=on" or "-DGGML_METAL=on";
#                     part of the cache key, so a CUDA wheel never replaces a CPU one.
# An llama-cpp-python >= LLAMA_CPP_VERSION already importable by PYTHON is reused as is (the venv
# sees system site-packages), so nothing is rebuilt for users who have one.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
VENV=${AVIS_VENV:-$ROOT/.venv}
LLAMA_CPP_VERSION=0.3.36
CACHE=${AVIS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/avis-llamacpp}
log() { echo "[setup] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtualenv $VENV"
    if [ "${AVIS_SYSTEM_SITE:-1}" = 1 ]; then "$PY" -m venv --system-site-packages "$VENV"; else "$PY" -m venv "$VENV"; fi
fi
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

have_llama() {
    "$VPY" - "$LLAMA_CPP_VERSION" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
def key(v): return tuple(int(x) for x in v.split(".")[:3] if x.isdigit())
import llama_cpp, llama_cpp.mtmd_cpp  # noqa: F401  (also checks the shared libraries load)
sys.exit(0 if key(version("llama-cpp-python")) >= key(sys.argv[1]) else 1)
PYEOF
}

if have_llama; then
    log "llama-cpp-python already installed: reusing it"
else
    pytag=$("$VPY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    argkey=$(printf '%s' "${CMAKE_ARGS:-}" | sha1sum | cut -c1-10)
    WHEELS="$CACHE/wheels/llama_cpp_python-$LLAMA_CPP_VERSION-$pytag-$(uname -m)-$argkey"
    mkdir -p "$WHEELS"
    if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
        log "building llama-cpp-python $LLAMA_CPP_VERSION from source into $WHEELS (CMAKE_ARGS='${CMAKE_ARGS:-}'); this happens once"
        start=$(date +%s)
        tmp=$(mktemp -d "$CACHE/build.XXXXXX")
        CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
            "$VPY" -m pip wheel --no-deps --no-binary llama-cpp-python -w "$tmp" "llama-cpp-python==$LLAMA_CPP_VERSION" >&2
        mv "$tmp"/llama_cpp_python-*.whl "$WHEELS"/ && rmdir "$tmp"
        log "built in $(( $(date +%s) - start )) s"
    fi
    log "installing llama-cpp-python from the wheel cache"
    "$VPY" -m pip install -q "$WHEELS"/llama_cpp_python-*.whl >&2
fi

# the package itself (editable) with test extras; the pip cache makes repeat runs quick
if ! "$VPY" -c 'import avis_llamacpp, pytest, hypothesis, jinja2, av' 2>/dev/null \
   || [ "$ROOT/pyproject.toml" -nt "$VENV/.avis-installed" ]; then
    log "installing avis-llamacpp (editable) and test extras"
    "$VPY" -m pip install -q -e "$ROOT[test]" >&2
    touch "$VENV/.avis-installed"
fi
log "ready: $VPY"
