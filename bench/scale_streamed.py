"""Larger than memory: a synthetic Llama of about 3B parameters compressed with disk streaming (``--offload disk``).

    python bench/scale_streamed.py --workdir /work/scratch/synth --depths 2,28 --json bench/results/scale/x.json

Writes a Llama with random weights from a config (the shape of Llama-3.2-3B: hidden 3072, intermediate 8192, 24
heads, 8 KV heads; SmolLM2's tokenizer and its vocabulary of 49152, tied embeddings; 28 blocks = 2.97B parameters)
as sharded bfloat16 safetensors, once per depth in ``--depths``, then compresses it with each recipe in
``--recipes`` (RTN and GPTQ w4g128 by default) in its own process: ``lmshrink compress DIR --recipe R --offload
disk --nsamples 8 --seqlen 256 -o OUT`` (calibration: the packaged enwiki-sample, seed 0; computed in float32).
Each row records the wall and CPU time of the engine, the peak RSS of the engine and of the whole process (model
loading, compressing, writing the output; from the kernel's accounting of the child), and the sizes on disk.
Runs of two depths side by side show whether peak memory grows with depth. ``--delete`` removes each synthetic model
and output once measured (a 28-block model takes 6 GB of disk, its output 2 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from p1 import CLI, run_json  # noqa: E402

SHAPE = dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
             vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
             rope_theta=500000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def write_synthetic_llama(folder: Path, layers: int, seed: int = 0, shard_bytes: int = 2 * 1024**3) -> int:
    """A Llama of ``layers`` blocks with random bfloat16 weights (normal, std 0.02; norms 1) written tensor by
    tensor into safetensors shards of about ``shard_bytes``, with an index, config and SmolLM2's tokenizer. Returns
    the number of parameters."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lmshrink.models.loader import load_model

    config = LlamaConfig(num_hidden_layers=layers, **SHAPE)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    names = [(n, p.shape) for n, p in meta.named_parameters()]  # tied head: listed once, as the embedding
    staging = folder.with_name(folder.name + ".writing")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shards, current, size, total = [], {}, 0, 0

    def flush():
        nonlocal current, size
        if current:
            shards.append(current)
            save_file(current, str(staging / f"part-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            current, size = {}, 0

    for name, shape in names:
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        total += tensor.numel()
        if current and size + tensor.numel() * 2 > shard_bytes:
            flush()
        current[name] = tensor
        size += tensor.numel() * 2
    flush()
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        os.replace(staging / f"part-{number:05d}.safetensors", staging / filename)
        weight_map.update({key: filename for key in shard})
    index = {"metadata": {"total_size": total * 2}, "weight_map": weight_map}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.dtype = torch.bfloat16
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(staging)
    load_model("smollm2-135m", progress=False, lazy_blocks=True).tokenizer.save_pretrained(staging)
    os.replace(staging, folder)
    return total


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="where the synthetic models and outputs are written")
    parser.add_argument("--depths", default="28", help="comma-separated numbers of blocks (default: 28)")
    parser.add_argument("--recipes", default="rtn-w4g128,w4g128")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--delete", action="store_true", help="remove each model and output once measured")
    parser.add_argument("--json", help="write the rows to this JSON file (after every row)")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for depth in [int(d) for d in args.depths.split(",")]:
        model = workdir / f"llama-synthetic-{depth}blocks"
        written = None
        if not (model / "config.json").is_file():
            started = time.perf_counter()
            parameters = write_synthetic_llama(model, depth)
            written = time.perf_counter() - started
            print(f"wrote {model}: {parameters / 1e9:.2f}B parameters in {written:.0f}s", file=sys.stderr, flush=True)
        parameters = json.loads((model / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 2
        for recipe in args.recipes.split(","):
            out = workdir / f"out-{depth}-{recipe}"
            cmd = [*CLI, "compress", str(model), "--recipe", recipe, "--offload", "disk", "--nsamples",
                   str(args.nsamples), "--seqlen", str(args.seqlen), "--threads", str(args.threads), "-o", str(out),
                   "--overwrite", "--json", "--quiet"]
            started = time.perf_counter()
            record = run_json(cmd)
            summary = record["summary"]
            row = {"blocks": depth, "parameters": parameters, "recipe": recipe,
                   "engine_seconds": round(summary["seconds"], 1), "engine_cpu_seconds": round(summary["cpu_seconds"], 1),
                   "process_seconds": round(time.perf_counter() - started, 1),
                   "engine_peak_rss_gib": round(summary["peak_rss_bytes"] / 2**30, 3),
                   "process_peak_rss_gib": round(record["process_peak_rss_bytes"] / 2**30, 3),
                   "model_gib_on_disk": round(folder_bytes(model) / 2**30, 2),
                   "output_gib_on_disk": round(folder_bytes(out) / 2**30, 2),
                   "calibration": f"{args.nsamples} x {args.seqlen} tokens of enwiki-sample (seed 0)",
                   "threads": args.threads, "command": " ".join(cmd[2:])}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
            if args.delete:
                shutil.rmtree(out)
        if args.delete:
            shutil.rmtree(model)
    print("| blocks | parameters | recipe | engine s | engine CPU s | engine peak RSS GiB | process peak RSS GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['blocks']} | {r['parameters'] / 1e9:.2f}B | {r['recipe']} | {r['engine_seconds']} | "
              f"{r['engine_cpu_seconds']} | {r['engine_peak_rss_gib']} | {r['process_peak_rss_gib']} |")


if __name__ == "__main__":
    main()
