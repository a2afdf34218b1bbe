"""Recovery after compression on a real model (protocol P1): perplexity before and after distilling the base model
into LoRA adapters, and the fraction of the gap to the dense model that recovery closes.

    python bench/recover.py --data-dir ../shared/data                         # P1, sparse50 / 2:4 / w3g128
    python bench/recover.py --recipes 2:4 --steps 5 --nsamples 4 --limit 2 --rec-seqlen 128   # a smoke run only
    python bench/recover.py --memory --steps 2 --rec-seqlen 128                 # peak memory: LoRA vs full FT
    python bench/recover.py --recipes 2:4 --steps 10000 --max-seconds 1800 --eval-every 10   # 30 min of recovery

Protocol P1 as bench/prune.py: smollm2-135m (fp32); calibration NSAMPLES windows x 512 tokens of C4 (seed 0);
evaluation: the first 40 non-overlapping 512-token windows of WikiText-2 test and of the enwiki-sample held-out
split, KL(base || model) on WikiText-2. For each base recipe R the script compresses R alone and R followed by a
recover stage (teacher: the base model; KL loss, temperature 1; LoRA rank/alpha on every block linear; STEPS
AdamW steps, or as many as fit in --max-seconds, of BATCH windows x REC_SEQLEN tokens of the calibration text,
whose documents are split into training and held-out ones; merged into the weights keeping masks and grids) in
separate processes, saves both, and evaluates the saved checkpoints through `lmshrink evaluate`. "gap closed" = (ppl(R) - ppl(R+recover)) /
(ppl(R) - ppl(dense)) on WikiText-2. "recover s" is the recover stage's own wall time (the machine may be shared:
state that with any timing). With --memory it instead measures, in two fresh processes, the peak resident memory
of STEPS training steps of LoRA adapters and of full fine-tuning (AdamW, every parameter) of the dense model.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

import yaml
from p1 import (
    CLI,
    DENSE_KEYS,
    add_p1_arguments,
    check_reused,
    compress_options,
    evaluate_options,
    keep_row,
    protocol_line,
    run_json,
    stamp,
)

DEFAULT_RECIPES = "sparse50,2:4,w3g128"


def _measure(mode: str, model_name: str, steps: int, batch: int, seqlen: int, rank: int) -> None:
    """One process: ``steps`` training steps (LoRA on every block linear, or full fine-tuning); prints JSON."""
    import torch

    from lmshrink import load_model
    from lmshrink.methods.recover.lora import attach
    from lmshrink.methods.recover.memory import memory_report, optimizer_state_bytes
    from lmshrink.models.adapters import iter_linears

    loaded = load_model(model_name, progress=False)
    model = loaded.model.train()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if mode == "lora":
        model = attach(model, [n for n, _ in iter_linears(model)], rank, 2 * rank, masks={})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, loaded.model.config.vocab_size, (batch, seqlen), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    report = memory_report(loaded.model if mode == "full" else model.base_model.model,
                           params if mode == "lora" else [], optimizer if mode == "lora" else None)
    print(json.dumps({"mode": mode, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "rss_after_load_bytes": before, "trainable_parameters": sum(p.numel() for p in params),
                      "optimizer_state_bytes": optimizer_state_bytes(optimizer), "report": report}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_p1_arguments(parser, DEFAULT_RECIPES, "base recipes (presets), comma separated")
    parser.add_argument("--steps", type=int, default=200, help="recover: optimizer steps")
    parser.add_argument("--batch", type=int, default=4, help="recover: windows per step")
    parser.add_argument("--rec-seqlen", type=int, default=512, help="recover: tokens per window")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=8, help="recover: held-out windows for early stopping")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="recover: wall-time budget of each recover stage (e.g. 1800); training stops there and "
                             "the learning rate decays over it (steps then only cap the run)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="recover: steps between held-out evaluations (default steps/8; set it with --max-seconds)")
    parser.add_argument("--loss", choices=("kl", "mse", "kl+mse"), default="kl", help="recover: training loss")
    parser.add_argument("--hidden-weight", type=float, default=1.0, help="recover: weight of the hidden MSE (kl+mse)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other recover-stage option (YAML value), e.g. --set gradient_checkpointing=false")
    parser.add_argument("--reuse-json", help="rows of an earlier bench/quantize.py or bench/prune.py --json run with "
                        "the same P1 options: the dense model and any base recipe found there are not compressed and "
                        "evaluated again (their rows are copied, marked 'reused')")
    parser.add_argument("--memory", action="store_true", help="measure peak memory of LoRA vs full fine-tuning")
    parser.add_argument("--_measure", choices=("lora", "full"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure:
        return _measure(args._measure, args.model, args.steps, args.batch, args.rec_seqlen, args.rank)
    if args.memory:
        rows = [run_json([sys.executable, __file__, "--_measure", mode, "--model", args.model, "--steps", str(args.steps),
                      "--batch", str(args.batch), "--rec-seqlen", str(args.rec_seqlen), "--rank", str(args.rank)])
                for mode in ("lora", "full")]
        print(f"{args.model}: {args.steps} steps of {args.batch} x {args.rec_seqlen} tokens, AdamW, fp32")
        print("| training | trainable parameters | optimizer state MiB | peak RSS MiB | peak RSS during load MiB |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['mode']} | {r['trainable_parameters']:,} | {r['optimizer_state_bytes'] / 2**20:.1f} "
                  f"| {r['peak_rss_bytes'] / 2**20:.0f} | {r['rss_after_load_bytes'] / 2**20:.0f} |")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return
    import torch

    evaluate, compress = evaluate_options(args), compress_options(args)
    reused = {r["recipe"]: r for r in json.loads(Path(args.reuse_json).read_text())} if args.reuse_json else {}
    if "dense fp32" in reused:
        dense_row = {k: reused["dense fp32"][k] for k in ("recipe", "wikitext2", "enwiki", "kl")}
        rows = [{**dense_row, "reused": check_reused(parser, args, reused["dense fp32"], args.reuse_json, DENSE_KEYS)}]
    else:
        dense = run_json(CLI + ["evaluate", args.model] + evaluate)
        rows = [{"recipe": "dense fp32", "wikitext2": dense["perplexity"][0]["ppl"],
                 "enwiki": dense["perplexity"][1]["ppl"], "kl": 0.0}]
    dense_ppl = rows[0]["wikitext2"]
    recover = {"method": "recover", "steps": args.steps, "batch": args.batch, "seqlen": args.rec_seqlen,
               "lr": args.lr, "rank": args.rank, "alpha": 2 * args.rank, "eval_windows": args.eval_windows,
               "seed": args.seed, "loss": args.loss, "hidden_weight": args.hidden_weight}
    if args.max_seconds:
        recover["max_seconds"] = args.max_seconds
    if args.eval_every:
        recover["eval_every"] = args.eval_every
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE, e.g. --set gradient_checkpointing=false")
        recover[key] = yaml.safe_load(value)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.recipes.split(","):
            from lmshrink.pipeline.presets import PRESETS

            yaml_path = work / f"{name.replace(':', '-')}+recover.yaml"
            yaml_path.write_text(yaml.safe_dump({"name": f"{name}+recover",
                                                 "stages": PRESETS[name]["stages"] + [recover]}))
            before = None
            if name in reused:
                rows.append({**{k: reused[name][k] for k in ("recipe", "wikitext2", "enwiki", "kl")},
                             "reused": check_reused(parser, args, reused[name], args.reuse_json)})
                before = rows[-1]["wikitext2"]
            for recipe in (name, str(yaml_path))[1 if name in reused else 0:]:
                out = work / Path(recipe).stem.replace(":", "-")
                record = run_json(CLI + ["compress", args.model, "--recipe", recipe, "-o", str(out)] + compress)
                result = run_json(CLI + ["evaluate", str(out), "--kl-base", args.model] + evaluate)
                row = {"recipe": record["recipe"]["name"], "wikitext2": result["perplexity"][0]["ppl"],
                       "enwiki": result["perplexity"][1]["ppl"], "kl": result["kl"]["kl_mean"]}
                if "recover" in record:
                    rec = record["recover"][0]
                    final = rec.get("held_out_after_merge", rec["held_out_after"])
                    row.update(recover_seconds=rec["train_seconds"], steps_run=rec["steps_run"],
                               stopped_by=rec.get("stopped_by"),
                               best_step=rec["best_step"], held_out_kl=(rec["held_out_before"]["kl"], final["kl"]),
                               codes_changed=rec.get("merge", {}).get("quantized_codes_changed"),
                               held_out_kl_adapters=rec["held_out_after"]["kl"],
                               merge_gain_kept=rec.get("merge", {}).get("gain_kept"),
                               gap_closed=(before - row["wikitext2"]) / (before - dense_ppl)
                               if before is not None and before != dense_ppl else None,
                               memory=rec["memory"])
                else:
                    before = row["wikitext2"]
                rows.append(row)
                keep_row(args, rows, row["recipe"])
    print(f"{protocol_line(args)}; recover stage: {json.dumps(recover)}"
          f"{f'; rows marked * reused from {args.reuse_json}' if reused else ''}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| recipe | wikitext2 ppl | enwiki-sample ppl | KL to base | gap closed | steps (best) | recover s "
          "| held-out KL before -> after | codes changed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gap = "" if r.get("gap_closed") is None else f"{100 * r['gap_closed']:.1f}%"
        steps = f"{r['steps_run']} ({r['best_step']}; {r.get('stopped_by')})" if "steps_run" in r else ""
        secs = f"{r['recover_seconds']:.0f}" if "recover_seconds" in r else ""
        held = "{:.4f} -> {:.4f}".format(*r["held_out_kl"]) if "held_out_kl" in r else ""
        codes = "" if r.get("codes_changed") is None else f"{100 * r['codes_changed']:.3f}%"
        print(f"| {r['recipe']}{' *' if r.get('reused') else ''} | {r['wikitext2']:.3f} | {r['enwiki']:.3f} | {r['kl']:.4f} | {gap} | {steps} "
              f"| {secs} | {held} | {codes} |")
    if args.json:
        Path(args.json).write_text(json.dumps(stamp(args, rows), indent=1))


if __name__ == "__main__":
    main()
