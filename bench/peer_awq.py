"""The peer row for AWQ: llm-compressor's ``AWQModifier`` on the P1 calibration windows, evaluated like our rows.

    python bench/peer_awq.py --peer-python /work/scratch/peers/llmc/bin/python --data-dir ../shared/data \\
        --reuse-dense bench/results/quantize/quantize_p1.json --json peer.json

The peer runs in its own virtual environment (outside the repository: ``python3 -m venv DIR && DIR/bin/pip install
torch==2.13.0 llmcompressor==0.14.0.1``); without one, or when llmcompressor does not import there, the script says
so and exits 0. Protocol P1 as bench/quantize.py: lmshrink draws the calibration windows (C4 excerpt, NSAMPLES x 512
tokens, seed 0) and hands exactly those token ids to the peer as a ``datasets.Dataset`` of ``input_ids``; the peer
runs ``oneshot(model, dataset, recipe=[AWQModifier(), QuantizationModifier(W4A16_ASYM's weight arguments at the
asked bits and group size, targets "Linear", ignore lm_head)], pipeline="sequential", max_seq_length=512,
num_calibration_samples=NSAMPLES)`` on the fp32
model folder lmshrink loads (the converted SmolLM2-135M), with its defaults otherwise (duo scaling, 20 grid points,
no clipping search: its AWQ scales only, then its quantizer rounds), and saves a compressed-tensors folder, which
``lmshrink evaluate`` then loads through transformers (WikiText-2, enwiki-sample, KL to the base).

Two things on CPU with 0.14.0.1: its AWQ pins cached inputs in page-locked memory, which needs an accelerator, so
the script makes that pinning a no-op (it only speeds transfers to a GPU); and its observers reshape each row into
groups, which fails when the group size does not divide a layer's width (SmolLM2-135M: 576 columns and group 128,
"unflatten: Provided sizes [-1, 128] don't multiply up to the size of dim 1 (576)"), so on SmolLM2 the peer runs
with ``--group-size 64``, the largest group that divides every width. Its folder stores packed asymmetric zero
points, which transformers' default loading route expects unpacked: the script adds ``"dequantize": true`` to its
``quantization_config``, as lmshrink's writer does for its own asymmetric checkpoints (transformers then decodes
them at load time; the stored tensors are unchanged). Peak RSS is the
peer process's (wait4), its compression time the ``oneshot`` call's; bits/weight as bench/quantize.py.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from p1 import (
    CLI,
    add_p1_arguments,
    add_reuse_dense_argument,
    evaluate_options,
    keep_row,
    print_saved_table,
    protocol_line,
    reused_dense_row,
    run_json,
    stamp,
)
from peer import add_peer_arguments, draw_windows, mark_dequantize, peer_ready, run_together
from quantize import _print_table

from lmshrink.formats.compressed_tensors import packed_storage

# runs in the peer's environment: argv = model folder, ids file, output folder, bits, group size, nsamples, seqlen
PEER = r'''
import json, sys, time
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.transform.awq import AWQModifier
from llmcompressor.modifiers.quantization import QuantizationModifier

from llmcompressor.pipelines.cache import IntermediatesCache

if not torch.cuda.is_available():  # 0.14.0.1's AWQ pins its cached inputs, which needs an accelerator; only speed
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
model_dir, ids_file, out_dir, bits, group_size, nsamples, seqlen = sys.argv[1:8]
bits, group_size, nsamples, seqlen = int(bits), int(group_size), int(nsamples), int(seqlen)
ids = load_file(ids_file)["input_ids"]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
dataset = Dataset.from_dict({"input_ids": ids.tolist()})
# W4A16_ASYM's weight arguments (int, asymmetric, group strategy, static) at these bits and group size
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group_size,
                        dynamic=False)
quantize = QuantizationModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=["lm_head"])
started = time.perf_counter()
oneshot(model=model, dataset=dataset, recipe=[AWQModifier(), quantize], pipeline="sequential",
        max_seq_length=seqlen, num_calibration_samples=nsamples)
seconds = time.perf_counter() - started
model.save_pretrained(out_dir, save_compressed=True)
tokenizer.save_pretrained(out_dir)
import llmcompressor, compressed_tensors, transformers
print("PEER-RESULT " + json.dumps({"seconds": seconds, "llmcompressor": llmcompressor.__version__,
                                   "compressed_tensors": compressed_tensors.__version__,
                                   "transformers": transformers.__version__, "torch": torch.__version__}))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_p1_arguments(parser, "4", "bits of the peer's grids, comma-separated (W4A16_ASYM's arguments otherwise)")
    add_reuse_dense_argument(parser)
    add_peer_arguments(parser, "--group-size", 128)
    args = parser.parse_args()
    if print_saved_table(args, _print_table):
        return
    why = peer_ready(args.peer_python)
    if why is not None:
        print(f"peer_awq: skipped, no llm-compressor to run: {why}")
        return
    rows = []
    reused = reused_dense_row(parser, args)
    if reused is not None:
        rows.append(reused)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir = draw_windows(args, work / "calibration_ids.safetensors")
        for bits in (int(b) for b in args.recipes.split(",")):
            out = work / f"llmcompressor-awq-w{bits}g{args.group_size}"
            ran = run_together([([args.peer_python, "-c", PEER, model_dir, str(work / "calibration_ids.safetensors"),
                                  str(out), str(bits), str(args.group_size), str(args.nsamples), str(args.seqlen)],
                                 {})])[0].check()
            peer, wall, rss = ran.tagged("PEER-RESULT "), ran.wall, ran.peak_rss_bytes
            mark_dequantize(out)
            result = run_json(CLI + ["evaluate", str(out), "--kl-base", args.model] + evaluate_options(args))
            weights = packed_storage(out)
            rows.append({"recipe": f"llm-compressor {peer['llmcompressor']} AWQ w{bits}g{args.group_size} asym",
                         "wikitext2": result["perplexity"][0]["ppl"], "enwiki": result["perplexity"][1]["ppl"],
                         "kl": result["kl"]["kl_mean"], "grid_bpw": bits + (16 + bits) / args.group_size,
                         "stored_bpw": weights["bits_per_weight"], "seconds": peer["seconds"], "cpu_seconds": None,
                         "peak_rss_gib": rss / 2**30, "process_wall_seconds": wall, "peer": peer})
            keep_row(args, rows, rows[-1]["recipe"])
    print(f"{protocol_line(args)}; KL on WikiText-2; peer in {args.peer_python}")
    _print_table(stamp(args, rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
