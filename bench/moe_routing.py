"""A tiny mixture of experts with skewed routing: how many calibration tokens each expert gets, and which fall back.

    python bench/moe_routing.py --workdir /tmp/moe-bench --json bench/results/scale/moe_routing.json

Writes a Qwen3-MoE-shaped model with random weights (4 blocks, hidden 128, 8 experts of width 128, 2 per token)
whose routing is skewed on purpose: hidden dimension 0 is held at a constant positive value (the embeddings set
it; attention and the experts never write it) and each expert's router row (random, std 0.3) gets a weight on it,
from favoured (+0.3) through neutral to disfavoured (-0.3), and expert 7 only a weight of -100 (it never receives
a token). Then
compresses it with `lmshrink compress DIR --recipe w4g128 --nsamples 32 --seqlen 128` (the packaged
enwiki-sample, seed 0; the default fallback threshold: a tenth of the block's mean tokens per expert) and prints
the record's per-expert token counts and fallbacks, block by block.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from p1 import CLI, run_json  # noqa: E402

BIAS = [0.3, 0.2, 0.1, 0.0, 0.0, -0.1, -0.3, -100.0]


def write_skewed_moe(folder: Path, seed: int = 0) -> None:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from lmshrink.models.loader import load_model

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                            num_experts=len(BIAS), num_experts_per_tok=2, max_position_embeddings=2048,
                            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.5
        for block in model.model.layers:
            block.mlp.gate.weight.normal_(0, 0.3)
            block.mlp.gate.weight[:, 0] = torch.tensor(BIAS)
            block.mlp.gate.weight[-1, 1:] = 0
            block.mlp.experts.gate_up_proj.normal_(0, 0.05)
            block.mlp.experts.down_proj.normal_(0, 0.05)
            block.mlp.experts.down_proj[:, 0] = 0
            block.self_attn.o_proj.weight[0] = 0
    model.save_pretrained(folder)
    load_model("smollm2-135m", progress=False, lazy_blocks=True).tokenizer.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--recipe", default="w4g128")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--json", help="write the per-block counts to this JSON file")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    model = workdir / "skewed-moe"
    if not (model / "config.json").is_file():
        write_skewed_moe(model)
    cmd = [*CLI, "compress", str(model), "--recipe", args.recipe, "--nsamples", str(args.nsamples), "--seqlen",
           str(args.seqlen), "-o", str(workdir / "out"), "--overwrite", "--json", "--quiet"]
    record = run_json(cmd)
    blocks = record["experts"]["blocks"]
    nan = [layer["name"] for layer in record["layers"] if layer["rel_output_error"] != layer["rel_output_error"]]
    print(f"{record['summary']['layers']} layers compressed ({sum(1 for l in record['layers'] if 'experts.' in l['name'])} "
          f"expert linears); NaN errors: {len(nan)}; threshold: {record['experts']['min_tokens']}")
    print("| block | " + " | ".join(f"expert {e}" for e in range(len(BIAS))) + " | min tokens | fell back |")
    print("|---" * (len(BIAS) + 3) + "|")
    for block, entry in sorted(blocks.items(), key=lambda item: int(item[0])):
        counts = " | ".join(str(entry["tokens"][str(e)]) for e in range(len(BIAS)))
        fallback = sorted(set(entry["fallback"].get("gate_up", [])) | set(entry["fallback"].get("down", [])))
        print(f"| {block} | {counts} | {entry['min_tokens']} | {', '.join(map(str, fallback)) or '-'} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": " ".join(cmd[2:]), "router_bias": BIAS,
                                               "experts": record["experts"], "nan_layers": nan,
                                               "layers": [{k: v for k, v in layer.items() if k in (
                                                   "name", "tokens", "routed_tokens", "fallback",
                                                   "fallback_tokens", "rel_output_error")}
                                                   for layer in record["layers"] if "experts." in layer["name"]]},
                                              indent=1))


if __name__ == "__main__":
    main()
