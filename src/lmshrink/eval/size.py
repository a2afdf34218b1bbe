"""Parameter count and weight bytes, as stored in memory (tied tensors counted once).

``parameters`` counts the model's weights, not the elements of the tensors that store them: a packed
``QuantLinear`` layer counts ``out_features * in_features`` (plus its bias), while its bytes are those of what it
holds (codes, scales, zero points, bias).
"""

from __future__ import annotations

import torch

from lmshrink.runtime.qlinear import OutlierLinear, QuantLinear


def _unique_tensors(model: torch.nn.Module):
    seen = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype) if tensor.numel() else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        yield name, tensor


def _packed_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``name -> module`` of the layers that store their weight packed (``QuantLinear``, or ``OutlierLinear`` with
    the QuantLinear it holds)."""

    outer = {name for name, module in model.named_modules() if isinstance(module, OutlierLinear)}
    return {name: module for name, module in model.named_modules()
            if name in outer or (isinstance(module, QuantLinear) and name.rpartition(".")[0] not in outer)}


def _weight_count(module: torch.nn.Module) -> int:
    """Weights of a packed layer: its [out, in] matrix and its bias."""
    bias = 0 if module.bias is None else module.bias.numel()
    return int(module.out_features) * int(module.in_features) + bias


def model_size(model: torch.nn.Module) -> dict:
    """Parameters and bytes in total, for the embeddings/head, and for everything else (the blocks).

    Parameters are weights (a packed layer counts its dense weight shape); bytes are what the tensors hold."""
    embed_modules = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    embed_ids = {t.data_ptr() for module in embed_modules for t in module.state_dict().values()}
    packed = _packed_layers(model)
    prefixes = tuple(f"{name}." for name in packed)
    total = {"parameters": 0, "bytes": 0}
    embed = {"parameters": 0, "bytes": 0}
    dtypes: dict[str, int] = {}
    for name, tensor in _unique_tensors(model):
        nbytes = tensor.numel() * tensor.element_size()
        in_embed = tensor.data_ptr() in embed_ids
        count = 0 if prefixes and name.startswith(prefixes) else tensor.numel()  # packed layers: counted below
        total["parameters"] += count
        total["bytes"] += nbytes
        if in_embed:
            embed["parameters"] += count
            embed["bytes"] += nbytes
        key = str(tensor.dtype).replace("torch.", "")
        dtypes[key] = dtypes.get(key, 0) + nbytes
    for module in {id(m): m for m in packed.values()}.values():
        count = _weight_count(module)
        total["parameters"] += count
        if any(module is m for m in embed_modules):
            embed["parameters"] += count
    return {
        "parameters": total["parameters"],
        "weight_bytes": total["bytes"],
        "embedding_and_head_bytes": embed["bytes"],
        "body_parameters": total["parameters"] - embed["parameters"],
        "body_bytes": total["bytes"] - embed["bytes"],
        "bytes_by_dtype": dtypes,
    }
