"""Saving and restoring a recover stage's progress (adapters, optimizer, counters), so a killed run resumes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmshrink.core.atomic import atomic_directory
from lmshrink.core.errors import LmshrinkError
from lmshrink.methods.recover import lora

_STATE_TENSORS = "state.safetensors"


_STATE_JSON = "state.json"


def save_state(folder: Path, key: str, peft_model, optimizer: torch.optim.Optimizer, best_state: dict,
               scalars: dict) -> None:
    """Adapters, optimizer state, best adapters and the loop's counters, replacing ``folder`` in one rename."""
    from safetensors.torch import save_file


    tensors = {f"adapter.{n}": p.detach() for n, p in peft_model.named_parameters() if p.requires_grad}
    tensors.update({f"best.{n}": v for n, v in best_state.items()})
    opt = optimizer.state_dict()
    for index, entry in opt["state"].items():
        tensors.update({f"opt.{index}.{k}": v for k, v in entry.items() if isinstance(v, torch.Tensor)})
    meta = {"key": key, "param_groups": opt["param_groups"],
            "opt_scalars": {str(i): {k: v for k, v in e.items() if not isinstance(v, torch.Tensor)}
                            for i, e in opt["state"].items()}, **scalars}
    with atomic_directory(folder, overwrite=True) as staging:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / _STATE_TENSORS))
        (staging / _STATE_JSON).write_text(json.dumps(meta, default=str))


def load_state(folder: Path, key: str, peft_model, optimizer: torch.optim.Optimizer) -> dict | None:
    """Restore what ``save_state`` wrote (adapters and optimizer in place); returns the counters plus ``best_state``,
    or None when ``folder`` holds nothing. A state of another run is refused."""
    from safetensors.torch import load_file

    if not (folder / _STATE_JSON).is_file():
        return None
    meta = json.loads((folder / _STATE_JSON).read_text())
    if meta.get("key") != key:
        raise LmshrinkError(f"{folder} holds recover progress of a different run",
                            fix=f"run again with --restart to discard it and start over, or delete {folder}")
    tensors = load_file(str(folder / _STATE_TENSORS))
    lora.load_adapter_state(peft_model, {n[len("adapter."):]: v for n, v in tensors.items()
                                         if n.startswith("adapter.")})
    device = next(p.device for p in peft_model.parameters() if p.requires_grad)
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, index, field = name.split(".", 2)
            state.setdefault(int(index), {})[field] = value
    for index, scalars in meta.pop("opt_scalars").items():
        state.setdefault(int(index), {}).update(scalars)
    optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    meta["best_state"] = {n[len("best."):]: v.to(device) for n, v in tensors.items() if n.startswith("best.")}
    return meta
