"""Report sections of scripts/gpu-check.sh (Markdown on stdout).

  gpu_report.py batch1 MODEL BATCH1_JSON DEVICE     batch 1 against the memory-bandwidth bound
  gpu_report.py load PORT NUM_STEPS TOKENS BATCH1_JSON C...   concurrent streams through the server
"""
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

# Peak memory bandwidth by GPU name (HBM_BYTES_PER_S overrides): the vendor's figures.
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12}


def gpu_name():
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def weight_bytes(model):
    """Bytes of weights read for one token: once per token (prelude, coda, head) and per step (adapter, core)."""
    cfg = json.load(open(os.path.join(model, "config.json")))
    d, i, v = cfg["n_embd"], cfg["intermediate_size"], cfg["vocab_size"]
    size = {"bfloat16": 2, "float16": 2}.get(cfg.get("torch_dtype"), 4)
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    attention = d * d + 2 * d * (d * kv_heads // heads) + d * d
    block = attention + 3 * d * i
    once = (cfg["n_layers_in_prelude"] + cfg["n_layers_in_coda"]) * block + v * d
    per_step = 2 * d * d + cfg["n_layers_in_recurrent_block"] * block
    return size * once, size * per_step


def batch1(model, path, device):
    out = json.load(open(path))
    timing = out["timing"]
    tps = timing["decode_tokens_per_second"]
    steps = out["mean_steps_per_token"]
    once, per_step = weight_bytes(model)
    per_token = once + steps * per_step
    print(f"- {len(out['token_ids'])} tokens, mean {steps:.1f} steps/token; prefill {timing['prefill_seconds']:.2f} s")
    print(f"- decode: **{tps:.2f} tokens/s**, {timing['core_steps_per_second']:.1f} core steps/s")
    print(f"- weights read per token: {per_token / 1e6:.1f} MB, so {tps * per_token / 1e9:.2f} GB/s")
    name = gpu_name() if device != "cpu" else ""
    peak = float(os.environ.get("HBM_BYTES_PER_S", 0)) or next((b for k, b in BANDWIDTH.items() if k in name), 0)
    if peak:
        bound = peak / per_token
        print(f"- bandwidth bound: {bound:.2f} tokens/s at {peak / 1e12:.2f} TB/s ({name}): "
              f"**{100 * tps / bound:.0f}%** of it")


def stream(port, num_steps, tokens):
    """One streamed completion: (start time, arrival time of each text chunk, tokens in its usage)."""
    body = json.dumps({"prompt": "12+34=", "max_tokens": tokens, "num_steps": num_steps, "ignore_eos": True,
                       "init_scale": 0, "stream": True, "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(f"http://localhost:{port}/v1/completions", body,
                                 {"content-type": "application/json"})
    start, times, produced = time.time(), [], 0
    with urllib.request.urlopen(req, timeout=600) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[len(b"data: "):])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                times.append(time.time())
            if chunk.get("usage"):
                produced = chunk["usage"]["completion_tokens"]
    return start, times, produced


def load(port, num_steps, tokens, batch1_path, levels):
    try:
        single = json.load(open(batch1_path))["timing"]["decode_tokens_per_second"]
    except (OSError, ValueError, KeyError):
        single = 0
    print("| concurrency | aggregate tokens/s | vs batch 1 | median TTFT (s) | median ITL (s) | worst ITL (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    sys.stdout.flush()
    for concurrency in levels:
        t0 = time.time()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda _: stream(port, num_steps, tokens), range(concurrency)))
        wall = time.time() - t0
        produced = sum(n for _, _, n in results)
        ttft = [t[0] - s for s, t, _ in results if t] or [0.0]
        itl = [b - a for _, t, _ in results for a, b in zip(t, t[1:])] or [0.0]
        rate = produced / wall
        ratio = f"{rate / single:.1f}x" if single else "n/a"
        print(f"| {concurrency} | {rate:.2f} | {ratio} | {statistics.median(ttft):.2f} | "
              f"{statistics.median(itl):.3f} | {max(itl):.3f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    if sys.argv[1] == "batch1":
        batch1(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "load":
        load(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], [int(c) for c in sys.argv[6:]])
    else:
        sys.exit(__doc__)
