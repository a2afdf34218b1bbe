"""Token windows: calibration windows (GPTQ sampling protocol) and evaluation windows (non-overlapping)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from lmshrink.core.errors import DataSourceError, LmshrinkError
from lmshrink.data.sources import TextSource


@dataclass
class Windows:
    """``input_ids`` of shape [n, seqlen] and the protocol that produced them."""

    input_ids: torch.Tensor
    protocol: dict

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def encode_text(tokenizer, text: str) -> list[int]:
    # Default special-token handling, as the GPTQ/SparseGPT reference code tokenizes.
    return tokenizer(text, verbose=False)["input_ids"]


def _encode_plain(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token in front of a text by itself (Gemma, Llama 2/3 do; SmolLM2 does
    not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = encode_text(tokenizer, "a")
    return bool(ids) and ids[0] == bos


def _bos_per_window(tokenizer, bos_per_window: bool | None) -> int | None:
    """The BOS id to put at the start of every window, or None (windows are plain slices of the token stream)."""
    if bos_per_window is None:
        bos_per_window = adds_bos(tokenizer)
    if not bos_per_window:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise LmshrinkError("bos_per_window=True, but the tokenizer has no BOS token",
                            fix="leave bos_per_window at its default (None: only when the tokenizer adds BOS)")
    return int(bos)


def check_seqlen(seqlen: int, max_context: int | None) -> None:
    if seqlen < 2:
        raise LmshrinkError(f"seqlen {seqlen} is too short", fix="use a seqlen of at least 2 tokens (e.g. 512)")
    if max_context is not None and seqlen > max_context:
        raise LmshrinkError(f"seqlen {seqlen} is beyond the model's context of {max_context} tokens",
                            fix=f"use --seqlen {max_context} or less")


def evaluation_windows(tokenizer, source: TextSource, seqlen: int, limit: int | None = None,
                       max_context: int | None = None, bos_per_window: bool | None = None) -> Windows:
    """Join the documents, tokenize once, cut into non-overlapping windows of ``seqlen`` tokens.

    ``bos_per_window``: start every window with the BOS token followed by ``seqlen - 1`` text tokens, so each is
    read as the start of a sequence; None (default) does so exactly when the tokenizer adds BOS by itself (Gemma
    reads text without it badly). Otherwise windows are plain slices of the stream, and only the first holds the
    BOS a tokenizer adds (the GPTQ reference convention). The protocol records which.
    """
    check_seqlen(seqlen, max_context)
    bos = _bos_per_window(tokenizer, bos_per_window)
    ids = encode_text(tokenizer, source.joined()) if bos is None else _encode_plain(tokenizer, source.joined())
    step = seqlen if bos is None else seqlen - 1
    available = len(ids) // step
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
    input_ids = torch.tensor(ids[: count * step], dtype=torch.long).view(count, step)
    if bos is not None:
        input_ids = torch.cat([torch.full((count, 1), bos, dtype=torch.long), input_ids], dim=1)
    protocol = {**source.protocol(), "seqlen": seqlen, "windows": count, "windows_available": available,
                "tokens": count * seqlen, "tokens_in_split": len(ids), "windows_kind": "non-overlapping, from the start",
                "bos_per_window": bos is not None}
    return Windows(input_ids=input_ids, protocol=protocol)


def calibration_windows(tokenizer, source: TextSource, nsamples: int, seqlen: int, seed: int = 0,
                        max_context: int | None = None, bos_per_window: bool | None = None) -> Windows:
    """GPTQ sampling, seeded. Document corpora (``source.calibration == "documents"``: c4, enwiki, .jsonl): pick a
    random document longer than ``seqlen`` tokens, then a random offset in it. Sets whose rows are paragraphs or
    sentences (``"stream"``: wikitext2, ptb, .txt): a random offset in the joined, tokenized text.
    ``bos_per_window`` as in ``evaluation_windows``: each window is BOS plus ``seqlen - 1`` text tokens."""
    check_seqlen(seqlen, max_context)
    if nsamples < 1:
        raise LmshrinkError(f"nsamples {nsamples} must be at least 1", fix="pass --nsamples 1 or more")
    bos = _bos_per_window(tokenizer, bos_per_window)
    encode = encode_text if bos is None else _encode_plain
    span = seqlen if bos is None else seqlen - 1
    rng = random.Random(seed)
    docs = source.documents
    if not docs:
        raise DataSourceError(f"{source.name} ({source.split}) has no documents", fix="use another calibration text")
    windows = []
    if source.calibration == "stream":
        ids = encode(tokenizer, source.joined())
        if len(ids) <= span:
            raise DataSourceError(f"{source.name} ({source.split}) has only {len(ids)} tokens, not more than one "
                                  f"window of {seqlen}", fix="use a shorter --seqlen or a larger text")
        for _ in range(nsamples):
            start = rng.randint(0, len(ids) - span - 1)
            windows.append(ids[start:start + span])
        sampling = "random offset in the joined, tokenized text (GPTQ protocol for wikitext2 and ptb)"
    else:
        cache: dict[int, list[int]] = {}
        for _ in range(nsamples):
            for _ in range(10 * len(docs) + 100):
                index = rng.randint(0, len(docs) - 1)
                if index not in cache:
                    cache[index] = encode(tokenizer, docs[index])
                if len(cache[index]) > span:
                    break
            else:
                longest = max(len(encode(tokenizer, d)) for d in docs)
                raise DataSourceError(
                    f"no document in {source.name} ({source.split}) is longer than {span} tokens (longest: "
                    f"{longest})", fix=f"use --seqlen {max(2, longest - 1 + seqlen - span)} or less, or a text with "
                                       "longer documents")
            ids = cache[index]
            start = rng.randint(0, len(ids) - span - 1)
            windows.append(ids[start:start + span])
        sampling = "random document with more than seqlen tokens, random offset (GPTQ protocol)"
    input_ids = torch.tensor(windows, dtype=torch.long)
    if bos is not None:
        input_ids = torch.cat([torch.full((nsamples, 1), bos, dtype=torch.long), input_ids], dim=1)
    protocol = {**source.protocol(), "seqlen": seqlen, "nsamples": nsamples, "seed": seed,
                "tokens": nsamples * seqlen, "sampling": sampling, "bos_per_window": bos is not None}
    return Windows(input_ids=input_ids, protocol=protocol)
