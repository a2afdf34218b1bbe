"""The work of the ``activations`` and ``kv-cache`` stages on one block."""

from __future__ import annotations

import torch

from lmshrink.core.actquant import cluster_channels, cluster_params, static_params
from lmshrink.core.errors import LmshrinkError
from lmshrink.core.stage import BlockOutcome, Stat
from lmshrink.runtime import kvcache
from lmshrink.runtime.activations import CLUSTER, SCALE, ZERO, install_quantizer


def calibrate_activations(stage, job) -> BlockOutcome:
    """Attach ``stage``'s quantizer to every layer it selects in ``job.block``, group by group in execution order;
    static grids take their range from the group's inputs over the calibration windows (all earlier groups already
    quantized). Returns the stored scales as changed tensors."""
    spec = stage.spec()
    changed: list[str] = []
    for group in job.groups:
        scale = zero = cluster = None
        if not spec.dynamic:
            first = job.block.get_submodule(group[0])
            channels = job.collect(frozenset({Stat.CHANNELS}), {group[0]: first})[group[0]].channels
            if spec.granularity == "cluster":  # RPTQ: channels clustered by their ranges, a grid per cluster
                cluster = cluster_channels(channels.min.cpu(), channels.max.cpu(), spec.clusters)
                scale, zero = cluster_params(channels.min.cpu(), channels.max.cpu(), cluster, spec)
            else:
                scale, zero = static_params(channels.min, channels.max, spec)
        for name in group:
            install_quantizer(job.block.get_submodule(name), spec, scale, zero, cluster)
            if not spec.dynamic:
                changed.append(f"{name}.{SCALE}")
                if not spec.symmetric:
                    changed.append(f"{name}.{ZERO}")
                if cluster is not None:
                    changed.append(f"{name}.{CLUSTER}")
    return BlockOutcome(changed=changed)


def restore_activations(stage, block, groups: list[list[str]], tensors: dict[str, torch.Tensor]) -> None:
    spec = stage.spec()
    for group in groups:
        for name in group:
            scale = tensors.get(f"{name}.{SCALE}")
            zero = tensors.get(f"{name}.{ZERO}")
            if not spec.dynamic and scale is None:
                raise LmshrinkError(f"the saved progress lacks the activation scale of {name}",
                                    fix="run again with --restart to start over")
            install_quantizer(block.get_submodule(name), spec, scale, zero, tensors.get(f"{name}.{CLUSTER}"))


def install_kv(stage, block, groups: list[list[str]]) -> None:
    """Quantize ``block``'s cache when the stage selects its key and value projections."""
    selected = {name.rsplit(".", 1)[-1] for group in groups for name in group}
    attention = getattr(block, "self_attn", None)
    if attention is None or not ({"k_proj", "v_proj"} <= selected or "qkv_proj" in selected):
        return
    kvcache.install(attention, stage.spec())
