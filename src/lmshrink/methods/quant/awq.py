"""AWQ (Lin et al., 2023): activation-aware input scales, folded into the module that produces the input, and AWQ's
clipping search.

For a group of linears that read one input (q,k,v after the attention norm; gate,up after the MLP norm; o after v;
down after up), scaling input channel ``j`` up by ``s_j`` before rounding and dividing the producer's output channel
``j`` by ``s_j`` leaves the float model unchanged, while the channels with large activations lose less to rounding.
The scale is ``s = mean|x| ** alpha`` (normalised to a geometric mean of 1), and ``alpha`` is searched on a grid of
``[0, 1)``: the one whose rounded group has the smallest output error on the calibration inputs wins. The group's
output error ``sum_l ||(W_l - Q(W_l s) / s) X||^2`` is computed exactly from the input Hessian ``X^T X`` (the same
statistic GPTQ reads), so every candidate is scored on every calibration token without running the block again.
``alpha = 0`` (``s = 1``: plain rounding) is always a candidate, so the chosen scale never scores worse than none.

The clipping search then shrinks each (row, group) range of the scaled weights: for shrink factors
``1, 1 - 1/grid, ...`` down to ``1 - max_shrink``, the weights are clamped to ``[-m, m]`` and rounded, and the factor
with the smallest error of the group's output contribution ``(Q - W)_g H_gg (Q - W)_g^T`` is kept (shrink 1, no
clipping, is a candidate). The weights are clamped in place, as AWQ does; the quantizing stage after it rounds them.
Layers whose outputs become attention scores (q, k) are not clipped (AWQ's choice: the error of a product of two
rounded layers is not that of each).
"""

from __future__ import annotations

import math

import torch

from lmshrink.core.grids import GridSpec, dequantize, fit_grid_float, quantize


def _min_max(spec: GridSpec) -> GridSpec:
    """The grid AWQ rounds with while it searches: the stage's, with the full range of each group (no clip search)."""
    return GridSpec(bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric, clip_search=False,
                    scale_dtype=spec.scale_dtype)


def _spans(columns: int, width: int) -> list[tuple[int, int, int]]:
    """``(start, groups, width)`` runs of equal-width contiguous groups: the full groups, then a shorter last one."""
    full = columns // width
    spans = [(0, full, width)] if full else []
    if full * width < columns:
        spans.append((full * width, 1, columns - full * width))
    return spans


