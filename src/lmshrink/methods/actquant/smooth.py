"""SmoothQuant (Xiao et al., 2023) on one decoder block: per input channel ``j`` of a group of consumer layers,
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` divides the activations and multiplies the weights' columns, moved
into the producer of those activations so the float model is unchanged:

* ``attn-norm``: input_layernorm -> q, k, v (the norm's weight divided by ``s``);
* ``mlp-norm``: post_attention_layernorm -> gate, up;
* ``v-o``: v_proj's output rows -> o_proj's columns (attention is linear in the values; with grouped-query
  attention the heads that share a key/value head share its ``s``);
* ``up-down``: up_proj's output rows -> down_proj's columns (``silu(gate) * up`` is linear in ``up``).

``alpha`` is fixed, or searched per block and pair among candidates (and "no smoothing"): the one whose smoothed
layers, fake-quantized as the recipe will quantize them (round-to-nearest int8 weights per channel, the given
activation grid), best reproduce the float outputs on a sample of the block's calibration tokens.
"""

from __future__ import annotations

import torch

from lmshrink.core.actquant import ActSpec, act_params, fake_quantize_activations
from lmshrink.core.errors import UnsupportedArchitectureError
from lmshrink.core.grids import GridSpec, fake_quantize
from lmshrink.core.stage import BlockOutcome

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
# producer, consumers: the pairs smoothing can fold exactly
PAIRS = {
    "attn-norm": ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "v-o": ("self_attn.v_proj", ("self_attn.o_proj",)),
    "mlp-norm": ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    "up-down": ("mlp.up_proj", ("mlp.down_proj",)),
}
_MIN_SCALE = 1e-5


def check_model(model) -> None:
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type not in SUPPORTED:
        raise UnsupportedArchitectureError(
            f"smoothquant folds scales into Llama-style RMSNorms and projections (model types "
            f"{', '.join(SUPPORTED)}); this model is {model_type!r}",
            fix="leave the smoothquant stage out for this model")


class _Inputs:
    """Per-channel max |x| over every calibration token, and an even sample of the tokens, of one consumer group."""

    def __init__(self, stride: int):
        self.stride = stride
        self.amax: torch.Tensor | None = None
        self.rows: list[torch.Tensor] = []

    def __call__(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        amax = x.abs().amax(0)
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)
        self.rows.append(x[:: self.stride].cpu())


