"""The engine on CUDA, and data-parallel calibration over NCCL: a short check for a machine with a GPU.

    python bench/gpu_check.py --workdir /tmp/gpu-check            # needs torch with CUDA and one or more GPUs

Works offline on tiny random models (tests/helpers.py): a 4-block Llama, GPTQ w4 (groups of 32) on 32 windows of 64
tokens of a generated text file. Checks, and prints one line each:

1. `lmshrink compress --device cuda` runs and its codes agree with the CPU run's up to float rounding (the share of
   codes that differ, and both runs' mean layer output error);
2. `--offload disk --device cuda` saves the same folder as `--device cuda` in memory;
3. with two or more GPUs: `torchrun --nproc-per-node 2 -m lmshrink compress ... --device cuda` (NCCL, one GPU per
   rank) saves the same folder as one process on one GPU; with one GPU this check is skipped (NCCL needs a GPU per
   rank).

Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _run(cmd: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def main() -> None:
    import torch
    from helpers import folder_digest, save_tiny_llama, write_calibration_text
    from safetensors import safe_open

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU visible: run this on a GPU machine")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = save_tiny_llama(work / "model", seed=3, num_hidden_layers=4, hidden_size=256, intermediate_size=512)
    calib = f"file:{write_calibration_text(work / 'calib.txt')}"
    recipe = work / "recipe.json"
    recipe.write_text(json.dumps({"stages": [{"method": "gptq", "bits": 4, "group_size": 32}]}))
    cli = [sys.executable, "-m", "lmshrink.cli", "compress", str(model), "--recipe", str(recipe), "--calib", calib,
           "--nsamples", "32", "--seqlen", "64", "--overwrite", "--json", "--quiet"]
    failed = []
    cpu = _run([*cli, "-o", str(work / "cpu")])
    gpu = _run([*cli, "-o", str(work / "cuda"), "--device", "cuda"])
    differ = total = 0
    with safe_open(str(work / "cpu" / "model.safetensors"), "pt") as a, \
            safe_open(str(work / "cuda" / "model.safetensors"), "pt") as b:
        for key in a.keys():
            if key.endswith("weight_packed"):
                total += a.get_tensor(key).numel()
                differ += int((a.get_tensor(key) != b.get_tensor(key)).sum())
    print(f"1. cuda vs cpu: {differ / total:.4%} of packed words differ; mean layer output error "
          f"{gpu['summary']['mean_rel_output_error']:.5f} (cuda) vs {cpu['summary']['mean_rel_output_error']:.5f} (cpu)")
    if not gpu["summary"]["mean_rel_output_error"] < 1.5 * cpu["summary"]["mean_rel_output_error"]:
        failed.append("cuda output error")
    _run([*cli, "-o", str(work / "cuda-streamed"), "--device", "cuda", "--offload", "disk"])
    same = folder_digest(work / "cuda-streamed") == folder_digest(work / "cuda")
    print(f"2. --offload disk on cuda saves the in-memory folder: {same}")
    failed += [] if same else ["streamed on cuda"]
    if torch.cuda.device_count() >= 2:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                    "lmshrink.cli", *cli[3:]]
        record = _run([*torchrun, "-o", str(work / "nccl"), "--device", "cuda"])
        same = folder_digest(work / "nccl") == folder_digest(work / "cuda")
        print(f"3. 2 ranks over {record['summary']['backend']} save the one-GPU folder: {same}")
        failed += [] if same else ["nccl data parallel"]
    else:
        print("3. skipped: one GPU (NCCL needs a GPU per rank)")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
