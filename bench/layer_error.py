"""Per-layer error of RTN vs GPTQ variants (and of pruning with and without the refit) on real SmolLM2-135M layers.

Protocol: calibration = 16 windows x 512 tokens drawn (seed 0) from ../shared/data/c4 (documents joined with
"\n\n"); held-out = 8 further windows from the same text, disjoint from the calibration ones. The Hessians
``X^T X`` of the chosen layers' inputs come from the unmodified model. The table gives the relative output error
``||(W-Q)X||^2 / ||WX||^2`` on calibration and held-out inputs, and the solve time.

    python bench/layer_error.py [--block 5] [--layers self_attn.q_proj mlp.down_proj] [--windows 16]
    python bench/layer_error.py --variants refit --layers self_attn.q_proj self_attn.o_proj mlp.up_proj mlp.down_proj
    python bench/layer_error.py --variants joint --layers self_attn.q_proj self_attn.o_proj mlp.up_proj mlp.down_proj
    python bench/layer_error.py --variants prune-refit --block 12 --windows 64 --layers self_attn.q_proj \
        self_attn.v_proj self_attn.o_proj mlp.up_proj mlp.down_proj

``--variants descent``: GPTQ (act-order + static groups), then 1/2/4/8 coordinate-descent passes over its codes.
``--variants prune-refit``: SparseGPT and Wanda 50% alone and with the least-squares refit of their kept weights
(5/10/20 conjugate-gradient steps), against the refit's fixed point solved directly per row in float64 (no grid).
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
from types import SimpleNamespace

import torch

from lmshrink.core.grids import GridSpec
from lmshrink.engine.statistics import HessianAccumulator
from lmshrink.methods.prune.refit import damped_hessian, refit_kept_weights
from lmshrink.methods.prune.sparsegpt import sparsegpt_prune
from lmshrink.methods.quant.gptq import gptq_keep_mask
from lmshrink.methods.prune.wanda import wanda_prune
from lmshrink.methods.quant.gptq import gptq_quantize
from lmshrink.methods.quant.refine import coordinate_descent
from lmshrink.methods.quant.refit import refit_scales
from lmshrink.methods.quant.rtn import rtn_quantize
from lmshrink.methods.solver import output_error

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
    parser.add_argument("--variants", choices=["methods", "options", "refit", "joint", "descent", "prune-refit"],
                        default="methods",
                        help="methods: RTN vs GPTQ variants; options: clip weighting and damping of act-order+static; "
                             "refit: least-squares scales after the sweep; joint: SparseGPT 50%% with quantization; "
                             "descent: coordinate-descent passes over the codes after the sweep; prune-refit: "
                             "least-squares refit of the kept weights after SparseGPT / Wanda 50%%")
    parser.add_argument("--cache", type=Path, default=None, help="reuse/store the Hessians in this .pt file")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    from lmshrink.formats.loading import load_model
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

    def refit_after(prune, steps):
        def run(w, h, s):
            pruned = prune(w, h)
            return SimpleNamespace(weight=refit_kept_weights(w, pruned.weight, pruned.mask, h, steps)[0])
        return run

    def per_row_solution(w, h, s):
        """The refit's fixed point: per row, H_KK q_K = (H w)_K solved directly in float64 (same damping)."""
        mask = sparsegpt_prune(w, h, 0.5).mask
        damped = damped_hessian(h, 0.01)[0].double()
        target = w.double() @ damped
        out = torch.zeros_like(w, dtype=torch.float64)
        for row in range(w.shape[0]):
            keep = ~mask[row]
            out[row, keep] = torch.linalg.solve(damped[keep][:, keep], target[row, keep])
        return SimpleNamespace(weight=out.float())

    def sparsegpt50(w, h):
        return sparsegpt_prune(w, h, 0.5)

    def wanda50(w, h):
        return wanda_prune(w, h, 0.5)

    prune_refit = [("sparsegpt 50%", lambda w, h, s: sparsegpt50(w, h))]
    prune_refit += [(f"sparsegpt 50% + refit {n} steps", refit_after(sparsegpt50, n)) for n in (5, 10, 20)]
    prune_refit += [("sparsegpt 50% mask, per-row solution (float64)", per_row_solution),
                    ("wanda 50%", lambda w, h, s: wanda50(w, h)),
                    ("wanda 50% + refit 20 steps", refit_after(wanda50, 20))]
    descent = [("gptq act+static", lambda w, h, s: gptq_quantize(w, h, s))]
    descent += [(f"gptq act+static + {n} descent passes", descended(n)) for n in (1, 2, 4, 8)]
    variants = {"methods": methods, "options": options, "refit": refit, "joint": joint,
                "descent": descent, "prune-refit": prune_refit}[args.variants]
    # pruning without quantization has no grid: one row per variant
    grids = [(None, "-")] if args.variants == "prune-refit" else [
        (GridSpec(bits=bits, group_size=128, clip_search=clip), f"w{bits}g128" + (" mse-clip" if clip else ""))
        for bits in (4, 3) for clip in (False, True)]
    modules = dict(model.named_modules())
    print("| layer | grid | variant | rel err calib | rel err held-out | seconds |")
    print("|---|---|---|---|---|---|")
    for name in names:
        weight = modules[name].weight.detach().float()
        for spec, grid in grids:
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
