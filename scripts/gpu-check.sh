#!/usr/bin/env bash
# The GPU check, made for one call of the device tool (README "GPU"), run from the repository root.
# It needs the folder scripts/gpu-bundle.sh fills (`huginn-gpu.tar.xz`: `huginn` and the
# `device_suite` test binary, unpacked to $GPU_UNPACK_DIR), bash, tar with xz (or python3's tarfile),
# python3 and curl; no Rust toolchain, no network. Parts, in order of value, each under a time guard,
# each written to $OUT (the device tool's return folder; default target/gpu-check) as it finishes, so
# a run cut short still returns what it measured:
#   0. the environment: the CUDA runtime libraries found (torch venv's nvidia/*/lib, a CUDA install)
#      and the GPU (nvidia-smi);
#   1. the device suite on $GPU_DEVICE: fixture parity, the engine, chunked prefill, speculation, the
#      parallel sampler (tensor ops: the device path);
#   2. the full-size checkpoint written there with `huginn init-random` (timed);
#   3. batch 1 through `huginn generate` against the memory-bandwidth bound;
#   4. concurrent streams through `huginn serve`: aggregate tokens/s, TTFT, ITL.
# The report is $OUT/BENCHMARKS-GPU.md (committed as docs/BENCHMARKS-GPU.md).
# The dry run on a CPU machine (.ci/run): GPU_DEVICE=cpu with a CPU bundle and a small preset.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUNDLE=${GPU_BUNDLE:-gpu-bundle}
DEVICE=${GPU_DEVICE:-cuda:0}
PRESET=${GPU_PRESET:-huginn-0125}
DTYPE=${GPU_DTYPE:-bf16}
NUM_STEPS=${GPU_NUM_STEPS:-32}
TOKENS=${GPU_TOKENS:-32}
CONCURRENCY=${GPU_CONCURRENCY:-16 64}
TEST_THREADS=${GPU_TEST_THREADS:-4}
BUDGET=${GPU_CHECK_BUDGET_S:-560}
RESULTS=${OUT:-target/gpu-check}
MODEL=${GPU_MODEL_DIR:-/tmp/huginn-gpu-check-model}
PORT=${GPU_CHECK_PORT:-8199}
REPORT=$RESULTS/BENCHMARKS-GPU.md
UNPACKED=${GPU_UNPACK_DIR:-/tmp/huginn-gpu-bundle}
BIN=$UNPACKED/huginn
SUITE=$UNPACKED/device_suite
mkdir -p "$RESULTS"
log() { echo "[gpu-check $(($(date +%s) - START))s] $*" >&2; }
say() { echo "$*" >> "$REPORT"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
failed=0

# Runs a part's command under the time guard: at most CAP seconds and never past the budget; a part
# that cannot get NEED seconds is skipped. Returns the command's status (124: cut by the guard).
guarded() {
  local name=$1 cap=$2 need=$3 t
  shift 3
  t=$(left)
  if [ "$t" -lt "$need" ]; then
    log "$name: skipped ($t s of the budget left, it needs $need)"
    say "- **$name: skipped**, $t s of the ${BUDGET} s budget left."
    return 125
  fi
  [ "$t" -gt "$cap" ] && t=$cap
  log "$name (at most $t s)"
  timeout --kill-after=5 "$t" "$@"
}

# Records a part's outcome in the report and the exit status.
outcome() {
  local name=$1 status=$2
  case $status in
    0) ;;
    125) failed=1 ;;
    124 | 137) failed=1; say "- **$name: cut by the time guard.**" ;;
    *) failed=1; say "- **$name: failed** (exit status $status)." ;;
  esac
}

if [ ! -f "$BUNDLE/huginn-gpu.tar.xz" ]; then
  echo "missing $BUNDLE/huginn-gpu.tar.xz: build the bundle with scripts/gpu-bundle.sh" >&2
  exit 2
fi
rm -rf "$UNPACKED" && mkdir -p "$UNPACKED"
if ! tar -C "$UNPACKED" -xJf "$BUNDLE/huginn-gpu.tar.xz" 2> /dev/null; then
  python3 -m tarfile -e "$BUNDLE/huginn-gpu.tar.xz" "$UNPACKED" || exit 2
fi
for f in "$BIN" "$SUITE"; do
  [ -x "$f" ] || { echo "the bundle holds no executable $(basename "$f")" >&2; exit 2; }
done
log "bundle unpacked into $UNPACKED"

