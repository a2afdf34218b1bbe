"""Per-layer quantization error of RTN vs GPTQ variants on real SmolLM2-135M layers.

Protocol: calibration = 16 windows x 512 tokens drawn (seed 0) from ../shared/data/c4 (documents joined with
"\n\n"); held-out = 8 further windows from the same text, disjoint from the calibration ones. The Hessians
``X^T X`` of the chosen layers' inputs come from the unmodified model. The table gives the relative output error
``||(W-Q)X||^2 / ||WX||^2`` on calibration and held-out inputs, and the solve time.

    python bench/layer_error.py [--block 5] [--layers self_attn.q_proj mlp.down_proj] [--windows 16]
    python bench/layer_error.py --variants refit --layers self_attn.q_proj self_attn.o_proj mlp.up_proj mlp.down_proj
    python bench/layer_error.py --variants joint --layers self_attn.q_proj self_attn.o_proj mlp.up_proj mlp.down_proj

``--variants descent``: GPTQ (act-order + static groups), then 1/2/4/8 coordinate-descent passes over its codes.
``--variants joint``: SparseGPT 50% alone, joint 50% + quantization (one sweep: groups fitted as the sweep reaches
them on the kept weights, static groups fitted on the original weights, or act-order column order),
the SparseGPT mask then act-order GPTQ keeping it (same Hessian), and GPTQ alone, each grid with group 128.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from lmshrink.methods.prune import gptq_keep_mask, sparsegpt_prune
from lmshrink.methods.quant import gptq_quantize, rtn_quantize
from lmshrink.methods.quant.refine import coordinate_descent
from lmshrink.methods.quant.refit import refit_scales
from lmshrink.methods.solver import HessianAccumulator, output_error
from lmshrink.quant import GridSpec

REPO = Path(__file__).resolve().parents[1]
C4 = REPO.parent / "shared" / "data" / "c4" / "c4-train-00000-first500.jsonl"


def _windows(tokenizer, count: int, seqlen: int, seed: int) -> torch.Tensor:
    text = "\n\n".join(json.loads(line)["text"] for line in C4.read_text().splitlines())
    ids = torch.tensor(tokenizer(text)["input_ids"])
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randperm(len(ids) // seqlen, generator=gen)[:count] * seqlen
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])


def _hessians(model, names, windows):
    modules = dict(model.named_modules())
    accs = {n: HessianAccumulator(modules[n].in_features) for n in names}
    hooks = [modules[n].register_forward_pre_hook(lambda m, args, n=n: accs[n].add_batch(args[0].detach()))
             for n in names]
    with torch.no_grad():
        for row in windows:
            model(row[None])
    for h in hooks:
        h.remove()
    return {n: a.hessian for n, a in accs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--layers", nargs="+", default=["self_attn.q_proj", "mlp.down_proj"])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--heldout", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--variants", choices=["methods", "options", "refit", "joint", "descent"], default="methods",
                        help="methods: RTN vs GPTQ variants; options: clip weighting and damping of act-order+static; "
                             "refit: least-squares scales after the sweep; joint: SparseGPT 50%% with quantization; "
                             "descent: coordinate-descent passes over the codes after the sweep")
    parser.add_argument("--cache", type=Path, default=None, help="reuse/store the Hessians in this .pt file")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    from lmshrink.models import load_model
    loaded = load_model("smollm2-135m")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    all_windows = _windows(tokenizer, args.windows + args.heldout, args.seqlen, seed=0)
    names = [f"model.layers.{args.block}.{layer}" for layer in args.layers]
    started = time.perf_counter()
    key = [args.block, args.layers, args.windows, args.heldout, args.seqlen]
    key.append(hashlib.sha256(all_windows.numpy().tobytes()).hexdigest()[:16])  # the tokens, hence model and text
    cached = torch.load(args.cache, weights_only=True) if args.cache and args.cache.exists() else None
    if cached is not None and cached["key"] == key:
        calib, heldout = cached["calib"], cached["heldout"]
        print(f"hessians from {args.windows}+{args.heldout} windows x {args.seqlen} tokens loaded from the cache "
              f"{args.cache} (computed by an earlier run, of the same windows)")
    else:
        calib = _hessians(model, names, all_windows[: args.windows])
        heldout = _hessians(model, names, all_windows[args.windows:])
        if args.cache:
            torch.save({"key": key, "calib": calib, "heldout": heldout}, args.cache)
        print(f"hessians from {args.windows}+{args.heldout} windows x {args.seqlen} tokens in "
              f"{time.perf_counter() - started:.0f} s")

    methods = [
        ("rtn", lambda w, h, s: rtn_quantize(w, s, h, clip_weighted=False)),
        ("gptq plain", lambda w, h, s: gptq_quantize(w, h, s, act_order=False, static_groups=False)),
        ("gptq act-order", lambda w, h, s: gptq_quantize(w, h, s, act_order=True, static_groups=False)),
        ("gptq act-order+static", lambda w, h, s: gptq_quantize(w, h, s, act_order=True, static_groups=True)),
        ("gptq act+static fp64-chol", lambda w, h, s: gptq_quantize(w, h, s, cholesky_dtype=torch.float64)),
        ("gptq act+static damp 0.1%", lambda w, h, s: gptq_quantize(w, h, s, damp_percent=0.001)),
    ]
    options = [
        ("gptq act+static damp 1%", lambda w, h, s: gptq_quantize(w, h, s, clip_weighted=False)),
        ("gptq act+static damp 1% clip-weighted", lambda w, h, s: gptq_quantize(w, h, s, clip_weighted=True)),
        ("gptq act+static damp 5%", lambda w, h, s: gptq_quantize(w, h, s, damp_percent=0.05, clip_weighted=False)),
        ("gptq act+static damp 10%", lambda w, h, s: gptq_quantize(w, h, s, damp_percent=0.1, clip_weighted=False)),
        ("rtn", lambda w, h, s: rtn_quantize(w, s, h, clip_weighted=False)),
        ("rtn clip-weighted", lambda w, h, s: rtn_quantize(w, s, h, clip_weighted=True)),
    ]
    def refitted(w, h, s):
        result = gptq_quantize(w, h, s)
        refit_scales(result, w, h)
        return result

    refit = [
        ("gptq act+static", lambda w, h, s: gptq_quantize(w, h, s)),
        ("gptq act+static + refit scales", refitted),
    ]
    def mask_then_gptq(w, h, s):
        pruned = sparsegpt_prune(w, h, 0.5)
        return gptq_keep_mask(pruned.weight, h, pruned.mask, s, act_order=True)

    joint = [
        ("sparsegpt 50% alone (no grid)", lambda w, h, s: sparsegpt_prune(w, h, 0.5)),
        ("joint 50% + grid (groups fitted on kept weights)", lambda w, h, s: sparsegpt_prune(w, h, 0.5, spec=s)),
        ("joint 50% + grid, static groups (reference)",
         lambda w, h, s: sparsegpt_prune(w, h, 0.5, spec=s, static_groups=True)),
        ("joint 50% + grid, act-order", lambda w, h, s: sparsegpt_prune(w, h, 0.5, spec=s, act_order=True)),
        ("sparsegpt mask, then act-order gptq", mask_then_gptq),
        ("gptq act+static alone", lambda w, h, s: gptq_quantize(w, h, s)),
    ]
    def descended(passes):
        def run(w, h, s):
            result = gptq_quantize(w, h, s)
            coordinate_descent(result, w, h, passes)
            return result
        return run

    descent = [("gptq act+static", lambda w, h, s: gptq_quantize(w, h, s))]
    descent += [(f"gptq act+static + {n} descent passes", descended(n)) for n in (1, 2, 4, 8)]
    variants = {"methods": methods, "options": options, "refit": refit, "joint": joint,
                "descent": descent}[args.variants]
    modules = dict(model.named_modules())
    print("| layer | grid | variant | rel err calib | rel err held-out | seconds |")
    print("|---|---|---|---|---|---|")
    for name in names:
        weight = modules[name].weight.detach().float()
        for bits in (4, 3):
            for clip in (False, True):
                spec = GridSpec(bits=bits, group_size=128, clip_search=clip)
                grid = f"w{bits}g128" + (" mse-clip" if clip else "")
                for label, fn in variants:
                    t0 = time.perf_counter()
                    result = fn(weight, calib[name], spec)
                    seconds = time.perf_counter() - t0
                    held = output_error(weight, result.weight, heldout[name])
                    calib_error = output_error(weight, result.weight, calib[name])  # against the original weight
                    print(f"| {name.split('layers.')[1]} | {grid} | {label} | {calib_error:.5f} | "
                          f"{held:.5f} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
