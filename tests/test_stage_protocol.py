"""The stage protocol: a method of each scope, registered from this file alone (nothing in lmshrink knows it), runs
through ``compress``, resumes after a kill bit-identically and gives the same folder streamed from disk.

* layer scope: ``toy-quiet-columns`` zeroes the input columns whose mean |x| is smallest (``Stat.CHANNELS``);
* block scope: ``toy-fold`` moves a per-channel scale from q/k/v's columns into the attention norm (the float
  model is unchanged), reporting the tensors it changed;
* model scope: ``toy-permute`` permutes the residual stream (embeddings, norms, head outside the blocks; every
  block through ``transform_block``), and ``toy-budget`` runs a statistics pass over all blocks and gives a later
  stage per-block options.
"""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from helpers import assert_resume_and_streaming_identical, save_tiny_llama, write_calibration_text

from lmshrink import compress, load_model
from lmshrink.core.results import PruneResult
from lmshrink.core.stage import BlockOutcome, Scope, StageBase, Stat, register_stage, stage_types, unregister_stage
from lmshrink.models.adapters import linear_weight
from lmshrink.pipeline.recipe import RecipeError, parse_recipe


@register_stage
class QuietColumns(StageBase):
    method: Literal["toy-quiet-columns"] = "toy-quiet-columns"
    fraction: float = 0.25

    def needs(self) -> frozenset[Stat]:
        return frozenset({Stat.CHANNELS})

    def solve(self, job) -> PruneResult:
        weight = linear_weight(job.module).detach().float().clone()
        channels = job.stats.channels
        quiet = torch.argsort(channels.abs_sum / channels.tokens)[: int(self.fraction * weight.shape[1])]
        mask = torch.zeros_like(weight, dtype=torch.bool)
        mask[:, quiet] = True
        return PruneResult.from_weight(weight, mask, pattern="unstructured", target_sparsity=self.fraction)


@register_stage
class Fold(StageBase):
    scope = Scope.BLOCK
    method: Literal["toy-fold"] = "toy-fold"

    def solve_block(self, job) -> BlockOutcome:
        names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
        stats = job.collect(frozenset({Stat.CHANNELS}), {names[0]: job.block.get_submodule(names[0])})
        scale = (stats[names[0]].channels.abs_sum / stats[names[0]].channels.tokens).clamp_min(1e-3).sqrt()
        with torch.no_grad():
            job.block.input_layernorm.weight.div_(scale)
            for name in names:
                job.block.get_submodule(name).weight.mul_(scale)
        return BlockOutcome(changed=["input_layernorm.weight"] + [f"{n}.weight" for n in names])


def _permutation(width: int) -> torch.Tensor:
    return torch.randperm(width, generator=torch.Generator().manual_seed(7))


@register_stage
class Permute(StageBase):
    scope = Scope.MODEL
    method: Literal["toy-permute"] = "toy-permute"

    def before_blocks(self, job, number: int) -> None:
        model = job.model
        perm = _permutation(model.config.hidden_size)
        with torch.no_grad():
            embed = model.get_input_embeddings().weight
            embed.copy_(embed[:, perm])
            model.model.norm.weight.copy_(model.model.norm.weight[perm])
            head = model.get_output_embeddings().weight
            head.copy_(head[:, perm])

    def transform_block(self, index: int, block) -> list[str]:
        perm = _permutation(block.input_layernorm.weight.shape[0])
        readers = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"]
        writers = ["self_attn.o_proj", "mlp.down_proj"]
        with torch.no_grad():
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight.copy_(norm.weight[perm])
            for name in readers:
                weight = block.get_submodule(name).weight
                weight.copy_(weight[:, perm])
            for name in writers:
                weight = block.get_submodule(name).weight
                weight.copy_(weight[perm])
        return ["input_layernorm.weight", "post_attention_layernorm.weight"] + [f"{n}.weight" for n in readers + writers]


@register_stage
class Budget(StageBase):
    scope = Scope.MODEL
    method: Literal["toy-budget"] = "toy-budget"

    def before_blocks(self, job, number: int) -> None:
        def loudness(index, block, stats):
            return float(sum(s.channels.sq_sum.sum() / s.channels.tokens for s in stats.values()))

        levels = job.statistics_pass(frozenset({Stat.CHANNELS}), self.selects, loudness)
        louder = max(range(len(levels)), key=levels.__getitem__)
        for block in range(len(levels)):  # the next stage rounds the loudest block to 8 bits, the others to 4
            job.set_block_options(number + 1, block, {"bits": 8 if block == louder else 4})
        job.log(f"toy-budget: input energy per block {levels}")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-protocol"), num_hidden_layers=2, hidden_size=64,
                           intermediate_size=128)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    return write_calibration_text(tmp_path_factory.mktemp("text") / "calib.txt", "A toy method is one room.")


