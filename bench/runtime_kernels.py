"""Per-layer speed of QuantLinear paths vs a dense fp32 Linear, by number of rows (the kernel_max_rows choice).

For SmolLM2-135M's Linear shapes and a w4g32 / w8 grid: torch's packed kernel path (int4 / int8, bf16 activations),
lmshrink's AVX2 int4 kernel (``int4_avx2``, float32 activations; 4-bit only, where it builds), the same kernel with
activations rounded to int8 per block of 32 (``int4_linear_q8``, FastDecoder's ``activations="int8"``), the
dequantize-per-call path, and a dense fp32 ``F.linear`` on the same weights. A last table compares SmolLM2's
lm_head (49152 x 576) as a dense fp32 ``F.linear`` and as q8_0 blocks (``q8_linear``, FastDecoder's ``head="int8"``). Each timing is the median of
``--repeats`` interleaved repetitions of ``--inner`` calls, in wall-clock time or (``--clock cpu``) the process's
CPU time, which leaves out the time other processes hold the cores on a shared machine. Prints one markdown table;
timings are for this machine and the stated number of threads only.

    python bench/runtime_kernels.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from lmshrink.core.grids import GridSpec
from lmshrink.methods.quant.rtn import rtn_quantize
from lmshrink.runtime import cpu_kernels
from lmshrink.runtime.qlinear import QuantLinear

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # (out, in): q/o, k/v, gate/up, down


def _median_times(calls: dict, repeats: int, inner: int, clock) -> dict[str, float]:
    """Microseconds per call of each of ``calls``: one warm-up call each, then the median of ``repeats`` interleaved
    repetitions of ``inner`` calls."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    with torch.inference_mode():
        for f in calls.values():
            f()
        for _ in range(repeats):
            for key, f in calls.items():
                start = clock()
                for _ in range(inner):
                    f()
                times[key].append((clock() - start) / inner * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default="1,2,4,8,16,64,256")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8))
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                        help="wall: time.perf_counter; cpu: time.process_time (CPU time of all threads)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = GridSpec(bits=4, group_size=32) if args.bits == 4 else GridSpec(bits=8, group_size=-1, symmetric=True)
    rows_list = [int(r) for r in args.rows.split(",")]
    print(f"threads {args.threads}, cpu capability {torch.backends.cpu.get_cpu_capability()}, torch "
          f"{torch.__version__}, load average {os.getloadavg()[0]:.2f} at start, grid {spec.bits}-bit group "
          f"{spec.group_size}; median of {args.repeats} interleaved repeats of {args.inner} calls, microseconds of "
          f"{'wall-clock' if args.clock == 'wall' else 'process CPU'} time")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    avx2 = args.bits == 4 and cpu_kernels.available()
    print(f"AVX2 int4 kernel: {cpu_kernels.kernel_status()}")
    # the first five timing columns call modules (QuantLinear / F.linear), so their ratios include the same Python
    # dispatch; "avx2 kernel call" and "avx2 int8 activations" call the two kernels directly, and their ratio is
    # kernel against kernel
    print("| out x in | rows | torch kernel | avx2 kernel | dequantize + matmul | dense fp32 | avx2 kernel call "
          "| avx2 int8 activations call | torch / dense | avx2 / dense | avx2 / torch | int8 act. / exact (calls) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for out_features, in_features in SHAPES:
        result = rtn_quantize(torch.randn(out_features, in_features, generator=generator) * 0.05, spec)
        previous = os.environ.get(cpu_kernels.ENV_VAR)
        os.environ[cpu_kernels.ENV_VAR] = "0"  # torch's kernel for this one
        try:
            kernel = QuantLinear.from_result(result, kernel_max_rows=1 << 30)
        finally:
            if previous is None:
                del os.environ[cpu_kernels.ENV_VAR]
            else:
                os.environ[cpu_kernels.ENV_VAR] = previous
        own = QuantLinear.from_result(result, kernel_max_rows=1 << 30) if avx2 else None
        assert own is None or own.kind == "int4_avx2", own
        dequant = QuantLinear.from_result(result, kernel_max_rows=0)
        dense = result.weight.clone()
        for rows in rows_list:
            x = torch.randn(rows, in_features, generator=generator)
            calls = {"kernel": lambda: kernel(x), "dequant": lambda: dequant(x), "dense": lambda: F.linear(x, dense)}
            if own is not None:
                calls["avx2"] = lambda: own(x)
                calls["exact"] = lambda: cpu_kernels.int4_linear(x, own.packed, own.group_scale, own.group_zero, None,
                                                                 own._groups, own._blocks_per_group)
                calls["q8"] = lambda: cpu_kernels.int4_linear_q8(x, own.packed, own.group_scale, own.group_zero, None,
                                                                 own._groups, own._blocks_per_group)
            med = _median_times(calls, args.repeats, args.inner, clock)
            if own is not None:
                own_cols = (f"{med['avx2']:.0f}", f"{med['exact']:.0f}", f"{med['q8']:.0f}",
                            f"{med['avx2'] / med['dense']:.2f}", f"{med['avx2'] / med['kernel']:.2f}",
                            f"{med['q8'] / med['exact']:.2f}")
            else:
                own_cols = ("-",) * 6
            print(f"| {out_features} x {in_features} | {rows} | {med['kernel']:.0f} | {own_cols[0]} | "
                  f"{med['dequant']:.0f} | {med['dense']:.0f} | {own_cols[1]} | {own_cols[2]} | "
                  f"{med['kernel'] / med['dense']:.2f} | {own_cols[3]} | {own_cols[4]} | {own_cols[5]} |", flush=True)
    if avx2:
        head = torch.randn(49152, 576, generator=generator) * 0.05
        codes, scales = cpu_kernels.quantize_q8_rows(head)
        x = torch.randn(1, 576, generator=generator)
        calls = {"dense": lambda: F.linear(x, head), "q8": lambda: cpu_kernels.q8_linear(x, codes, scales)}
        med = _median_times(calls, args.repeats, max(1, args.inner // 5), clock)
        print("\n| lm_head 49152 x 576, 1 row | dense fp32 | q8_0 (q8_linear) | q8_0 / dense |\n|---|---|---|---|")
        print(f"| | {med['dense']:.0f} | {med['q8']:.0f} | {med['q8'] / med['dense']:.2f} |")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
