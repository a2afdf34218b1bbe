"""A lean greedy decoder for Llama-family causal LMs (batch 1): the model's own modules and weights, its own forward.

transformers' eager forward spends much of a one-token step outside the matrix products (per-layer module calls,
cache classes, mask construction, keyword plumbing).
``FastDecoder`` runs the same computation with few Python-level operations per layer (about 30 dispatcher calls
for one token, where each costs microseconds):

* the KV cache is one preallocated tensor ``[layers, 2 (keys, values), kv_heads, max_len, head_dim]`` written in
  place (keys and values of a new token in one copy);
* rotary cos/sin come from the model's own rotary module, called once on positions ``0..max_len-1`` (so every
  ``rope_scaling`` type whose frequencies do not depend on the sequence length is reproduced as transformers
  computes it; ``dynamic`` and ``longrope`` are refused). For one token, q and k heads are rotated by one batched
  product with ``diag(cos) + S * sin`` (``S``: the signed half swap of ``rotate_half``; v heads take the identity,
  q heads also the attention scale), which leaves k and v laid out for the cache; the prompt uses
  ``x * cos + swap_halves(x) * sin_signed``;
* RMSNorm for one float32 row is ``addcmul(0, x, weight, value=rsqrt(mean(x^2) + eps))`` with the scalar computed in
  Python from one ``dot``; ``torch.rms_norm`` for the prompt (transformers' formula in other dtypes);
* GQA without copies: for one new token the ``heads`` queries are viewed as ``[kv_heads, heads/kv_heads, head_dim]``
  against the ``[kv_heads, length, head_dim]`` cache (two ``bmm`` and a softmax; no mask: every cached position is
  visible); the prompt runs in one causal ``scaled_dot_product_attention`` call with ``enable_gqa``;
* q/k/v and gate/up run as one call each where all of them are QuantLinear layers of kind ``int4_avx2`` with the
  same grid (their packed rows concatenated once; the layers' own buffers then view that tensor, so no copy stays
  and the model keeps working), or plain ``nn.Linear`` layers when ``fuse_dense=True`` (a concatenated copy of
  those weights: more memory, so off by default); ``int4_avx2`` layers are called through the compiled op directly,
  and o_proj / down_proj take the residual as the kernel's bias (added last, the same float32 sum);
* only the last position goes through the final norm and ``lm_head``.

The results differ from transformers' only in float rounding (summation order, the fused rotation); the tests
require logits within 1e-4 and the same greedy tokens.

Supported: ``LlamaForCausalLM``, ``MistralForCausalLM`` and ``Qwen2ForCausalLM`` (q/k/v biases are part of the
Linear layers) with SiLU MLPs, greedy, batch 1, up to ``max_len`` positions; sliding-window attention only where the
window covers ``max_len`` (then it masks nothing). Everything else is refused with an LmshrinkError naming the model
type and the fix (``--decode hf``, transformers' own forward). ``tests/test_fastpath.py`` checks the logits of the
prompt and of every step against transformers' forward with its cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmshrink.core.errors import LmshrinkError, UnsupportedArchitectureError
from lmshrink.runtime import cpu_kernels, kvcache
from lmshrink.runtime.int8 import Int8Linear
from lmshrink.runtime.qlinear import QuantLinear

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
REFUSED_ROPE = ("dynamic", "longrope")  # frequencies depend on the sequence length
FIX = ("use transformers' own forward instead: `lmshrink bench ... --decode hf` (Python: bench(..., decode='hf')), "
       "or model.generate()")


def _rope_type(model) -> str:
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    kind = getattr(rotary, "rope_type", None)
    if kind is None:
        params = getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None) or {}
        kind = params.get("rope_type", params.get("type", "default"))
    return str(kind)


def _sliding_windows(config) -> list[int]:
    """The sliding windows the model's layers use (empty when none)."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return []
    if config.model_type == "qwen2":
        layer_types = getattr(config, "layer_types", None) or []
        if not getattr(config, "use_sliding_window", False) and "sliding_attention" not in layer_types:
            return []
        if layer_types and "sliding_attention" not in layer_types:
            return []
    return [int(window)]


