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
  # your own recipe; continue a killed run from its last finished block
  lmshrink compress ./llama-dir --recipe my-recipe.yaml -o out/x --resume
  # then measure it against the base model
  lmshrink evaluate out/smollm2-w4g128 --ppl wikitext2 --kl-base smollm2-135m --data-dir ../shared/data

recipes: a preset name (see `lmshrink recipes`) or a YAML file (`lmshrink recipes --show w4g128` prints one).
the output folder is a Hugging Face checkpoint in the compressed-tensors pack-quantized layout (transformers with
the compressed-tensors package, and vLLM, load it) plus lmshrink.json with the recipe, calibration protocol,
per-layer errors, times and peak memory.
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
    cp.add_argument("--resume", action="store_true", help="continue from the last finished block of a killed run")
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
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"packaged models (cache: {cache_root()})")
    for col in ("name", "architecture", "parameters", "wheels", "cached", "license"):
        table.add_column(col, no_wrap=col == "name", overflow="fold")  # the name is what users type: never cut
    for r in rows:
        table.add_row(r["name"], r["architecture"], r["parameters"], "\n".join(r["wheels"]),
                      "yes" if r["cached"] else "no", r["license"])
    Console().print(table)
    return 0


def _print_evaluation(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    info, size = record["model"], record["size"]
    console.print(f"[bold]model[/bold] {info['source']} ({info['kind']}, {info['model_type']}, {info['dtype']}): "
                  f"{size['parameters'] / 1e6:.1f}M parameters, {size['weight_bytes'] / 2**20:.1f} MiB of weights "
                  f"({size['body_bytes'] / 2**20:.1f} MiB outside embeddings/head)")
    sparsity = record.get("sparsity") or {}
    if sparsity.get("overall") is not None:
        types = ", ".join(f"{name} {100 * value:.1f}%" for name, value in sparsity["by_type"].items())
        patterns = f"; every sparse layer is {' and '.join(sparsity['nm_patterns'])}" if sparsity["nm_patterns"] else ""
        console.print(f"[bold]sparsity[/bold] (exact zeros in {sparsity['layers']} block linears): "
                      f"{100 * sparsity['overall']:.2f}% overall; {types}{patterns}")
    if record["perplexity"]:
        table = Table(title="perplexity")
        for col in ("dataset", "split", "seqlen", "windows", "tokens", "ppl", "tokens/s"):
            table.add_column(col, justify="right" if col not in ("dataset", "split") else "left")
        for r in record["perplexity"]:
            p = r["protocol"]
            table.add_row(p["dataset"], p["split"], str(p["seqlen"]), f"{p['windows']}/{p['windows_available']}",
                          str(p["tokens"]), f"{r['ppl']:.3f}",
                          f"{r['tokens'] / r['seconds']:.0f}" + (" (with base)" if r.get("with_kl_base") else ""))
        console.print(table)
        for r in record["perplexity"]:
            p = r["protocol"]
            console.print(f"protocol: {p['dataset']} {p['split']} from {p['origin']}, documents joined with "
                          f"{json.dumps(p['join'])}, tokenized once, first {p['windows']} non-overlapping windows "
                          f"of {p['seqlen']} tokens; ppl = exp(mean over windows of mean next-token NLL)")
    if "kl" in record:
        kl = record["kl"]
        console.print(f"[bold]KL(base || model)[/bold] vs {kl['base']['source']}: mean {kl['kl_mean']:.5f}, "
                      f"median {kl['kl_median']:.5f}, p99 {kl['kl_p99']:.4f}, max {kl['kl_max']:.3f} nats; "
                      f"top-1 agreement {100 * kl['top1_agreement']:.2f}% over {kl['positions']} positions; "
                      f"base ppl {kl['base_ppl']:.3f}")
    if record.get("tasks"):
        table = Table(title="zero-shot tasks")
        for col in ("task", "metric", "value", "stderr", "n", "seconds"):
            table.add_column(col)
        for task in record["tasks"].values() if isinstance(record["tasks"], dict) else record["tasks"]:
            for metric, value in task["metrics"].items():
                if metric.endswith("_stderr"):
                    continue
                stderr = task["metrics"].get(f"{metric}_stderr")
                table.add_row(task["task"], metric, f"{value:.4f}", "" if stderr is None else f"{stderr:.4f}",
                              str(task["n"]), f"{task['seconds']:.0f}")
        console.print(table)


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
        print(json.dumps(recipe.to_dict(), indent=2) if args.json else recipe.to_yaml(), end="\n" if args.json else "")
        return 0
    if args.json:
        print(json.dumps({name: load_recipe(name).to_dict() for name in PRESETS}, indent=2))
        return 0
    print(_preset_lines(PRESETS, shutil.get_terminal_size((100, 24)).columns))
    print("\nlmshrink recipes --show NAME prints one as YAML (edit it, then compress --recipe my.yaml)")
    return 0


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
    from rich.console import Console
    from rich.table import Table

    console = Console()
    by_type: dict[str, list[float]] = {}
    for layer in record["layers"]:
        if layer["rel_output_error"] is not None:
            by_type.setdefault(layer["name"].rsplit(".", 1)[-1], []).append(layer["rel_output_error"])
    table = Table(title="relative output error ||(W-Q)X||^2/||WX||^2 by layer type (calibration inputs)")
    for col in ("layer", "count", "mean", "max"):
        table.add_column(col)
    for name, errors in by_type.items():
        table.add_row(name, str(len(errors)), f"{sum(errors) / len(errors):.5f}", f"{max(errors):.5f}")
    console.print(table)
    cal, summary = record["calibration"], record["summary"]
    if record.get("sparsity"):
        sparsity = record["sparsity"]
        types = ", ".join(f"{name} {100 * value:.1f}%" for name, value in sparsity["by_type"].items())
        console.print(f"measured sparsity of the {sparsity['layers']} pruned layers "
                      f"({', '.join(sparsity['patterns'])}): {100 * sparsity['overall']:.2f}% overall; {types}")
    storage = record["summary"].get("sparse_storage")
    if storage:
        console.print(f"pruned layers stored {storage['format']}: {storage['stored_bytes'] / 2**20:.2f} MiB "
                      f"({storage['dense_bytes'] / 2**20:.2f} MiB dense, {storage['saved_bytes'] / 2**20:.2f} MiB "
                      "saved)")
    console.print(f"calibration: {cal['nsamples']} windows x {cal['seqlen']} tokens of {cal['dataset']} "
                  f"({cal['split']}, {cal['origin']}), seed {cal['seed']}")
    ranks = summary.get("ranks", 1)
    peaks = summary.get("peak_rss_bytes_per_rank") or [summary["peak_rss_bytes"]]
    console.print(f"compressed {summary['layers']} layers in {summary['seconds']:.1f}s, peak RSS "
                  + (f"{summary['peak_rss_bytes'] / 2**30:.2f} GiB" if ranks == 1 else
                     f"per rank {' / '.join(f'{p / 2**30:.2f}' for p in peaks)} GiB on {ranks} data-parallel ranks")
                  + (f", resumed at block {summary['resumed_from_block'] + 1}"
                     if summary["resumed_from_block"] else ""))
    for number, stage in enumerate(record.get("recover") or [], 1):
        before, after = stage.get("held_out_before") or {}, stage.get("held_out_after_merge") or stage.get(
            "held_out_after") or {}
        kl = (f"held-out KL {before['kl']:.4f} -> {after['kl']:.4f}" if "kl" in before and "kl" in after else
              "held-out KL not measured")
        console.print(f"recover stage {number}: {kl}, {stage.get('steps_run')} steps (best {stage.get('best_step')}), "
                      f"stopped by {stage.get('stopped_by')}, training {stage.get('train_seconds', 0):.0f}s")
    if summary.get("recover_seconds") is not None:
        console.print(f"recovery took {summary['recover_seconds']:.1f}s (evaluations and merges included)")
    if record.get("output"):
        console.print(f"saved to {record['output']} (lmshrink.json holds the full record)")


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
                          seed=args.seed, data_dir=args.data_dir, device=args.device, resume=args.resume,
                          overwrite=args.overwrite, progress=not quiet, offload=args.offload,
                          sparse_format=args.sparse_format, expert_min_tokens=args.expert_min_tokens)
    finally:
        if joined:
            import torch.distributed as dist

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
    for col in ("model", "runtime", "decode", "prefill tok/s", "decode tok/s", "decode vs first",
                "CPU-time decode vs first", "TTFT ms", "peak RSS MiB", "peak RSS running", "weights MiB",
                "linear MiB", "linear vs fp16", "greedy = first"):
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
        print(f"wrote {report['output']} ({report['bytes'] / 2**20:.1f} MiB): {types + '; ' if types else ''}{layers}; "
              f"metadata from {report['metadata_from']}")
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


def _check_device(device: str | None) -> None:
    """Refuse a device torch cannot use here before any model is loaded (torch would fail later, mid-way)."""
    if device is None:
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
             "bench": _cmd_bench, "export": _cmd_export}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        _check_threads(getattr(args, "threads", None))
        _check_device(getattr(args, "device", None))
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
