"""An ONNX export against the lmshrink checkpoint it came from, on WikiText-2 test windows.

    lmshrink export out/smollm2-w4g32 --to onnx -o out/onnx
    python bench/onnx_check.py out/smollm2-w4g32 out/onnx --data-dir ../shared/data --windows 2 --seqlen 512

Runs the first --windows windows through the checkpoint (``load_model``, float32) and through onnxruntime (CPU),
and prints the largest logit difference, top-1 agreement and the perplexity of each on those windows.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

from lmshrink.data.sources import load_text
from lmshrink.data.windows import evaluation_windows
from lmshrink.formats.loading import load_model
from lmshrink.formats.onnx_export import run_onnx

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return float(-logprobs.gather(2, ids[:, 1:, None]).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("onnx_dir")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LMSHRINK_DATA", DEFAULT_DATA)))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    loaded = load_model(args.checkpoint)
    ids = evaluation_windows(loaded.tokenizer, load_text("wikitext2", "test", args.data_dir), args.seqlen,
                             limit=args.windows).input_ids
    nll_ref = nll_onnx = 0.0
    worst, agree, total = 0.0, 0, 0
    for window in ids.split(1):
        with torch.inference_mode():
            ref = loaded.model(input_ids=window).logits.float()
        got = run_onnx(Path(args.onnx_dir) / "model.onnx", window, threads=args.threads).float()
        worst = max(worst, float((ref - got).abs().max()))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += window.numel()
        nll_ref += _nll(ref, window) / len(ids)
        nll_onnx += _nll(got, window) / len(ids)
    print(f"{args.checkpoint} vs {args.onnx_dir}/model.onnx (onnxruntime CPU, {args.threads} thread(s)); first "
          f"{len(ids)} x {args.seqlen} WikiText-2 test windows")
    print(f"max |logit difference| {worst:.3g}; top-1 agreement {agree}/{total}; perplexity lmshrink "
          f"{math.exp(nll_ref):.3f}, onnx {math.exp(nll_onnx):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
