"""Parameter count and weight bytes, as stored in memory (tied tensors counted once)."""

from __future__ import annotations

import torch


def _unique_tensors(model: torch.nn.Module):
    seen = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype) if tensor.numel() else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        yield name, tensor


def model_size(model: torch.nn.Module) -> dict:
    """Parameters and bytes in total, for the embeddings/head, and for everything else (the blocks)."""
    embed_ids = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            embed_ids.update(t.data_ptr() for t in module.state_dict().values())
    total = {"parameters": 0, "bytes": 0}
    embed = {"parameters": 0, "bytes": 0}
    dtypes: dict[str, int] = {}
    for _, tensor in _unique_tensors(model):
        nbytes = tensor.numel() * tensor.element_size()
        total["parameters"] += tensor.numel()
        total["bytes"] += nbytes
        if tensor.data_ptr() in embed_ids:
            embed["parameters"] += tensor.numel()
            embed["bytes"] += nbytes
        key = str(tensor.dtype).replace("torch.", "")
        dtypes[key] = dtypes.get(key, 0) + nbytes
    return {
        "parameters": total["parameters"],
        "weight_bytes": total["bytes"],
        "embedding_and_head_bytes": embed["bytes"],
        "body_parameters": total["parameters"] - embed["parameters"],
        "body_bytes": total["bytes"] - embed["bytes"],
        "bytes_by_dtype": dtypes,
    }
