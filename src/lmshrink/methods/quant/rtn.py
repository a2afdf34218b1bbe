"""Round-to-nearest weight quantization (no calibration data needed)."""

from __future__ import annotations

import torch

from lmshrink.core.grids import GridSpec, dequantize, fit_groups, group_index, quantize
from lmshrink.core.results import QuantResult
from lmshrink.methods.solver import output_error


def rtn_quantize(weight: torch.Tensor, spec: GridSpec, hessian: torch.Tensor | None = None,
                 clip_weighted: bool = True) -> QuantResult:
    """Round each weight (``[out, in]``) to the nearest point of the grid fitted to its group.

    With ``spec.clip_search`` the range is shrunk per group to minimise the ``clip_norm`` error (weighted by the
    Hessian diagonal when ``clip_weighted`` and ``hessian`` is given). ``hessian`` (``X^T X``, ``[in, in]``), when
    given, yields ``rel_output_error``. Groups are contiguous, so ``g_idx`` is None.
    """
    weight = weight.float()
    weights = None
    if hessian is not None and spec.clip_search and clip_weighted:
        weights = hessian.diagonal().to(weight.device).float()
    scale, zero = fit_groups(weight, spec, weights)
    g_idx = group_index(weight.shape[1], spec.group_width(weight.shape[1]), weight.device)
    codes = quantize(weight, scale, zero, spec.maxq, g_idx)
    dequantized = dequantize(codes, scale, zero, g_idx)
    rel = None if hessian is None else output_error(weight, dequantized, hessian.to(weight.device).float())
    return QuantResult(codes=codes, scale=scale, zero=zero, g_idx=None, weight=dequantized, spec=spec,
                       rel_output_error=rel, info={"method": "rtn"})
