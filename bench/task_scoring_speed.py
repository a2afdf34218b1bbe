"""Speed of zero-shot scoring with and without the shared-context key/value cache, side by side in one process.

    OMP_NUM_THREADS=1 python bench/task_scoring_speed.py --data-dir ../shared/data --tasks arc_easy,piqa --limit 40

For each task: the first --limit documents scored with ``share_context=True`` (the CPU default: choices of one
context run on its cache where that at least halves the tokens) and ``False`` (every choice a full sequence,
batched across documents), alternating, --repeats times; prints the fastest time of each, the largest
log-likelihood difference and whether every greedy flag agrees.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from lmshrink.eval.tasks.datafiles import load_docs
from lmshrink.eval.tasks.registry import TASKS, resolve_task_names
from lmshrink.eval.tasks.scoring import loglikelihoods
from lmshrink.formats.loading import load_model

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="arc_easy,piqa")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LMSHRINK_DATA", DEFAULT_DATA)))
    args = parser.parse_args(argv)

    loaded = load_model(args.model)
    print(f"{args.model}, first {args.limit} documents, batch size {args.batch_size}, {torch.get_num_threads()} "
          f"threads, fastest of {args.repeats} alternating repeats")
    for task in resolve_task_names(args.tasks):
        docs, _ = load_docs(TASKS[task], args.data_dir)
        requests = [r for doc in docs[:args.limit] for r in TASKS[task].to_item(doc).requests]
        times: dict[bool, list[float]] = {True: [], False: []}
        scores = {}
        for _ in range(args.repeats):
            for share in (True, False):
                start = time.perf_counter()
                scores[share] = loglikelihoods(loaded.model, loaded.tokenizer, requests, batch_size=args.batch_size,
                                               progress=False, share_context=share)
                times[share].append(time.perf_counter() - start)
        diff = max(abs(a[0] - b[0]) for a, b in zip(scores[True], scores[False]))
        same = all(a[1] == b[1] for a, b in zip(scores[True], scores[False]))
        print(f"{task}: share_context=True {min(times[True]):.1f} s, False {min(times[False]):.1f} s "
              f"({min(times[False]) / min(times[True]):.2f}x); {len(requests)} requests; "
              f"max |log-likelihood difference| {diff:.2e}; greedy flags agree: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
