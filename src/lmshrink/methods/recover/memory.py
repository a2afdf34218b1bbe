"""What training adapters costs in memory, against full fine-tuning of the same model (AdamW, same dtype)."""

from __future__ import annotations

import torch
from torch import nn

from lmshrink.core.process import peak_rss_bytes


def _unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    unique = []
    for p in model.parameters():  # tied weights once
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Measured: bytes of every tensor in the optimizer's state (AdamW: exp_avg, exp_avg_sq, step)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))


def memory_report(model: nn.Module, trainable: list[nn.Parameter],
                  optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Trainable parameters, gradient and optimizer-state bytes of adapter training, and the same for full fine-tuning
    of ``model`` (every parameter trainable, AdamW: two states per parameter in its dtype).

    ``model`` is the model without adapters counted (the adapters are ``trainable``). Bytes for full fine-tuning are
    computed from the parameter counts (AdamW keeps exp_avg and exp_avg_sq like the parameter); the adapters'
    optimizer bytes are measured from ``optimizer`` when given. ``peak_rss_bytes`` is this process's peak so far
    (everything the process did, not only training).
    """
    trainable_ids = {id(p) for p in trainable}
    base = [p for p in _unique_parameters(model) if id(p) not in trainable_ids]
    base_count = sum(p.numel() for p in base)
    base_bytes = sum(p.numel() * p.element_size() for p in base)
    lora_count = sum(p.numel() for p in trainable)
    lora_bytes = sum(p.numel() * p.element_size() for p in trainable)
    lora_optimizer = optimizer_state_bytes(optimizer) if optimizer is not None and optimizer.state else 2 * lora_bytes
    full = {"trainable_parameters": base_count, "gradient_bytes": base_bytes, "optimizer_state_bytes": 2 * base_bytes,
            "training_state_bytes": 3 * base_bytes}
    lora = {"trainable_parameters": lora_count, "trainable_fraction": lora_count / base_count if base_count else None,
            "gradient_bytes": lora_bytes, "optimizer_state_bytes": lora_optimizer,
            "optimizer_state_measured": optimizer is not None and bool(optimizer.state),
            "training_state_bytes": lora_bytes + lora_optimizer}
    return {"model_parameters": base_count, "model_bytes": base_bytes, "lora": lora, "full_finetune": full,
            "training_state_ratio": lora["training_state_bytes"] / full["training_state_bytes"] if base_bytes else None,
            "peak_rss_bytes": peak_rss_bytes(),
            "notes": "training_state = gradients + optimizer states of the trainable parameters (activations, "
                     "weights and the teacher not included); full fine-tuning computed for AdamW in the model's "
                     "dtype; peak_rss_bytes is the whole process's peak"}
