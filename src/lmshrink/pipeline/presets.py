"""The recipe presets: a name, a one-line summary and the stages (as a recipe file would hold them). Presets named
after a published method run it as published; the evidence behind each other choice is in docs/decisions.md."""

from __future__ import annotations


def _quant(method: str, bits: int, group_size: int, symmetric: bool = False, **kw) -> dict:
    return {"method": method, "bits": bits, "group_size": group_size, "symmetric": symmetric, **kw}


def _awq(bits: int, **kw) -> dict:
    return {"method": "awq", "bits": bits, "group_size": 128, "symmetric": False, **kw}


def _preset(summary: str, *stages: dict) -> dict:
    return {"summary": summary, "stages": list(stages)}


# FFN widths in multiples of 32: llama.cpp's quantized blocks and GPTQ groups of 32 fit them (docs/decisions.md)
_WIDTH = {"method": "prune-width", "importance": "fluctuation", "repair": "lstsq", "widths": "uniform",
          "multiple": 32}
# the P1 recovery settings of docs/recovery.md, with a one-hour budget
_RECOVER_HOUR = {"method": "recover", "max_seconds": 3600, "steps": 100000, "eval_every": 10, "patience": 4,
                 "seqlen": 256, "batch": 4, "lr": 5e-4, "gradient_checkpointing": False}

