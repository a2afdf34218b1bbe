"""LoRA adapters (PEFT) on a compressed model: attach them, keep pruned zeros while training, merge them back into the
layers' results (masked for pruned layers, re-quantized onto the stored grid for quantized ones), or save them in
PEFT format.

Pruned layers train with a masked update: the forward pass adds ``x @ (mask_keep * (B @ A) * alpha/rank)^T`` instead
of PEFT's low-rank path, so the function trained is exactly the one the masked merge produces (an unmasked update
would be cut off at merge time). The mask is kept as bool (1 byte a weight) and the dense ``[out, in]`` update exists
only while one layer's forward or backward runs (``MaskedLoraFunction`` recomputes it in backward instead of keeping
it in the autograd graph until then). Quantized layers train against their dequantized weights (frozen, QLoRA-style);
merging puts ``base + delta`` back onto the layer's stored grid (same scales, zeros and group index): by default by
rounding to nearest, so an update smaller than half a grid step on a weight does not survive the merge; with
``requantize="gptq"`` the codes are chosen by a GPTQ sweep on the merged model's calibration Hessians (``requant``).
"""

from __future__ import annotations

import dataclasses
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmshrink.core.errors import LmshrinkError
from lmshrink.core.grids import dequantize, quantize
from lmshrink.core.results import PruneResult, QuantResult
from lmshrink.models.adapters import linear_weight, set_linear_weight

ADAPTER = "default"


def pruned_mask(result) -> torch.Tensor | None:
    """bool ``[out, in]``, True where the layer's weight was pruned (must stay zero), or None when not pruned."""
    if isinstance(result, PruneResult):
        return result.mask
    if isinstance(result, QuantResult) and result.pruned is not None:
        return result.pruned
    if isinstance(result, QuantResult) and (result.info or {}).get("pattern"):  # no mask kept: its zeros
        weight = result.weight if result.weight.numel() else dequantize(result.codes, result.scale, result.zero,
                                                                         result.group_index())
        return weight == 0
    return None


class MaskedLoraFunction(torch.autograd.Function):
    """``x @ (keep * (B @ A) * scaling)^T`` with the dense update recomputed in backward, not saved.

    Saves ``x``, ``A``, ``B`` and the bool mask (True = pruned); the ``[out, in]`` update and its gradient exist only
    inside this layer's forward or backward.
    """

    @staticmethod
    def forward(ctx, x, a, b, pruned, scaling):
        ctx.save_for_backward(x, a, b, pruned)
        ctx.scaling = scaling
        return F.linear(x, _masked_delta(a, b, pruned, scaling))

    @staticmethod
    def backward(ctx, grad):
        x, a, b, pruned = ctx.saved_tensors
        scaling = ctx.scaling
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ _masked_delta(a, b, pruned, scaling)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])  # d loss / d delta, [out, in]
            g.masked_fill_(pruned, 0.0).mul_(scaling)
            grad_a = b.t() @ g if ctx.needs_input_grad[1] else None
            grad_b = g @ a.t() if ctx.needs_input_grad[2] else None
        return grad_x, grad_a, grad_b, None, None


def _masked_delta(a: torch.Tensor, b: torch.Tensor, pruned: torch.Tensor, scaling: float) -> torch.Tensor:
    return (b @ a).mul_(scaling).masked_fill_(pruned, 0.0)


def _masked_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT LoRA Linear forward with the update masked to the kept weights (``MaskedLoraFunction``)."""
    result = self.base_layer(x, *args, **kwargs)
    if self.disable_adapters or self.merged or ADAPTER not in self.active_adapters:
        return result
    a, b = self.lora_A[ADAPTER].weight, self.lora_B[ADAPTER].weight
    update = MaskedLoraFunction.apply(x.to(a.dtype), a, b, self.lmshrink_pruned, float(self.scaling[ADAPTER]))
    return result + update.to(result.dtype)


def lora_delta(module: nn.Module) -> torch.Tensor:
    """The adapter's update of a PEFT LoRA layer as ``[out, in]`` (masked when the layer carries a pruning mask)."""
    a, b = module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight
    pruned = getattr(module, "lmshrink_pruned", None)
    if pruned is not None:
        return _masked_delta(a, b, pruned, float(module.scaling[ADAPTER]))
    return b @ a * module.scaling[ADAPTER]


def attach(model: nn.Module, names: list[str], rank: int, alpha: float, masks: dict[str, torch.Tensor]):
    """Wrap ``model`` (in place) with LoRA adapters on the linears ``names``; returns the ``PeftModel``.

    The base weights are frozen; adapters start at zero (B = 0), so the student starts as the compressed model.
    Layers in ``masks`` (True = pruned) get the masked forward.
    """
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    if not names:
        raise LmshrinkError("the recover stage selects no layer", fix="check its targets and ignore patterns")
    conv1d = any(isinstance(model.get_submodule(n), Conv1D) for n in names)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=list(names),
                        fan_in_fan_out=conv1d, init_lora_weights=True)
    peft_model = get_peft_model(model, config)
    for name in names:
        module = lora_layer(peft_model, name)
        if name in masks:
            module.register_buffer("lmshrink_pruned", masks[name].to(module.lora_A[ADAPTER].weight.device, torch.bool),
                                   persistent=False)
            module.forward = types.MethodType(_masked_forward, module)
    return peft_model


