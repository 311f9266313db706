#!/usr/bin/env bash
# lm-evaluation-harness against a local huginn server, prefix cache on, off, on again; checks that
# the per-request log-likelihoods are bit-identical and prints each run's wall time.
#
#   scripts/lm-eval/run.sh                 # from the repository root; needs target/release/huginn
#   HUGINN=/path/to/huginn VENV=/path/to/venv OUT=/tmp/lmeval scripts/lm-eval/run.sh
#
# Everything is offline: the task's data are the jsonl files here (regenerate with
# `python3 scripts/lm-eval/addition_mc.py`) and the tokenizer is the checkpoint's own.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=scripts/lm-eval
HUGINN=${HUGINN:-target/release/huginn}
VENV=${VENV:-/work/lmeval-venv}
OUT=${OUT:-/tmp/lmeval}
PORT=${PORT:-8000}
MODEL_DIR=${MODEL_DIR:-$PWD/models/huginn-addition}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# One-time install (no torch: local-completions needs only the `api` extra, and transformers for
# the tokenizer, which runs without torch).
if [ ! -x "$VENV/bin/lm_eval" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install "lm_eval[api]==0.4.13" transformers
fi

server_pid=
stop_server() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null; server_pid=; }
trap stop_server EXIT

# $1: run name; $2: engine.prefix_cache_bytes (unset = the default, 1 GiB; 0 = off)
run() {
  local name=$1 cache=${2-}
  mkdir -p "$OUT"
  if [ -n "$cache" ]; then export HUGINN_ENGINE_PREFIX_CACHE_BYTES=$cache; else unset HUGINN_ENGINE_PREFIX_CACHE_BYTES; fi
  "$HUGINN" serve --model "$MODEL_DIR" --port "$PORT" >"$OUT/server-$name.log" 2>&1 &
  server_pid=$!
  until curl -sf "localhost:$PORT/ready" >/dev/null; do sleep 0.5; done
  local t0 t1
  t0=$(date +%s.%N)
  "$VENV/bin/lm_eval" --model local-completions \
    --model_args "model=huginn-addition,base_url=http://127.0.0.1:$PORT/v1/completions,num_concurrent=1,max_retries=3,tokenizer_backend=huggingface,tokenizer=$MODEL_DIR,tokenized_requests=True,max_length=256" \
    --tasks huginn_addition_mc --include_path "$HERE" \
    --output_path "$OUT/$name" --log_samples >"$OUT/lmeval-$name.log" 2>&1
  t1=$(date +%s.%N)
  echo "== $name (prefix_cache_bytes=${cache:-default}): lm_eval wall $(echo "$t1 - $t0" | bc) s"
  # the request phase alone (lm_eval's start-up, ~10 s, dominates the wall time with this small model)
  grep -o 'Requesting API: 100%[^]]*]' "$OUT/lmeval-$name.log" | tail -1 || true
  grep -E '\|acc(_norm)? *\|' "$OUT/lmeval-$name.log" || tail -20 "$OUT/lmeval-$name.log"
  curl -s "localhost:$PORT/metrics" | grep '^huginn_prefix_cache' || true
  stop_server
}

run on1
run off 0
run on2
"$VENV/bin/python" "$HERE/compare_samples.py" "$OUT/on1" "$OUT/off"
"$VENV/bin/python" "$HERE/compare_samples.py" "$OUT/on2" "$OUT/off"
