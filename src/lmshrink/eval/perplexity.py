"""Perplexity as the GPTQ/SparseGPT reference code computes it: exp of the mean of per-window mean NLLs."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from lmshrink.data.windows import Windows
from lmshrink.eval.progress import bar


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def window_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits for a batch of windows (no KV cache)."""
    out = model(input_ids=input_ids.to(model_device(model)), use_cache=False)
    return out.logits.float()


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token NLL per position, shape [batch, seqlen - 1]."""
    targets = input_ids[:, 1:].to(logits.device)
    pred = logits[:, :-1]
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.reshape(-1), reduction="none").view(targets.shape)


@torch.inference_mode()
def perplexity(model: torch.nn.Module, windows: Windows, batch_size: int = 1, progress: bool = True,
               desc: str = "perplexity") -> dict:
    """Perplexity over ``windows``; returns ppl, mean NLL, per-window NLLs, tokens, seconds and tokens/s."""
    model.eval()
    ids = windows.input_ids
    window_nll: list[float] = []
    start = time.perf_counter()
    with bar(len(ids), desc, progress) as pbar:
        for i in range(0, len(ids), batch_size):
            batch = ids[i:i + batch_size]
            nll = token_nll(window_logits(model, batch), batch).mean(dim=1)
            window_nll.extend(nll.double().cpu().tolist())
            pbar.update(len(batch))
            pbar.set_postfix(tok_s=f"{(i + len(batch)) * ids.shape[1] / (time.perf_counter() - start):.0f}")
    seconds = time.perf_counter() - start
    mean_nll = sum(window_nll) / len(window_nll)
    return {"ppl": math.exp(mean_nll), "mean_nll": mean_nll, "window_nll": window_nll,
            "tokens": int(ids.numel()), "seconds": seconds, "tokens_per_s": ids.numel() / seconds}
