"""The structured stages' work: the width plan before the block loop (``plan_width``), each block's width pruning
(``solve_width``) and the choice of blocks to remove (``plan_depth``)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmshrink.core.errors import LmshrinkError
from lmshrink.core.stage import BlockOutcome, Stat
from lmshrink.methods.structured.plan import BlockShape, kept_target, per_layer_plan, standardised, uniform_plan
from lmshrink.methods.structured.width import (
    InputStats,
    Units,
    channel_units,
    choose,
    head_units,
    remove,
    scores,
    steps_scores,
    unit_cost,
)
from lmshrink.models.adapters import linear_dims
from lmshrink.models.structure import WidthLayout, bias_companions, width_layout

# -- width ------------------------------------------------------------------------------------------------------------


def _units(stage, block: nn.Module, layout: WidthLayout) -> dict[str, Units]:
    out = {}
    if "heads" in stage.structures:
        out["heads"] = head_units(block, layout, stage.gqa)
    if "channels" in stage.structures:
        out["channels"] = channel_units(block, layout)
    return out


def _adds_bias(stage) -> bool:
    return stage.repair in ("bias", "lstsq+bias")


def _new_biases(stage, model: nn.Module, block: nn.Module, units: Units) -> set[str]:
    """The projections that get a bias when this kind is pruned with a bias repair (the reader and, for the config
    to state it, its flag's companions)."""
    reader = block.get_submodule(units.reader)
    if not _adds_bias(stage) or reader.bias is not None:
        return set()
    companions = bias_companions(model, block, units.reader) or []
    return {units.reader, *(n for n in companions if block.get_submodule(n).bias is None)}


def _shape(stage, model: nn.Module, block: nn.Module, units: dict[str, Units]) -> BlockShape:
    """The block's parameters as a function of the head and channel steps removed (new biases counted)."""
    params = sum(p.numel() for p in block.parameters())
    parts = {}
    for kind, u in units.items():
        new = _new_biases(stage, model, block, u)
        per_step = unit_cost(block, u, new) * (stage.multiple if kind == "channels" else 1)
        # a new bias on a producer has one entry per row; on the reader one per output
        added = 0
        for name in new:
            out_f = linear_dims(block.get_submodule(name))[0]
            added += out_f
        steps = u.steps() if kind == "heads" else u.count // stage.multiple
        parts[kind] = (per_step, added, steps - 1 if kind == "heads" else max(steps - 1, 0))

    def kept(heads: int, channels: int) -> int:
        total = params
        for kind, taken in (("heads", heads), ("channels", channels)):
            if kind in parts and taken:
                per_step, added, _ = parts[kind]
                total += added - taken * per_step
        return total

    return BlockShape(params=params, kept=kept, max_heads=parts["heads"][2] if "heads" in parts else 0,
                      max_channels=parts["channels"][2] if "channels" in parts else 0)


def _needs(stage) -> frozenset[Stat]:
    needs = {Stat.CHANNELS}
    if stage.importance == "second-order" or stage.repair.startswith("lstsq"):
        needs.add(Stat.HESSIAN)
    if stage.fp_target:
        needs.add(Stat.FP_TARGET)
    return frozenset(needs)


def _check_bias(stage, model: nn.Module, block: nn.Module, units: dict[str, Units]) -> None:
    if not _adds_bias(stage) or stage.widths != "uniform":
        return
    for u in units.values():
        reader = block.get_submodule(u.reader)
        if reader.bias is None and bias_companions(model, block, u.reader) is None:
            raise LmshrinkError(
                f"prune-width, option 'repair' = {stage.repair!r}: the repair puts a bias on {u.reader}, which the "
                f"{model.config.model_type} config cannot turn on, so plain transformers could not load the uniform "
                "model", fix="use repair: lstsq (or none), or widths: per-layer (loads with lmshrink only)")


def plan_width(stage, job, number: int) -> None:
    """Per-block removal counts (``set_block_options``): from the budget, the same in every block or allocated
    across blocks by standardised scores; a dense statistics pass when the split or the allocation needs scores."""
    model, prefix = job.model, job.prefix
    blocks = list(job.blocks)
    layout = None
    selected, shapes = [], []
    for index, block in enumerate(blocks):
        layout = width_layout(job.adapter, block)
        if not (stage.selects(f"{prefix}.{index}.{layout.o}") or stage.selects(f"{prefix}.{index}.{layout.ffn_out}")):
            continue
        units = _units(stage, block, layout)
        _check_bias(stage, model, block, units)
        if _adds_bias(stage):  # what a bias on each reader brings along for the config to state it
            stage.bias_companions().update({u.reader: bias_companions(model, block, u.reader) for u in units.values()})
        selected.append(index)
        shapes.append(_shape(stage, model, block, units))
    if not selected:
        raise LmshrinkError(f"prune-width selects no block's o_proj/down_proj (targets {stage.targets})",
                            fix="check the targets patterns")
    others = sum(p.numel() for p in model.parameters()) - sum(s.params for s in shapes)
    heads_given = stage.heads_removed
    if "heads" not in stage.structures:
        heads_given = 0
    channel_steps_given = None
    if stage.channels_removed is not None:
        if stage.channels_removed % stage.multiple:
            raise LmshrinkError(f"prune-width: channels_removed = {stage.channels_removed} is not a multiple of "
                                f"multiple = {stage.multiple}", fix="make it one")
        channel_steps_given = stage.channels_removed // stage.multiple
    if stage.widths == "uniform":
        first = shapes[0]
        if any(s.params != first.params or s.max_heads != first.max_heads or s.max_channels != first.max_channels
               for s in shapes):
            raise LmshrinkError("prune-width with widths: uniform needs blocks of equal widths, and this model's "
                                "blocks differ", fix="use widths: per-layer")
        if stage.ratio is None and stage.params is None:  # fixed counts, no budget
            heads, channels = heads_given or 0, channel_steps_given or 0
            if heads > first.max_heads or channels > first.max_channels:
                raise LmshrinkError(
                    f"prune-width asks for {heads} head steps and {channels * stage.multiple} channels per block, but "
                    f"a block can lose at most {first.max_heads} head steps and "
                    f"{first.max_channels * stage.multiple} channels (one of each must stay)",
                    fix="ask for fewer heads_removed / channels_removed")
            records = []
        else:
            if stage.params is not None:
                if stage.params >= others + sum(s.params for s in shapes):
                    raise LmshrinkError(f"prune-width: params = {stage.params} is not below the model's "
                                        f"{others + sum(s.params for s in shapes)} parameters: nothing to remove",
                                        fix="give a smaller params, or drop the stage")
                target = (stage.params - others) // len(shapes)
                if target <= 0:
                    raise LmshrinkError(f"prune-width: params = {stage.params} leaves no parameter for the blocks "
                                        f"(the model has {others} outside its pruned blocks)",
                                        fix="give a larger params")
            else:
                target = kept_target(first.params, stage.ratio)
            head_cost = channel_cost = None
            if heads_given is None and first.max_heads > 0:
                proxies = job.statistics_pass(
                    frozenset({Stat.CHANNELS}), lambda name: name.endswith((layout.o, layout.ffn_out)),
                    lambda index, block, stats: _proxy_steps(stage, block, stats, layout) if index in selected
                    else None)
                proxies = [p for p in proxies if p is not None]
                head_cost = lambda h: sum(float(p["heads"][:h].sum()) for p in proxies)
                channel_cost = lambda c: sum(float(p["channels"][:c].sum()) for p in proxies
                                             if "channels" in p)
            heads, channels, records = uniform_plan(shapes, target, heads_given, head_cost, channel_cost)
            if channel_steps_given is not None:
                channels = channel_steps_given
        plan = [(heads, channels)] * len(selected)
        job.log(f"prune-width stage {number + 1}: every block loses {heads} head step(s) and "
                f"{channels * stage.multiple} FFN channels, keeping {shapes[0].kept(heads, channels)} of "
                f"{shapes[0].params} parameters" + (f" (candidates {records})" if len(records) > 1 else ""))
    else:
        total = sum(s.params for s in shapes)
        target = (stage.params - others) if stage.params is not None else total - math.ceil(stage.ratio * total - 1e-9)
        if target <= 0 or target >= sum(s.kept(0, 0) for s in shapes):
            raise LmshrinkError(f"prune-width: the budget leaves {target} of the pruned blocks' {total} parameters",
                                fix="give a budget between nothing and everything")
        steps = job.statistics_pass(
            _needs(stage) - {Stat.FP_TARGET} if stage.importance == "second-order" else frozenset({Stat.CHANNELS}),
            lambda name: name.endswith((layout.o, layout.ffn_out)),
            lambda index, block, stats: _allocation_steps(stage, block, stats, layout) if index in selected
            else None)
        steps = [s for s in steps if s is not None]
        plan = per_layer_plan(shapes, target, [s.get("heads") for s in steps], [s.get("channels") for s in steps])
        kept = sum(shape.kept(*p) for shape, p in zip(shapes, plan))
        job.log(f"prune-width stage {number + 1}: per-layer head steps {[p[0] for p in plan]}, FFN channels removed "
                f"{[p[1] * stage.multiple for p in plan]}; blocks keep {kept} of {total} parameters")
    for index, (heads, channels) in zip(selected, plan):
        job.set_block_options(number, index, {"heads_removed": heads if "heads" in stage.structures else 0,
                                              "channels_removed": channels * stage.multiple})


def _block_stats(block: nn.Module, layout: WidthLayout, stats: dict, kind: str) -> InputStats | None:
    name = layout.o if kind == "heads" else layout.ffn_out
    return InputStats.from_stats(stats[name]) if name in stats and stats[name].channels is not None else None


def _proxy_steps(stage, block: nn.Module, stats: dict, layout: WidthLayout) -> dict[str, torch.Tensor]:
    """Per kind, the fluctuation (output variance, comparable between heads and channels) of each successive
    removal step: what the uniform split between heads and channels minimises."""
    out = {}
    for kind, units in _units(stage, block, layout).items():
        values = scores(block, units, _block_stats(block, layout, stats, kind), "fluctuation", stage.damp_percent)
        step = steps_scores(units, values)
        if kind == "channels" and stage.multiple > 1:
            step = step[: len(step) // stage.multiple * stage.multiple].view(-1, stage.multiple).sum(dim=1)
        out[kind] = step
    return out


def _allocation_steps(stage, block: nn.Module, stats: dict, layout: WidthLayout) -> dict[str, torch.Tensor]:
    """Per kind, the standardised importance of each successive removal step of this block (per-layer widths)."""
    out = {}
    for kind, units in _units(stage, block, layout).items():
        values = standardised(scores(block, units, _block_stats(block, layout, stats, kind), stage.importance,
                                     stage.damp_percent))
        step = steps_scores(units, values) / (units.step_units if units.groups is not None else 1)
        if kind == "channels" and stage.multiple > 1:
            step = step[: len(step) // stage.multiple * stage.multiple].view(-1, stage.multiple).mean(dim=1)
        out[kind] = step
    return out


def solve_width(stage, job) -> BlockOutcome:
    """Remove this block's planned heads, then its planned channels, each followed by the repair of its reader."""
    block = job.block
    layout = width_layout(job.adapter, block)
    plan = {"heads": stage.heads_removed or 0, "channels": stage.channels_removed or 0}
    needs = _needs(stage) if (stage.repair != "none" or stage.importance != "magnitude") else frozenset()
    readers = {"heads": layout.o, "channels": layout.ffn_out}
    kinds = [k for k in ("heads", "channels") if k in stage.structures and plan[k] > 0]
    records: dict[str, dict[str, Any]] = {}
    stats: dict = {}
    for position, kind in enumerate(kinds):
        if needs and (position == 0 or stage.true_sequential):
            wanted = kinds[position:] if position == 0 and not stage.true_sequential else [kind]
            stats = job.collect(needs, {readers[k]: block.get_submodule(readers[k]) for k in wanted})
        units = _units(stage, block, layout)[kind]
        input_stats = _block_stats(block, layout, stats, kind) if needs else None
        values = scores(block, units, input_stats, stage.importance, stage.damp_percent)
        removed = choose(units, values, plan[kind])
        companions = stage.bias_companions().get(units.reader)
        record = remove(block, layout, units, removed, input_stats, stage.repair, stage.damp_percent, companions)
        records[units.reader] = {"structure": kind, **record}
    return BlockOutcome(records=records)


# -- depth ------------------------------------------------------------------------------------------------------------


def plan_depth(stage, job, number: int) -> None:
    """Choose the blocks to remove and remove them (``job.drop_blocks``) before the block loop."""
    blocks = list(job.blocks)
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    if stage.remove is not None:
        chosen = sorted(set(stage.remove))
        scores_record = None
    else:
        if stage.blocks is not None:
            count = stage.blocks
        else:
            count, removed = 0, 0
            order = sorted(range(len(blocks)), key=lambda i: sizes[i])  # equal sizes: count = ceil(ratio * blocks)
            while removed < stage.ratio * sum(sizes) - 1e-6 and count < len(blocks):
                removed += sizes[order[count]]
                count += 1
        if count >= len(blocks):
            raise LmshrinkError(f"prune-depth: removing {count} of the model's {len(blocks)} blocks leaves none",
                                fix="ask for fewer blocks (a smaller ratio or blocks)")
        if stage.score == "influence":
            influence = job.statistics_pass(frozenset(), lambda name: False, _influence, streams=True)
            chosen = sorted(sorted(range(len(blocks)), key=lambda i: influence[i])[:count])
            scores_record = [round(v, 6) for v in influence]
        else:
            chosen, scores_record = _greedy_kl(stage, job, count)
    job.log(f"prune-depth stage {number + 1}: removing blocks {chosen}"
            + (f" ({stage.score} per block: {scores_record})" if scores_record is not None else ""))
    job.drop_blocks(chosen)


def _influence(index: int, block: nn.Module, stats: dict, inputs: list[torch.Tensor],
               outputs: list[torch.Tensor]) -> float:
    """ShortGPT's block influence: 1 - the mean over tokens of cosine(block input, block output)."""
    total, count = 0.0, 0
    for h_in, h_out in zip(inputs, outputs):
        cos = F.cosine_similarity(h_in.float().reshape(-1, h_in.shape[-1]), h_out.float().reshape(-1, h_out.shape[-1]),
                                  dim=-1)
        total += float(cos.double().sum())
        count += cos.numel()
    return 1.0 - total / count


def _greedy_kl(stage, job, count: int) -> tuple[list[int], list[list[float]]]:
    """Remove, one at a time, the block whose skipping (with those already chosen) gives the smallest KL from the
    unpruned model's next-token distributions on ``kl_windows`` calibration windows."""
    model = job.model
    if any(p.device.type == "meta" for p in model.parameters()):
        raise LmshrinkError("prune-depth with score: kl runs the whole model, whose blocks are on disk here "
                            "(offload disk)", fix="use score: influence, or compress without --offload disk")
    if job.calibration is None:
        raise LmshrinkError("prune-depth with score: kl needs the calibration windows", fix="pass calibration text")
    windows = job.calibration[: stage.kl_windows]
    blocks = list(job.blocks)
    with torch.no_grad():
        reference = [torch.log_softmax(model(input_ids=w[None]).logits.float(), dim=-1) for w in windows]

    def kl_without(skipped: set[int]) -> float:
        saved = {}
        for i in skipped:
            saved[i] = blocks[i].forward
            blocks[i].forward = _pass_through(blocks[i])
        try:
            total, tokens = 0.0, 0
            with torch.no_grad():
                for w, ref in zip(windows, reference):
                    logp = torch.log_softmax(model(input_ids=w[None]).logits.float(), dim=-1)
                    total += float((ref.exp() * (ref - logp)).sum())
                    tokens += ref.shape[1]
            return total / tokens
        finally:
            for i, forward in saved.items():
                blocks[i].forward = forward

    chosen: set[int] = set()
    history = []
    for _ in range(count):
        candidates = {i: kl_without(chosen | {i}) for i in range(len(blocks)) if i not in chosen}
        best = min(candidates, key=candidates.get)
        history.append([round(candidates.get(i, float("nan")), 6) for i in range(len(blocks))])
        chosen.add(best)
    return sorted(chosen), history


def _pass_through(block: nn.Module):
    """A forward that returns the block's input hidden states in the form the block returns its output."""
    original = type(block).forward

    def forward(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        out = original(block, *args, **kwargs) if _returns_tuple.get(type(block)) is None else None
        if out is not None:
            _returns_tuple[type(block)] = isinstance(out, tuple)
        if _returns_tuple[type(block)]:
            return (hidden,)
        return hidden

    return forward


_returns_tuple: dict[type, bool] = {}
