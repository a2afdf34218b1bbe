"""Short recovery runs from one saved compressed model, to compare recover settings at equal training time.

    python bench/recover_probe.py STUDENT_DIR --data-dir ../shared/data --max-seconds 600 \\
        --variant lora:lr=5e-4 --variant full:adapter=full,lr=1e-4 --json probe.json

Each variant loads the student folder and the dense teacher afresh and runs one recover stage (the P1 recovery
settings of docs/recovery.md unless the variant sets an option: KL, 4 x 256-token windows per step, lr 5e-4, no
gradient checkpointing, an evaluation every 10 steps, no early stopping) for --max-seconds of wall time, on the
calibration text's held-out documents (C4 by default). Prints each variant's held-out KL and perplexity after every
evaluation, so the curves compare at equal time. Nothing is saved but the --json record.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from lmshrink.formats.loading import load_model
from lmshrink.methods.recover.stage import RecoverStage
from lmshrink.methods.recover.train import recover

BASE = {"method": "recover", "steps": 100000, "eval_every": 10, "patience": 0, "seqlen": 256, "batch": 4,
        "lr": 5e-4, "gradient_checkpointing": False, "save_every": 0}


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("student", help="a compressed model folder")
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--data", default="c4", help="text set for training and held-out windows")
    parser.add_argument("--data-dir", default=os.environ.get("LMSHRINK_DATA", "../shared/data"))
    parser.add_argument("--max-seconds", type=float, default=600)
    parser.add_argument("--variant", action="append", required=True, metavar="NAME:k=v,k=v")
    parser.add_argument("--json")
    args = parser.parse_args()
    records = []
    for spec in args.variant:
        name, _, options = spec.partition(":")
        overrides = dict(item.split("=", 1) for item in options.split(",") if item)
        stage = RecoverStage(**{**BASE, "max_seconds": args.max_seconds, "data": args.data,
                                **{k: _value(v) for k, v in overrides.items()}})
        student = load_model(args.student, progress=False)
        teacher = load_model(args.teacher, progress=False)
        started = time.perf_counter()
        record = recover(student.model, teacher.model.requires_grad_(False), student.tokenizer, stage, {},
                         default_data=args.data, data_dir=args.data_dir, progress=False)
        seconds = time.perf_counter() - started
        history = [{k: h.get(k) for k in ("step", "kl", "ppl")} for h in record["history"]]
        final = record.get("held_out_after_merge", record["held_out_after"])
        records.append({"variant": name, "options": overrides, "seconds": seconds, "steps": record["steps_run"],
                        "before": record["held_out_before"], "after": final, "history": history,
                        "torch_threads": torch.get_num_threads()})
        print(f"{name}: {record['steps_run']} steps in {seconds:.0f}s; held-out KL {record['held_out_before']['kl']:.4f}"
              f" -> {final['kl']:.4f}, ppl {record['held_out_before']['ppl']:.3f} -> {final['ppl']:.3f} "
              f"(teacher {final['teacher_ppl']:.3f})", flush=True)
        print("  " + " ".join(f"{h['step']}:{h['kl']:.4f}" for h in history), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
