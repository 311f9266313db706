#!/usr/bin/env bash
# The GPU check: run on a host with an NVIDIA GPU, from the repository root, with a CUDA build:
#   cargo build --release --features cuda && cargo test --release --features cuda --no-run
#   (or, with no CUDA install: source <(bash scripts/cuda-toolchain.sh) first)
#   scripts/gpu-check.sh
# 1. fixture parity (both kernel choices) and the engine tests on cuda:0;
# 2. the full-size Huginn-0125 shape in bfloat16 (random weights, made here): batch-1 tokens/s at
#    num_steps 32 against the HBM bound, aggregate tokens/s at concurrency 16 and 64, TTFT and ITL;
# and writes docs/BENCHMARKS-GPU.md. Needs curl and python3. LD_LIBRARY_PATH must reach the CUDA
# 13 runtime libraries (cublas, cublasLt, curand, cudart).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${HUGINN_BIN:-target/release/huginn}
DEVICE=${GPU_DEVICE:-cuda:0}
MODEL=${FULL_SIZE_MODEL:-target/bench-models/huginn-0125-bf16}
OUT=${GPU_REPORT:-docs/BENCHMARKS-GPU.md}
HBM_BYTES_PER_S=${HBM_BYTES_PER_S:-4.8e12}   # H200: 4.8 TB/s
PORT=${GPU_CHECK_PORT:-8199}
log() { echo "[gpu-check] $*" >&2; }

# 1. The device path against the reference fixture, and the engine, on the GPU.
for name in parity engine; do
  test_bin=$(ls -t target/release/deps/${name}-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
  [ -x "$test_bin" ] || { echo "missing test binary for $name: cargo test --release --features cuda --no-run" >&2; exit 1; }
  log "$name tests on $DEVICE ($test_bin)"
  (cd "$PWD" && HUGINN_TEST_DEVICE=$DEVICE HUGINN_MODEL_BACKEND=tensor "$test_bin" --test-threads 1) | tee "target/gpu-check-$name.log" | tail -3
done

# 2. The full-size shape, written once.
if [ ! -f "$MODEL/model.safetensors.index.json" ]; then
  log "writing the full-size checkpoint to $MODEL"
  "$BIN" init-random --preset huginn-0125 --dtype bf16 --shards 4 --out "$MODEL"
fi

log "batch 1, num_steps 32"
"$BIN" generate --model "$MODEL" --device "$DEVICE" --prompt-ids 1,2,3,4,5,6,7,8 --max-tokens 32 --num-steps 32 \
  --init-scale 0 --ignore-eos --format json > target/gpu-check-batch1.json

log "serving on $DEVICE"
HUGINN_MODEL_DEVICES=$DEVICE "$BIN" serve --model "$MODEL" --port "$PORT" > target/gpu-check-serve.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do curl -sf "localhost:$PORT/ready" >/dev/null && break; sleep 1; done

python3 - "$PORT" "$MODEL" "$OUT" "$HBM_BYTES_PER_S" "$DEVICE" <<'PY'
import concurrent.futures, json, statistics, subprocess, sys, time, urllib.request
port, model, out, hbm, device = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
cfg = json.load(open(f"{model}/config.json"))
d, i, v = cfg["n_embd"], cfg["intermediate_size"], cfg["vocab_size"]
block = 4 * d * d + 3 * d * i
step_bytes = 2 * (d * d + cfg["n_layers_in_recurrent_block"] * block)
token_bytes = 2 * (d * d + (cfg["n_layers_in_prelude"] + cfg["n_layers_in_coda"]) * block + v * d)
batch1 = json.load(open("target/gpu-check-batch1.json"))
tps1 = batch1["timing"]["decode_tokens_per_second"]
bound1 = hbm / (token_bytes + 32 * step_bytes)

def stream(tokens):
    body = json.dumps({"prompt": "12+34=", "max_tokens": tokens, "num_steps": 32, "ignore_eos": True,
                       "init_scale": 0, "stream": True}).encode()
    req = urllib.request.Request(f"http://localhost:{port}/v1/completions", body, {"content-type": "application/json"})
    start, times = time.time(), []
    with urllib.request.urlopen(req, timeout=3600) as r:
        for line in r:
            if line.startswith(b"data: {") and b'"text"' in line:
                times.append(time.time())
    return start, times

rows = []
for concurrency in (16, 64):
    tokens = 32
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda _: stream(tokens), range(concurrency)))
    wall = time.time() - t0
    produced = sum(len(t) for _, t in results)
    ttft = [t[0] - s for s, t in results if t]
    itl = [b - a for _, t in results for a, b in zip(t, t[1:])]
    rows.append((concurrency, produced / wall, statistics.median(ttft), statistics.median(itl), max(itl)))

gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
with open(out, "w") as f:
    f.write("# GPU benchmarks\n\nProduced by `scripts/gpu-check.sh` (this file is overwritten).\n")
    f.write(f"GPU: {gpu} ({device}); the full-size Huginn-0125 shape in bfloat16, random weights; tensor ops.\n\n")
    f.write("Fixture parity and the engine tests passed on this device (logs: target/gpu-check-*.log).\n\n")
    f.write("## Batch 1, num_steps 32\n\n")
    f.write(f"- {tps1:.2f} tokens/s; HBM bound {bound1:.2f} tokens/s ({hbm / 1e12:.1f} TB/s over "
            f"{(token_bytes + 32 * step_bytes) / 1e9:.1f} GB of weights per token): {100 * tps1 / bound1:.0f}%\n\n")
    f.write("## Concurrent streams (num_steps 32, 32 tokens each)\n\n")
    f.write("| concurrency | aggregate tokens/s | vs batch 1 | median TTFT (s) | median ITL (s) | worst ITL (s) |\n")
    f.write("|---:|---:|---:|---:|---:|---:|\n")
    for c, tps, ttft, itl, worst in rows:
        f.write(f"| {c} | {tps:.2f} | {tps / tps1:.1f}x | {ttft:.2f} | {itl:.3f} | {worst:.3f} |\n")
print(open(out).read())
PY
log "wrote $OUT"
