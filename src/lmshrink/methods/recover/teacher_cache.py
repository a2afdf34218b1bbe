"""The teacher's next-token distributions on disk in top-k form (recover option ``teacher_cache: topk``).

A cache is a folder written in one rename (``core.atomic.atomic_directory``), so it is either complete or absent:

- ``meta.json``: the cache key (the run, the windows, k, temperature, vocabulary), shapes and sizes;
- ``train-NNNNN.safetensors``: for ``SHARD_WINDOWS`` training windows, ``logp`` (float16,
  ``[windows, seqlen - 1, k + 1]``: the k largest log-probabilities of each next-token position at the stage
  temperature, then the log of the rest of the probability mass; float16's lowest value when k is the whole
  vocabulary: that bucket is empty, and the loss leaves it out) and ``ids`` (int32, ``[windows, seqlen - 1, k]``:
  their token ids);
- ``heldout.safetensors``: ``hidden``, the teacher's final hidden states of the held-out windows (the held-out KL and
  perplexities stay exact: they are computed from these and the output head, which the teacher shares with the
  student).

The rest bucket's log-mass is computed when the cache is written (a log-sum-exp over the tokens outside the top k, in
float32), not as ``1 - sum(top k)`` from the rounded values, so it stays accurate when it is small.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lmshrink.core.atomic import atomic_directory
from lmshrink.core.errors import LmshrinkError
from lmshrink.core.process import release_free_heap

SHARD_WINDOWS = 64
FORMAT = 1
_META = "meta.json"
_HELD = "heldout.safetensors"


def _shard_name(index: int) -> str:
    return f"train-{index:05d}.safetensors"


@torch.no_grad()
def topk_logprobs(hidden: torch.Tensor, head: nn.Linear, k: int, temperature: float,
                  chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, ids)`` of ``head(hidden) / temperature`` for every row of ``hidden`` (``[n, size]``): the k largest
    log-probabilities and the log of the remaining mass (``[n, k + 1]``, float32), and the k token ids (``[n, k]``).
    Computed ``chunk`` rows at a time."""
    values, indices = [], []
    for i in range(0, len(hidden), chunk):
        logits = F.linear(hidden[i:i + chunk], head.weight, head.bias).float().div_(temperature)
        logp = logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))
        top, ids = logp.topk(k, dim=-1)
        if k < logp.shape[-1]:
            rest = logp.scatter_(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
        else:
            rest = top.new_full((len(top), 1), float("-inf"))
        values.append(torch.cat([top, rest], -1))
        indices.append(ids)
        del logits, logp
    return torch.cat(values), torch.cat(indices)


class TopKCache:
    """A complete cache folder, read one batch of training windows at a time (the whole cache is never loaded)."""

    def __init__(self, folder: Path, meta: dict, reused: bool, seconds: float):
        self.folder = Path(folder)
        self.meta = meta
        self.reused = reused
        self.seconds = seconds

    @property
    def k(self) -> int:
        return self.meta["k"]

    @property
    def bytes(self) -> int:
        """Bytes of the cache's files on disk."""
        return sum(f.stat().st_size for f in self.folder.iterdir() if f.is_file())

    def windows(self, index: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logp, ids)`` of the training windows ``index``: float32 ``[b, seqlen - 1, k + 1]`` and int64
        ``[b, seqlen - 1, k]``."""
        logp, ids = [], []
        handles: dict[int, object] = {}
        for window in index.tolist():
            shard, row = divmod(int(window), SHARD_WINDOWS)
            if shard not in handles:
                handles[shard] = safe_open(str(self.folder / _shard_name(shard)), framework="pt")
            handle = handles[shard]
            logp.append(handle.get_slice("logp")[row:row + 1])
            ids.append(handle.get_slice("ids")[row:row + 1])
        return (torch.cat(logp).to(device=device, dtype=torch.float32),
                torch.cat(ids).to(device=device, dtype=torch.int64))

    def held_out_hidden(self, batch: int, device) -> list[torch.Tensor]:
        """The teacher's final hidden states of the held-out windows, in batches of ``batch`` windows."""
        hidden = load_file(str(self.folder / _HELD))["hidden"]
        return [h.to(device) for h in hidden.split(batch)]

    def record(self) -> dict:
        return {"mode": "topk", "k": self.k, "temperature": self.meta["temperature"], "vocab": self.meta["vocab"],
                "training_windows": self.meta["windows"], "bytes": self.bytes, "folder": str(self.folder),
                "reused": self.reused, "build_seconds": self.seconds,
                "approximation": "KL over the k cached tokens plus one rest bucket (a lower bound of the full KL)"}


def open_cache(folder: Path, key: str) -> TopKCache | None:
    """The complete cache in ``folder`` written for ``key``, or None (no cache, or one of other windows/options)."""
    meta_path = Path(folder) / _META
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("key") != key or meta.get("format") != FORMAT:
        return None
    return TopKCache(folder, meta, reused=True, seconds=0.0)


def write_cache(folder: Path, key: str, hidden: Callable[[torch.Tensor], torch.Tensor], head: nn.Linear,
                train_ids: torch.Tensor, eval_ids: torch.Tensor, k: int, temperature: float, batch: int,
                chunk: int, device, progress: bool = False) -> TopKCache:
    """Run the teacher (``hidden``: token ids -> final hidden states; ``head``: its output head) over every training
    window and write its top-k log-probabilities, and its held-out hidden states, to ``folder`` (replaced in one
    rename)."""
    import time

    from tqdm.auto import tqdm

    started = time.perf_counter()
    vocab = head.weight.shape[0]
    k = min(k, vocab)
    windows, seqlen = train_ids.shape
    shards = math.ceil(windows / SHARD_WINDOWS)
    bar = tqdm(total=windows, desc="teacher top-k", unit="window", disable=not progress, dynamic_ncols=True)
    with torch.no_grad(), atomic_directory(folder, overwrite=True) as staging:
        for shard in range(shards):
            rows = train_ids[shard * SHARD_WINDOWS:(shard + 1) * SHARD_WINDOWS]
            logp, ids = [], []
            for i in range(0, len(rows), batch):
                h = hidden(rows[i:i + batch].to(device))[:, :-1]
                v, t = topk_logprobs(h.reshape(-1, h.shape[-1]), head, k, temperature, chunk)
                v = v.clamp_(min=torch.finfo(torch.float16).min)  # into float16's range
                logp.append(v.to(torch.float16).reshape(len(h), seqlen - 1, k + 1).cpu())
                ids.append(t.to(torch.int32).reshape(len(h), seqlen - 1, k).cpu())
                bar.update(len(h))
            save_file({"logp": torch.cat(logp).contiguous(), "ids": torch.cat(ids).contiguous()},
                      str(staging / _shard_name(shard)))
            del logp, ids
        held = torch.cat([hidden(eval_ids[i:i + batch].to(device)) for i in range(0, len(eval_ids), batch)])
        save_file({"hidden": held.cpu().contiguous()}, str(staging / _HELD))
        meta = {"key": key, "format": FORMAT, "k": k, "temperature": temperature, "vocab": vocab,
                "windows": windows, "seqlen": seqlen, "shard_windows": SHARD_WINDOWS, "values": "float16 log-probs",
                "ids": "int32"}
        (staging / _META).write_text(json.dumps(meta))
    bar.close()
    return TopKCache(folder, meta, reused=False, seconds=time.perf_counter() - started)


def block_bytes(blocks: list[nn.Module]) -> int:
    """Bytes of the (non-meta) parameters and buffers of ``blocks``, each tensor once."""
    seen: set[int] = set()
    total = 0
    for block in blocks:
        for t in [*block.parameters(), *block.buffers()]:
            if id(t) not in seen and t.device.type != "meta":
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def _return_freed_memory() -> None:
    """Hand the teacher's freed memory back: its tensors are mostly too small for their own memory maps, so without
    trimming the freed memory stays in the process, reusable only by small allocations."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    release_free_heap(collect=True)


def _to_meta(blocks: list[nn.Module], shared: set[int]) -> int:
    freed = 0
    for block in blocks:
        for module in block.modules():
            for store in (module._parameters, module._buffers):
                for name, t in list(store.items()):
                    if t is None or id(t) in shared or t.device.type == "meta":
                        continue
                    freed += t.numel() * t.element_size()
                    meta = t.detach().to("meta")
                    store[name] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta
    return freed


def release_blocks(blocks: list[nn.Module], keep: nn.Module) -> int:
    """Free the teacher's decoder ``blocks``: each parameter and buffer that ``keep`` (the student) does not share
    is replaced by a tensor on the meta device (shape only), so its memory is released (and, with glibc, returned to
    the operating system). Returns the bytes freed. The blocks cannot run afterwards."""
    freed = _to_meta(blocks, {id(t) for t in [*keep.parameters(), *keep.buffers()]})
    _return_freed_memory()
    return freed


def check_released(blocks: list[nn.Module], option: str) -> None:
    """Refuse to run a teacher whose blocks were freed."""
    if any(t.device.type == "meta" for b in blocks for t in b.parameters()):
        raise LmshrinkError(f"recover stage, {option}: the teacher's decoder blocks were freed after an earlier "
                            "stage cached its distributions, so they cannot run again",
                            fix="use teacher_cache: topk in every recover stage, or none in every one")
