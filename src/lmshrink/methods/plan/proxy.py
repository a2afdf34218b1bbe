"""The cheap cost of an option on a layer: the layer's output error on the dense model's calibration inputs when
the option's own recipe stages solve it, ``tr((W - W') H (W - W')^T)`` with ``H`` the engine's ``Stat.HESSIAN``
(``2/n X^T X`` of the dense model's inputs): the squared error the option adds to the layer's output, per sample.

The stages run as a plan's recipe runs them (GPTQ with its clip search and act-order; a pruning stage, then the
quantization stage keeping its zeros), with two options off: ``fp_target`` (in a dense pass the layer's inputs are
the uncompressed ones, so there is no drift to aim at) and ``refit_scales`` (it moves a layer's error by about 1%,
not the order of options or layers, and adds to every solve). Any new kind of option whose stages
solve layers gets its proxy this way.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmshrink.core.stage import StageBase, Stat
from lmshrink.models.adapters import linear_weight, set_linear_weight


@dataclass
class _Job:
    """A ``core.stage.LayerJob`` for one layer of the dense model."""

    name: str
    module: nn.Module
    uncompressed: nn.Module | None
    stats: Any
    state: dict[str, Any] = field(default_factory=dict)


def proxy_stages(stages: list[StageBase]) -> list[StageBase]:
    """The stages as the proxy runs them: without ``fp_target`` and ``refit_scales``."""
    off = ("fp_target", "refit_scales")
    return [s.model_copy(update={k: False for k in off if getattr(s, k, False)}) for s in stages]


def needs_of(stages: list[StageBase]) -> frozenset[Stat]:
    needs: set[Stat] = set()
    for stage in stages:
        needs |= stage.needs()
    needs.discard(Stat.FP_TARGET)
    return frozenset(needs | {Stat.HESSIAN})


def output_error(original: torch.Tensor, changed: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - W') H (W - W')^T)``."""
    diff = original.float() - changed.float()
    return float(((diff @ hessian) * diff).sum(dtype=torch.float64))


def option_cost(stages: list[StageBase], name: str, module: nn.Module, stats: Any
                ) -> tuple[float, torch.Tensor, float]:
    """(output error, the layer's new weight, seconds) when ``stages`` (``proxy_stages``) solve ``module`` in turn
    from ``stats`` (the layer's group statistics; the module is not changed)."""
    started = time.perf_counter()
    original = linear_weight(module).detach().float().clone()
    work = copy.deepcopy(module)
    job = _Job(name=name, module=work, uncompressed=None, stats=stats)
    for stage in stages:
        result = stage.solve(job)
        set_linear_weight(work, result.dense().to(original.dtype))
    changed = linear_weight(work).detach().float()
    return output_error(original, changed, stats.hessian.float()), changed, time.perf_counter() - started
