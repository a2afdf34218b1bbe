"""``lmshrink-runtime.json``: what a saved model computes besides its weights, so that loading it rebuilds exactly
that (never silently float): the activation quantizer and online input transform of each layer
(``runtime.activations``; static scales are tensors in the weights, ``NAME.input_scale``), and the key/value cache
quantization of each block's attention (``runtime.kvcache``).

Written by ``save_quantized`` whenever the model has any of these; ``apply_runtime`` rebuilds them on a loaded
model. Other readers (transformers alone, vLLM) do not read this file: the compressed-tensors config states what
that format can hold (int8 activations), and exports refuse what their format cannot hold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lmshrink.core.errors import LmshrinkError
from lmshrink.runtime import kvcache
from lmshrink.runtime.activations import apply_inputs, describe_inputs

RUNTIME_FILE = "lmshrink-runtime.json"
VERSION = 1


def describe_runtime(model: nn.Module) -> dict[str, Any]:
    """The model's runtime scheme (empty when it computes with its weights alone)."""
    inputs = describe_inputs(model)
    kv = kvcache.describe(model) if _has_blocks(model) else {}
    if not inputs and not kv:
        return {}
    return {"version": VERSION, "inputs": inputs, "kv_cache": kv}


def _has_blocks(model: nn.Module) -> bool:
    try:
        kvcache.attention_modules(model)
    except LmshrinkError:
        return False
    return True


def runtime_json(model: nn.Module) -> str | None:
    scheme = describe_runtime(model)
    return None if not scheme else json.dumps(scheme, indent=1, sort_keys=True) + "\n"


def read_runtime(folder: str | Path) -> dict[str, Any] | None:
    """The folder's runtime scheme, or None when it has none."""
    path = Path(folder) / RUNTIME_FILE
    if not path.is_file():
        return None
    try:
        scheme = json.loads(path.read_text())
    except ValueError as exc:
        raise LmshrinkError(f"{path} is not valid JSON ({exc})", fix="restore the file or compress again") from exc
    if scheme.get("version") != VERSION:
        raise LmshrinkError(f"{path} has version {scheme.get('version')!r}; this lmshrink reads version {VERSION}",
                            fix="load the folder with the lmshrink version that wrote it")
    return scheme


def apply_runtime(model: nn.Module, scheme: dict[str, Any] | None,
                  tensors: Callable[[str], torch.Tensor | None]) -> None:
    """Rebuild ``scheme`` on ``model``; ``tensors(name)`` gives a stored tensor (None when absent)."""
    if not scheme:
        return
    apply_inputs(model, scheme.get("inputs") or {}, tensors)
    kvcache.apply(model, scheme.get("kv_cache") or {})


def summary(scheme: dict[str, Any] | None) -> dict[str, Any]:
    """A short statement of a scheme for records: the distinct activation specs and transforms with their layer
    counts, and the cache specs with their block counts."""
    if not scheme:
        return {}
    activations: dict[str, int] = {}
    transforms: dict[str, int] = {}
    for entry in (scheme.get("inputs") or {}).values():
        if "activations" in entry:
            key = json.dumps(entry["activations"], sort_keys=True)
            activations[key] = activations.get(key, 0) + 1
        if "transform" in entry:
            key = json.dumps(entry["transform"], sort_keys=True)
            transforms[key] = transforms.get(key, 0) + 1
    caches: dict[str, int] = {}
    for spec in (scheme.get("kv_cache") or {}).values():
        key = json.dumps(spec, sort_keys=True)
        caches[key] = caches.get(key, 0) + 1
    out: dict[str, Any] = {}
    if activations:
        out["activations"] = [{"layers": n, **json.loads(k)} for k, n in activations.items()]
    if transforms:
        out["input_transforms"] = [{"layers": n, **json.loads(k)} for k, n in transforms.items()]
    if caches:
        out["kv_cache"] = [{"blocks": n, **json.loads(k)} for k, n in caches.items()]
    return out


__all__ = ["RUNTIME_FILE", "describe_runtime", "runtime_json", "read_runtime", "apply_runtime", "summary"]
