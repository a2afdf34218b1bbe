"""A quantized key/value cache in transformers' own forward (``core.actquant.KVSpec``): the attention of every layer
whose attention module carries a ``KVSpec`` (``lmshrink_kv``) computes with the keys and values a KIVI cache would
hold, position by position.

The model switches to the attention implementation ``lmshrink_kv`` (registered with transformers'
``AttentionInterface``, with the eager mask), which for a query at position ``t`` uses the quantized keys and values
of the first ``kv_quantized_length(t + 1)`` positions and the unquantized ones of the rest (the window), so a
whole window of text (perplexity) computes what a decoder whose cache quantizes as it goes computes token by token
(``FastDecoder``). Layers without a spec run plain attention. With ``KVSpec.rotate`` queries and keys are turned
by a normalized Hadamard transform per head first (dot products unchanged, outliers spread before quantization).

Supported: attention without logit soft-capping or attention sinks (Llama, Mistral, Qwen2/3, Phi-3 families);
others are refused naming the model type.
"""

from __future__ import annotations

import torch
from torch import nn

from lmshrink.core.actquant import (
    KVSpec,
    check_kv_shape,
    fake_quantize_keys,
    fake_quantize_values,
    kv_codes,
    kv_params_keys,
    kv_params_values,
    kv_quantized_length,
)
from lmshrink.core.errors import UnsupportedArchitectureError

IMPLEMENTATION = "lmshrink_kv"
ATTRIBUTE = "lmshrink_kv"
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3")
_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(IMPLEMENTATION, kv_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, eager_mask)
    _registered = True


def rotate_heads(x: torch.Tensor) -> torch.Tensor:
    """``x [..., head_dim]`` times the normalized Hadamard matrix of ``head_dim`` (its own inverse)."""
    from lmshrink.core.hadamard import hadamard_transform

    return hadamard_transform(x)


def quantized_lengths(q_len: int, k_len: int, spec: KVSpec, device) -> torch.Tensor:
    """For each query row (the last ``q_len`` of ``k_len`` positions): how many leading positions it sees
    quantized."""
    ends = torch.arange(k_len - q_len + 1, k_len + 1)
    return torch.tensor([kv_quantized_length(int(e), spec) for e in ends], device=device)


def kv_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 **kwargs):
    """transformers' attention interface: ``query [b, heads, q, d]``, ``key``/``value`` ``[b, kv_heads, k, d]``
    (keys after the rotary embedding, the cache's content); returns ``([b, q, heads, d], None)``."""
    if kwargs.get("softcap") is not None or getattr(module, "sinks", None) is not None:
        raise UnsupportedArchitectureError("the quantized key/value cache does not support attention soft-capping "
                                           "or sinks", fix="leave the kv-cache stage out for this model")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = mixed_attention(query, key, value, getattr(module, ATTRIBUTE, None), scale, attention_mask)
    return out.transpose(1, 2).contiguous(), None


