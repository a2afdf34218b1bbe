"""A GGUF export in llama.cpp (llama-cpp-python) against the lmshrink checkpoint it came from.

    lmshrink export out/smollm2-w4g32 --to gguf -o out/smollm2-w4g32.gguf
    python bench/llama_cpp_check.py out/smollm2-w4g32 out/smollm2-w4g32.gguf --data-dir ../shared/data

Feeds the first --tokens tokens of the WikiText-2 test text to both (llama.cpp: one ``eval`` with every position's
logits kept; lmshrink: ``load_model``, float32), and prints the largest logit difference relative to the largest
logit, top-1 agreement, the perplexity of each on those tokens, and llama.cpp's decode speed (--new-tokens greedy
tokens after a short prompt, --threads threads) beside lmshrink's fp32 model on the same prompt.
llama-cpp-python is optional (it compiles for about 9 minutes; build with CMAKE_ARGS=-DGGML_AMX_INT8=OFF where its
AMX backend crashes).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from lmshrink.data.sources import load_text
from lmshrink.data.windows import evaluation_windows
from lmshrink.eval.tasks.scoring import _cache_argument
from lmshrink.formats.loading import load_model

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    return float(-logprobs.gather(1, ids[1:, None]).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("gguf")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LMSHRINK_DATA", DEFAULT_DATA)))
    args = parser.parse_args(argv)

    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: CMAKE_ARGS=-DGGML_AMX_INT8=OFF pip install "
                         "llama-cpp-python (compiles for about 9 minutes)")
    torch.set_num_threads(args.threads)
    loaded = load_model(args.checkpoint)
    ids = evaluation_windows(loaded.tokenizer, load_text("wikitext2", "test", args.data_dir), args.tokens,
                             limit=1).input_ids[0]
    llm = llama_cpp.Llama(str(args.gguf), logits_all=True, verbose=False, n_ctx=max(512, args.tokens + 8),
                          n_threads=args.threads)
    llm.eval(ids.tolist())
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    with torch.inference_mode():
        ours = loaded.model(input_ids=ids[None]).logits[0].float()
    worst = float((theirs - ours).abs().max())
    agree = int((theirs.argmax(-1) == ours.argmax(-1)).sum())
    print(f"{args.checkpoint} vs {args.gguf} (llama-cpp-python {llama_cpp.__version__}, {args.threads} thread(s)); "
          f"the first {len(ids)} WikiText-2 test tokens")
    print(f"max |logit difference| {worst:.4g} (largest logit {float(ours.abs().max()):.3g}); top-1 agreement "
          f"{agree}/{len(ids)}; perplexity lmshrink {math.exp(_nll(ours, ids)):.3f}, llama.cpp "
          f"{math.exp(_nll(theirs, ids)):.3f}")

    prompt = ids[:32].tolist()
    llm.reset()
    made, first = 0, time.perf_counter()
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        made += 1
        if made == 1:
            first = time.perf_counter()
        if made > args.new_tokens:
            break
    cpp_rate = (made - 1) / (time.perf_counter() - first)
    argument = _cache_argument(loaded.model)
    with torch.inference_mode():
        out = loaded.model(input_ids=torch.tensor([prompt]), use_cache=True)
        cache, token = getattr(out, "cache", None) or out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(args.new_tokens):
            out = loaded.model(input_ids=token, use_cache=True, **{argument: cache})
            cache, token = getattr(out, "cache", None) or out.past_key_values, out.logits[:, -1:].argmax(-1)
        ours_rate = args.new_tokens / (time.perf_counter() - start)
    print(f"decode, {args.new_tokens} greedy tokens after a 32-token prompt, {args.threads} thread(s): llama.cpp "
          f"{cpp_rate:.1f} tok/s, lmshrink checkpoint through transformers (float32, eager) {ours_rate:.1f} tok/s "
          f"({cpp_rate / ours_rate:.2f}x); one run each, not interleaved")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
