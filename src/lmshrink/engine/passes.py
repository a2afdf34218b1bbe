"""Collection passes: run a block over the calibration windows with hooks that gather the statistics stages asked
for (``core.stage.Stat``), and decide which passes can be shared."""

from __future__ import annotations

import time
from collections.abc import Collection

import torch
from torch import nn

from lmshrink.core.stage import Stat
from lmshrink.engine.capture import StopForward, run_block
from lmshrink.engine.replay import PassMemo
from lmshrink.engine.statistics import (
    ChannelAccumulator,
    CrossAccumulator,
    DriftStats,
    GroupStats,
    HessianAccumulator,
    OutputNorm,
    ProjectedCross,
)
from lmshrink.models.adapters import linear_dims
from lmshrink.runtime.activations import weight_input


def to_device(value, device):
    """``value`` (a tensor, or tuples/dicts of them, e.g. a block's captured arguments) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def _group_stats(module: nn.Module, needs: Collection[Stat], device, members: dict[str, nn.Module] | None = None,
                 norms: dict[str, OutputNorm] | None = None) -> GroupStats:
    width = linear_dims(module)[1]
    drift = None
    if Stat.FP_TARGET in needs:
        if members:  # per layer, from the uncompressed layers' outputs
            drift = DriftStats(projected={n: ProjectedCross(linear_dims(m)[0], width, device=device)
                                          for n, m in members.items()})
        elif norms:  # the reference Hessian only as each member's output norm, summed when the copy runs it
            drift = DriftStats(CrossAccumulator(width, device=device), norms=dict(norms))
        else:
            drift = DriftStats(CrossAccumulator(width, device=device), HessianAccumulator(width, device=device))
    return GroupStats(
        hessian_accumulator=HessianAccumulator(width, device=device) if Stat.HESSIAN in needs else None,
        fp_target=drift, channels=ChannelAccumulator(width, device=device) if Stat.CHANNELS in needs else None)


def _weight_output(module: nn.Linear, output: torch.Tensor) -> torch.Tensor:
    """A plain linear's output without its bias: the weight times the input (``plain_linears``)."""
    y = output.detach()
    return y if module.bias is None else y - module.bias


def plain_linears(original: nn.Module, group: list[str]) -> bool:
    """Whether every member of ``group`` in the uncompressed copy ``original`` is a plain ``nn.Linear`` (output =
    weight x input + bias, no input transform or quantizer): its outputs then give ``W X`` exactly."""
    return all(type(m) is nn.Linear and getattr(m, "input_transform", None) is None
               and getattr(m, "input_spec", None) is None for m in (original.get_submodule(n) for n in group))


def projectable(original: nn.Module, groups: list[list[str]]) -> dict[str, list[str]]:
    """The groups (first name -> members) whose ``Stat.FP_TARGET`` is cheaper per layer (``ProjectedCross``) than as
    the group's two matrices, when the pass runs the uncompressed copy ``original`` through them anyway: plain
    linears whose outputs together are narrower than 13/8 of the input (``out * in`` per token against ``in * in``
    for the cross term and about ``5/8 in * in`` for the reference Hessian)."""
    chosen = {}
    for group in groups:
        if not plain_linears(original, group):
            continue
        outputs = sum(original.get_submodule(n).out_features for n in group)
        if 8 * outputs < 13 * original.get_submodule(group[0]).in_features:
            chosen[group[0]] = list(group)
    return chosen


