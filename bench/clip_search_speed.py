"""Clip search cost: the current ``_clip_error`` (``|e|^p`` as ``exp(p log|e|)``) against the earlier ``pow_`` form,
on every decoder linear of SmolLM2-135M (w4g128, float16 scales, a positive per-column weighting as the Hessian
diagonal gives), timed side by side in one run (old then new, per layer); also counts the group grids whose scale or
zero point differ between the two.

    OMP_NUM_THREADS=1 python bench/clip_search_speed.py
"""

from __future__ import annotations

import os
import time

import lmshrink.core.grids as grids
import torch

from lmshrink.core.grids import GridSpec
from lmshrink.formats.loading import load_model


def _pow_error(w, scale, zero, maxq, norm, col_weights):
    """The form ``_clip_error`` had before: the same computation with ``pow_``."""
    buf = w / scale[:, None]
    buf.round_().add_(zero[:, None]).clamp_(0, maxq).sub_(zero[:, None]).mul_(scale[:, None]).sub_(w).abs_()
    if norm == 2.0:
        buf.square_()
    else:
        buf.pow_(norm)
    if col_weights is not None:
        buf.mul_(col_weights)
    return buf.sum(dim=1)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = load_model("smollm2-135m").model
    current = grids._clip_error
    spec = GridSpec(bits=4, group_size=128, clip_search=True, scale_dtype="float16")
    seconds = {"pow_": 0.0, "exp-log": 0.0}
    layers = different_scales = different_zeros = total = 0
    try:
        for name, module in model.named_modules():
            if not (isinstance(module, torch.nn.Linear) and "layers." in name):
                continue
            w = module.weight.detach().float()
            weights = w.abs().mean(0) + 0.1
            fitted = {}
            for label, error in (("pow_", _pow_error), ("exp-log", current)):
                grids._clip_error = error
                started = time.perf_counter()
                fitted[label] = grids.fit_groups_float(w, spec, weights)
                seconds[label] += time.perf_counter() - started
            layers += 1
            different_scales += int((fitted["pow_"][0] != fitted["exp-log"][0]).sum())
            different_zeros += int((fitted["pow_"][1] != fitted["exp-log"][1]).sum())
            total += fitted["pow_"][0].numel()
    finally:
        grids._clip_error = current
    print(f"{total} group grids of {layers} layers, {torch.get_num_threads()} thread(s): pow_ {seconds['pow_']:.1f} s, "
          f"exp-log {seconds['exp-log']:.1f} s (ratio {seconds['exp-log'] / seconds['pow_']:.2f}); "
          f"different scales {different_scales}, different zero points {different_zeros}")


if __name__ == "__main__":
    main()