def supported(model: nn.Module, max_len: int | None = None) -> tuple[bool, str]:
    """Whether ``FastDecoder`` runs ``model`` (with ``max_len`` positions, when given), and why not."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    name = f"{type(model).__name__} (model_type {model_type!r})"
    if model_type not in SUPPORTED_TYPES:
        return False, (f"the fast decode path supports model types {', '.join(SUPPORTED_TYPES)}; this model is "
                       f"{name}")
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(model, "lm_head") or not hasattr(inner, "rotary_emb"):
        return False, f"{name} lacks the Llama layout (model.layers, model.rotary_emb, lm_head)"
    if getattr(config, "hidden_act", "silu") != "silu":
        return False, f"{name} uses the MLP activation {config.hidden_act!r}; the fast path computes SiLU"
    rope = _rope_type(model)
    if rope in REFUSED_ROPE:
        return False, f"{name} uses rope type {rope!r}, whose frequencies change with the sequence length"
    for index, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        parts = [getattr(attn, p, None) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        parts += [getattr(mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
        if any(p is None for p in parts):
            return False, f"{name}: layer {index} lacks one of q/k/v/o_proj or gate/up/down_proj"
        for norm in (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)):
            if norm is None or not type(norm).__name__.endswith("RMSNorm"):
                return False, f"{name}: layer {index} has a norm that is not an RMSNorm"
        if any(hasattr(attn, extra) for extra in ("q_norm", "k_norm")):
            return False, f"{name}: layer {index} normalizes queries/keys (q_norm/k_norm), which the fast path lacks"
    windows = _sliding_windows(config)
    if windows and max_len is not None and max_len > min(windows):
        return False, (f"{name} uses sliding-window attention (window {min(windows)}) and {max_len} positions "
                       "were asked for; the fast path attends to every position, which matches only within the window")
    return True, "supported"


def _avx2_key(module: nn.Module):
    """What must agree for QuantLinear layers to run as one int4_avx2 call (None where the module cannot)."""
    if (isinstance(module, QuantLinear) and module.kind == "int4_avx2" and module.packed.device.type == "cpu"
            and (module.bias is None or module.bias.dtype == torch.float32)
            and module.input_spec is None and module.input_transform is None):
        return (module.in_features, module._groups, module._blocks_per_group, module.packed.dtype,
                tuple(module.packed.shape[1:]), module.group_scale.dtype)
    return None


class _Int4:
    """int4_avx2 QuantLinear layers on one input as one kernel call (one layer, or several whose rows are
    concatenated: their buffers then become views of the concatenation, so no second copy stays)."""

    def __init__(self, modules: list[QuantLinear], int8_activations: bool = False):
        first = modules[0]
        self.groups, self.bpg = first._groups, first._blocks_per_group
        if len(modules) == 1:
            self.packed, self.scale, self.zero, self.bias = first.packed, first.group_scale, first.group_zero, first.bias
        else:
            self._concatenate(modules)
        # the compiled op itself: no Python wrapper per call
        self.kernel = cpu_kernels._module.int4_linear_q8 if int8_activations else cpu_kernels._module.int4_linear
        self.bias_arg = cpu_kernels._EMPTY if self.bias is None else self.bias

    def _concatenate(self, modules: list[QuantLinear]) -> None:
        self.packed = torch.cat([m.packed for m in modules])
        self.scale = torch.cat([m.group_scale for m in modules])
        self.zero = torch.cat([m.group_zero for m in modules])
        self.bias = None
        if any(m.bias is not None for m in modules):
            self.bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in modules])
        start = 0
        for m in modules:
            size = m.out_features
            m.packed = self.packed[start:start + size]
            m.group_scale = self.scale[start:start + size]
            m.group_zero = self.zero[start:start + size]
            if m.bias is not None:
                m.bias = self.bias[start:start + size]
            start += size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.packed, self.scale, self.zero, self.bias_arg, self.groups, self.bpg)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)`` for one row: the kernel adds the residual as its bias, last, so the sum is the
        same float32 addition."""
        if self.bias is not None:
            return residual + self(x)
        return self.kernel(x, self.packed, self.scale, self.zero, residual, self.groups, self.bpg)


class _Dense:
    """nn.Linear layers on one input as one ``F.linear`` call (several: a concatenated copy of their weights)."""

    def __init__(self, modules: list[nn.Linear]):
        if len(modules) == 1:
            self.weight, self.bias = modules[0].weight, modules[0].bias
            return
        self.weight = torch.cat([m.weight.detach() for m in modules])
        self.bias = None
        if any(m.bias is not None for m in modules):
            self.bias = torch.cat([m.bias.detach() if m.bias is not None
                                   else torch.zeros(m.out_features, dtype=m.weight.dtype) for m in modules])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if self.bias is None and x.dim() == 1:
            return torch.addmv(residual, self.weight, x)  # residual + W x in one call
        return residual + F.linear(x, self.weight, self.bias)


