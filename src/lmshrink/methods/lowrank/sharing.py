"""Basis Sharing (Wang et al. 2024) before the block loop: the shared bases of every group of adjacent layers.

A dense statistics pass runs the calibration windows through the uncompressed model and collects the input
Hessian of each selected layer type in every block. The layers of one type (e.g. every ``self_attn.q_proj``) are
grouped by ``layers_per_basis`` adjacent blocks; as soon as a group's blocks have been seen, its weights are stacked,
whitened with the Cholesky factor of the summed Hessians and truncated by one SVD (``factorize.shared_basis``), so
only the factors of finished groups and the Hessians of the groups in progress are held. The factors of every
selected layer stay in CPU memory until the block loop reaches it (a basis needs the weights of all its blocks at
once, which a streamed loop never holds): about the size of those layers once compressed.
"""

from __future__ import annotations

from typing import Any

import torch

from lmshrink.core.errors import LmshrinkError
from lmshrink.core.stage import Stat
from lmshrink.methods.lowrank.common import group_first_selection
from lmshrink.methods.lowrank.factorize import check_rank, shared_basis
from lmshrink.methods.solver import output_error
from lmshrink.models.adapters import linear_weight


def group_rank(ratio: float, layers: int, out_features: int, in_features: int) -> int:
    """The rank of a basis shared by ``layers`` layers of ``out x in`` that keeps ``1 - ratio`` of their
    parameters: ``floor((1 - ratio) n m k / (k + n m))``, at least 1."""
    dense = layers * out_features * in_features
    return max(1, int((1.0 - ratio) * dense / (in_features + layers * out_features) + 1e-9))


def compute_shared_bases(stage, job, number: int) -> dict[str, dict[str, Any]]:
    """``full layer name -> {left, right, basis, owner, info}`` for every layer the stage selects."""
    blocks = len(job.blocks)
    names = [name for group in job.adapter.linear_groups(job.blocks[0]) for name in group]
    members: dict[str, list[int]] = {}  # layer type -> the blocks where the stage selects it
    for name in names:
        chosen = [index for index in range(blocks) if stage.selects(f"{job.prefix}.{index}.{name}")]
        if chosen:
            members[name] = chosen
    if not members:
        raise LmshrinkError(f"basis-sharing stage {number + 1} selects no layer", fix="check its targets")
    chunks: dict[tuple[str, int], list[int]] = {}  # (type, block) -> the blocks of its group
    for name, chosen in members.items():
        for start in range(0, len(chosen), stage.layers_per_basis):
            group = chosen[start:start + stage.layers_per_basis]
            for index in group:
                chunks[(name, index)] = group
    select, first_of = group_first_selection(job, stage.selects)
    pending: dict[tuple[str, int], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    factors: dict[str, dict[str, Any]] = {}
    ranks: dict[str, list[int]] = {}

    def finish(name: str, seen: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        indices = [index for index, _, _ in seen]
        weights = [weight for _, weight, _ in seen]
        out_features, in_features = weights[0].shape
        if any(tuple(w.shape) != (out_features, in_features) for w in weights):
            raise LmshrinkError(f"basis-sharing: the {name} layers of blocks {indices} differ in shape",
                                fix="share bases only between layers of one shape (targets)")
        rank = group_rank(stage.ratio, len(weights), out_features, in_features)
        key = f"{name}@{indices[0]}-{indices[-1]}"
        check_rank(f"{job.prefix}.{indices[0]}.{name} (basis {key})", out_features, in_features, rank,
                   shared_by=len(weights))
        total = torch.zeros_like(seen[0][2], dtype=torch.float64)
        for _, _, hessian in seen:
            total += hessian.double()
        lefts, right, info = shared_basis(weights, total, rank)
        ranks.setdefault(name, []).append(rank)
        right_cpu = right.cpu()  # held until the block loop reaches each layer: off the compute device
        for position, (index, weight, hessian) in enumerate(seen):
            error = output_error(weight, lefts[position] @ right, hessian)
            factors[f"{job.prefix}.{index}.{name}"] = {
                "left": lefts[position].cpu(), "right": right_cpu, "basis": key, "owner": position == 0,
                "info": {**info, "layers_per_basis": len(weights), "rel_output_error_dense_inputs": error}}

    def observe(index, block, stats):
        for name in names:
            group = chunks.get((name, index))
            if group is None:
                continue
            weight = linear_weight(block.get_submodule(name)).detach().float().clone()
            seen = pending.setdefault((name, group[0]), [])
            seen.append((index, weight, stats[first_of[name]].hessian))
            if len(seen) == len(group):
                finish(name, pending.pop((name, group[0])))
        return None

    job.statistics_pass(frozenset({Stat.HESSIAN}), select, observe)
    if pending:
        raise LmshrinkError(f"basis-sharing: the statistics pass left groups unfinished: {sorted(pending)}",
                            fix="report this: every selected block should have been seen")
    job.log(f"basis-sharing stage {number + 1}: " + "; ".join(
        f"{name} ranks {sorted(set(values))} over {len(values)} bases" for name, values in ranks.items()))
    return factors
