"""Peak memory and time of a recover stage on a small random model (no download, no real model): a Llama with
SmolLM2's vocabulary size (49152, so the next-token distributions are as wide as the real model's) but few,
narrow blocks (--layers, --hidden), magnitude-pruned 2:4, then recovered. Each configuration runs in a fresh
process; the number reported is the growth of the process's peak RSS during compress (after the model, tokenizer and
text are loaded).

    OMP_NUM_THREADS=1 python bench/recover_tiny_memory.py                       # default options
    OMP_NUM_THREADS=1 python bench/recover_tiny_memory.py --options '{"gradient_checkpointing": false}'
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _one(options: dict, steps: int, batch: int, seqlen: int, layers: int = 4, hidden: int = 128) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch
    from helpers import tiny_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lmshrink import load_model
    from lmshrink import compress

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          tie_word_embeddings=True)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp)
        tiny_tokenizer().save_pretrained(tmp)
        rng = random.Random(0)
        words = "the quick brown fox jumps over lazy dog pruning sets some weights to zero model quality".split()
        text = Path(tmp) / "text.txt"
        text.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(400)) for _ in range(40)))
        loaded = load_model(tmp, progress=False)
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        stage = {"method": "recover", "steps": steps, "batch": batch, "seqlen": seqlen, "eval_windows": 4,
                 "eval_every": steps, "patience": 0, "rank": 8, "alpha": 16, **options}
        t0 = time.perf_counter()
        record = compress(loaded, {"stages": [{"method": "magnitude", "pattern": "2:4"}, stage]},
                          calibration=f"file:{text}", nsamples=4, seqlen=64, progress=False)
        rec = record["recover"][0]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"options": options, "peak_growth_mib": (peak - start) / 2**20, "start_mib": start / 2**20,
                "steps": rec["steps_run"], "train_seconds": rec["train_seconds"],
                "total_seconds": time.perf_counter() - t0,
                "held_out_kl": [rec["held_out_before"]["kl"],
                                rec.get("held_out_after_merge", rec["held_out_after"])["kl"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--options", default="{}", help="recover stage options (JSON)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(_one(json.loads(args.options), args.steps, args.batch, args.seqlen, args.layers,
                              args.hidden)))
        return
    out = subprocess.run([sys.executable, __file__, "--_child", "--options", args.options, "--steps", str(args.steps),
                          "--batch", str(args.batch), "--seqlen", str(args.seqlen), "--layers", str(args.layers),
                          "--hidden", str(args.hidden)],
                         check=True, capture_output=True, text=True).stdout
    print(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
