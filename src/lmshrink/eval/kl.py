"""KL divergence of a model's next-token distribution from a base model's, as llama.cpp's KLD tool reports it."""

from __future__ import annotations

import math
import time

import torch

from lmshrink.core.errors import LmshrinkError
from lmshrink.data.windows import Windows
from lmshrink.eval.perplexity import token_nll, window_logits
from lmshrink.eval.progress import bar


@torch.inference_mode()
def kl_divergence(model: torch.nn.Module, base: torch.nn.Module, windows: Windows, batch_size: int = 1,
                  progress: bool = True) -> dict:
    """KL(base || model) per next-token position over ``windows``.

    Returns the mean, median, 99th percentile and max KL (nats), top-1 agreement (fraction of positions where
    both models' argmax tokens agree), and both models' perplexities on the same windows.
    """
    ids = windows.input_ids
    kls: list[torch.Tensor] = []
    agree = positions = 0
    nll_model: list[float] = []
    nll_base: list[float] = []
    start = time.perf_counter()
    with bar(len(ids), "kl divergence", progress) as pbar:
        for i in range(0, len(ids), batch_size):
            batch = ids[i:i + batch_size]
            logits = window_logits(model, batch)
            base_logits = window_logits(base, batch).to(logits.device)
            if logits.shape[-1] != base_logits.shape[-1]:
                raise LmshrinkError(
                    f"the model's vocabulary ({logits.shape[-1]}) differs from the base model's ({base_logits.shape[-1]})",
                    fix="compare against the base model this model was compressed from")
            nll_model.extend(token_nll(logits, batch).mean(1).double().cpu().tolist())
            nll_base.extend(token_nll(base_logits, batch).mean(1).double().cpu().tolist())
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            base_logp = torch.log_softmax(base_logits[:, :-1], dim=-1)
            kl = (base_logp.exp() * (base_logp - logp)).sum(-1).clamp_min(0.0)
            kls.append(kl.flatten().double().cpu())
            agree += int((logp.argmax(-1) == base_logp.argmax(-1)).sum())
            positions += kl.numel()
            pbar.update(len(batch))
    values = torch.cat(kls)
    seconds = time.perf_counter() - start
    mean_nll = sum(nll_model) / len(nll_model)
    return {
        "kl_mean": float(values.mean()),
        "kl_median": float(values.median()),
        "kl_p99": float(torch.quantile(values.float(), 0.99)),
        "kl_max": float(values.max()),
        "top1_agreement": agree / positions,
        "positions": positions,
        "ppl": math.exp(mean_nll),
        "mean_nll": mean_nll,
        "window_nll": nll_model,
        "base_ppl": math.exp(sum(nll_base) / len(nll_base)),
        "seconds": seconds,
    }
