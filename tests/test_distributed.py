"""Data-parallel calibration (engine.distributed): statistics that do not depend on how the batches are split, and
2-rank gloo runs (torchrun and the Python API) that save the same folder as one process, resume after a rank dies,
and say clearly that one did."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import folder_digest, save_tiny_llama, write_calibration_text

from lmshrink import compress, load_model
from lmshrink.core.errors import LmshrinkError
from lmshrink.core.stage import Scope, StageBase
from lmshrink.engine.distributed import Group
from lmshrink.engine.statistics import ChannelAccumulator, CrossAccumulator, HessianAccumulator

SRC = Path(__file__).resolve().parents[1] / "src"
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
# every statistic the engine reduces: the column norms (wanda), the Hessian, the uncompressed stream (fp_target), and
# a hand-over from one stage to the next (wanda's mask, kept by GPTQ)
RECIPE = [{"method": "wanda", "sparsity": 0.25, "targets": ["*mlp*"]},
          {"method": "gptq", "bits": 4, "group_size": 32, "clip_search": False, "fp_target": True}]
NSAMPLES = 24  # three batches of 8 windows: rank 0 runs two, rank 1 one


def _batches(gen, count, width=40):
    return [torch.randn(int(torch.randint(1, 4, (1,), generator=gen)), 7, width, generator=gen) * (1 + i)
            for i in range(count)]


def test_statistics_do_not_depend_on_how_the_batches_are_split_or_ordered():
    gen = torch.Generator().manual_seed(0)
    batches = _batches(gen, 9, width=300)  # over 256 columns: the banded upper-triangle product
    paired = [b + 0.01 * torch.randn(b.shape, generator=gen) for b in batches]

    def accumulate(order, parts):
        """``parts`` accumulators, each fed every ``parts``-th batch of ``order``, summed as ranks would be."""
        accs = [(HessianAccumulator(300), CrossAccumulator(300), ChannelAccumulator(300)) for _ in range(parts)]
        for position, b in enumerate(order):
            h, c, ch = accs[position % parts]
            h.add_batch(batches[b])
            c.add_batch(paired[b], batches[b])
            ch.add_batch(batches[b])
        total = accs[0]
        for other in accs[1:]:  # what an all-reduce does with the float64 totals
            total[0]._total += other[0]._total
            total[0].nsamples += other[0].nsamples
            total[1]._total += other[1]._total
            total[1].nsamples += other[1].nsamples
            total[2]._sq += other[2]._sq
            total[2]._abs += other[2]._abs
            total[2].min = torch.minimum(total[2].min, other[2].min)
            total[2].max = torch.maximum(total[2].max, other[2].max)
        return total[0].hessian, total[1].cross, total[2].sq_sum, total[2].abs_sum, total[2].min

    one = accumulate(list(range(9)), 1)
    for order, parts in [([8, 3, 1, 0, 5, 2, 7, 6, 4], 1), (list(range(9)), 2), ([4, 0, 8, 2, 6, 1, 3, 7, 5], 3)]:
        for a, b in zip(one, accumulate(order, parts)):
            assert torch.equal(a, b)
    # and they are the statistics: H = 2/n X^T X (n samples), symmetric
    rows = torch.cat([b.reshape(-1, 300) for b in batches]).double()
    samples = sum(b.shape[0] for b in batches)
    reference = 2 / samples * rows.T @ rows
    torch.testing.assert_close(one[0].double(), reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max()))
    assert torch.equal(one[0], one[0].T)


def test_a_read_statistic_cannot_take_more_batches():
    acc = HessianAccumulator(8)
    acc.add_batch(torch.randn(2, 3, 8))
    acc.hessian
    with pytest.raises(RuntimeError, match="read already"):
        acc.add_batch(torch.randn(2, 3, 8))


def test_a_layer_that_saw_no_token_gets_zero_statistics_not_nan():
    assert torch.equal(HessianAccumulator(4).hessian, torch.zeros(4, 4))
    assert torch.equal(CrossAccumulator(4).cross, torch.zeros(4, 4))


def test_too_few_batches_for_the_ranks_is_refused_with_a_fix():
    with pytest.raises(LmshrinkError, match="every rank needs at least one batch") as err:
        Group(rank=0, world=3).check_batches(2, 8)
    assert "24 calibration windows" in err.value.fix


def test_block_stages_that_do_not_reduce_their_own_sums_are_refused_in_a_data_parallel_run():
    class LocalBlockStage(StageBase):
        scope = Scope.BLOCK
        method: str = "local-block"

    class ReducingBlockStage(LocalBlockStage):
        data_parallel = True

    assert not LocalBlockStage().supports_data_parallel()
    assert ReducingBlockStage().supports_data_parallel()
    from lmshrink.engine.loop import Engine
    from lmshrink.models.adapters import get_adapter
    from helpers import tiny_llama

    model = tiny_llama()
    engine = Engine(model, get_adapter(model), [LocalBlockStage()], torch.zeros(16, 8, dtype=torch.long),
                    progress=False, group=Group(rank=0, world=2))
    with pytest.raises(LmshrinkError, match="local-block do not support data-parallel") as err:
        engine.run()  # refused before any collective
    assert "single process" in err.value.fix


def test_single_process_features_are_refused_clearly_in_a_data_parallel_run():
    """Block removal (prune-depth) and block stages that read Stat.FP_TARGET work in a single process only: with
    several ranks they are refused before any collective, naming the stage and the fix."""
    from helpers import tiny_llama

    from lmshrink.core.stage import Stat
    from lmshrink.engine.loop import Engine
    from lmshrink.methods.structured.stages import DepthStage
    from lmshrink.models.adapters import get_adapter

    class DriftBlockStage(StageBase):
        scope = Scope.BLOCK
        data_parallel = True
        method: str = "drift-block"

        def needs(self):
            return frozenset({Stat.FP_TARGET})

    for stage, message in ((DepthStage(method="prune-depth", remove=[1]), "prune-depth do not support data-parallel"),
                           (DriftBlockStage(), "drift-block read Stat.FP_TARGET")):
        model = tiny_llama()
        engine = Engine(model, get_adapter(model), [stage], torch.zeros(16, 8, dtype=torch.long), progress=False,
                        group=Group(rank=0, world=2))
        with pytest.raises(LmshrinkError, match=message) as err:
            engine.run()
        assert "single process" in err.value.fix


# -- two gloo ranks ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    model = save_tiny_llama(root / "model", seed=3, num_hidden_layers=3)
    calib = f"file:{write_calibration_text(root / 'calib.txt')}"
    single = root / "single"
    record = compress(load_model(str(model), progress=False), RECIPE, output=single, calibration=calib,
                      nsamples=NSAMPLES, seqlen=32, progress=False)
    assert record["summary"]["ranks"] == 1
    return {"root": root, "model": model, "calib": calib, "single": folder_digest(single),
            "layers": record["layers"]}


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(SRC), str(WORKER.parent), os.environ.get("PYTHONPATH", "")]))
    env.pop("WORLD_SIZE", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *map(str, args)], env=_env(), capture_output=True, text=True, timeout=300)


def _recipe_file(root: Path) -> Path:
    path = root / "recipe.json"
    path.write_text(json.dumps({"stages": RECIPE}))
    return path


def _same_records(a: list[dict], b: list[dict]) -> None:
    assert [(x["name"], x["method"], x["tokens"], x["rel_output_error"]) for x in a] == \
        [(x["name"], x["method"], x["tokens"], x["rel_output_error"]) for x in b]


def test_two_ranks_under_torchrun_save_the_single_process_folder(setup):
    out = setup["root"] / "torchrun"
    run = _torchrun("-m", "lmshrink", "compress", setup["model"], "--recipe", _recipe_file(setup["root"]), "-o", out,
                    "--calib", setup["calib"], "--nsamples", NSAMPLES, "--seqlen", 32, "--offload", "disk", "--quiet")
    assert run.returncode == 0, run.stderr[-3000:]
    assert folder_digest(out) == setup["single"]
    record = json.loads((out / "lmshrink.json").read_text())
    assert record["summary"]["ranks"] == 2 and record["summary"]["backend"] == "gloo"
    assert len(record["summary"]["peak_rss_bytes_per_rank"]) == 2
    _same_records(record["layers"], setup["layers"])


def test_a_rank_that_dies_stops_the_group_with_a_clear_error_and_the_run_resumes(setup):
    out = setup["root"] / "killed"
    port = str(_free_port())
    ranks = []
    for rank in (0, 1):
        env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        ranks.append(subprocess.Popen(
            [sys.executable, str(WORKER), str(setup["model"]), setup["calib"], str(_recipe_file(setup["root"])),
             str(out), "--nsamples", str(NSAMPLES), "--die-rank", "1", "--die-after-block", "0"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in ranks]
    assert ranks[1].returncode == 17  # the crash
    assert ranks[0].returncode == 2, outputs[0]
    message = outputs[0][1]
    assert "lmshrink: error (rank 0): the data-parallel run stopped: rank 0 of 2" in message
    assert "another of the 2 ranks ended" in message and f"saved in {out}.partial" in message
    assert "--resume" in message
    assert json.loads((Path(f"{out}.partial") / "state.json").read_text())["finished_blocks"] == 1
    assert not out.exists()

    resumed = _torchrun("-m", "lmshrink", "compress", setup["model"], "--recipe", _recipe_file(setup["root"]),
                        "-o", out, "--calib", setup["calib"], "--nsamples", NSAMPLES, "--seqlen", 32,
                        "--offload", "disk", "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = json.loads((out / "lmshrink.json").read_text())
    assert record["summary"]["resumed_from_block"] == 1
    assert folder_digest(out) == setup["single"]
    _same_records(record["layers"], setup["layers"])


def test_a_correction_built_on_an_earlier_stage_s_result_matches_the_single_process_folder(setup):
    """A lowrank-correction reads the result an earlier stage left (LAST_RESULT); each layer is solved by one rank,
    so the hand-over must reach every rank: the 2-rank folder is the single-process one."""
    recipe = {"order": "group", "stages": [{"method": "gptq", "bits": 3, "group_size": 32, "fp_target": True},
                                           {"method": "lowrank-correction", "rank": 4}]}
    path = setup["root"] / "recipe-lrc.json"
    path.write_text(json.dumps(recipe))
    single = setup["root"] / "lrc-single"
    compress(load_model(str(setup["model"]), progress=False), recipe, output=single, calibration=setup["calib"],
             nsamples=NSAMPLES, seqlen=32, progress=False)
    out = setup["root"] / "lrc-torchrun"
    run = _torchrun("-m", "lmshrink", "compress", setup["model"], "--recipe", path, "-o", out,
                    "--calib", setup["calib"], "--nsamples", NSAMPLES, "--seqlen", 32, "--quiet")
    assert run.returncode == 0, run.stderr[-3000:]
    assert folder_digest(out) == folder_digest(single)
