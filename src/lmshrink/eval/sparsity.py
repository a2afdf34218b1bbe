"""Measured sparsity of a model's decoder-block linear layers: exact zeros, by layer type and overall."""

from __future__ import annotations

import torch

from lmshrink.models.adapters import iter_linears

_NM_PATTERNS = ((2, 4), (4, 8))


def _weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The layer's dense weight, or None when it is stored packed (no floating ``weight``)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.device.type == "meta":
        return None
    return weight.detach()


def _satisfies(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every run of ``m`` consecutive inputs of each row holds at least ``n`` zeros."""
    rows, cols = weight.shape  # Linear: [out, in]; the runs are along the input
    if cols % m:
        return False
    return bool(((weight == 0).reshape(rows, cols // m, m).sum(-1) >= n).all())


def model_sparsity(model: torch.nn.Module, decoded: dict[str, torch.Tensor] | None = None) -> dict:
    """Fraction of exact zeros in the decoder-block linear weights: ``overall``, ``by_type`` (e.g. ``q_proj``), the
    N:M patterns (2:4, 4:8) every layer with zeros satisfies, and how many layers were measured or skipped.

    decoded: full layer name -> ``[out, in]`` weight for layers the model holds packed (no floating ``weight``);
    packed layers not in it are skipped."""
    from transformers.pytorch_utils import Conv1D


    by_type: dict[str, list[int]] = {}
    total = [0, 0]
    skipped = 0
    sparse_layers: list[torch.Tensor] = []
    for name, module in iter_linears(model):
        weight = _weight(module)
        if weight is None and decoded is not None and name in decoded:
            weight = decoded[name]
        elif weight is not None and isinstance(module, Conv1D):
            weight = weight.t()
        if weight is None:
            skipped += 1
            continue
        count = weight.numel()
        zeros = count - int(torch.count_nonzero(weight))
        if zeros:
            sparse_layers.append(weight)
        counts = by_type.setdefault(name.rsplit(".", 1)[-1], [0, 0])
        for acc in (counts, total):
            acc[0] += zeros
            acc[1] += count
    # a layer can only satisfy N:M with at least N/M zeros: that cheap test settles dense models at once
    def zeros_of(w):
        return w.numel() - int(torch.count_nonzero(w))

    patterns = [f"{n}:{m}" for n, m in _NM_PATTERNS
                if sparse_layers and all(zeros_of(w) >= w.numel() * n // m for w in sparse_layers)
                and all(_satisfies(w, n, m) for w in sparse_layers)]
    return {"overall": total[0] / total[1] if total[1] else None,
            "by_type": {k: z / c for k, (z, c) in by_type.items()},
            "nm_patterns": patterns, "layers": sum(1 for _ in iter_linears(model)) - skipped,
            "skipped_packed_layers": skipped}
