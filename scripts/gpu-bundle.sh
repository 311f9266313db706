#!/usr/bin/env bash
# Builds what the GPU check runs and puts it in one folder that travels with the working tree
# (`carry`): `huginn` and `device_suite` (fixture parity, the engine, chunked prefill, speculation
# and the parallel sampler in one test binary), stripped and packed into one `huginn-gpu.tar.xz`
# (the CUDA build embeds candle's PTX kernels in each binary: about 113 MiB stripped, 9 MiB packed;
# scripts/gpu-check.sh unpacks it). Prints the sizes and the total with the working tree, against
# the device tool's 64 MiB.
#   scripts/gpu-bundle.sh            # CUDA build (scripts/cuda-toolchain.sh) into gpu-bundle/
#   scripts/gpu-bundle.sh --cpu DIR  # the CPU build into DIR (the dry run in .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--cpu" ]; then
  DIR=${2:-target/gpu-dry/bundle}
  build=(cargo test --release --no-run --test device_suite)
else
  DIR=${1:-gpu-bundle}
  # shellcheck disable=SC1090
  source <(bash scripts/cuda-toolchain.sh "${CUDA_WHEELS:-$HOME/.cache/huginn-cuda-wheels}")
  build=(cargo test --release --no-run --test device_suite --features cuda --target-dir target/cuda)
fi
# An integration test's build also builds the `huginn` binary (cargo provides it to the tests).
"${build[@]}" --message-format=json-render-diagnostics > target/gpu-bundle-build.json
python3 - "$DIR" target/gpu-bundle-build.json <<'PY'
import json, os, shutil, subprocess, sys
out, log = sys.argv[1], sys.argv[2]
found = {}
for line in open(log):
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
        name = msg["target"]["name"]
        if name in ("huginn", "device_suite"):
            found[name] = msg["executable"]
missing = {"huginn", "device_suite"} - found.keys()
if missing:
    sys.exit(f"the build made no {', '.join(sorted(missing))}")
os.makedirs(out, exist_ok=True)
for name, path in sorted(found.items()):
    dest = os.path.join(out, name)
    shutil.copyfile(path, dest)
    os.chmod(dest, 0o755)
    subprocess.run(["strip", dest], check=True)
PY
# One archive: the two binaries share most of their bytes (the PTX), which xz's 64 MiB window at -9
# finds. XZ_OPT overrides the level (the CPU dry run packs faster).
tar -C "$DIR" -cf - huginn device_suite | xz -T1 ${XZ_OPT:--9} > "$DIR/huginn-gpu.tar.xz"
raw_bytes=$(du -cb "$DIR/huginn" "$DIR/device_suite" | tail -1 | cut -f1)
rm "$DIR/huginn" "$DIR/device_suite"
tree_bytes=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s}')
bundle_bytes=$(du -cb "$DIR"/* | tail -1 | cut -f1)
ls -l "$DIR"
awk -v r="$raw_bytes" -v t="$tree_bytes" -v b="$bundle_bytes" 'BEGIN {
  printf "binaries %.1f MiB stripped, packed %.1f MiB + working tree %.1f MiB = %.1f MiB of the 64 MiB a device call carries\n",
    r / 1048576, b / 1048576, t / 1048576, (b + t) / 1048576 }'