def _compress(tiny_dir, calib_file, recipe, **kw):
    return compress(load_model(str(tiny_dir), progress=False), recipe, calibration=f"file:{calib_file}", nsamples=4,
                    seqlen=32, progress=False, **kw)


def _logits(model):
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


RTN8 = {"method": "rtn", "bits": 8, "group_size": 32}
RECIPES = {
    "layer": [{"method": "toy-quiet-columns", "targets": ["*mlp*"]}, RTN8 | {"targets": ["*self_attn*"]}],
    "block": [{"method": "toy-fold"}],
    "block-then-rtn": [{"method": "toy-fold"}, RTN8 | {"targets": ["*mlp*"]}],
    "model": [{"method": "toy-permute"}],
    "model-budget": [{"method": "toy-budget"}, {"method": "rtn", "group_size": 32, "symmetric": True}],
}


def test_toy_stages_are_registered_and_parse_like_built_in_ones():
    assert {"toy-quiet-columns", "toy-fold", "toy-permute", "toy-budget"} <= set(stage_types())
    recipe = parse_recipe(RECIPES["layer"])
    assert recipe.stages[0].fraction == 0.25 and recipe.stages[0].needs() == {Stat.CHANNELS}
    with pytest.raises(RecipeError, match="toy-fold.*unknown option 'alpha'"):
        parse_recipe([{"method": "toy-fold", "alpha": 1}])


def test_a_registered_stage_can_be_removed():
    @register_stage
    class Gone(StageBase):
        method: Literal["toy-gone"] = "toy-gone"

    assert "toy-gone" in stage_types()
    unregister_stage("toy-gone")
    with pytest.raises(RecipeError, match="unknown method 'toy-gone'"):
        parse_recipe([{"method": "toy-gone"}])


def test_layer_stage_gets_the_statistics_it_asks_for(tiny_dir, calib_file):
    record = _compress(tiny_dir, calib_file, RECIPES["layer"])
    mlp = [layer for layer in record["layers"] if ".mlp." in layer["name"]]
    assert len(mlp) == 6 and all(layer["method"] == "toy-quiet-columns" and layer["tokens"] == 128 for layer in mlp)
    for layer in mlp:
        result = record["results"][layer["name"]]
        assert isinstance(result, PruneResult)
        quiet = result.mask.all(dim=0)  # whole input columns
        assert int(quiet.sum()) == layer["in_features"] // 4 and torch.equal(result.mask, quiet.expand_as(result.mask))


def test_block_stage_folds_a_scale_without_changing_the_float_model(tiny_dir, calib_file):
    dense = load_model(str(tiny_dir), progress=False).model
    folded = load_model(str(tiny_dir), progress=False)
    compress(folded, RECIPES["block"], calibration=f"file:{calib_file}", nsamples=4, seqlen=32, progress=False)
    assert not torch.equal(folded.model.model.layers[0].input_layernorm.weight, dense.model.layers[0].input_layernorm.weight)
    torch.testing.assert_close(_logits(folded.model), _logits(dense), rtol=1e-4, atol=1e-4)


def test_model_stage_permutes_the_residual_stream_without_changing_the_float_model(tiny_dir, calib_file):
    dense = load_model(str(tiny_dir), progress=False).model
    permuted = load_model(str(tiny_dir), progress=False)
    compress(permuted, RECIPES["model"], calibration=f"file:{calib_file}", nsamples=4, seqlen=32, progress=False)
    assert not torch.equal(permuted.model.lm_head.weight, dense.lm_head.weight)
    torch.testing.assert_close(_logits(permuted.model), _logits(dense), rtol=1e-4, atol=1e-4)


def test_model_stage_statistics_pass_gives_a_later_stage_per_block_options(tiny_dir, calib_file):
    record = _compress(tiny_dir, calib_file, RECIPES["model-budget"])
    options = record["block_options"]["stage 2"]
    assert sorted(options) == ["0", "1"] and sorted(o["bits"] for o in options.values()) == [4, 8]
    for layer in record["layers"]:
        assert record["results"][layer["name"]].spec.bits == options[str(layer["block"])]["bits"]


@pytest.mark.parametrize("scope", list(RECIPES))
def test_resume_and_streaming_are_bit_identical(tiny_dir, calib_file, tmp_path, scope):
    def run(output, streamed=False, **kw):
        source = str(tiny_dir) if streamed else load_model(str(tiny_dir), progress=False)
        return compress(source, RECIPES[scope], output=output, calibration=f"file:{calib_file}", nsamples=4,
                        seqlen=32, progress=False, offload="disk" if streamed else "none", **kw)

    assert_resume_and_streaming_identical(tmp_path, run)
    # the saved folder is the compressed model: it reloads to the in-memory result
    in_memory = load_model(str(tiny_dir), progress=False)
    compress(in_memory, RECIPES[scope], calibration=f"file:{calib_file}", nsamples=4, seqlen=32, progress=False)
    torch.testing.assert_close(_logits(load_model(str(tmp_path / "full"), progress=False).model),
                               _logits(in_memory.model))