def _kv_tie(values: torch.Tensor, attention, reduce) -> torch.Tensor:
    """``values`` per o_proj input channel (heads x head_dim), made equal across the heads that share a key/value
    head by ``reduce`` (max) over each group: returns ``(per kv channel [kv * d], per o channel [heads * d])``."""
    heads = attention.config.num_attention_heads
    kv = attention.config.num_key_value_heads
    d = values.numel() // heads
    grouped = values.reshape(kv, heads // kv, d)
    per_kv = reduce(grouped)
    return per_kv.reshape(-1), per_kv[:, None, :].expand(kv, heads // kv, d).reshape(-1)


def _scales(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_amax.clamp_min(_MIN_SCALE).pow(alpha) / w_amax.clamp_min(_MIN_SCALE).pow(1 - alpha)
    return s.clamp_min(_MIN_SCALE)


def _proxy_error(x: torch.Tensor, x_amax: torch.Tensor, weight: torch.Tensor, s: torch.Tensor, act: ActSpec,
                 grid: GridSpec, reference: torch.Tensor) -> float:
    """Relative error of the smoothed, fake-quantized product ``Q(x / s) Q(W s)^T`` against ``x W^T``."""
    xs = x / s
    if act.dynamic:
        xq = fake_quantize_activations(xs, act)
    else:  # a static range over every calibration token: max |x_j| / s_j
        amax = (x_amax / s).amax().reshape(1)
        scale, zero = act_params(-amax, amax, act)
        xq = fake_quantize_activations(xs, act, scale, zero)
    wq = fake_quantize(weight * s, grid)
    out = xq @ wq.t()
    return float((out - reference).square().sum() / reference.square().sum().clamp_min(1e-30))


def smooth_block(stage, job) -> BlockOutcome:
    """Search and fold the smoothing scales of every pair ``stage.pairs`` names in ``job.block`` (and in its
    uncompressed copy, ``job.uncompressed``, so later ``fp_target`` stages aim at the folded layers)."""
    block = job.block
    pairs = [p for p in PAIRS if p in stage.pairs]
    consumers = {PAIRS[p][1][0]: p for p in pairs}
    tokens = sum(h.numel() // h.shape[-1] for h in job.inputs)
    stride = max(1, tokens // stage.samples)
    inputs = {name: _Inputs(stride) for name in consumers}
    handles = [block.get_submodule(name).register_forward_pre_hook(hook) for name, hook in inputs.items()]
    try:
        for batch in range(len(job.inputs)):
            job.forward(batch)
    finally:
        for handle in handles:
            handle.remove()
    act = ActSpec(bits=stage.act_bits, granularity=stage.act_granularity, dynamic=stage.act_dynamic)
    grid = GridSpec(bits=stage.weight_bits, group_size=-1, symmetric=True)
    changed: list[str] = []
    chosen: dict[str, float | None] = {}
    for pair in pairs:
        producer_name, consumer_names = PAIRS[pair]
        seen = inputs[consumer_names[0]]
        x = torch.cat(seen.rows)
        x_amax = seen.amax.cpu()
        weights = [block.get_submodule(n).weight.detach().float().cpu() for n in consumer_names]
        weight = torch.cat(weights)
        w_amax = weight.abs().amax(0)
        attention = block.self_attn if pair == "v-o" else None
        if attention is not None:  # one scale per key/value channel, shared by the heads of its group
            x_amax = _kv_tie(x_amax, attention, lambda g: g.amax(1))[1]
            w_amax = _kv_tie(w_amax, attention, lambda g: g.amax(1))[1]
        reference = x @ weight.t()
        candidates = [stage.alpha] if stage.alpha is not None else list(stage.alphas)
        best_alpha, best_s, best_error = None, None, None
        if stage.alpha is None:  # "no smoothing" is a candidate: a search never makes the proxy worse
            best_error = _proxy_error(x, x_amax, weight, torch.ones_like(x_amax), act, grid, reference)
        for alpha in candidates:
            s = _scales(x_amax, w_amax, alpha)
            error = _proxy_error(x, x_amax, weight, s, act, grid, reference)
            if best_error is None or error < best_error:
                best_alpha, best_s, best_error = alpha, s, error
        chosen[pair] = best_alpha
        if best_s is None:
            continue
        changed += _fold(block, producer_name, consumer_names, best_s, attention)
        if job.uncompressed is not None:  # fp_target stages after this one aim at the folded layers
            _fold(job.uncompressed, producer_name, consumer_names, best_s, attention)
    job_info = {"alpha": chosen}
    return BlockOutcome(changed=changed, record=job_info)


@torch.no_grad()
def _fold(block, producer_name: str, consumer_names, s: torch.Tensor, attention) -> list[str]:
    """Divide the producer's output channels by ``s`` and multiply the consumers' columns by it."""
    producer = block.get_submodule(producer_name)
    changed = []
    out_scale = s
    if attention is not None:  # v_proj's rows are the key/value channels
        heads = attention.config.num_attention_heads
        kv = attention.config.num_key_value_heads
        out_scale = s.reshape(kv, heads // kv, -1)[:, 0].reshape(-1)
    weight = producer.weight
    if weight.dim() == 1:  # a norm: its weight scales each channel
        weight.div_(out_scale.to(weight))
    else:  # a linear: its output rows
        weight.div_(out_scale.to(weight)[:, None])
    changed.append(f"{producer_name}.weight")
    bias = getattr(producer, "bias", None)
    if bias is not None:
        bias.div_(out_scale.to(bias))
        changed.append(f"{producer_name}.bias")
    for name in consumer_names:
        consumer = block.get_submodule(name)
        consumer.weight.mul_(s.to(consumer.weight)[None, :])
        changed.append(f"{name}.weight")
    return changed
