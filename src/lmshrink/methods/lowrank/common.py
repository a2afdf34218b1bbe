"""What the low-rank solves share: the layer's rank from a stage's options, the record of a factorized layer, and
the dense statistics pass over each linear group's first layer."""

from __future__ import annotations

from typing import Any, Callable

import torch

from lmshrink.core.stage import Stat
from lmshrink.methods.lowrank.factorize import check_rank, rank_for_ratio


def layer_rank(stage, name: str, out_features: int, in_features: int) -> int:
    """The rank stage ``stage`` gives layer ``name``: from ``ranks`` (full or block-relative name), else ``rank``,
    else ``ratio``; refused (``check_rank``) when it would not make the layer smaller."""
    rank = None
    for key, value in (stage.ranks or {}).items():
        if name == key or name.endswith("." + key):
            rank = int(value)
            break
    if rank is None:
        rank = stage.rank if stage.rank is not None else rank_for_ratio(out_features, in_features,
                                                                          stage.budget_ratio())
    check_rank(name, out_features, in_features, rank)
    return rank


def dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def relative_weight_error(weight: torch.Tensor, approximation: torch.Tensor) -> float:
    """``||W - W~||_F / ||W||_F``."""
    norm = float(weight.double().norm())
    return float((weight.double() - approximation.double()).norm()) / norm if norm > 0 else 0.0


def group_first_selection(job, selects: Callable[[str], bool]) -> tuple[Callable[[str], bool], dict[str, str]]:
    """For a dense statistics pass on the layers ``selects`` accepts: a selection of the first layer of each linear
    group holding one of them (the members of a group share their input, so its statistics serve them all) and
    ``relative name -> relative name of its group's first layer``."""
    groups = job.adapter.linear_groups(job.blocks[0])
    first_of = {name: group[0] for group in groups for name in group}
    members = {group[0]: group for group in groups}

    def select(full: str) -> bool:
        index, _, relative = full[len(job.prefix) + 1:].partition(".")
        group = members.get(relative)
        return group is not None and any(selects(f"{job.prefix}.{index}.{name}") for name in group)

    return select, first_of


def statistics_needs(whitening: str) -> frozenset[Stat]:
    return frozenset({Stat.HESSIAN, Stat.CHANNELS}) if whitening == "asvd" else frozenset({Stat.HESSIAN})


def low_rank_info(rank: int, out_features: int, in_features: int, **extra: Any) -> dict[str, Any]:
    return {"rank": rank, "dense_params": out_features * in_features,
            "stored_params": rank * (out_features + in_features), **extra}