def attach_full(model: nn.Module, names: list[str], masks: dict[str, torch.Tensor], results: dict) -> nn.Module:
    """Make the weights and biases of the linears ``names`` trainable themselves (every other parameter frozen);
    returns ``model``. Pruned layers keep their zeros: their gradient is masked, so AdamW never moves them (its
    state there stays zero). Quantized layers are refused: their weights live on a grid."""
    if not names:
        raise LmshrinkError("the recover stage selects no layer", fix="check its targets and ignore patterns")
    quantized = [n for n in names if isinstance(results.get(n), QuantResult)]
    if quantized:
        raise LmshrinkError(f"recover stage, option 'adapter' = 'full': {len(quantized)} selected layers are "
                            f"quantized (e.g. {quantized[0]}), and trained weights would leave their grids",
                            fix="use adapter: lora for quantized models, or recover before quantizing")
    model.requires_grad_(False)
    hooks = []
    for name in names:
        module = model.get_submodule(name)
        module.weight.requires_grad_(True)
        if module.bias is not None:
            module.bias.requires_grad_(True)
        if name in masks:
            keep = ~masks[name].to(module.weight.device)
            keep = keep.t() if module.weight.shape != keep.shape else keep  # Conv1D stores [in, out]
            hooks.append(module.weight.register_hook(lambda grad, _keep=keep: grad * _keep))
    _FULL_HOOKS[id(model)] = hooks
    return model


_FULL_HOOKS: dict[int, list] = {}  # model -> the gradient masks of its pruned layers while it trains


def finish_full(model: nn.Module, names: list[str], results: dict, masks: dict[str, torch.Tensor],
                before: dict[str, torch.Tensor]) -> dict:
    """After full training: the pruned layers' results take their trained kept weights; the record gives each
    layer's relative weight change."""
    change = {}
    for name in names:
        module = model.get_submodule(name)
        weight = linear_weight(module).float()
        change[name] = _relative_change(weight, before[name])
        if name in masks and isinstance(results.get(name), PruneResult):
            old = results[name]
            results[name] = PruneResult.from_weight(weight.clone(), masks[name], pattern=old.pattern,
                                                    target_sparsity=old.target_sparsity,
                                                    rel_output_error=old.rel_output_error, info=dict(old.info))
    for handle in _FULL_HOOKS.pop(id(model), []):
        handle.remove()
    return {"mode": "full", "rel_weight_change": change,
            "mean_rel_weight_change": sum(change.values()) / len(change) if change else 0.0}


def lora_layer(peft_model, name: str) -> nn.Module:
    return peft_model.base_model.model.get_submodule(name)


def trainable_parameters(peft_model) -> list[nn.Parameter]:
    return [p for p in peft_model.parameters() if p.requires_grad]


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """A copy of the adapters' weights (for keeping the best ones during training)."""
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_adapter_state(peft_model, state: dict[str, torch.Tensor]) -> None:
    params = dict(peft_model.named_parameters())
    for name, value in state.items():
        params[name].copy_(value)


