"""Compare two lm-eval --log_samples outputs: per-request log-likelihoods must be bit-identical.

usage: compare_samples.py OUT_DIR_A OUT_DIR_B   (the --output_path folders of two runs)
"""

import glob
import json
import sys


def load(out_dir):
    paths = sorted(glob.glob(f"{out_dir}/**/samples_huginn_addition_mc_*.jsonl", recursive=True))
    if not paths:
        sys.exit(f"no samples file under {out_dir}")
    rows = {}
    with open(paths[-1]) as f:
        for line in f:
            s = json.loads(line)
            # resps: one [[loglikelihood, is_greedy]] per choice; lm-eval writes the numbers as
            # Python's repr of the float, which round-trips exactly
            rows[s["doc_id"]] = [(float(r[0][0]), r[0][1]) for r in s["resps"]]
    return paths[-1], rows


def main():
    (pa, a), (pb, b) = load(sys.argv[1]), load(sys.argv[2])
    print(f"A: {pa}\nB: {pb}")
    if a.keys() != b.keys():
        sys.exit(f"different docs: {len(a)} vs {len(b)}")
    n = diff = 0
    worst = 0.0
    for doc in sorted(a):
        for ra, rb in zip(a[doc], b[doc], strict=True):
            n += 1
            if ra != rb:  # exact comparison of the float64 values
                diff += 1
                worst = max(worst, abs(ra[0] - rb[0]))
                if diff <= 5:
                    print(f"doc {doc}: {ra} != {rb}")
    print(f"{n} requests compared, {diff} differ (max |diff| {worst:g})")
    sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
