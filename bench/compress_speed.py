"""Compression time and memory side by side with llm-compressor's GPTQ, on P1, and against the physical floor.

    python bench/compress_speed.py --data-dir ../shared/data --reuse-dense bench/results/quantize/quantize_p1.json \\
        --json speed.json
    python bench/compress_speed.py --recipes w4g128 --scaling      # also 1 vs 2 threads, each alone

For each recipe of --recipes (lmshrink presets or recipe files), one round: `lmshrink compress MODEL --recipe R` and
llm-compressor's ``oneshot(GPTQModifier(W4A16_ASYM's weight arguments at --peer-group-size, targets "Linear",
ignore lm_head), pipeline="sequential", max_seq_length=512, num_calibration_samples=NSAMPLES)`` (its default
activation ordering).
SmolLM2-135M's 576-column layers are not whole groups of 128, which 0.14.0.1's observers cannot reshape ("unflatten:
Provided sizes [-1, 128] don't multiply up to the size of dim 1 (576)"), so on SmolLM2 the peer runs with groups of
64, the largest that divides every width (more scales than lmshrink's g128: in its favour on quality; its time hardly
depends on the group size) are started together, one thread
each (OMP_NUM_THREADS=MKL_NUM_THREADS=1), on the same calibration windows: lmshrink draws them (P1: C4 excerpt, 64 x
512 tokens, seed 0) and hands exactly those token ids to the peer as a ``datasets.Dataset`` of ``input_ids``. Each
round runs the peer again, so every lmshrink time has a peer time measured beside it.

Reported per process: its wall time from start to exit, its compression time (lmshrink: the engine, the record's
``summary.seconds``; the peer: its ``oneshot`` call) and its peak RSS (the kernel's ``wait4``). The ratio is
lmshrink's compression time over the peer's in the same round. lmshrink's engine time is split by part (the
record's ``seconds_by_part_per_rank``): forwards of the calibration windows through blocks, statistics accumulated
in those forwards' hooks, layer solves, block stages, checkpoint writes.

The floor, measured after the rounds, alone, with the same thread count: two forward passes of the dense model's
decoder over the calibration windows in batches of 8 (the engine's batch), the work no block-by-block method avoids
(one pass to collect each layer's inputs, one to carry the compressed block's outputs on).

--scaling: after that, the first recipe alone with 1 thread, then alone with 2 threads (its speed-up).

Each output is then evaluated as bench/quantize.py does (WikiText-2 and enwiki-sample perplexity, KL to the base on
WikiText-2, through transformers). Without llm-compressor in --peer-python the script says so and times lmshrink
alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from p1 import (
    CLI,
    add_p1_arguments,
    add_reuse_dense_argument,
    compress_options,
    dense_row,
    evaluate_options,
    keep_row,
    print_saved_table,
    protocol_line,
    run_json,
    stamp,
)
from peer import (
    add_peer_arguments,
    draw_windows,
    mark_dequantize,
    peer_ready,
    run_together,
    threads_env,
)

# runs in the peer's environment: argv = model folder, ids file, output folder, nsamples, seqlen, group size
PEER = r'''
import json, sys, time
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from llmcompressor.pipelines.cache import IntermediatesCache

if not torch.cuda.is_available():  # 0.14.0.1 pins cached inputs, which needs an accelerator; only speed
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
model_dir, ids_file, out_dir, nsamples, seqlen, group_size = sys.argv[1:7]
nsamples, seqlen, group_size = int(nsamples), int(seqlen), int(group_size)
ids = load_file(ids_file)["input_ids"]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
dataset = Dataset.from_dict({"input_ids": ids.tolist()})
started = time.perf_counter()
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
# W4A16_ASYM's weight arguments (4-bit int, asymmetric, group strategy, static) at this group size
weights = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=group_size,
                           dynamic=False)
recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                      ignore=["lm_head"])
oneshot(model=model, dataset=dataset, recipe=recipe, pipeline="sequential", max_seq_length=seqlen,
        num_calibration_samples=nsamples)
seconds = time.perf_counter() - started
model.save_pretrained(out_dir, save_compressed=True)
tokenizer.save_pretrained(out_dir)
import llmcompressor
print("PEER-RESULT " + json.dumps({"seconds": seconds, "llmcompressor": llmcompressor.__version__,
                                   "threads": torch.get_num_threads()}))
'''

# runs in lmshrink's environment: argv = model, ids file, batch; two passes of the decoder over the windows
FLOOR = r'''
import json, sys, time
import torch
from safetensors.torch import load_file
from lmshrink import load_model
model, ids_file, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
decoder = load_model(model, progress=False).model.get_decoder().eval()
ids = load_file(ids_file)["input_ids"]
seconds = []
with torch.no_grad():
    for _ in range(2):
        started = time.perf_counter()
        for start in range(0, ids.shape[0], batch):
            decoder(input_ids=ids[start:start + batch], use_cache=False)
        seconds.append(time.perf_counter() - started)
print("FLOOR-RESULT " + json.dumps({"seconds": sum(seconds), "passes": seconds, "threads": torch.get_num_threads()}))
'''

PARTS = ("forwards", "statistics", "solves", "block_stages", "checkpoint")


def _print_table(rows: list[dict]) -> None:
    print("| run | threads | beside | process wall s | compression s | vs peer | peak RSS GiB | RSS vs peer "
          "| wikitext2 ppl | enwiki-sample ppl | KL to base |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def num(key, fmt, r=r):
            return "" if r.get(key) is None else format(r[key], fmt)
        print(f"| {r['run']} | {r.get('threads', '')} | {r.get('beside') or 'alone'} "
              f"| {num('process_wall_seconds', '.0f')} | {num('seconds', '.0f')} | {num('vs_peer', '.2f')} "
              f"| {num('peak_rss_gib', '.2f')} | {num('rss_vs_peer', '.2f')} | {num('wikitext2', '.3f')} "
              f"| {num('enwiki', '.3f')} | {num('kl', '.4f')} |")
    for r in rows:
        if r.get("parts"):
            parts = ", ".join(f"{k} {r['parts'][k]:.0f}" for k in PARTS if r["parts"].get(k))
            print(f"- {r['run']} ({r.get('beside') or 'alone'}, {r['threads']} thread(s)): engine "
                  f"{r['seconds']:.0f} s = {parts} s; the rest {r['seconds'] - sum(r['parts'].values()):.0f} s"
                  + (f"; engine / floor {r['seconds'] / r['floor_seconds']:.2f}" if r.get("floor_seconds") else ""))


def _lmshrink(args, recipe: str, out: Path, threads: int) -> tuple[list[str], dict[str, str]]:
    return CLI + ["compress", args.model, "--recipe", recipe, "-o", str(out)] + compress_options(args), \
        threads_env(threads)


def _lmshrink_row(name: str, ran, threads: int, beside: str | None) -> dict:
    record = json.loads(ran.check().stdout)
    summary = record["summary"]
    return {"run": f"lmshrink {name}", "recipe": name, "threads": threads, "beside": beside,
            "process_wall_seconds": ran.wall, "seconds": summary["seconds"], "cpu_seconds": summary.get("cpu_seconds"),
            "peak_rss_gib": ran.peak_rss_bytes / 2**30, "parts": summary["seconds_by_part_per_rank"][0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_p1_arguments(parser, "w4g128,bench/recipes/gptq-w4g128.yaml", "lmshrink presets or recipe files, each timed "
                     "beside the peer")
    add_reuse_dense_argument(parser)
    parser.add_argument("--threads", type=int, default=1, help="threads of each process in the rounds")
    parser.add_argument("--scaling", action="store_true", help="also the first recipe alone with 1, then 2 threads")
    parser.add_argument("--no-floor", action="store_true", help="skip the two dense forward passes")
    parser.add_argument("--no-eval", action="store_true", help="times and memory only")
    add_peer_arguments(parser, "--peer-group-size", 64)
    args = parser.parse_args()
    if print_saved_table(args, _print_table):
        return
    why = peer_ready(args.peer_python)
    if why is not None:
        print(f"compress_speed: no llm-compressor to run beside lmshrink ({why}); timing lmshrink alone",
              file=sys.stderr)
    rows: list[dict] = []
    evaluate = evaluate_options(args)
    if not args.no_eval:
        rows.append({"run": "dense fp32", **dense_row(parser, args, evaluate)[0]})
    recipes = args.recipes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        ids = work / "calibration_ids.safetensors"
        model_dir = draw_windows(args, ids)
        outputs: dict[str, Path] = {}
        for recipe in recipes:
            name = Path(recipe).stem
            out = work / f"lmshrink-{name}"
            commands = [_lmshrink(args, recipe, out, args.threads)]
            peer_out = work / f"llmcompressor-gptq-w4g{args.peer_group_size}-asym"
            if why is None:
                commands.append(([args.peer_python, "-c", PEER, model_dir, str(ids), str(peer_out),
                                  str(args.nsamples), str(args.seqlen), str(args.peer_group_size)],
                                 threads_env(args.threads)))
            ran = run_together(commands)
            row = _lmshrink_row(name, ran[0], args.threads, "llm-compressor" if why is None else None)
            outputs[row["run"]] = out
            if why is None:
                peer = ran[1].check().tagged("PEER-RESULT ")
                mark_dequantize(peer_out)
                peer_row = {"run": f"llm-compressor {peer['llmcompressor']} GPTQ w4g{args.peer_group_size} asym",
                            "threads": args.threads,
                            "beside": f"lmshrink {name}", "process_wall_seconds": ran[1].wall,
                            "seconds": peer["seconds"], "peak_rss_gib": ran[1].peak_rss_bytes / 2**30}
                row["vs_peer"] = row["seconds"] / peer_row["seconds"]
                row["rss_vs_peer"] = row["peak_rss_gib"] / peer_row["peak_rss_gib"]
                outputs.setdefault(peer_row["run"], peer_out)
            rows.append(row)
            keep_row(args, rows, row["run"])
            if why is None:
                rows.append(peer_row)
                keep_row(args, rows, peer_row["run"])
        floor = None
        if not args.no_floor:
            ran = run_together([([sys.executable, "-c", FLOOR, args.model, str(ids), "8"],
                                 threads_env(args.threads))])[0].check()
            floor = ran.tagged("FLOOR-RESULT ")
            rows.append({"run": "floor: two dense forward passes", "threads": args.threads,
                         "process_wall_seconds": ran.wall, "seconds": floor["seconds"],
                         "peak_rss_gib": ran.peak_rss_bytes / 2**30})
            for row in rows:
                if row.get("parts"):
                    row["floor_seconds"] = floor["seconds"]
            keep_row(args, rows, rows[-1]["run"])
        if args.scaling:
            name = Path(recipes[0]).stem
            for threads in (1, 2):
                out = work / f"lmshrink-{name}-alone-{threads}"
                ran = run_together([_lmshrink(args, recipes[0], out, threads)])[0]
                rows.append(_lmshrink_row(name, ran, threads, None))
                rows[-1]["run"] += " (alone)"
                if floor is not None and threads == args.threads:
                    rows[-1]["floor_seconds"] = floor["seconds"]
                keep_row(args, rows, rows[-1]["run"])
            one, two = rows[-2]["seconds"], rows[-1]["seconds"]
            rows[-1]["speedup_vs_1_thread"] = one / two
        if not args.no_eval:  # each output once; the peer's rows of every round share its output
            for run, folder in outputs.items():
                result = run_json(CLI + ["evaluate", str(folder), "--kl-base", args.model] + evaluate)
                for row in rows:
                    if row["run"] == run:
                        row.update(wikitext2=result["perplexity"][0]["ppl"], enwiki=result["perplexity"][1]["ppl"],
                                   kl=result["kl"]["kl_mean"])
                keep_row(args, rows, f"evaluated {run}")
    print(f"{protocol_line(args)}; KL on WikiText-2; peer in {args.peer_python}")
    _print_table(stamp(args, rows))
    if args.scaling:
        print(f"2 threads vs 1 (alone): {rows[-1]['speedup_vs_1_thread']:.2f}x faster")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