# 0. The environment.
{
  echo "# GPU benchmarks"
  echo
  echo "Produced by \`scripts/gpu-check.sh\` (README \"GPU\"); this file is overwritten by each run."
  echo
  echo "## Environment"
  echo
  echo "- run: $(date -u +%Y-%m-%dT%H:%MZ), device \`$DEVICE\`, budget ${BUDGET} s"
  echo "- host: $(nproc) CPU cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
} > "$REPORT"
if [ "$DEVICE" != cpu ]; then
  dirs=()
  for py in python3 /opt/torch/.venv/bin/python3; do
    command -v "$py" > /dev/null || continue
    for site in $("$py" -c 'import site; print(" ".join(site.getsitepackages()))' 2> /dev/null); do
      for d in "$site"/nvidia/*/lib; do [ -d "$d" ] && dirs+=("$d"); done
    done
  done
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64; do
    [ -d "$d" ] && dirs+=("$d")
  done
  LD_LIBRARY_PATH=$(printf '%s:' "${dirs[@]}" | awk -v RS=: '!seen[$0]++ && length' | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export LD_LIBRARY_PATH
  log "library folders: $LD_LIBRARY_PATH"
  say "- library folders searched: \`$LD_LIBRARY_PATH\`"
  ldd "$BIN" | grep -E 'cuda|cublas|curand|nvrtc|not found' | sed 's/^\s*/- /' >> "$REPORT"
  if ldd "$BIN" | grep -q 'not found'; then
    log "libraries not found:"; ldd "$BIN" | grep 'not found' >&2
    exit 3
  fi
  if ! gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1); then
    log "no GPU visible: $gpu"; say "- **no GPU visible**: $gpu"; exit 4
  fi
  say "- GPU: $gpu"
else
  say "- a dry run on the CPU (no GPU, no CUDA libraries)"
fi
log "environment written"

# 1. The device suite.
say ""
say "## 1. Device suite (tensor ops on \`$DEVICE\`)"
say ""
t0=$(date +%s)
CARGO_MANIFEST_DIR=$PWD HUGINN_TEST_DEVICE=$DEVICE HUGINN_MODEL_BACKEND=tensor \
  guarded "device suite" 300 60 "$SUITE" --test-threads "$TEST_THREADS" > "$RESULTS/device-suite.log" 2>&1
status=$?
grep -E '^test result|^failures:|^    [a-z_:]+$|panicked' "$RESULTS/device-suite.log" | head -20 | sed 's/^\s*/- /' >> "$REPORT"
say "- $(($(date +%s) - t0)) s; log: device-suite.log"
outcome "device suite" $status

# 2. The full-size checkpoint, written on this machine.
say ""
say "## 2. Checkpoint (\`init-random --preset $PRESET --dtype $DTYPE\`, random weights)"
say ""
t0=$(date +%s.%N)
if [ -f "$MODEL/model.safetensors.index.json" ]; then
  say "- reused \`$MODEL\`"
  status=0
else
  guarded "init-random" 240 30 "$BIN" init-random --preset "$PRESET" --dtype "$DTYPE" --shards 4 --out "$MODEL" \
    > "$RESULTS/init-random.log" 2>&1
  status=$?
  [ $status = 0 ] && say "$(du -sb "$MODEL" | awk -v t0="$t0" -v t1="$(date +%s.%N)" '{
    printf "- %.3f GB written in %.2f s (%.3f GB/s)", $1 / 1e9, t1 - t0, $1 / 1e9 / (t1 - t0) }')"
fi
outcome "init-random" $status

# 3. Batch 1.
say ""
say "## 3. Batch 1 (\`huginn generate\`, num_steps $NUM_STEPS, $TOKENS tokens)"
say ""
if [ $status = 0 ]; then
  guarded "batch 1" 240 30 "$BIN" generate --model "$MODEL" --device "$DEVICE" --prompt-ids 1,2,3,4,5,6,7,8 \
    --max-tokens "$TOKENS" --num-steps "$NUM_STEPS" --init-scale 0 --ignore-eos --format json \
    > "$RESULTS/batch1.json" 2> "$RESULTS/batch1.log"
  status=$?
  [ $status = 0 ] && python3 scripts/gpu_report.py batch1 "$MODEL" "$RESULTS/batch1.json" "$DEVICE" >> "$REPORT"
else
  say "- skipped: no checkpoint"
fi
outcome "batch 1" $status

# 4. Concurrent streams through the server.
say ""
say "## 4. Concurrent streams (\`huginn serve\`, num_steps $NUM_STEPS, $TOKENS tokens each)"
say ""
if [ -f "$MODEL/config.json" ] && [ "$(left)" -gt 60 ]; then
  HUGINN_MODEL_DEVICES=$DEVICE HUGINN_ENGINE_MAX_KV_BYTES=${GPU_MAX_KV_BYTES:-34359738368} \
    timeout "$(left)" "$BIN" serve --model "$MODEL" --port "$PORT" > "$RESULTS/serve.log" 2>&1 &
  server=$!
  trap 'kill $server 2> /dev/null' EXIT
  ready=0
  for _ in $(seq 1 "$(left)"); do
    if curl -sf "localhost:$PORT/ready" > /dev/null; then ready=1; break; fi
    kill -0 $server 2> /dev/null || break
    sleep 1
  done
  if [ $ready = 1 ]; then
    guarded "concurrent streams" 300 30 python3 scripts/gpu_report.py load "$PORT" "$NUM_STEPS" "$TOKENS" \
      "$RESULTS/batch1.json" $CONCURRENCY >> "$REPORT"
    status=$?
  else
    say "- the server did not become ready (log: serve.log)"
    status=1
  fi
  kill $server 2> /dev/null
  wait $server 2> /dev/null
else
  say "- skipped: no checkpoint or no time left"
  status=125
fi
outcome "concurrent streams" $status

log "done in $(($(date +%s) - START)) s; report: $REPORT"
cat "$REPORT"
exit $failed