def adapter_files(peft_model, masks: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """The adapters in PEFT format (``adapter_config.json``, ``adapter_model.safetensors``), as file name -> bytes.

    Refused for pruned layers: PEFT applies an unmasked update at load time, which is not what was trained.
    """
    if masks:
        raise LmshrinkError(f"option 'merge' = False: {len(masks)} recovered layers are pruned (e.g. "
                            f"{next(iter(masks))}), and PEFT would apply their adapters without the pruning mask "
                            "at load time (not the model that was trained, and not sparse)",
                            fix="use merge: true for pruned models (the merge keeps the zeros)")
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def load_adapter(model: nn.Module, folder: str | Path):
    """Apply adapters saved by ``adapter_files`` (a PEFT folder) to ``model``; returns the ``PeftModel``."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(folder), is_trainable=False).eval()


REQUANTIZE = {
    "round": "round to nearest onto each layer's stored grid",
    "gptq": "GPTQ onto each layer's stored grid (Hessians of the merged model's inputs on the calibration windows)",
}


def _relative_change(merged: torch.Tensor, weight: torch.Tensor) -> float:
    return float((merged.to(weight.device) - weight).norm() / weight.norm().clamp_min(1e-12))


def _on_grid(result: QuantResult, codes: torch.Tensor, requantize: str, extra: dict | None = None
             ) -> tuple[QuantResult, torch.Tensor, int]:
    """``result`` with new ``codes`` on its grid (scales, zeros, group index unchanged), its dequantized weights and
    the number of codes changed."""
    merged = dequantize(codes, result.scale, result.zero, result.group_index())
    changed = int((codes != result.codes).sum())
    info = {**(result.info or {}), "recovered": True, "recover_requantize": requantize,
            "recover_codes_changed": changed / codes.numel(), **(extra or {})}
    if info.get("pattern"):
        info["sparsity"] = float((merged == 0).sum()) / merged.numel()
    return dataclasses.replace(result, codes=codes, weight=merged, info=info), merged, changed


@torch.no_grad()
def merge(peft_model, names: list[str], results: dict, masks: dict[str, torch.Tensor], requantize: str = "round",
          requantize_on_grid=None) -> tuple[nn.Module, dict]:
    """Fold the adapters into the weights, update ``results`` (name -> PruneResult / QuantResult) to the merged
    weights, remove the adapters; returns the plain model and a record of what the merge kept and changed.

    Pruned layers: ``base + mask_keep * delta`` (exact zeros and N:M pattern kept). Quantized layers: ``base + delta``
    (masked if pruned) put back onto the stored grid (scales, zeros, group index unchanged), by ``requantize``:
    ``"round"`` rounds each weight to nearest; ``"gptq"`` chooses the codes with the GPTQ sweep on the Hessians of
    the merged model's inputs, through ``requantize_on_grid(model, targets)`` (the engine collects them on the
    calibration windows; see ``requant``). Other layers:
    ``base + delta``. The record's ``rel_weight_change`` is, per layer, ``||W_merged - W_before|| / ||W_before||`` of
    the weights actually stored; ``quantized_codes_changed`` the fraction of codes that changed.
    """
    if requantize not in REQUANTIZE:
        raise LmshrinkError(f"requantize={requantize!r} is not known", fix=f"use one of: {', '.join(REQUANTIZE)}")
    changed_codes = total_codes = 0
    delta_norms: list[float] = []
    change: dict[str, float] = {}  # name -> ||merged - before|| / ||before|| (after masking and re-quantization)
    pending: dict[str, tuple[torch.Tensor, QuantResult, torch.Tensor | None]] = {}  # gptq: float merged weights
    for name in names:
        module = lora_layer(peft_model, name)
        base = module.base_layer
        weight = linear_weight(base).float()
        delta = lora_delta(module).float().to(weight.device)
        delta_norms.append(float(delta.norm() / weight.norm().clamp_min(1e-12)))
        merged = weight + delta
        result = results.get(name)
        if isinstance(result, PruneResult):
            merged = merged.masked_fill(masks[name].to(merged.device), 0.0).cpu()
            results[name] = PruneResult(mask=result.mask, values=merged[~result.mask].contiguous(), weight=merged,
                                        pattern=result.pattern, target_sparsity=result.target_sparsity,
                                        rel_output_error=result.rel_output_error,
                                        info={**result.info, "recovered": True})
        elif isinstance(result, QuantResult):
            if name in masks:
                merged = merged.masked_fill(masks[name].to(merged.device), 0.0)
            merged = merged.cpu()
            if requantize == "gptq":  # solved below, block by block on the merged model
                pending[name] = (merged, result, masks[name].cpu() if name in masks else None)
            else:
                codes = quantize(merged, result.scale, result.zero, result.spec.maxq, result.group_index())
                results[name], merged, changed = _on_grid(result, codes, requantize)
                changed_codes += changed
                total_codes += codes.numel()
        change[name] = _relative_change(merged, weight)
        set_linear_weight(base, merged)
    model = peft_model.unload()
    errors: dict[str, list[float]] = {"rel_output_error": [], "rel_output_error_round": []}
    if pending:
        if requantize_on_grid is None:
            raise LmshrinkError("requantize: 'gptq' needs the calibration Hessians of the merged model's layers",
                                fix="pass requantize_on_grid= to merge (compress passes the engine's)")
        solved = requantize_on_grid(model, pending)
        for name, (codes, info) in solved.items():
            extra = {f"recover_{k}": v for k, v in info.items()}
            old = pending[name][1]
            results[name], merged, changed = _on_grid(old, codes, requantize, extra)
            change[name] = _relative_change(merged, dequantize(old.codes, old.scale, old.zero, old.group_index()))
            changed_codes += changed
            total_codes += codes.numel()
            for key in errors:
                errors[key].append(info[key])
    record = {"layers": len(names), "mean_rel_delta_norm": sum(delta_norms) / len(delta_norms),
              "rel_weight_change": change,
              "quantized_codes_changed": changed_codes / total_codes if total_codes else None,
              "requantization": REQUANTIZE[requantize] if total_codes else None}
    if errors["rel_output_error"]:  # per-layer means, on the calibration windows, against the merged float weights
        record["mean_rel_output_error"] = sum(errors["rel_output_error"]) / len(errors["rel_output_error"])
        record["mean_rel_output_error_round"] = (sum(errors["rel_output_error_round"])
                                                 / len(errors["rel_output_error_round"]))
    return model, record


def unload(peft_model) -> nn.Module:
    """Remove the adapters without merging (the model returns to its compressed weights)."""
    return peft_model.unload()