def mixed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spec: KVSpec | None,
                    scale: float, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention ``[b, heads, q, d]`` of the last ``q`` of ``k`` positions where the query at position ``t`` sees the
    first ``kv_quantized_length(t + 1)`` keys and values quantized (``spec``; None: none) and the rest as they are.
    ``attention_mask``: transformers' additive (or boolean) mask ``[b, 1, q, k]``; None: causal."""
    heads, kv_heads = query.shape[1], key.shape[1]
    q_len, k_len = query.shape[2], key.shape[2]
    if spec is not None and spec.rotate:
        query, key = rotate_heads(query), rotate_heads(key)
    quantized = 0 if spec is None else kv_quantized_length(k_len, spec)
    key_q, value_q = key, value
    if quantized:
        check_kv_shape(key.shape[-1], spec)
        key_q = torch.cat([fake_quantize_keys(key[:, :, :quantized], spec), key[:, :, quantized:]], dim=2)
        value_q = torch.cat([fake_quantize_values(value[:, :, :quantized], spec), value[:, :, quantized:]], dim=2)
    if heads != kv_heads:
        rep = heads // kv_heads
        key, value, key_q, value_q = (t.repeat_interleave(rep, dim=1) for t in (key, value, key_q, value_q))
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    old = None
    if quantized:
        lengths = quantized_lengths(q_len, k_len, spec, query.device)
        old = torch.arange(k_len, device=query.device)[None, :] < lengths[:, None]  # [q, k]: seen quantized
        scores = torch.where(old, torch.matmul(query, key_q.transpose(-1, -2)) * scale, scores)
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :k_len]
        scores = scores + mask if mask.dtype != torch.bool else scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    if old is None:
        return torch.matmul(probs, value)
    return torch.matmul(probs.masked_fill(old, 0.0), value) + torch.matmul(probs.masked_fill(~old, 0.0), value_q)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., d]`` of ``bits`` bits, ``8 / bits`` per byte along the last dimension."""
    per = 8 // bits
    if per == 1:
        return codes
    parts = codes.unflatten(-1, (codes.shape[-1] // per, per)).to(torch.int32)
    packed = parts[..., 0]
    for i in range(1, per):
        packed = packed | (parts[..., i] << (bits * i))
    return packed.to(torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    per = 8 // bits
    if per == 1:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)[..., :width]


class QuantizedKV:
    """One layer's cache for ``FastDecoder`` (one sequence): keys ``[kv_heads, positions, head_dim]`` and values,
    the first ``quantized`` positions stored as packed codes with float16 scales and minima (``core.actquant``'s
    KIVI layout), the rest unquantized in a window of at most ``window + group_size`` positions. Holding
    ``max_len`` positions costs ``bits / 8`` bytes per value plus the scales, instead of 4 (float32)."""

    def __init__(self, spec: KVSpec, kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype, device):
        check_kv_shape(head_dim, spec)
        if head_dim * spec.bits % 8:
            raise UnsupportedArchitectureError(f"head dimension {head_dim} does not pack into bytes at {spec.bits} "
                                               "bits", fix="use 8-bit keys and values")
        self.spec, self.kv, self.dim = spec, kv_heads, head_dim
        g, vg = spec.group_size, min(spec.group_size, head_dim)
        stored = kv_quantized_length(max_len, spec)
        width = head_dim * spec.bits // 8
        self.key_codes = torch.zeros(kv_heads, stored, width, dtype=torch.uint8, device=device)
        self.value_codes = torch.zeros(kv_heads, stored, width, dtype=torch.uint8, device=device)
        self.key_params = torch.zeros(2, kv_heads, stored // g, head_dim, dtype=torch.float16, device=device)
        self.value_params = torch.zeros(2, kv_heads, stored, head_dim // vg, dtype=torch.float16, device=device)
        capacity = spec.window + g
        self.window = torch.zeros(2, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.length = self.quantized = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.key_codes, self.value_codes, self.key_params,
                                                          self.value_params, self.window))

    def reset(self) -> None:
        self.length = self.quantized = 0

    def extend(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Append positions (``[kv_heads, n, head_dim]`` each), then quantize every group that left the window."""
        done, n = 0, key.shape[1]
        while done < n:  # as much as the window holds, then the groups that left it
            start = self.length - self.quantized
            take = min(self.window.shape[2] - start, n - done)
            self.window[0, :, start:start + take] = key[:, done:done + take]
            self.window[1, :, start:start + take] = value[:, done:done + take]
            self.length += take
            done += take
            while kv_quantized_length(self.length, self.spec) > self.quantized:
                self._quantize_oldest()

    def _quantize_oldest(self) -> None:
        spec, g = self.spec, self.spec.group_size
        if kv_quantized_length(self.length, spec) <= self.quantized:
            raise RuntimeError("the cache window overflowed before a group could be quantized")
        q0 = self.quantized
        keys, values = self.window[0, :, :g].float(), self.window[1, :, :g].float()
        scale, minimum = kv_params_keys(keys, spec)  # [kv, 1, 1, d]
        self.key_params[0, :, q0 // g] = scale[:, 0, 0].to(torch.float16)
        self.key_params[1, :, q0 // g] = minimum[:, 0, 0].to(torch.float16)
        codes = kv_codes(keys.unflatten(-2, (1, g)), scale, minimum, spec).flatten(-3, -2)
        self.key_codes[:, q0:q0 + g] = _pack(codes, spec.bits)
        scale, minimum = kv_params_values(values, spec)  # [kv, g, d / vg, 1]
        self.value_params[0, :, q0:q0 + g] = scale[..., 0].to(torch.float16)
        self.value_params[1, :, q0:q0 + g] = minimum[..., 0].to(torch.float16)
        vg = min(g, self.dim)
        codes = kv_codes(values.unflatten(-1, (self.dim // vg, vg)), scale, minimum, spec).flatten(-2)
        self.value_codes[:, q0:q0 + g] = _pack(codes, spec.bits)
        rest = self.length - q0 - g
        self.window[:, :, :rest] = self.window[:, :, g:g + rest].clone()
        self.quantized = q0 + g

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every position ``[kv_heads, length, head_dim]`` as attention uses them."""
        q, spec, g = self.quantized, self.spec, self.spec.group_size
        recent = self.length - q
        keys, values = self.window[0, :, :recent], self.window[1, :, :recent]
        if not q:
            return keys, values
        codes = _unpack(self.key_codes[:, :q], spec.bits, self.dim).float().unflatten(1, (q // g, g))
        params = self.key_params[:, :, : q // g].float().unsqueeze(3)  # [2, kv, groups, 1, d]
        old_keys = (codes * params[0] + params[1]).flatten(1, 2)
        vg = min(g, self.dim)
        codes = _unpack(self.value_codes[:, :q], spec.bits, self.dim).float().unflatten(-1, (self.dim // vg, vg))
        params = self.value_params[:, :, :q].float().unsqueeze(-1)  # [2, kv, q, groups, 1]
        old_values = (codes * params[0] + params[1]).flatten(-2)
        return (torch.cat([old_keys.to(keys.dtype), keys], 1), torch.cat([old_values.to(values.dtype), values], 1))


def attention_modules(model: nn.Module) -> list[nn.Module]:
    from lmshrink.models.adapters import get_adapter

    return [block.self_attn for block in get_adapter(model).blocks(model) if hasattr(block, "self_attn")]


def check_model(model: nn.Module) -> None:
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type not in SUPPORTED:
        raise UnsupportedArchitectureError(
            f"the quantized key/value cache supports model types {', '.join(SUPPORTED)}; this model is {model_type!r}",
            fix="leave the kv-cache stage out for this model")
    if getattr(model.config, "attn_logit_softcapping", None):
        raise UnsupportedArchitectureError(f"{model_type} soft-caps its attention logits, which the quantized "
                                           "key/value cache does not support", fix="leave the kv-cache stage out")


def enable(model: nn.Module) -> None:
    """Switch ``model`` to the ``lmshrink_kv`` attention (layers without a spec compute plain attention)."""
    check_model(model)
    _register()
    if model.config._attn_implementation != IMPLEMENTATION:
        model.set_attn_implementation(IMPLEMENTATION)


def install(attention: nn.Module, spec: KVSpec) -> None:
    """Quantize the cache of this attention module with ``spec`` (the model must be ``enable``d)."""
    head_dim = getattr(attention, "head_dim", None)
    if head_dim is not None:
        check_kv_shape(int(head_dim), spec)
        if spec.rotate:
            from lmshrink.core.hadamard import check_hadamard_size

            check_hadamard_size(int(head_dim), "the head dimension (kv-cache rotate)")
    setattr(attention, ATTRIBUTE, spec)


def describe(model: nn.Module) -> dict[str, dict]:
    """Block index -> the spec of its attention's cache (only blocks that have one)."""
    out = {}
    for index, attention in enumerate(attention_modules(model)):
        spec = getattr(attention, ATTRIBUTE, None)
        if spec is not None:
            out[str(index)] = spec.to_dict()
    return out


def apply(model: nn.Module, described: dict[str, dict]) -> None:
    """Rebuild ``describe``'s cache specs on ``model``."""
    if not described:
        return
    enable(model)
    modules = attention_modules(model)
    for index, spec in described.items():
        install(modules[int(index)], KVSpec(**spec))


__all__ = ["enable", "install", "describe", "apply", "kv_attention", "mixed_attention", "QuantizedKV",
           "attention_modules", "IMPLEMENTATION",
           "ATTRIBUTE", "quantized_lengths", "rotate_heads"]
