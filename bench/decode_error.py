"""What FastDecoder's speed options cost in accuracy: teacher-forced decode steps on real text, exact vs approximate.

    python bench/decode_error.py out/smollm2-w4g32 --data-dir ../shared/data
    python bench/decode_error.py out/smollm2-w4g32 --windows 4 --seqlen 512 --json decode_error.json

The checkpoint is loaded packed (``runtime="packed"``). Each window of WikiText-2 test ("\\n\\n"-joined rows, the
first WINDOWS non-overlapping windows of SEQLEN tokens) is fed one token per ``FastDecoder.step`` after a one-token
prefill, so every position's logits come from the decode path the speed benchmark times (``lmshrink bench --decode
fast``), for each configuration:

* ``exact``: float32 activations, the model's own lm_head (differs from transformers' forward only in rounding);
* ``int8 activations``: ``activations="int8"`` (inputs of the int4 layers rounded to int8 per block of 32);
* ``int8 head``: ``head="int8"`` (lm_head from a q8_0 copy);
* ``int8 activations + head``: both (``lmshrink bench --decode fast-q8``).

Printed per configuration: perplexity of the window tokens (positions 1..SEQLEN-1), mean KL(exact || config) per
token, and the share of positions whose argmax equals the exact path's. A first row gives transformers' forward on
the same packed model and windows (the number ``lmshrink evaluate`` computes), to tie the decode path to it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CONFIGS = {"exact": {}, "int8 activations": {"activations": "int8"}, "int8 head": {"head": "int8"},
           "int8 activations + head": {"activations": "int8", "head": "int8"}}


def _decode_logits(decoder, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[T - 1, vocab]`` predicting ``ids[1:]``: a one-token prefill, then one step per token."""
    rows = [decoder.prefill(ids[:1].view(1, 1))[0]]
    for token in ids[1:-1].tolist():
        rows.append(decoder.step(token)[0])
    return torch.stack(rows).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a folder written by `lmshrink compress` (4-bit, e.g. w4g32)")
    parser.add_argument("--data-dir", default=os.environ.get("LMSHRINK_DATA", "../shared/data"))
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lmshrink.data.sources import load_text
    from lmshrink.data.windows import evaluation_windows
    from lmshrink.formats.loading import load_model
    from lmshrink.runtime.fastpath import FastDecoder

    loaded = load_model(args.checkpoint, runtime="packed", progress=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    windows = evaluation_windows(tokenizer, load_text("wikitext2", "test", args.data_dir), args.seqlen,
                                 limit=args.windows).input_ids
    targets = windows[:, 1:].reshape(-1)
    logits: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    with torch.inference_mode():
        start = time.perf_counter()
        logits["transformers forward"] = torch.cat([model(w.view(1, -1)).logits[0, :-1].float() for w in windows])
        seconds["transformers forward"] = time.perf_counter() - start
        for name, options in CONFIGS.items():
            decoder = FastDecoder(model, args.seqlen, **options)
            start = time.perf_counter()
            logits[name] = torch.cat([_decode_logits(decoder, w) for w in windows])
            seconds[name] = time.perf_counter() - start
    exact = F.log_softmax(logits["exact"], -1)
    rows = []
    for name, values in logits.items():
        logp = F.log_softmax(values, -1)
        nll = float(-logp.gather(1, targets.view(-1, 1)).mean())
        kl = float((exact.exp() * (exact - logp)).sum(-1).mean())
        agree = float((values.argmax(-1) == logits["exact"].argmax(-1)).float().mean())
        rows.append({"config": name, "ppl": math.exp(nll), "kl_to_exact": kl, "top1_agreement": agree,
                     "seconds": seconds[name], "max_abs_logit_diff": float((values - logits["exact"]).abs().max())})
    print(f"{args.checkpoint}: WikiText-2 test, first {args.windows} windows x {args.seqlen} tokens "
          f"({len(targets)} predicted tokens), teacher-forced, {args.threads} thread(s)")
    print("| configuration | ppl | KL(exact ‖ config) per token | top-1 = exact | max abs logit diff | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['ppl']:.3f} | {r['kl_to_exact']:.5f} | {r['top1_agreement']:.4f} "
              f"| {r['max_abs_logit_diff']:.4f} | {r['seconds']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": args.checkpoint, "windows": args.windows,
                                               "seqlen": args.seqlen, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
