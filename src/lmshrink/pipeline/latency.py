"""The per-layer, per-option kernel timing table a latency budget is planned with (``lmshrink bench MODEL
--layer-table OUT``): for every distinct linear shape of the model's blocks and every option, the time of one
decode-step call (one row) of the layer as the packed runtime runs it (``runtime.QuantLinear``: the AVX2 int4
kernel, torch's int4/int8 kernels or dequantize, whichever it picks for the grid; dense options as ``F.linear`` in
the model's dtype), and the dense model's decode time per token measured by ``lmshrink bench``. What is not a
planned linear layer (attention, norms, embeddings, the head) is the difference, ``fixed_seconds``; a plan's
predicted time per token is that plus its layers' times."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F

from lmshrink.core.grids import GridSpec
from lmshrink.core.process import environment
from lmshrink.core.results import QuantResult
from lmshrink.core.stage import StageBase
from lmshrink.formats.loading import load_model
from lmshrink.methods.plan.options import Option, parse_options
from lmshrink.models.adapters import iter_linears, linear_dims
from lmshrink.runtime.qlinear import QuantLinear


def _random_layer(option: Option, out_features: int, in_features: int, dtype: torch.dtype):
    """A callable ``x -> y`` running a random layer stored as ``option`` (None: the option cannot be timed)."""
    scheme = option.scheme()
    generator = torch.Generator().manual_seed(out_features * 7 + in_features)
    if scheme is None:  # dense (pruned layers are stored and run dense)
        weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
        return lambda x: F.linear(x, weight)
    bits, group_size, symmetric = scheme
    spec = GridSpec(bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype="float16")
    groups = spec.num_groups(in_features)
    codes = torch.randint(0, 1 << bits, (out_features, in_features), generator=generator, dtype=torch.uint8)
    scale = (torch.rand(out_features, groups, generator=generator) * 0.01 + 1e-3).half().float()
    zero = (torch.full((out_features, groups), 1 << (bits - 1), dtype=torch.uint8) if symmetric else
            torch.randint(0, 1 << bits, (out_features, groups), generator=generator, dtype=torch.uint8))
    result = QuantResult(codes=codes, scale=scale, zero=zero, g_idx=None, weight=torch.empty(0), spec=spec)
    module = QuantLinear.from_result(result).eval()
    return module


def _median_seconds(calls: dict[str, Any], x: torch.Tensor, repeats: int, inner: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in calls}
    with torch.inference_mode():
        for call in calls.values():
            call(x)
        for _ in range(repeats):  # interleaved, so a slow moment of the machine hits every option alike
            for key, call in calls.items():
                started = time.perf_counter()
                for _ in range(inner):
                    call(x)
                times[key].append((time.perf_counter() - started) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def layer_table(model: str, options: str | list[str], *, threads: int = 1, repeats: int = 7, inner: int = 20,
                bench_trials: int = 3, decode: str = "hf", progress: bool = True) -> dict[str, Any]:
    """The timing table of ``model``'s block linears for ``options`` (see the module doc), with ``threads``."""
    from lmshrink.eval.bench import bench

    torch.set_num_threads(threads)
    option_list = parse_options(options)
    loaded = load_model(model, progress=progress)
    selector = StageBase(method="select")
    shapes = Counter(linear_dims(m) for n, m in iter_linears(loaded.model) if selector.selects(n))
    dtype = loaded.model.dtype
    seconds: dict[str, dict[str, float]] = {}
    for (out_features, in_features) in sorted(shapes):
        x = torch.randn(1, in_features).to(dtype)
        calls = {o.key: _random_layer(o, out_features, in_features, dtype) for o in option_list
                 if o.applies(out_features, in_features)}
        calls.setdefault("dense", _random_layer(parse_options("dense")[0], out_features, in_features, dtype))
        seconds[f"{out_features}x{in_features}"] = _median_seconds(calls, x, repeats, inner)
    del loaded
    measured = bench([model], trials=bench_trials, threads=threads, decode=decode, progress=progress)
    row = measured["models"][0]
    dense_seconds = 1.0 / row["decode_tokens_per_s"]
    linear_dense = sum(count * seconds[f"{o}x{i}"]["dense"] for (o, i), count in shapes.items())
    return {"model": model, "options": [o.key for o in option_list], "threads": threads,
            "shapes": {f"{o}x{i}": count for (o, i), count in shapes.items()}, "seconds": seconds,
            "dense_seconds": dense_seconds, "dense_linear_seconds": linear_dense,
            "fixed_seconds": dense_seconds - linear_dense,
            "protocol": {"calls": "one row (a decode step), median of interleaved repeats", "repeats": repeats,
                         "inner": inner, "decode": decode, "bench_trials": bench_trials,
                         "bench_protocol": measured["protocol"]},
            "environment": environment()}