class _Q8:
    """A float32 Linear without bias run from a q8_0 copy of its weight (``cpu_kernels.q8_linear``: int8 blocks of 32
    with a float32 scale each, activations rounded the same way)."""

    def __init__(self, module: nn.Linear):
        self.codes, self.scales = cpu_kernels.quantize_q8_rows(module.weight)
        self.kernel = cpu_kernels._module.q8_linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.codes, self.scales)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return residual + self(x)


class _Modules:
    """Any other layers: called as modules (several: their outputs concatenated)."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.modules) == 1:
            return self.modules[0](x)
        return torch.cat([m(x) for m in self.modules], dim=-1)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return residual + self(x)


def _int8_key(module: nn.Module):
    """What must agree for Int8Linear layers to run as one (None where the module is not one)."""
    if not isinstance(module, Int8Linear) or module.input_transform is not None:
        return None
    static = None if module.input_spec.dynamic else float(module.input_scale)
    return (module.in_features, module.input_spec, static, module.kernel, module.row_kernel, module.seven,
            module.bias is None)


class _Int8:
    """Int8Linear layers reading one input as one Int8Linear (their codes, scales and biases concatenated; the
    layers' own buffers then view the concatenation and they drop their own oneDNN copy of the weight, so memory
    holds each weight once: called alone with a long input, such a layer multiplies in float)."""

    def __init__(self, modules: list[Int8Linear]):
        if len(modules) == 1:
            self.layer = modules[0]
            return
        first = modules[0]
        bias = None if first.bias is None else torch.cat([m.bias for m in modules])
        self.layer = Int8Linear.from_codes(torch.cat([m.codes for m in modules]),
                                           torch.cat([m.weight_scale for m in modules]), bias, first.input_spec,
                                           getattr(first, "input_scale", None),
                                           kernels=first.kernel != "float" or first.row_kernel != "float",
                                           onednn_min_rows=first.onednn_min_rows)
        start = 0
        for m in modules:
            end = start + m.out_features
            for name in ("codes", "weight_scale", "bias", "row_codes", "row_sums"):
                fused = getattr(self.layer, name, None)
                if fused is not None and getattr(m, name, None) is not None:
                    setattr(m, name, fused[start:end])
            m._packed, m.kernel = None, "float"
            start = end

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return residual + self.layer(x)


def _linear(modules: list[nn.Module], fuse: bool, fuse_dense: bool, fp32: bool, int8_activations: bool = False):
    """One callable computing ``cat([m(x) for m in modules], -1)`` for a one-row ``x`` (see the module docstring)."""
    int8 = [_int8_key(m) for m in modules]
    if int8[0] is not None and all(k == int8[0] for k in int8) and (fuse or len(modules) == 1):
        return _Int8(modules)
    keys = [_avx2_key(m) for m in modules]
    if fp32 and keys[0] is not None and all(k == keys[0] for k in keys) and cpu_kernels.ready():
        if fuse or len(modules) == 1:
            return _Int4(modules, int8_activations)
    if all(type(m) is nn.Linear for m in modules):
        if len(modules) == 1 or (fuse and fuse_dense and len({(m.weight.dtype, m.weight.device) for m in modules}) == 1):
            return _Dense(modules)
    return _Modules(modules)


def _kind(linear, int8_activations: bool) -> str:
    """How a ``_linear`` result runs, as ``FastDecoder.linears`` names it."""
    if isinstance(linear, _Int4):
        return "int4_avx2_q8" if int8_activations else "int4_avx2"
    if isinstance(linear, _Int8):
        return "int8_a8"
    return {_Dense: "dense", _Q8: "q8", _Modules: "modules"}[type(linear)]


class FastDecoder:
    """Greedy batch-1 decoding of a Llama-family ``model`` with a preallocated cache of ``max_len`` positions.

    ``prefill(ids)`` starts a new sequence with the prompt ``ids`` (``[1, T]`` or ``[T]``) in one pass and returns the
    last position's logits ``[1, vocab]``; ``step(token)`` appends one token (an int or a tensor holding one id) and
    returns its logits ``[1, vocab]``; ``reset()`` empties the cache. The model is used in place (its modules and
    weights; see the module docstring for the int4 buffers that become views). ``fuse=False`` runs every Linear
    layer as its own call; ``fuse_dense=True`` also fuses plain ``nn.Linear`` q/k/v and gate/up (a concatenated copy
    of their weights). ``linears`` says how the decode step runs each group (``int4_avx2``, ``int4_avx2_q8``,
    ``dense``, ``q8``, ``modules``).

    Two approximations, both off by default, trade exactness for decode speed the way llama.cpp does:
    ``activations="int8"`` rounds the input of every int4_avx2 layer in the decode step to int8 per block of 32
    columns (``cpu_kernels.int4_linear_q8``, integer products); ``head="int8"`` runs a float32 ``lm_head`` (a plain
    Linear without bias) from a q8_0 copy of its weight (int8 blocks of 32 columns with a float32 scale each, and
    activations rounded the same way: ``cpu_kernels.q8_linear``; the copy costs 1.125 bytes per weight beside the
    model's), for the prompt's last position and every step. Both need the AVX2 kernel and a float32 model on CPU;
    the prompt's layers run as before. ``bench/decode_error.py`` measures what they cost.
    """

    ACTIVATIONS = ("float32", "int8")
    HEADS = ("model", "int8")

    def __init__(self, model: nn.Module, max_len: int, *, fuse: bool = True, fuse_dense: bool = False,
                 activations: str = "float32", head: str = "model"):
        if max_len < 1:
            raise LmshrinkError(f"max_len={max_len}: the cache needs at least one position", fix="pass max_len >= 1")
        if activations not in self.ACTIVATIONS:
            raise LmshrinkError(f"activations={activations!r} is not known",
                                fix=f"use one of {', '.join(self.ACTIVATIONS)}")
        if head not in self.HEADS:
            raise LmshrinkError(f"head={head!r} is not known", fix=f"use one of {', '.join(self.HEADS)}")
        ok, reason = supported(model, max_len)
        if not ok:
            raise UnsupportedArchitectureError(f"cannot decode with the fast path: {reason}", fix=FIX)
        config = model.config
        inner = model.model
        self.model, self.max_len = model, int(max_len)
        self.embedding = inner.embed_tokens.weight
        dtype, device = self.embedding.dtype, self.embedding.device
        self.dtype = dtype
        first_attn = inner.layers[0].self_attn
        self.head_dim = hd = int(first_attn.head_dim)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.group = self.heads // self.kv_heads
        self.scale = float(first_attn.scaling)
        self.hidden = int(config.hidden_size)
        self.intermediate = int(config.intermediate_size)
        layers = inner.layers[: config.num_hidden_layers]
        # layers whose attention quantizes its cache (runtime.kvcache) keep a QuantizedKV; the others share one
        # float tensor [layers, 2 (keys, values), kv_heads, max_len, head_dim]: one copy writes both per step
        specs = [getattr(layer.self_attn, kvcache.ATTRIBUTE, None) for layer in layers]
        self.kv_caches = [None if spec is None else kvcache.QuantizedKV(spec, self.kv_heads, hd, self.max_len, dtype,
                                                                         device) for spec in specs]
        float_len = self.max_len if any(spec is None for spec in specs) else 0
        self.cache = torch.zeros(len(layers), 2, self.kv_heads, float_len, hd, dtype=dtype, device=device)
        self.k_cache, self.v_cache = self.cache[:, 0], self.cache[:, 1]
        with torch.no_grad():
            positions = torch.arange(self.max_len, device=device).unsqueeze(0)
            probe = torch.zeros(1, dtype=dtype, device=device)  # the dtype and device rotary_emb computes in
            cos, sin = inner.rotary_emb(probe, positions)  # the model's own frequencies and scaling
        self.half = hd // 2
        sign = torch.ones(hd, dtype=dtype, device=device)
        sign[: self.half] = -1
        # rotate_half(x) * sin == swap_halves(x) * (sin with its first half negated)
        self.cos = cos[0].to(dtype).reshape(self.max_len, 2, self.half).contiguous()
        self.sin_signed = (sin[0].to(dtype) * sign).reshape(self.max_len, 2, self.half).contiguous()
        # for one token: x @ M(pos) rotates a head (M = diag(cos) + swap-halves-and-negate-first * sin); q and k heads
        # take M, v heads the identity, so one batched product rotates q and k and lays out k, v for the cache
        self.swap = torch.zeros(hd, hd, dtype=dtype, device=device)
        idx = torch.arange(self.half, device=device)
        self.swap[idx + self.half, idx] = -1
        self.swap[idx, idx + self.half] = 1
        self.rotation = torch.eye(hd, dtype=dtype, device=device).repeat(self.heads + 2 * self.kv_heads, 1, 1)
        self.cos_flat, self.sin_flat = cos[0].to(dtype).contiguous(), sin[0].to(dtype).contiguous()
        self.fp32 = dtype == torch.float32
        self.final_norm = (inner.norm.weight, float(inner.norm.variance_epsilon))
        self.lm_head = model.lm_head
        self.activations, self.head_kind = activations, head
        if activations != "float32" or head != "model":
            if not (self.fp32 and device.type == "cpu" and cpu_kernels.ready()):
                why = ("the model is not float32" if not self.fp32 else f"the model is on {device}"
                       if device.type != "cpu" else f"AVX2 kernel: {cpu_kernels.kernel_status()}")
                raise UnsupportedArchitectureError(
                    f"activations={activations!r} / head={head!r} need lmshrink's AVX2 kernel and a float32 model "
                    f"on CPU ({why})", fix="use activations='float32', head='model'")
        int8 = activations == "int8"
        if head == "int8":
            if type(model.lm_head) is not nn.Linear or model.lm_head.bias is not None:
                raise UnsupportedArchitectureError(
                    f"head='int8' takes a plain Linear lm_head without bias, not {type(model.lm_head).__name__}",
                    fix="use head='model'")
            self.head = _Q8(model.lm_head)
        else:
            self.head = _linear([model.lm_head], False, False, self.fp32, int8)
        self.layers = []      # for the prompt: the modules themselves
        self.step_layers = []  # for one token: kernels called directly, q/k/v and gate/up fused where possible
        self.linears: dict[str, int] = {}
        for index, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            norm1 = (layer.input_layernorm.weight, float(layer.input_layernorm.variance_epsilon))
            norm2 = (layer.post_attention_layernorm.weight, float(layer.post_attention_layernorm.variance_epsilon))
            k_cache, v_cache = self.k_cache[index], self.v_cache[index]
            quantized = self.kv_caches[index]
            qkv = _linear([attn.q_proj, attn.k_proj, attn.v_proj], fuse, fuse_dense, self.fp32, int8)
            out = _linear([attn.o_proj], False, False, self.fp32, int8)
            gate_up = _linear([mlp.gate_proj, mlp.up_proj], fuse, fuse_dense, self.fp32, int8)
            down = _linear([mlp.down_proj], False, False, self.fp32, int8)
            # the prompt runs fused int8 layers fused too (their kernels take any number of rows); the rest as modules
            qkv_prompt = qkv if isinstance(qkv, _Int8) else None
            gate_up_prompt = gate_up if isinstance(gate_up, _Int8) else None
            self.layers.append((norm1, norm2, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                                mlp.gate_proj, mlp.up_proj, mlp.down_proj, k_cache, v_cache, quantized,
                                qkv_prompt, gate_up_prompt))
            for name, linear in (("qkv", qkv), ("o", out), ("gate_up", gate_up), ("down", down)):
                kind = _kind(linear, int8)
                key = f"{name}:{kind}" + (":fused" if name in ("qkv", "gate_up") and not isinstance(linear, _Modules)
                                          else "")
                self.linears[key] = self.linears.get(key, 0) + 1
            self.step_layers.append((norm1[0], norm1[1], qkv, out.add, norm2[0], norm2[1], gate_up, down.add,
                                     self.cache[index], k_cache, v_cache, quantized))
        self.linears[f"lm_head:{_kind(self.head, int8)}"] = 1
        # queries and keys of layers with a rotated quantized cache: turned by a Hadamard transform after RoPE
        self.head_hadamard = None
        if any(spec is not None and spec.rotate for spec in specs):
            from lmshrink.core.hadamard import orthogonal_hadamard

            self.head_hadamard = orthogonal_hadamard(hd).to(dtype=dtype, device=device)
        self.rotation_hadamard = self.rotation.clone()
        self.zero = torch.zeros(self.hidden, dtype=dtype, device=device)
        self.length = 0

    # -- pieces ------------------------------------------------------------------------------------------------

    def _norm(self, x: torch.Tensor, norm) -> torch.Tensor:
        weight, eps = norm
        if self.fp32:
            return torch.rms_norm(x, (self.hidden,), weight, eps)
        h = x.float()  # transformers' formula: normalize in float32, round, then scale
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of ``x [..., heads, head_dim]`` with cos/sin ``[..., 2, head_dim / 2]``."""
        x = x.unflatten(-1, (2, self.half))
        return torch.addcmul(x * cos, x.flip(-2), sin).flatten(-2)

    def reset(self) -> None:
        """Forget the sequence (the cache is overwritten by the next prefill)."""
        self.length = 0
        for quantized in self.kv_caches:
            if quantized is not None:
                quantized.reset()

    def cache_bytes(self) -> dict[str, int]:
        """Bytes the key/value cache holds for ``max_len`` positions: ``float`` (layers with an unquantized
        cache), ``quantized`` (codes, scales and windows of the others) and ``float_equivalent`` (every layer
        unquantized in the model's dtype)."""
        quantized = sum(q.nbytes() for q in self.kv_caches if q is not None)
        per_layer = 2 * self.kv_heads * self.max_len * self.head_dim * self.cache.element_size()
        return {"float": self.cache.numel() * self.cache.element_size(), "quantized": quantized,
                "float_equivalent": per_layer * len(self.kv_caches)}

    def _check_room(self, new: int) -> None:
        if self.length + new > self.max_len:
            raise LmshrinkError(f"the sequence would reach {self.length + new} positions; this FastDecoder holds "
                                f"{self.max_len}", fix="build it with a larger max_len (prompt plus new tokens)")

    # -- prompt ------------------------------------------------------------------------------------------------

    def _gated(self, gate, up, gate_up, h: torch.Tensor) -> torch.Tensor:
        """``silu(gate(h)) * up(h)``, through the fused layer where there is one."""
        if gate_up is None:
            return F.silu(gate(h)) * up(h)
        g, u = gate_up(h).split([self.intermediate, self.intermediate], dim=-1)
        return F.silu(g) * u

    @torch.inference_mode()
    def prefill(self, ids) -> torch.Tensor:
        """Start a new sequence with ``ids`` in one pass; the last position's logits ``[1, vocab]``."""
        ids = torch.as_tensor(ids)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise LmshrinkError(f"the fast path decodes one sequence at a time; got a batch of {ids.shape[0]}",
                                    fix="pass one sequence, or " + FIX)
            ids = ids[0]
        if ids.dim() != 1 or ids.numel() == 0:
            raise LmshrinkError(f"prompt ids of shape {tuple(ids.shape)}: expected [1, T] or [T] with T >= 1",
                                fix="pass the tokenizer's input_ids for one prompt")
        self.length = 0
        n = ids.numel()
        self._check_room(n)
        heads, kv, hd = self.heads, self.kv_heads, self.head_dim
        x = F.embedding(ids.to(self.embedding.device), self.embedding)  # [T, D]
        cos, sin = self.cos[:n].unsqueeze(1), self.sin_signed[:n].unsqueeze(1)  # [T, 1, 2, hd/2]
        for (norm1, norm2, q_proj, k_proj, v_proj, o_proj, gate, up, down, k_cache, v_cache, quantized, qkv_prompt,
             gate_up_prompt) in self.layers:
            h = self._norm(x, norm1)
            if qkv_prompt is not None:
                q, k, v = qkv_prompt(h).split([heads * hd, kv * hd, kv * hd], dim=-1)
            else:
                q, k, v = q_proj(h), k_proj(h), v_proj(h)
            q = self._rotate(q.reshape(n, heads, hd), cos, sin).transpose(0, 1)  # [H, T, hd]
            k = self._rotate(k.reshape(n, kv, hd), cos, sin).transpose(0, 1)
            v = v.reshape(n, kv, hd).transpose(0, 1)
            if quantized is not None:  # each query sees the positions a quantizing cache would hold at its turn
                a = kvcache.mixed_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), quantized.spec, self.scale)
                quantized.reset()
                quantized.extend(kvcache.rotate_heads(k) if quantized.spec.rotate else k, v)
                x = x + o_proj(a[0].transpose(0, 1).reshape(n, heads * hd))
                x = x + down(self._gated(gate, up, gate_up_prompt, self._norm(x, norm2)))
                continue
            k_cache[:, :n] = k
            v_cache[:, :n] = v
            a = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), is_causal=True,
                                               scale=self.scale, enable_gqa=self.group > 1)
            x = x + o_proj(a[0].transpose(0, 1).reshape(n, heads * hd))
            x = x + down(self._gated(gate, up, gate_up_prompt, self._norm(x, norm2)))
        self.length = n
        head = self.head if self.head_kind == "int8" else self.lm_head
        return head(self._norm(x[-1:], self.final_norm))

    # -- one token ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, token) -> torch.Tensor:
        """Append one token (an int or a tensor holding one id); its logits ``[1, vocab]``."""
        if self.length == 0:
            raise LmshrinkError("step() before prefill(): the sequence is empty", fix="call prefill(prompt_ids) first")
        token = torch.as_tensor(token, device=self.embedding.device)
        if token.numel() != 1:
            raise LmshrinkError(f"step() takes one token id, got a tensor of shape {tuple(token.shape)}",
                                fix="pass the argmax of the last logits (batch 1), or " + FIX)
        self._check_room(1)
        pos = self.length
        end = pos + 1
        heads, kv, hd, group = self.heads, self.kv_heads, self.head_dim, self.group
        rows = heads + 2 * kv
        inter, hidden, scale = self.intermediate, self.hidden, self.scale
        rotation = self.rotation
        m = torch.diag(self.cos_flat[pos]).addcmul_(self.swap, self.sin_flat[pos])
        rotation[heads: heads + kv] = m
        rotation[:heads] = m.mul_(scale)  # the attention scale folded into the queries' rotation
        rotated = self.rotation_hadamard
        if self.head_hadamard is not None:  # the same, then the per-head Hadamard of a rotated quantized cache
            torch.matmul(rotation[: heads + kv], self.head_hadamard, out=rotated[: heads + kv])
        fp32, zero = self.fp32, self.zero
        x = F.embedding(token.reshape(1), self.embedding)[0]  # [D]: one row, kept 1-D
        for (w1, eps1, qkv_proj, out_add, w2, eps2, gate_up, down_add, cache, k_cache, v_cache,
             quantized) in self.step_layers:
            if fp32:  # RMSNorm in two calls: 0 + (rsqrt(mean(x^2) + eps) * x) * weight, the scalar in Python
                h = torch.addcmul(zero, x, w1, value=1.0 / math.sqrt(float(torch.dot(x, x)) / hidden + eps1))
            else:
                h = self._norm(x, (w1, eps1))
            # q (times the scale) and k rotated, v unchanged: [rows, 1, hd]; then k and v into the cache in one copy
            if quantized is not None:
                qkv = torch.bmm(qkv_proj(h).view(rows, 1, hd), rotated if quantized.spec.rotate else rotation)
                quantized.extend(qkv[heads:heads + kv].view(kv, 1, hd), qkv[heads + kv:].view(kv, 1, hd))
                keys, values = quantized.keys_values()
                w = torch.bmm(qkv[:heads].view(kv, group, hd), keys.transpose(1, 2))
                a = torch.bmm(torch.softmax(w, -1), values)
            else:
                qkv = torch.bmm(qkv_proj(h).view(rows, 1, hd), rotation)
                cache.select(2, pos).copy_(qkv[heads:].view(2, kv, hd))
                # GQA without copies: the queries of each kv head as rows [kv, group, hd] against its cache
                w = torch.bmm(qkv[:heads].view(kv, group, hd), k_cache[:, :end].transpose(1, 2))
                a = torch.bmm(torch.softmax(w, -1), v_cache[:, :end])
            x = out_add(a.view(heads * hd), x)
            if fp32:
                h = torch.addcmul(zero, x, w2, value=1.0 / math.sqrt(float(torch.dot(x, x)) / hidden + eps2))
            else:
                h = self._norm(x, (w2, eps2))
            gu = gate_up(h)
            x = down_add(F.silu(gu[:inter]).mul_(gu[inter:]), x)
        self.length = end
        return self.head(self._norm(x, self.final_norm)).view(1, -1)

    def generate(self, ids, new_tokens: int) -> list[int]:
        """Greedy: the prompt, then ``new_tokens`` steps; the ``new_tokens + 1`` chosen ids (the first from the prompt)."""
        token = self.prefill(ids).argmax(-1)
        tokens = [int(token)]
        for _ in range(new_tokens):
            token = self.step(token).argmax(-1)
            tokens.append(int(token))
        return tokens


__all__ = ["FastDecoder", "supported", "SUPPORTED_TYPES"]
