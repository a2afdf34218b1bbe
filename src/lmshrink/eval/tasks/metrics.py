"""lm-eval's per-item decisions and aggregate metrics (mean with its standard error, perplexity)."""

from __future__ import annotations

import math

import numpy as np

from lmshrink.eval.tasks.spec import Item

PERPLEXITY_BOOTSTRAP = 1000  # resamples for the perplexity stderr (lm-eval bootstraps it too)


def mean_stderr(values: list[float]) -> float | None:
    """Sample standard deviation / sqrt(n) (lm-eval's mean_stderr); None below two values."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def choose(item: Item, scores: list[tuple[float, bool]]) -> dict:
    """lm-eval's multiple-choice decision for one item: argmax of the summed log-probs (acc) and of the sum
    divided by the choice's length in characters (acc_norm); ties go to the first choice (np.argmax)."""
    lls = np.array([s for s, _ in scores], dtype=np.float64)
    lengths = np.array([float(len(c)) for c in item.choices], dtype=np.float64)
    pred = int(np.argmax(lls))
    with np.errstate(divide="ignore", invalid="ignore"):
        pred_norm = int(np.argmax(lls / lengths))
    return {"gold": item.gold, "pred": pred, "pred_norm": pred_norm, "loglikelihoods": lls.tolist(),
            "acc": float(pred == item.gold), "acc_norm": float(pred_norm == item.gold)}


def aggregate(kind: str, metric_names: tuple[str, ...], records: list[dict]) -> dict[str, float | None]:
    """Task metrics and their stderr from per-item records."""
    out: dict[str, float | None] = {}
    if kind == "multiple_choice":
        for name in metric_names:
            values = [r[name] for r in records]
            out[name] = sum(values) / len(values) if values else None
            out[f"{name}_stderr"] = mean_stderr(values)
        return out
    # loglikelihood (LAMBADA): acc = greedy hit rate, perplexity = exp(-mean log-likelihood)
    lls = np.array([r["loglikelihood"] for r in records], dtype=np.float64)
    hits = [float(r["greedy"]) for r in records]
    if "perplexity" in metric_names:
        out["perplexity"] = float(math.exp(-lls.mean())) if len(lls) else None
        out["perplexity_stderr"] = _bootstrap_perplexity_stderr(lls)
    if "acc" in metric_names:
        out["acc"] = sum(hits) / len(hits) if hits else None
        out["acc_stderr"] = mean_stderr(hits)
    return out


def _bootstrap_perplexity_stderr(lls: np.ndarray, iters: int = PERPLEXITY_BOOTSTRAP, seed: int = 0) -> float | None:
    if len(lls) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = np.empty(iters)
    for i in range(iters):
        means[i] = lls[rng.integers(0, len(lls), len(lls))].mean()
    return float(np.std(np.exp(-means), ddof=1))
