"""Log-likelihood of continuations given contexts, tokenized and batched the way lm-eval's HFLM does it."""

from __future__ import annotations

import copy
import inspect
import sys
from typing import Sequence

import torch

# lm-eval treats this tokenizer model_max_length as "unset" (transformers' VERY_LARGE_INTEGER).
_TOKENIZER_INFINITY = 1000000000000000019884624838656
_DEFAULT_MAX_LENGTH = 2048


def max_length_of(model, tokenizer) -> int:
    """The context length lm-eval uses: config n_positions / max_position_embeddings / n_ctx, else the
    tokenizer's model_max_length, else 2048."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    value = getattr(tokenizer, "model_max_length", None)
    if value is not None and value != _TOKENIZER_INFINITY:
        return int(value)
    return _DEFAULT_MAX_LENGTH


def prefix_token_id(tokenizer) -> int:
    """The token lm-eval conditions on when a context is empty: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_text(tokenizer, text: str) -> list[int]:
    """lm-eval's tok_encode with add_bos_token unset: the tokenizer's own special-token default, except
    that a string already starting with the prefix token's text gets no special tokens."""
    prefix = prefix_token_id(tokenizer)
    if prefix is not None and text.startswith(tokenizer.decode(prefix)):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-eval splits them.

    Trailing spaces of the context move onto the continuation; the whole string is encoded once and the
    continuation is what follows the context's own encoding. An empty context becomes the prefix token.
    """
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode_text(tokenizer, context + continuation)
    context_ids = encode_text(tokenizer, context)
    return context_ids, whole[len(context_ids):]


def _accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _cache_argument(model) -> str:
    """The forward argument that takes a key/value cache: ``cache`` (transformers >= 5.2x), else
    ``past_key_values``."""
    try:
        return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


# Sharing a context pays when it cuts the model's tokens to at most this fraction: a shared context costs two small
# per-document forwards, slower per token than batched full sequences (docs/decisions.md)
SHARE_MAX_TOKEN_FRACTION = 0.5


def _worth_sharing(ctx: tuple[int, ...], requests: list[tuple[tuple[int, ...], list[int]]]) -> bool:
    inputs = {inputs for inputs, _ in requests}
    if len(inputs) < 2:
        return False
    tails = {tuple(cont) for _, cont in requests}
    shared_tokens = len(ctx) + sum(len(t) - 1 for t in tails)
    return shared_tokens <= SHARE_MAX_TOKEN_FRACTION * sum(len(i) for i in inputs)


def _record(results: list, index: int, cont_ids: list[int], logprobs: torch.Tensor) -> None:
    """Store request ``index``'s (summed log-prob, all-greedy) from the log-probs of its continuation positions."""
    tail = logprobs[-len(cont_ids):]
    target = torch.tensor(cont_ids, dtype=torch.long, device=tail.device)
    results[index] = (float(tail.gather(1, target[:, None]).sum()), bool((tail.argmax(dim=-1) == target).all()))