def _rounded(weight: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    """Round to nearest on the grid fitted to each contiguous group (``fake_quantize`` without its per-column
    gathers, which dominate the search's time)."""
    rows, columns = weight.shape
    out = torch.empty_like(weight)
    for start, groups, size in _spans(columns, spec.group_width(columns)):
        end = start + groups * size
        block = weight[:, start:end].reshape(rows * groups, size)
        scale, zero = fit_grid_float(block, spec)
        codes = (block / scale[:, None]).round_().add_(zero[:, None]).clamp_(0, spec.maxq)
        out[:, start:end] = codes.sub_(zero[:, None]).mul_(scale[:, None]).reshape(rows, end - start)
    return out


def _quadratic(diff: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(D H D^T)`` in float64 sums."""
    return float(((diff @ hessian) * diff).sum(dtype=torch.float64))


def candidate_scale(mean_abs: torch.Tensor, alpha: float, weight_mean: torch.Tensor | None = None) -> torch.Tensor:
    """``mean|x| ** alpha`` (divided by ``weight_mean ** (1 - alpha)`` with duo scaling), clamped away from 0 and
    normalised so that its largest and smallest entries multiply to 1."""
    scale = mean_abs.float().pow(alpha)
    if weight_mean is not None:
        scale = scale / (weight_mean.float().pow(1.0 - alpha) + 1e-4)
    scale = scale.clamp(min=1e-4)
    return scale / torch.sqrt(scale.max() * scale.min())


def weight_magnitude(weights: list[torch.Tensor], spec: GridSpec) -> torch.Tensor:
    """Per input column: the mean over the group's rows of ``|w|`` relative to the largest ``|w|`` of its (row,
    quantization group) (AWQ's duo-scaling statistic)."""
    weight = torch.cat([w.float() for w in weights]).abs()
    columns = weight.shape[1]
    width = spec.group_width(columns)
    relative = torch.empty_like(weight)
    for start in range(0, columns, width):
        part = weight[:, start:start + width]
        relative[:, start:start + width] = part / (part.amax(dim=1, keepdim=True) + 1e-6)
    return relative.mean(dim=0)


def group_output_error(weights: list[torch.Tensor], hessian: torch.Tensor, scale: torch.Tensor,
                       spec: GridSpec) -> float:
    """``sum_l tr(D_l H D_l^T)`` with ``D_l = W_l - Q(W_l diag(s)) diag(s)^-1``: the group's squared output error on
    the inputs of ``hessian`` when its inputs are scaled by ``1/s`` and its weights by ``s`` before rounding."""
    grid = _min_max(spec)
    total = 0.0
    for weight in weights:
        w = weight.float()
        rounded = _rounded(w * scale[None, :], grid) / scale[None, :]
        total += _quadratic(w - rounded, hessian)
    return total


def search_scale(weights: list[torch.Tensor], hessian: torch.Tensor, mean_abs: torch.Tensor, spec: GridSpec,
                 grid: int = 20, duo_scaling: bool = False) -> tuple[torch.Tensor, dict]:
    """AWQ's search: the input scale (``[in]``) of the grid ``alpha = 0, 1/grid, ..., (grid-1)/grid`` whose rounded
    group has the smallest output error, and a record (the alpha, the relative errors with it and with no scale).

    weights: the group's ``[out_l, in]`` weights; hessian: ``X^T X`` of their shared input; mean_abs: ``mean |x|``
    per input channel. Ties keep the smaller alpha, so inputs whose channels are all alike get ``alpha = 0``.
    """
    hessian = hessian.float()
    weight_mean = weight_magnitude(weights, spec) if duo_scaling else None
    reference = sum(_quadratic(w.float(), hessian) for w in weights)
    best_alpha, best_error, best_scale, plain = 0.0, math.inf, None, None
    for step in range(grid):
        alpha = step / grid
        scale = candidate_scale(mean_abs, alpha, weight_mean)
        error = group_output_error(weights, hessian, scale, spec)
        if step == 0:
            plain = error
        if error < best_error:
            best_alpha, best_error, best_scale = alpha, error, scale
    norm = reference if reference > 0 else 1.0
    return best_scale, {"alpha": best_alpha, "rel_output_error": best_error / norm,
                        "rel_output_error_alpha0": plain / norm}


def scaled_hessian(hessian: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The Hessian of inputs divided by ``scale`` per channel: ``diag(1/s) H diag(1/s)``."""
    if scale is None:
        return hessian.float()
    inverse = 1.0 / scale.float()
    return hessian.float() * inverse[:, None] * inverse[None, :]


def _clip_blocks(weight: torch.Tensor, hessian: torch.Tensor, spec: GridSpec, grid: int,
                 max_shrink: float) -> torch.Tensor:
    """Clip search on ``G`` groups of equal width at once: weight ``[out, G, width]``, hessian ``[G, width, width]``
    (the diagonal blocks of ``X^T X``). Returns the best clamp bound ``[out, G, 1]``."""
    rows, groups, width = weight.shape
    original = weight.abs().amax(dim=-1, keepdim=True)
    bound = original.clone()
    best = torch.full((rows, groups), math.inf, dtype=torch.float64)
    for step in range(max(1, int(max_shrink * grid))):
        candidate = original * (1.0 - step / grid)
        clamped = torch.maximum(torch.minimum(weight, candidate), -candidate).reshape(rows * groups, width)
        scale, zero = fit_grid_float(clamped, spec)
        rounded = dequantize(quantize(clamped, scale, zero, spec.maxq), scale, zero).reshape(rows, groups, width)
        diff = (rounded - weight).transpose(0, 1)  # [G, out, width]: one matmul per group
        error = (torch.bmm(diff, hessian) * diff).sum(dim=-1, dtype=torch.float64).t()
        better = error < best
        best = torch.where(better, error, best)
        bound = torch.where(better.unsqueeze(-1), candidate, bound)
    return bound


def search_clip(weight: torch.Tensor, hessian: torch.Tensor, spec: GridSpec, grid: int = 20,
                max_shrink: float = 0.5) -> tuple[torch.Tensor, dict]:
    """AWQ's clipping search on one layer: ``weight`` (``[out, in]``) clamped per (row, quantization group) to the
    range whose rounding gives the smallest error of the group's output contribution, with ``hessian`` the
    ``X^T X`` of the layer's input. Returns the clamped weight and a record: the layer's relative output error
    after rounding without and with the clamp, and the share of (row, group) ranges clipped."""
    w = weight.float()
    h = hessian.float()
    grid_spec = _min_max(spec)
    rows, columns = w.shape
    clamped = w.clone()
    clipped = total = 0
    for start, groups, size in _spans(columns, spec.group_width(columns)):
        end = start + groups * size
        block = w[:, start:end].reshape(rows, groups, size)
        diagonal = torch.stack([h[start + g * size: start + (g + 1) * size, start + g * size: start + (g + 1) * size]
                                for g in range(groups)])
        bound = _clip_blocks(block, diagonal, grid_spec, grid, max_shrink)
        clamped[:, start:end] = torch.maximum(torch.minimum(block, bound), -bound).reshape(rows, end - start)
        clipped += int((bound < block.abs().amax(dim=-1, keepdim=True)).sum())
        total += rows * groups
    energy = _quadratic(w, h)
    norm = energy if energy > 0 else 1.0
    before = _quadratic(w - _rounded(w, grid_spec), h) / norm
    after = _quadratic(w - _rounded(clamped, grid_spec), h) / norm
    return clamped, {"rel_output_error_before_clip": before, "rel_output_error_after_clip": after,
                     "clipped_ranges": clipped / total if total else 0.0}


def awq_block(stage, job):
    """The ``awq`` stage on one block (``core.stage.BlockJob``): one statistics pass (input Hessian and mean |x| of
    every selected group), then for each producer -> consumers link of the block (``ModelAdapter.scale_links``) whose
    consumers the stage selects: the scale search and the fold; then, with ``stage.clip``, the clipping search on
    every selected layer the stage's ``clip_ignore`` leaves. Links that cannot absorb a scale are skipped, and the
    block's record says why. Each fold is applied to the block's uncompressed copy too (``job.uncompressed``), so
    later ``fp_target`` stages aim at the folded layers; the clipping is not (it changes the function)."""
    from lmshrink.core.stage import BlockOutcome, Stat, match
    from lmshrink.models.adapters import linear_weight, set_linear_weight

    block, adapter = job.block, job.adapter
    spec = stage.grid()
    selected = [name for group in job.groups for name in group]
    first_of = {name: group[0] for group in adapter.linear_groups(block) for name in group}
    firsts = {first_of[name] for name in selected}
    stats = job.collect(frozenset({Stat.HESSIAN, Stat.CHANNELS}), {n: block.get_submodule(n) for n in sorted(firsts)})
    changed: list[str] = []
    groups: list[dict] = []
    scales: dict[str, torch.Tensor] = {}  # first layer of a folded group -> its scale
    for link in adapter.scale_links(block):
        consumers = [name for name in link.link.consumers if name in selected]
        entry = {"producer": link.link.producer, "consumers": list(link.link.consumers)}
        if not consumers:
            groups.append({**entry, "skipped": "no consumer is selected by the stage's targets"})
            continue
        if link.reason is not None:
            groups.append({**entry, "skipped": link.reason})
            continue
        group_stats = stats[first_of[consumers[0]]]
        channels = group_stats.channels
        weights = [linear_weight(block.get_submodule(name)) for name in consumers]
        scale, info = search_scale(weights, group_stats.hessian, channels.abs_sum / max(channels.tokens, 1), spec,
                                   grid=stage.alpha_grid, duo_scaling=stage.duo_scaling)
        on_weights = scale.to(weights[0].device)
        changed.extend(adapter.fold_input_scale(block, link, on_weights))
        if job.uncompressed is not None:  # fp_target stages after this one aim at the folded layers
            adapter.fold_input_scale(job.uncompressed, link, on_weights)
        scales[first_of[consumers[0]]] = scale
        groups.append({**entry, **info})
    clipped: dict[str, dict] = {}
    if stage.clip:
        for name in selected:
            full = f"{job.prefix}.{name}"
            if any(match(pattern, full) for pattern in stage.clip_ignore):
                continue
            module = block.get_submodule(name)
            first = first_of[name]
            hessian = scaled_hessian(stats[first].hessian, scales.get(first))
            weight, info = search_clip(linear_weight(module), hessian, spec, grid=stage.clip_grid,
                                       max_shrink=stage.clip_max_shrink)
            set_linear_weight(module, weight)
            changed.append(f"{name}.weight")
            clipped[name] = info
    record = {"groups": groups}
    if clipped:
        record["clipped"] = clipped
    return BlockOutcome(changed=sorted(set(changed)), record=record)
