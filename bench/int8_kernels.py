"""Per-layer time of W8A8 Int8Linear's two kernels against a float32 Linear, on SmolLM2-135M's layer shapes.

    python bench/int8_kernels.py --threads 1 --rows 1,4,8,16,32,64,512

For each shape (q+k+v, o, gate+up, down as the fast decoder and transformers call them) and number of rows
(tokens), the median time of: ``F.linear`` in float32; Int8Linear through oneDNN's ``qlinear_pointwise`` (7-bit
weights, exact) with per-token dynamic activations, their quantization included; the same through lmshrink's AVX2
row kernel (``cpu_kernels.i8_linear``), quantization included. Random weights (the timing does not depend on the
values); the two kernels are checked against each other first. Prints the ratios to float32 and the crossover
row count (the smallest count from which oneDNN beats the row kernel), which ``runtime/int8.py`` uses as
``ONEDNN_MIN_ROWS``. First, oneDNN's error against the exact integer product for full-range and 7-bit weights (on
CPUs without VNNI the full range saturates its 16-bit pair sums: why the W8A8 presets use 7-bit weights).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lmshrink.core.actquant import ActSpec
from lmshrink.runtime import cpu_kernels
from lmshrink.runtime.int8 import Int8Linear, _SharedInput, has_vnni

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def saturation(rows: int = 512, k: int = 576, n: int = 1536) -> None:
    """How far oneDNN's qlinear_pointwise is from the exact integer product, for weights of the full int8 range and of
    a 7-bit range, with int8 activations of the full range (unsigned codes + 128), as Int8Linear feeds it."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, k, generator=gen)
    xs = float(2 * x.abs().max() / 255)
    codes = (torch.clamp(torch.round(x / xs), -128, 127) + 128).to(torch.uint8)
    for limit, label in ((127, "full int8 [-127, 127]"), (64, "7-bit [-64, 64]")):
        q = torch.randint(-limit, limit + 1, (n, k), generator=gen, dtype=torch.int8)
        exact = (codes.double() - 128) @ q.double().t()
        got = torch.ops.onednn.qlinear_pointwise(codes, 1.0, 128, torch.ops.onednn.qlinear_prepack(q, None),
                                                 torch.ones(n), torch.zeros(n, dtype=torch.int64), None, 1.0, 0,
                                                 torch.float32, "none", [], "")
        error = float((got.double() - exact).abs().max() / exact.abs().max())
        print(f"oneDNN qlinear_pointwise, weights {label}: max |error| / max |product| = {error:.2e} "
              f"({'exact up to float32 rounding' if error < 1e-6 else 'the 16-bit pair sums saturate'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default="1,4,8,16,32,64,128,512")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_kernels.available():
        raise SystemExit(f"the AVX2 kernel is not available: {cpu_kernels.kernel_status()}")
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, VNNI {'yes' if has_vnni() else 'no'}")
    saturation()
    print(f"median of {args.repeats} calls, milliseconds")
    print("| layer | rows | float32 ms | oneDNN ms (x fp32) | row kernel ms (x fp32) |")
    print("|---|---|---|---|---|")
    crossover = {}
    for name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k, generator=gen) * 0.02
        scale = weight.abs().amax(1) / 63.5
        codes = torch.clamp(torch.round(weight / scale[:, None]), -64, 63).to(torch.int8)
        onednn = Int8Linear.from_codes(codes, scale, None, ActSpec(), onednn_min_rows=1)
        rows_only = Int8Linear.from_codes(codes, scale, None, ActSpec(), onednn_min_rows=1 << 30)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k, generator=gen)
            reference = F.linear(x, weight)
            torch.testing.assert_close(onednn(x), rows_only(x), rtol=1e-4, atol=1e-3)

            def run(layer):
                _SharedInput.clear()  # each call quantizes its input, as the first layer of a group does
                return layer(x)

            fp32 = _median_ms(lambda: F.linear(x, weight), args.repeats)
            one = _median_ms(lambda: run(onednn), args.repeats)
            row = _median_ms(lambda: run(rows_only), args.repeats)
            if one < row and name not in crossover:
                crossover[name] = rows
            del reference
            print(f"| {name} [{n}x{k}] | {rows} | {fp32:.3f} | {one:.3f} ({fp32 / one:.2f}x) | {row:.3f} "
                  f"({fp32 / row:.2f}x) |")
    print("rows from which oneDNN is faster than the row kernel: "
          + ", ".join(f"{name} {rows}" for name, rows in crossover.items()))


if __name__ == "__main__":
    main()
