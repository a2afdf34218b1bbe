"""Rotations of a Llama-style model (QuaRot, Ashkboos et al., 2024) that leave the float model unchanged and spread
activation outliers over all channels, so activations quantize to 4 bits:

* the RMSNorm weights are folded into the linears that read the normalized activations (and the final norm into
  the head), the norms keep weight 1; tied embeddings are untied first;
* the residual stream is rotated by ``Q1 = D H / sqrt(d)`` (a random-sign Hadamard of the hidden size): embeddings
  ``E Q1``, every reader ``W Q1`` (q, k, v, gate, up, the head), every writer ``Q1^T W`` (o, down), so the stream
  between the blocks is ``x Q1`` (an RMSNorm of weight 1 commutes with a rotation);
* per head, v_proj's outputs and o_proj's matching inputs are turned by a random-sign Hadamard of the head dimension
  (exact offline: attention mixes positions, not channels);
* online Hadamards where no producer can absorb one: the input of down_proj (and of o_proj) is multiplied by
  ``H / sqrt(n)`` at run time (``runtime.activations`` input transform) and the weight by the same matrix offline.

Keys and queries after the rotary embedding are turned per head by the ``kv-cache`` stage's ``rotate`` option.
The model stage changes the tensors outside the blocks in ``before_blocks`` and each block in ``transform_block``,
so it also works when blocks are streamed from disk.
"""

from __future__ import annotations

import torch
from torch import nn

from lmshrink.core.errors import UnsupportedArchitectureError
from lmshrink.core.hadamard import check_hadamard_size, orthogonal_hadamard
from lmshrink.runtime.activations import HadamardTransform, install_transform

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def check_model(model: nn.Module, online: list[str]) -> None:
    """Refuse, before any work, models whose rotation is not exact here (naming the reason)."""
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    if model_type not in SUPPORTED:
        reasons = {"gemma": "its norms scale by (1 + w) and its embeddings by sqrt(hidden)",
                   "gemma2": "its extra norms after attention and MLP are not rotation-invariant",
                   "gemma3": "its extra norms after attention and MLP are not rotation-invariant",
                   "phi3": "its q/k/v and gate/up projections are fused (not supported by the rotation yet)",
                   "opt": "LayerNorm subtracts the mean, which a rotation does not preserve",
                   "gpt2": "LayerNorm subtracts the mean, which a rotation does not preserve"}
        raise UnsupportedArchitectureError(
            f"the rotate stage supports model types {', '.join(SUPPORTED)}; this model is {model_type!r}"
            + (f": {reasons[model_type]}" if model_type in reasons else ""),
            fix="leave the rotate stage out for this model")
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    check_hadamard_size(config.hidden_size, "the hidden size (residual rotation)")
    check_hadamard_size(head_dim, "the head dimension (v/o rotation)")
    if "down_proj" in online:
        check_hadamard_size(config.intermediate_size, "the MLP width (online Hadamard on down_proj's input)")
    if "o_proj" in online:
        check_hadamard_size(heads * head_dim, "the attention width (online Hadamard on o_proj's input)")
    del kv


def _residual(model_or_config, seed: int) -> torch.Tensor:
    config = getattr(model_or_config, "config", model_or_config)
    return orthogonal_hadamard(config.hidden_size, seed)


def _head(config, seed: int, index: int) -> torch.Tensor:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return orthogonal_hadamard(head_dim, seed * 100003 + 7919 * (index + 1))


@torch.no_grad()
def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


@torch.no_grad()
def rotate_outside(model: nn.Module, adapter, seed: int) -> None:
    """Untie the head, fold the final norm into it, and rotate the embeddings and head by ``Q1``."""
    q1 = _residual(model, seed)
    embed = adapter.embeddings(model)[0]
    head = adapter.head(model)
    if adapter.head_is_tied(model):
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        model.config.tie_word_embeddings = False
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        text.tie_word_embeddings = False
    norm = adapter.final_norm(model)
    head_weight = head.weight.double() * norm.weight.double()[None, :]
    _set(norm.weight, torch.ones_like(norm.weight))
    _set(head.weight, head_weight @ q1)
    _set(embed.weight, embed.weight.double() @ q1)


@torch.no_grad()
def rotate_block(stage, index: int, block: nn.Module) -> list[str]:
    """Fold the norms of block ``index`` into its readers and rotate it (see the module docstring); returns the
    tensors changed."""
    config = block.self_attn.config
    q1 = _residual(config, stage.seed)
    changed = []
    for norm_name, readers in READERS.items():
        norm = block.get_submodule(norm_name)
        scale = norm.weight.double()
        for name in readers:
            linear = block.get_submodule(name)
            _set(linear.weight, (linear.weight.double() * scale[None, :]) @ q1)
            changed.append(f"{name}.weight")
        _set(norm.weight, torch.ones_like(norm.weight))
        changed.append(f"{norm_name}.weight")
    for name in WRITERS:
        linear = block.get_submodule(name)
        _set(linear.weight, q1.t() @ linear.weight.double())
        changed.append(f"{name}.weight")
        if linear.bias is not None:
            _set(linear.bias, linear.bias.double() @ q1)
            changed.append(f"{name}.bias")
    attention = block.self_attn
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if stage.head_rotation:
        h2 = _head(config, stage.seed, index)
        d = h2.shape[0]
        v, o = attention.v_proj, attention.o_proj
        _set(v.weight, torch.einsum("ij,hik->hjk", h2, v.weight.double().reshape(kv, d, -1)).reshape(kv * d, -1))
        changed.append("self_attn.v_proj.weight")
        if v.bias is not None:
            _set(v.bias, (v.bias.double().reshape(kv, d) @ h2).reshape(-1))
            changed.append("self_attn.v_proj.bias")
        _set(o.weight, (o.weight.double().reshape(-1, heads, d) @ h2).reshape(o.weight.shape))
    for name in stage.online:
        linear = block.get_submodule("mlp.down_proj" if name == "down_proj" else "self_attn.o_proj")
        transform = HadamardTransform(linear.weight.shape[1])
        _set(linear.weight, linear.weight.double() @ transform.matrix())
        install_transform(linear, transform)
    return sorted(set(changed) | {"self_attn.o_proj.weight", "mlp.down_proj.weight"})


__all__ = ["check_model", "rotate_outside", "rotate_block", "SUPPORTED"]
