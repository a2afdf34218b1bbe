"""Engine speed with and without pass reuse (engine/replay.py), measured side by side in one run.

    python bench/engine_speed.py --nsamples 16 --recipe w4g128

Compresses the model twice with the same recipe and calibration (C4, seed 0), in the same process one after the
other, once running every collection pass in full and once reusing work between passes; prints wall and CPU
seconds of each engine run, their ratio, and checks that both give bit-identical codes and scales. Read the
ratio: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from lmshrink.core.process import cpu_seconds
from lmshrink.data.sources import load_text
from lmshrink.data.windows import calibration_windows
from lmshrink.engine.loop import Engine
from lmshrink.formats.loading import load_model
from lmshrink.models.adapters import get_adapter
from lmshrink.pipeline.recipe import load_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipe", default="w4g128")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--data-dir", default=os.environ.get("LMSHRINK_DATA", "../shared/data"))
    args = parser.parse_args()
    loaded = load_model(args.model, progress=False)
    recipe = load_recipe(args.recipe)
    text = load_text("c4", split="train", data_dir=args.data_dir)
    windows = calibration_windows(loaded.tokenizer, text, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    runs = {}
    for reuse in (False, True):
        model = copy.deepcopy(loaded.model)
        wall, cpu = time.perf_counter(), cpu_seconds()
        result = Engine(model, get_adapter(model), recipe, windows.input_ids, progress=False,
                        reuse_passes=reuse).run()
        runs[reuse] = (time.perf_counter() - wall, cpu_seconds() - cpu, result)
        del model
    (w0, c0, r0), (w1, c1, r1) = runs[False], runs[True]
    same = all(torch.equal(r0.results[n].codes, r1.results[n].codes)
               and torch.equal(r0.results[n].scale, r1.results[n].scale) for n in r0.results)
    print(f"{args.model}, recipe {args.recipe}, calibration {args.nsamples} x {args.seqlen} tokens of C4 (seed 0), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| passes | engine wall s | engine CPU s |")
    print("|---|---|---|")
    print(f"| every pass in full | {w0:.0f} | {c0:.0f} |")
    print(f"| reuse between passes | {w1:.0f} | {c1:.0f} |")
    print(f"reuse / full: wall {w1 / w0:.2f}, CPU {c1 / c0:.2f}; results bit-identical: {same}")


if __name__ == "__main__":
    main()