def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 8,
                   max_length: int | None = None, progress: bool = True,
                   desc: str = "scoring", share_context: bool | None = None) -> list[tuple[float, bool]]:
    """For each (context, continuation): the summed log-probability of the continuation tokens and whether
    every one of them is the model's greedy (argmax) choice.

    Sequences longer than ``max_length + 1`` tokens lose tokens from the left, as in lm-eval. Requests whose
    model inputs are identical (e.g. one-token answers after the same context) share one forward pass;
    the rest are sorted by length and right-padded into batches of ``batch_size``.

    ``share_context`` (default: on when the model is on CPU): the requests of one context with different
    multi-token continuations (the choices of ARC, OpenBookQA, HellaSwag) run the context once and their
    continuations on its key/value cache, so the context is not recomputed per choice (ARC-Easy's test split: 97k
    tokens instead of 249k), where that at least halves the tokens (``SHARE_MAX_TOKEN_FRACTION``; PIQA's long
    answers after short goals do not qualify). Scores equal the unshared ones up to float rounding. Off, every request is a full sequence in a
    batch across documents: fewer, larger forwards, which suits a GPU better than per-document calls.
    """
    max_length = max_length or max_length_of(model, tokenizer)
    prepared: list[tuple[tuple[int, ...], list[int]]] = []
    contexts: dict[tuple[int, ...], list[int]] = {}  # context ids -> requests that fit without truncation
    for index, (context, continuation) in enumerate(requests):
        context_ids, cont_ids = encode_pair(tokenizer, context, continuation)
        if not cont_ids or len(cont_ids) > max_length:
            raise ValueError(f"continuation {continuation!r} encodes to {len(cont_ids)} tokens; "
                             f"need 1..{max_length}")
        prepared.append((tuple((context_ids + cont_ids)[-(max_length + 1):][:-1]), cont_ids))
        if len(context_ids) + len(cont_ids) <= max_length + 1:
            contexts.setdefault(tuple(context_ids), []).append(index)

    device = next(model.parameters()).device
    if share_context is None:
        share_context = device.type == "cpu"
    # Contexts worth sharing: two or more distinct inputs (distinct multi-token continuations) after them, and
    # sharing at least halves the tokens the model runs (per-document forwards are smaller, hence slower per token).
    shared = {ctx: idx for ctx, idx in contexts.items() if _worth_sharing(ctx, [prepared[i] for i in idx])} \
        if share_context else {}
    in_shared = {i for idx in shared.values() for i in idx}

    # One forward per distinct input; each request reads its continuation's positions from it. Results are
    # computed batch by batch: keeping every input's [positions, vocab] log-probs until the end would take
    # vocab x 4 bytes per continuation token (about 10 GB for PIQA's validation split with a 49k vocabulary).
    longest_cont: dict[tuple[int, ...], int] = {}
    users: dict[tuple[int, ...], list[int]] = {}  # inputs -> indices of the requests that read them
    for index, (inputs, cont_ids) in enumerate(prepared):
        if index not in in_shared:
            longest_cont[inputs] = max(longest_cont.get(inputs, 0), len(cont_ids))
            users.setdefault(inputs, []).append(index)
    order = sorted(longest_cont, key=lambda seq: (-len(seq), seq))
    pad_id = 0
    use_keep = _accepts_logits_to_keep(model)
    results: list[tuple[float, bool] | None] = [None] * len(prepared)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(order) + len(shared), desc=desc, unit="seq", file=sys.stderr, leave=False)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                width = len(batch[0])
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                for row, seq in enumerate(batch):
                    ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
                # Only the tail positions holding continuations need logits (the vocab projection is the big part).
                keep = max(width - (len(seq) - longest_cont[seq]) for seq in batch)
                kwargs = {"logits_to_keep": keep} if use_keep else {}
                logits = model(input_ids=ids.to(device), use_cache=False, **kwargs).logits
                logits = logits[:, -keep:, :].float()
                for row, seq in enumerate(batch):
                    end = keep - (width - len(seq))  # exclusive end of this row's real positions in the kept tail
                    logprobs = torch.log_softmax(logits[row, end - longest_cont[seq]:end], dim=-1)
                    for index in users[seq]:
                        _record(results, index, prepared[index][1], logprobs)
                if bar is not None:
                    bar.update(len(batch))
            for ctx in sorted(shared, key=lambda c: (-len(c), c)):
                _score_shared_context(model, ctx, shared[ctx], prepared, results, batch_size, use_keep, device)
                if bar is not None:
                    bar.update(1)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return results


def _score_shared_context(model, ctx: tuple[int, ...], indices: list[int], prepared, results: list,
                          batch_size: int, use_keep: bool, device) -> None:
    """Score the requests ``indices`` that share context ``ctx``: one forward of the context (its last position
    predicts every continuation's first token), then the continuations minus their last token, right-padded, on
    copies of the context's key/value cache. Right padding needs no attention mask: causal attention never lets a
    real position see the padding after it, and padded positions' logits are not read."""
    kwargs = {"logits_to_keep": 1} if use_keep else {}
    out = model(input_ids=torch.tensor([ctx], dtype=torch.long, device=device), use_cache=True, **kwargs)
    first = torch.log_softmax(out.logits[0, -1:].float(), dim=-1)  # [1, vocab]: the first continuation token
    logprobs = {}
    tails = sorted({tuple(prepared[i][1]) for i in indices}, key=lambda t: (-len(t), t))
    longer = [t for t in tails if len(t) > 1]
    for t in tails[len(longer):]:
        logprobs[t] = first
    for start in range(0, len(longer), batch_size):
        chunk = longer[start:start + batch_size]
        cache = copy.deepcopy(getattr(out, "cache", None) or out.past_key_values)
        cache.batch_repeat_interleave(len(chunk))
        ids = torch.zeros((len(chunk), len(chunk[0]) - 1), dtype=torch.long)
        for row, tail in enumerate(chunk):
            ids[row, :len(tail) - 1] = torch.tensor(tail[:-1], dtype=torch.long)
        logits = model(input_ids=ids.to(device), use_cache=True, **{_cache_argument(model): cache}).logits.float()
        for row, tail in enumerate(chunk):
            logprobs[tail] = torch.cat([first, torch.log_softmax(logits[row, :len(tail) - 1], dim=-1)])
    for index in indices:
        _record(results, index, prepared[index][1], logprobs[tuple(prepared[index][1])])