PRESETS: dict[str, dict] = {
    "w8": _preset("GPTQ 8-bit, per channel, symmetric", _quant("gptq", 8, -1, symmetric=True)),
    # fp_target and refit_scales: each measured better at 4 and 3 bits, for about twice the engine time
    "w4g128": _preset("GPTQ 4-bit, groups of 128, fp_target + least-squares scales (best 4-bit)",
                      _quant("gptq", 4, 128, fp_target=True, refit_scales=True)),
    "w4g32": _preset("GPTQ 4-bit, groups of 32", _quant("gptq", 4, 32)),
    "w4g32-sym": _preset("GPTQ 4-bit, groups of 32, symmetric (maps to GGUF Q4_0)",
                         _quant("gptq", 4, 32, symmetric=True)),
    "w3g128": _preset("GPTQ 3-bit, groups of 128, fp_target + least-squares scales",
                      _quant("gptq", 3, 128, fp_target=True, refit_scales=True)),
    "w2g64": _preset("GPTQ 2-bit, groups of 64", _quant("gptq", 2, 64)),
    "rtn-w8": _preset("round to nearest 8-bit, per channel, symmetric", _quant("rtn", 8, -1, symmetric=True)),
    "rtn-w4g128": _preset("round to nearest 4-bit, groups of 128", _quant("rtn", 4, 128)),
    "rtn-w4g32": _preset("round to nearest 4-bit, groups of 32 (maps to GGUF Q4_1)", _quant("rtn", 4, 32)),
    "rtn-w3g128": _preset("round to nearest 3-bit, groups of 128", _quant("rtn", 3, 128)),
    # AWQ as published: its scales and clipping, then round to nearest on the full range of each group
    "awq-w4g128": _preset("AWQ 4-bit g128 as published: activation-aware scales + clipping, then round to nearest",
                          _awq(4), _quant("rtn", 4, 128, clip_search=False)),
    "awq-w3g128": _preset("AWQ 3-bit g128 as published: activation-aware scales + clipping, then round to nearest",
                          _awq(3), _quant("rtn", 3, 128, clip_search=False)),
    # GPTQ's own sweep, clip search and scale refit replace AWQ's clipping
    "awq-gptq-w4g128": _preset("AWQ scales, then the w4g128 GPTQ stage",
                               _awq(4, clip=False), _quant("gptq", 4, 128, fp_target=True, refit_scales=True)),
    "awq-gptq-w3g128": _preset("AWQ scales, then the w3g128 GPTQ stage",
                               _awq(3, clip=False), _quant("gptq", 3, 128, fp_target=True, refit_scales=True)),
    "owq-w3": _preset("OWQ: 3-bit per channel, the most sensitive columns in 16 bits (3.01 bits before scales)",
                      {"method": "owq", "bits": 3, "group_size": -1, "extra_bits": 0.01}),
    "owq-w4": _preset("OWQ: 4-bit per channel, the most sensitive columns in 16 bits (4.01 bits before scales)",
                      {"method": "owq", "bits": 4, "group_size": -1, "extra_bits": 0.01}),
    # W8A8: weights on a 7-bit grid held in int8, whose products oneDNN computes exactly on AVX2 CPUs without VNNI
    # (a full 8-bit grid saturates its 16-bit pair sums there); docs/decisions.md
    "w8a8": _preset("SmoothQuant + GPTQ int8 weights per channel (7-bit range) + dynamic int8 activations per token",
                    {"method": "smoothquant"}, _quant("gptq", 7, -1, symmetric=True),
                    {"method": "activations", "bits": 8, "granularity": "token"}),
    "w8a8-static": _preset("SmoothQuant + GPTQ int8 weights (7-bit range) + static int8 activations per tensor",
                           {"method": "smoothquant", "act_granularity": "tensor", "act_dynamic": False},
                           _quant("gptq", 7, -1, symmetric=True),
                           {"method": "activations", "bits": 8, "granularity": "tensor", "dynamic": False}),
    # RPTQ: static ranges per cluster of channels (8 clusters, k-means on the channels' ranges), asymmetric
    "rptq-w4a8": _preset("GPTQ 4-bit per channel + static int8 activations per cluster of channels (RPTQ)",
                         _quant("gptq", 4, -1, symmetric=True),
                         {"method": "activations", "bits": 8, "granularity": "cluster", "dynamic": False,
                          "symmetric": False, "clusters": 8}),
    # QuaRot's recipe: rotate, then GPTQ per channel on the rotated weights; activation clip 0.9 at 4 bits as QuaRot
    "w4a8-rot": _preset("QuaRot rotation + GPTQ 4-bit per channel + dynamic int8 activations per token",
                        {"method": "rotate"}, _quant("gptq", 4, -1, symmetric=True),
                        {"method": "activations", "bits": 8, "granularity": "token"}),
    "w4a4-kv4-rot": _preset("QuaRot rotation + GPTQ 4-bit per channel + int4 activations + 4-bit KV cache",
                            {"method": "rotate"}, _quant("gptq", 4, -1, symmetric=True),
                            {"method": "activations", "bits": 4, "granularity": "token", "clip_ratio": 0.9},
                            {"method": "kv-cache", "bits": 4, "rotate": True}),
    "w4a4-kv4": _preset("w4a4-kv4-rot without the rotations (the baseline rotation is measured against)",
                        _quant("gptq", 4, -1, symmetric=True),
                        {"method": "activations", "bits": 4, "granularity": "token", "clip_ratio": 0.9},
                        {"method": "kv-cache", "bits": 4}),
    # KIVI's layout; the window and group sizes are docs/decisions.md's
    "kv8": _preset("key/value cache in 8 bits (KIVI: keys per channel, values per token), weights untouched",
                   {"method": "kv-cache", "bits": 8}),
    "kv4": _preset("key/value cache in 4 bits (KIVI), weights untouched", {"method": "kv-cache", "bits": 4}),
    "kv2": _preset("key/value cache in 2 bits (KIVI), weights untouched", {"method": "kv-cache", "bits": 2}),
    "magnitude50": _preset("magnitude pruning, 50% unstructured", {"method": "magnitude", "sparsity": 0.5}),
    "magnitude-2:4": _preset("magnitude pruning, 2:4", {"method": "magnitude", "pattern": "2:4"}),
    "wanda50": _preset("Wanda, 50% unstructured", {"method": "wanda", "sparsity": 0.5}),
    "wanda-2:4": _preset("Wanda, 2:4", {"method": "wanda", "pattern": "2:4"}),
    "sparse50": _preset("SparseGPT, 50% unstructured", {"method": "sparsegpt", "sparsity": 0.5}),
    "2:4": _preset("SparseGPT, 2:4", {"method": "sparsegpt", "pattern": "2:4"}),
    "4:8": _preset("SparseGPT, 4:8", {"method": "sparsegpt", "pattern": "4:8"}),
    "sparse50-w4g128": _preset("SparseGPT 50% and 4-bit g128 in one joint sweep",
                               {"method": "sparsegpt", "sparsity": 0.5, "bits": 4, "group_size": 128}),
    # the kept weights refit by least squares before GPTQ
    "sparse50-then-w4g128": _preset("SparseGPT 50% with refit, then GPTQ 4-bit g128 keeping the zeros",
                                    {"method": "sparsegpt", "sparsity": 0.5, "refit_iterations": 20},
                                    _quant("gptq", 4, 128)),
    "sparse50-refit": _preset("SparseGPT 50%, kept weights refit by least squares",
                              {"method": "sparsegpt", "sparsity": 0.5, "refit_iterations": 20}),
    "owl-sparse50": _preset("SparseGPT 50% with OWL per-block sparsity",
                            {"method": "sparsegpt", "sparsity": 0.5, "allocation": "owl"}),
    "owl-wanda50": _preset("Wanda 50% with OWL per-block sparsity",
                           {"method": "wanda", "sparsity": 0.5, "allocation": "owl"}),
    "sparse50+recover": _preset("SparseGPT 50%, then LoRA distillation (hours on a CPU)",
                                {"method": "sparsegpt", "sparsity": 0.5}, {"method": "recover"}),
    "2:4+recover": _preset("SparseGPT 2:4, then LoRA distillation (hours on a CPU)",
                           {"method": "sparsegpt", "pattern": "2:4"}, {"method": "recover"}),
    # rounding a merge onto a 3-bit grid can lose the adapters' whole gain; a GPTQ sweep on the fixed grid keeps much
    "w3g128+recover": _preset("GPTQ 3-bit g128, then LoRA distillation merged by GPTQ",
                              _quant("gptq", 3, 128), {"method": "recover", "requantize": "gptq"}),
    "svd-llm20": _preset("SVD-LLM: whitened truncated SVD, 20% fewer block parameters (factors stored)",
                         {"method": "svd", "ratio": 0.2}),
    "svd-llm40": _preset("SVD-LLM: whitened truncated SVD, 40% fewer block parameters (factors stored)",
                         {"method": "svd", "ratio": 0.4}),
    "asvd20": _preset("ASVD: activation-scaled truncated SVD, 20% fewer block parameters",
                      {"method": "svd", "whitening": "asvd", "ratio": 0.2}),
    "share20": _preset("Basis Sharing (q,k,v,gate,up across 2 blocks) + SVD-LLM (o,down), 20% fewer block parameters",
                       {"method": "basis-sharing", "ratio": 0.2, "layers_per_basis": 2},
                       {"method": "svd", "ratio": 0.2, "targets": ["*o_proj", "*down_proj"]}),
    "share40": _preset("Basis Sharing (q,k,v,gate,up across 2 blocks) + SVD-LLM (o,down), 40% fewer block parameters",
                       {"method": "basis-sharing", "ratio": 0.4, "layers_per_basis": 2},
                       {"method": "svd", "ratio": 0.4, "targets": ["*o_proj", "*down_proj"]}),
    "w3g128+lrc": {**_preset("GPTQ 3-bit g128 + a low-rank correction of +1 bit per weight (fp16 factors)",
                             _quant("gptq", 3, 128, fp_target=True, refit_scales=True),
                             {"method": "lowrank-correction", "bits_per_weight": 1.0}), "order": "group"},
    # structured pruning: a smaller dense model (docs/structured-pruning.md); the recovery budget is one hour of
    # training, on one CPU thread about a hundred steps of 4 x 256 tokens
    "struct20": _preset("20% of block parameters: heads and FFN channels removed, reader refit (plain transformers)",
                        _WIDTH | {"ratio": 0.2}),
    "struct20+recover": _preset("struct20, then one hour of LoRA distillation",
                                _WIDTH | {"ratio": 0.2}, _RECOVER_HOUR),
    "struct30+recover": _preset("30% of block parameters (as struct20), then one hour of LoRA distillation",
                                _WIDTH | {"ratio": 0.3}, _RECOVER_HOUR),
    "depth20": _preset("20% of block parameters as whole blocks (ShortGPT block influence)",
                       {"method": "prune-depth", "ratio": 0.2}),
    "iterative-sparse": _preset("SparseGPT 30% -> recover -> 50% -> recover",
                                {"method": "sparsegpt", "sparsity": 0.3}, {"method": "recover", "steps": 100},
                                {"method": "sparsegpt", "sparsity": 0.5}, {"method": "recover", "steps": 100}),
}
