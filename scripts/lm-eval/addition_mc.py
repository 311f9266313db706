"""Three-digit addition as a 4-way multiple-choice task for lm-evaluation-harness.

`python addition_mc.py` (re)writes the data files next to it, deterministically:
  addition_mc.jsonl          50 test problems
  addition_mc_fewshot.jsonl  10 few-shot problems (none of them in the test set)
Each line: {"question": "472+389=", "choices": ["861", ...], "label": <index of the sum>}.
The three wrong choices are near misses of the sum (off by 1, 2, 10, 20 or 100).

`load()` is the task's `custom_dataset`: it reads those files relative to this file, so the task
works from any directory and without a network.
"""

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = {"test": "addition_mc.jsonl", "fewshot": "addition_mc_fewshot.jsonl"}
SEED = 20240611
OFFSETS = [1, -1, 2, -2, 10, -10, 20, -20, 100, -100]


def problem(rng, seen):
    while True:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        if (a, b) not in seen:
            seen.add((a, b))
            break
    s = a + b
    wrong = rng.sample([s + d for d in OFFSETS], 3)
    choices = [s] + wrong
    rng.shuffle(choices)
    return {"question": f"{a}+{b}=", "choices": [str(c) for c in choices], "label": choices.index(s)}


def generate():
    rng = random.Random(SEED)
    seen = set()
    sizes = {"fewshot": 10, "test": 50}
    for split, n in sizes.items():
        with open(os.path.join(HERE, FILES[split]), "w") as f:
            for _ in range(n):
                f.write(json.dumps(problem(rng, seen)) + "\n")


def load(**_metadata):
    import datasets

    files = {split: os.path.join(HERE, name) for split, name in FILES.items()}
    return datasets.load_dataset("json", data_files=files)


if __name__ == "__main__":
    generate()