def collect(block: nn.Module, modules: dict[str, nn.Module], needs: Collection[Stat], hidden: list[torch.Tensor],
            args: tuple, kwargs: dict, device, stop_at: str | None, memo: PassMemo | None = None,
            reference: tuple[nn.Module, list[torch.Tensor], PassMemo | None] | None = None,
            finish_reference: bool = False, outputs: list[torch.Tensor] | None = None,
            clock: dict[str, float] | None = None, projected: dict[str, list[str]] | None = None,
            late: dict[str, dict[str, OutputNorm]] | None = None, watch: dict[str, OutputNorm] | None = None
            ) -> dict[str, GroupStats]:
    """Run the windows through ``block`` and gather ``needs`` for each named module's input.

    ``stop_at``: the module after whose input the pass can stop (the rest of the block is not needed).
    ``memo``: reuses the work of earlier passes over the same windows (see ``replay``).
    ``reference``: ``(original block, its input hidden states, its memo or None)``, needed for ``Stat.FP_TARGET``:
    each batch first runs through the unmodified copy of the block on the uncompressed stream (stopping at
    ``stop_at``), keeping the inputs of the same modules, and the pairs are accumulated into ``DriftStats``.
    ``finish_reference``: the copy runs to its end instead of stopping, and each batch's block output replaces its
    input in the reference stream's list (this pass is the last use of those inputs).
    ``outputs``: a list that receives each batch's block output on CPU (the pass must not stop early).
    ``clock``: gets the wall seconds spent accumulating statistics added under ``"statistics"``.
    ``projected``: groups (first name -> members, ``projectable``) whose ``Stat.FP_TARGET`` is accumulated per layer
    from the copy's outputs of those layers (needs ``finish_reference``: the copy runs through them).
    ``late``: groups (first name -> member -> ``OutputNorm``) whose ``Stat.FP_TARGET`` keeps the cross term but
    takes the reference Hessian as those output norms. ``watch``: output norms (layer name -> norm) this pass adds
    the copy's outputs of those layers to, wherever the copy runs through them (the engine keeps or resets each
    after the pass).
    """
    if Stat.FP_TARGET in needs and reference is None:
        raise ValueError("Stat.FP_TARGET needs the reference block and its hidden states")
    projected = projected or {}
    if projected and not finish_reference:
        raise ValueError("per-layer fp_target terms need the copy's outputs of the layers: finish_reference")
    late = late or {}
    stats = {name: _group_stats(module, needs, device,
                                {n: reference[0].get_submodule(n) for n in projected.get(name, [])}, late.get(name))
             for name, module in modules.items()}
    handles = []
    reference_inputs: dict[str, torch.Tensor] = {}
    reference_outputs: dict[str, torch.Tensor] = {}  # projected layers' outputs in the copy (bias removed)
    drift = Stat.FP_TARGET in needs
    if drift:
        original, reference_hidden, reference_memo = reference
        if len(reference_hidden) != len(hidden):
            raise RuntimeError(f"{len(reference_hidden)} reference batches for {len(hidden)} calibration batches")
        for name in modules:
            def keep(_module, args, _name=name):
                reference_inputs[_name] = weight_input(_module, args[0].detach())
                if _name == stop_at and not finish_reference:
                    raise StopForward
            handles.append(original.get_submodule(name).register_forward_pre_hook(keep))
        for member in (m for members in projected.values() for m in members):
            def keep_output(_module, _args, output, _member=member):
                reference_outputs[_member] = _weight_output(_module, output)
            handles.append(original.get_submodule(member).register_forward_hook(keep_output))
        for member, norm in (watch or {}).items():
            def add_output(_module, _args, output, _norm=norm):
                started = time.perf_counter()
                _norm.add_batch(_weight_output(_module, output))
                if clock is not None:
                    clock["statistics"] = clock.get("statistics", 0.0) + time.perf_counter() - started
            handles.append(original.get_submodule(member).register_forward_hook(add_output))
    for name, module in modules.items():
        def hook(_module, args, _name=name):
            started = time.perf_counter()
            x = weight_input(_module, args[0].detach())  # what the weight multiplies (its online transform applied)
            group = stats[_name]
            if group.hessian_accumulator is not None:
                group.hessian_accumulator.add_batch(x)
            if group.channels is not None:
                group.channels.add_batch(x)
            if drift:
                x_fp = reference_inputs.pop(_name)  # the same tokens in the uncompressed model
                if group.fp_target.projected:
                    for member, accumulator in group.fp_target.projected.items():
                        accumulator.add_batch(reference_outputs.pop(member), x_fp, x)
                else:
                    group.fp_target.cross.add_batch(x_fp, x)
                    if group.fp_target.reference is not None:
                        group.fp_target.reference.add_batch(x_fp)
            if clock is not None:
                clock["statistics"] = clock.get("statistics", 0.0) + time.perf_counter() - started
            if _name == stop_at:
                raise StopForward
        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch, h in enumerate(hidden):
                if drift:
                    reference_inputs.clear()
                    reference_outputs.clear()
                    if reference_memo is not None:
                        reference_memo.set_batch(batch)
                    try:
                        out = run_block(original, reference_hidden[batch].to(device), args, kwargs)
                        if finish_reference:
                            reference_hidden[batch] = out.to("cpu")
                    except StopForward:
                        pass
                if memo is not None:
                    memo.set_batch(batch)
                try:
                    out = run_block(block, h.to(device), args, kwargs)
                    if outputs is not None:
                        outputs.append(out.to("cpu"))
                except StopForward:
                    if outputs is not None:
                        raise
    finally:
        for handle in handles:
            handle.remove()
    return stats


def pass_sources(tasks: list, reuse: bool) -> list[str | None]:
    """Where each layer task's statistics come from: "collect" (a collection pass), "shared" (the previous task's
    pass, which covered the same single group: the group's own changes leave its inputs as they were) or None (the
    stage reads none, or it is a block task, which collects its own). Sharing is part of pass reuse (``reuse``); a
    task shares a pass only when that pass collected every statistic it needs."""
    sources: list[str | None] = []
    shared = None  # (groups, statistics) of the last collection pass, while it holds for the next task
    for task in tasks:
        needs = task.needs()
        key = [list(g) for g in task.groups]
        if task.block or not needs:
            sources.append(None)
            shared = None
        elif reuse and shared is not None and shared[0] == key and needs <= shared[1]:
            sources.append("shared")
        else:
            sources.append("collect")
            # only a one-group pass can be shared: with several groups, the later ones' inputs change
            shared = (key, needs) if len(task.groups) == 1 else None
    return sources
