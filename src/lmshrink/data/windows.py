"""Token windows: calibration windows (GPTQ sampling protocol) and evaluation windows (non-overlapping)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..errors import DataSourceError, LmshrinkError
from .sources import TextSource


@dataclass
class Windows:
    """``input_ids`` of shape [n, seqlen] and the protocol that produced them."""

    input_ids: torch.Tensor
    protocol: dict

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def _encode(tokenizer, text: str) -> list[int]:
    # Default special-token handling, as the GPTQ/SparseGPT reference code tokenizes.
    return tokenizer(text, verbose=False)["input_ids"]


def check_seqlen(seqlen: int, max_context: int | None) -> None:
    if seqlen < 2:
        raise LmshrinkError(f"seqlen {seqlen} is too short", fix="use a seqlen of at least 2 tokens (e.g. 512)")
    if max_context is not None and seqlen > max_context:
        raise LmshrinkError(f"seqlen {seqlen} is beyond the model's context of {max_context} tokens",
                            fix=f"use --seqlen {max_context} or less")


def evaluation_windows(tokenizer, source: TextSource, seqlen: int, limit: int | None = None,
                       max_context: int | None = None) -> Windows:
    """Join the documents, tokenize once, cut into non-overlapping windows of ``seqlen`` tokens."""
    check_seqlen(seqlen, max_context)
    ids = _encode(tokenizer, source.joined())
    available = len(ids) // seqlen
    if available == 0:
        raise DataSourceError(f"{source.name} ({source.split}) has only {len(ids)} tokens, less than one window "
                              f"of {seqlen}", fix="use a shorter --seqlen or a larger text")
    if limit is not None:
        if limit < 1:
            raise LmshrinkError(f"limit {limit} must be at least 1", fix="pass --limit 1 or more, or leave it out")
        if limit > available:
            raise LmshrinkError(
                f"limit {limit} is larger than the {available} windows of {seqlen} tokens that "
                f"{source.name} ({source.split}) provides", fix=f"use --limit {available} or less (or leave it out)")
    count = available if limit is None else limit
    input_ids = torch.tensor(ids[: count * seqlen], dtype=torch.long).view(count, seqlen)
    protocol = {**source.protocol(), "seqlen": seqlen, "windows": count, "windows_available": available,
                "tokens": count * seqlen, "tokens_in_split": len(ids), "windows_kind": "non-overlapping, from the start"}
    return Windows(input_ids=input_ids, protocol=protocol)


def calibration_windows(tokenizer, source: TextSource, nsamples: int, seqlen: int, seed: int = 0,
                        max_context: int | None = None) -> Windows:
    """GPTQ sampling: pick a random document longer than ``seqlen`` tokens, then a random offset; seeded."""
    check_seqlen(seqlen, max_context)
    if nsamples < 1:
        raise LmshrinkError(f"nsamples {nsamples} must be at least 1", fix="pass --nsamples 1 or more")
    rng = random.Random(seed)
    cache: dict[int, list[int]] = {}
    docs = source.documents
    if not docs:
        raise DataSourceError(f"{source.name} ({source.split}) has no documents", fix="use another calibration text")
    windows, picked = [], []
    for _ in range(nsamples):
        for attempt in range(10 * len(docs) + 100):
            index = rng.randint(0, len(docs) - 1)
            if index not in cache:
                cache[index] = _encode(tokenizer, docs[index])
            if len(cache[index]) > seqlen:
                break
        else:
            longest = max(len(_encode(tokenizer, d)) for d in docs)
            raise DataSourceError(
                f"no document in {source.name} ({source.split}) is longer than {seqlen} tokens (longest: {longest})",
                fix=f"use --seqlen {max(2, longest - 1)} or less, or a text with longer documents")
        ids = cache[index]
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start:start + seqlen])
        picked.append([index, start])
    protocol = {**source.protocol(), "seqlen": seqlen, "nsamples": nsamples, "seed": seed,
                "tokens": nsamples * seqlen,
                "sampling": "random document with more than seqlen tokens, random offset (GPTQ protocol)"}
    return Windows(input_ids=torch.tensor(windows, dtype=torch.long), protocol=protocol)
