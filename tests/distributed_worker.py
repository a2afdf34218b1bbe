"""One rank of a data-parallel compression through the Python API, for tests/test_distributed.py.

Run with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set (as torchrun sets them):
``python distributed_worker.py MODEL CALIB RECIPE_FILE OUTPUT [--die-after-block N --die-rank R] [--resume]``.
It initialises a gloo process group, calls ``lmshrink.compress`` inside it, and exits 0, or with the
``LmshrinkError`` printed and exit code 2; ``--die-rank R --die-after-block N`` makes rank R exit abruptly (as a
crash would) once block N is finished.
"""

import argparse
import json
import os
import sys

import torch.distributed as dist

from lmshrink import compress
from lmshrink.core.errors import LmshrinkError


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("calib")
    parser.add_argument("recipe")
    parser.add_argument("output")
    parser.add_argument("--nsamples", type=int, default=24)
    parser.add_argument("--die-rank", type=int)
    parser.add_argument("--die-after-block", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--offload", default="disk")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def on_block_done(index: int) -> None:
        if rank == args.die_rank and index == args.die_after_block:
            os._exit(17)  # no clean-up, no goodbye: what a crash or a kill looks like to the other ranks

    try:
        record = compress(args.model, args.recipe, output=args.output, calibration=args.calib,
                          nsamples=args.nsamples, seqlen=32, progress=False, offload=args.offload,
                          resume=args.resume, on_block_done=on_block_done)
    except LmshrinkError as err:
        print(f"lmshrink: error (rank {rank}): {err.message}\n  fix: {err.fix}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps({"rank": rank, "results": len(record["results"]), "layers": len(record["layers"]),
                      "resumed_from_block": record["summary"]["resumed_from_block"]}), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
