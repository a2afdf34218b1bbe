"""Evaluation throughput of a real model: tokens/s of the perplexity pass at several batch sizes.

    python bench/eval_throughput.py --model smollm2-135m --windows 8 --seqlen 512 --data-dir ../shared/data

Protocol: WikiText-2 test ("\\n\\n"-joined HF rows), the first N non-overlapping windows, fp32 on CPU, each batch
size measured in the same run after one warm-up window; prints tokens/s and the perplexity (which must not
depend on the batch size).
"""

from __future__ import annotations

import argparse
import time

import torch

from lmshrink import load_model
from lmshrink.data.sources import load_text
from lmshrink.data.windows import Windows, evaluation_windows
from lmshrink.eval.perplexity import perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-sizes", default="1,2,4")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--dataset", default="wikitext2")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    loaded = load_model(args.model, progress=False)
    load_s = time.perf_counter() - t0
    source = load_text(args.dataset, "test", args.data_dir)
    windows = evaluation_windows(loaded.tokenizer, source, args.seqlen, args.windows, loaded.info.max_context)
    perplexity(loaded.model, Windows(windows.input_ids[:1], {}), progress=False)  # warm-up
    print(f"model {args.model} ({loaded.info.parameters / 1e6:.1f}M params, fp32), loaded in {load_s:.1f}s; "
          f"{source.name} {source.split}, {len(windows)} windows x {args.seqlen} tokens; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'batch':>5} {'seconds':>8} {'tokens/s':>9} {'ppl':>8}")
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        result = perplexity(loaded.model, windows, batch_size=batch_size, progress=False)
        print(f"{batch_size:>5} {result['seconds']:>8.2f} {result['tokens_per_s']:>9.1f} {result['ppl']:>8.3f}")


if __name__ == "__main__":
    main()
