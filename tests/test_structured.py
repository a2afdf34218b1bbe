"""Structured pruning (prune-width, prune-depth): removing structures whose weights are zero leaves the logits
unchanged on every family; grouped-query attention stays valid (the KV cache included); the saved folder loads in
plain transformers with the in-memory model's logits (per-layer widths load with lmshrink only); budgets are met
exactly; resume and streaming are bit-identical; the repair and the second-order score do what their formulas
say; and impossible requests fail naming the fix."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import (
    assert_resume_and_streaming_identical,
    correlated_layer,
    save_tiny_llama,
    tiny_tokenizer,
    write_calibration_text,
)
from tiny_families import FAMILIES, tiny_model
from transformers import AutoModelForCausalLM

from lmshrink import compress, load_model
from lmshrink.core.errors import LmshrinkError
from lmshrink.methods.structured.width import InputStats, Units, refit, scores
from lmshrink.models.adapters import get_adapter
from lmshrink.models.structure import STRUCTURE_KEY, config_structure, head_counts, width_layout
from lmshrink.pipeline.recipe import RecipeError, parse_recipe


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    return write_calibration_text(tmp_path_factory.mktemp("text") / "calib.txt", "Heads and channels go.")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-structured"), num_hidden_layers=3, hidden_size=64,
                           intermediate_size=128)


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids() if ids is None else ids).logits


def _run(model, stages, calib_file, output=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compress(model, {"stages": stages}, output=output, calibration=f"file:{calib_file}", nsamples=4,
                        seqlen=32, progress=False, tokenizer=tiny_tokenizer(), overwrite=True, **kw)


def _zero_units(model, heads: bool, gqa: str) -> None:
    """Zero every weight of one head step and of FFN channels 3, 7, ... (16 of them) in every block."""
    adapter = get_adapter(model)
    with torch.no_grad():
        for block in adapter.blocks(model):
            layout = width_layout(adapter, block)
            channels = torch.arange(3, 3 + 4 * 16, 4)
            for name in layout.producers_of_channels():
                weight = block.get_submodule(name).weight
                rows = torch.cat([channels, channels + weight.shape[0] // 2]) if name == layout.fused_ffn else channels
                if name in ("mlp.c_fc",):  # Conv1D: [in, out]
                    weight[:, rows] = 0
                else:
                    weight[rows] = 0
            out = block.get_submodule(layout.ffn_out).weight
            if layout.ffn_out == "mlp.c_proj":
                out[channels] = 0
            else:
                out[:, channels] = 0
            if not heads:
                continue
            dim = block.get_submodule(layout.attention).head_dim
            total, kv = head_counts(block, layout)
            per_group = total // kv
            zero_heads = ([g * per_group + 1 for g in range(kv)] if gqa == "queries" and per_group > 1
                          else list(range(per_group)))  # queries: head 1 of each group; else group 0
            columns = torch.cat([torch.arange(h * dim, (h + 1) * dim) for h in zero_heads])
            if layout.fused:  # GPT-2 c_attn [in, 3 * out], c_proj [in, out]
                c_attn = block.get_submodule(layout.fused).weight
                for part in range(3):
                    c_attn[:, part * total * dim + columns] = 0
                block.get_submodule(layout.o).weight[columns] = 0
                continue
            block.get_submodule(layout.q).weight[columns] = 0
            block.get_submodule(layout.o).weight[:, columns] = 0
            if not (gqa == "queries" and per_group > 1):
                for name in (layout.k, layout.v):
                    block.get_submodule(name).weight[:dim * 1] = 0


@pytest.mark.parametrize("family,gqa", [(f, "queries") for f in FAMILIES] + [("llama", "groups")])
def test_removing_zero_structures_leaves_logits_unchanged(family, gqa, calib_file, tmp_path):
    model = tiny_model(family)
    heads = family != "phi3"  # phi3's attention reads its head count from the shared config
    _zero_units(model, heads, gqa)
    expected = _logits(model)
    stage = {"method": "prune-width", "importance": "magnitude", "repair": "none", "gqa": gqa, "heads_removed": 1,
             "channels_removed": 16, "structures": ["heads", "channels"] if heads else ["channels"]}
    record = _run(model, [stage], calib_file, output=tmp_path / "out")
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)
    structure = record["structure"]
    assert structure["parameters_after"] < structure["parameters_before"]
    widths = structure["widths"][0]
    assert widths["ffn"] == get_adapter(model).blocks(model)[0].get_submodule(
        width_layout(get_adapter(model), get_adapter(model).blocks(model)[0]).ffn_out).weight.numel() // (
        model.config.get_text_config().hidden_size)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    in_memory = _logits(model)
    reloaded = load_model(str(tmp_path / "out"), progress=False).model
    assert torch.equal(_logits(reloaded), in_memory)
    if structure["plain_transformers"]:  # the config states the new widths: plain transformers builds the model
        assert STRUCTURE_KEY not in saved
        assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")), in_memory)
    else:  # OPT and GPT-2 derive the head size from the head count: their heads are recorded beside the config
        assert family in ("opt", "gpt2") and STRUCTURE_KEY in saved
        with pytest.raises(RuntimeError):
            AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("gqa,expected", [("queries", (2, 2)), ("groups", (2, 1))])
def test_grouped_query_attention_stays_valid(gqa, expected, calib_file, tmp_path):
    model = tiny_model("llama")
    _run(model, [{"method": "prune-width", "gqa": gqa, "heads_removed": 1, "structures": ["heads"]}], calib_file,
         output=tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    config = plain.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (*expected, 8)
    for block in plain.model.layers:
        assert block.self_attn.num_key_value_groups == expected[0] // expected[1]
    prompt = _ids()[:1, :8]
    cached = plain.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = plain.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(_logits(plain), _logits(model), rtol=0, atol=0)


def test_budgets_are_met_exactly(calib_file):
    fixed = tiny_model("llama")
    record = _run(fixed, [{"method": "prune-width", "heads_removed": 1, "channels_removed": 10}], calib_file)
    count = record["structure"]["parameters_after"]
    # the same widths as a parameter count: exactly that many parameters
    model = tiny_model("llama")
    record = _run(model, [{"method": "prune-width", "params": count, "heads_removed": 1}], calib_file)
    assert record["structure"]["parameters_after"] == count
    # a fraction: at least that much of the blocks removed, and one channel less would not be enough
    model = tiny_model("llama")
    record = _run(model, [{"method": "prune-width", "ratio": 0.25, "structures": ["channels"]}], calib_file)
    structure = record["structure"]
    before, after = structure["block_parameters_before"], structure["block_parameters_after"]
    channel = 3 * 32  # one channel: a row of gate and up, a column of down (hidden 32, no biases)
    assert after <= 0.75 * before < after + channel * 2  # two blocks
    # per-layer widths: the whole budget at once, within one removal step
    model = tiny_model("llama")
    record = _run(model, [{"method": "prune-width", "ratio": 0.25, "widths": "per-layer"}], calib_file)
    structure = record["structure"]
    assert structure["block_parameters_after"] <= 0.75 * structure["block_parameters_before"]
    head_step = 2 * 2 * 8 * 32  # the largest step: one query head of each of the 2 KV groups, q rows and o columns
    assert structure["block_parameters_after"] > 0.75 * structure["block_parameters_before"] - head_step


def test_per_layer_widths_load_with_lmshrink_only(tiny_dir, calib_file, tmp_path):
    model = load_model(str(tiny_dir), progress=False)
    record = compress(model, [{"method": "prune-width", "ratio": 0.3, "widths": "per-layer", "multiple": 32,
                               "importance": "second-order"}], output=tmp_path / "out",
                      calibration=f"file:{calib_file}", nsamples=4, seqlen=32, progress=False)
    assert not record["structure"]["uniform"] and not record["structure"]["plain_transformers"]
    assert "lmshrink.load_model" in record["structure"]["loads_with"]
    reloaded = load_model(str(tmp_path / "out"), progress=False).model
    assert torch.equal(_logits(reloaded), _logits(model.model))
    with pytest.raises(RuntimeError):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    # the folder compresses further, in memory or streamed from disk, and keeps its recorded widths
    for offload in ("none", "disk"):
        quantized = load_model(str(tmp_path / "out"), progress=False) if offload == "none" else str(tmp_path / "out")
        compress(quantized, "rtn-w4g32", output=tmp_path / f"q-{offload}", calibration=f"file:{calib_file}",
                 nsamples=4, seqlen=32, progress=False, offload=offload)
    quantized_model = load_model(str(tmp_path / "q-none"), progress=False).model
    assert torch.equal(_logits(load_model(str(tmp_path / "q-disk"), progress=False).model), _logits(quantized_model))
    for ours, theirs in zip(quantized_model.model.layers, reloaded.model.layers):
        assert ours.mlp.down_proj.weight.shape == theirs.mlp.down_proj.weight.shape


def test_depth_removes_blocks_and_the_config_follows(calib_file, tmp_path):
    model = tiny_model("gemma2", num_hidden_layers=3, layer_types=["sliding_attention", "full_attention",
                                                                     "sliding_attention"])
    blocks = model.model.layers
    skipped = blocks[1]
    # the expected model: block 1 left out of the forward
    keep = torch.nn.ModuleList([blocks[0], blocks[2]])
    record = _run(model, [{"method": "prune-depth", "remove": [1]}], calib_file, output=tmp_path / "out")
    assert record["structure"]["blocks_kept"] == [0, 2] and skipped not in list(model.model.layers)
    assert list(model.model.layers) == list(keep)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["layer_types"] == ["sliding_attention", "sliding_attention"]
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(_logits(plain), _logits(model))
    prompt = _ids()[:1, :8]
    assert torch.equal(plain.generate(prompt, max_new_tokens=6, do_sample=False),
                       plain.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False))


def test_depth_scores_choose_the_least_influential_blocks(calib_file):
    model = tiny_model("llama", num_hidden_layers=4)
    with torch.no_grad():  # block 2 adds almost nothing to the residual stream: its influence is the lowest
        model.model.layers[2].self_attn.o_proj.weight.mul_(1e-3)
        model.model.layers[2].mlp.down_proj.weight.mul_(1e-3)
    record = _run(model, [{"method": "prune-depth", "blocks": 1}], calib_file)
    assert record["structure"]["blocks_kept"] == [0, 1, 3]
    model = tiny_model("llama", num_hidden_layers=4)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-3)
        model.model.layers[1].self_attn.o_proj.weight.mul_(1e-3)
    record = _run(model, [{"method": "prune-depth", "blocks": 1, "score": "kl", "kl_windows": 2}], calib_file)
    assert record["structure"]["blocks_kept"] == [0, 2, 3]


RESUMED = {
    "per-layer": [{"method": "prune-width", "ratio": 0.3, "widths": "per-layer", "gqa": "groups",
                   "repair": "lstsq+bias"}],
    "depth-then-width": [{"method": "prune-depth", "blocks": 1}, {"method": "prune-width", "ratio": 0.2,
                                                                   "fp_target": True},
                         {"method": "rtn", "bits": 8, "group_size": -1, "symmetric": True, "targets": ["*mlp*"]}],
}


@pytest.mark.parametrize("name", list(RESUMED))
def test_resume_and_streaming_are_bit_identical(name, tiny_dir, calib_file, tmp_path):
    def run(output, streamed=False, **kw):
        source = str(tiny_dir) if streamed else load_model(str(tiny_dir), progress=False)
        return compress(source, RESUMED[name], output=output, calibration=f"file:{calib_file}", nsamples=4,
                        seqlen=32, progress=False, offload="disk" if streamed else "none", **kw)

    assert_resume_and_streaming_identical(tmp_path, run)
    configs = {json.loads((tmp_path / n / "config.json").read_text()).__repr__() for n in ("full", "resumed",
                                                                                             "streamed")}
    assert len(configs) == 1
    in_memory = load_model(str(tiny_dir), progress=False)
    compress(in_memory, RESUMED[name], calibration=f"file:{calib_file}", nsamples=4, seqlen=32, progress=False)
    torch.testing.assert_close(_logits(load_model(str(tmp_path / "full"), progress=False).model),
                               _logits(in_memory.model))


def test_repair_lowers_the_output_error_and_second_order_is_the_refit_error():
    weight, x, _ = correlated_layer(rows=12, cols=16, tokens=512)
    stats = InputStats(mean=x.mean(0), var=x.var(0, unbiased=False), mean_abs=x.abs().mean(0),
                       mean_sq=x.square().mean(0), second=x.t() @ x / x.shape[0])
    keep = torch.tensor([j for j in range(16) if j not in (2, 5, 11)])
    bias = torch.zeros(12)
    errors = {r: refit(weight, bias, keep, stats, r, 1e-9)[2]["rel_output_error"]
              for r in ("none", "bias", "lstsq", "lstsq+bias")}
    assert errors["lstsq+bias"] <= errors["lstsq"] < errors["none"] and errors["bias"] < errors["none"]
    # the second-order score of a channel is the output error of removing it alone with the others refit
    block = torch.nn.Module()
    block.mlp = torch.nn.Module()
    block.mlp.down_proj = torch.nn.Linear(16, 12, bias=False)
    block.mlp.down_proj.weight.data.copy_(weight)
    units = Units("channels", "mlp.down_proj", [torch.tensor([j]) for j in range(16)], {})
    obs = scores(block, units, stats, "second-order", 1e-9)
    for j in (0, 7):
        keep = torch.tensor([i for i in range(16) if i != j])
        new_w, _, _ = refit(weight, None, keep, stats, "lstsq", 1e-9)
        full = torch.zeros_like(weight)
        full[:, keep] = new_w
        diff = (weight - full).double()
        error = float(torch.einsum("oi,ij,oj->", diff, stats.second.double(), diff))
        assert abs(float(obs[j]) - error) <= 1e-3 * error


@pytest.mark.parametrize("stages,family,needle", [
    ([{"method": "prune-width", "ratio": 0.9}], "llama", "can remove at most"),
    ([{"method": "prune-width", "heads_removed": 2, "structures": ["heads"]}], "llama", "at most 1 head steps"),
    ([{"method": "prune-width", "ratio": 0.2}], "phi3", "shared config"),
    ([{"method": "prune-width", "ratio": 0.2, "repair": "bias"}], "mistral", "cannot turn on"),
    ([{"method": "prune-depth", "blocks": 2}], "llama", "leaves none"),
    ([{"method": "prune-width", "params": 10 ** 9}], "llama", "nothing to remove"),
])
def test_impossible_requests_fail_naming_the_fix(stages, family, needle, calib_file):
    with pytest.raises(LmshrinkError, match=needle) as caught:
        _run(tiny_model(family), stages, calib_file)
    assert caught.value.fix


def test_options_are_checked_when_the_recipe_parses():
    with pytest.raises(RecipeError, match="no budget"):
        parse_recipe([{"method": "prune-width"}])
    with pytest.raises(RecipeError, match="not both"):
        parse_recipe([{"method": "prune-width", "ratio": 0.2, "params": 1000}])
    with pytest.raises(RecipeError, match="exactly one"):
        parse_recipe([{"method": "prune-depth", "ratio": 0.2, "blocks": 2}])
    assert config_structure(tiny_model("llama")) == {}


def test_a_replaced_module_is_rebuilt_from_its_recorded_structure():
    """What a layer replacement (e.g. a low-rank factorization) leaves is re-applied to a fresh copy: the same
    module tree, shapes and attributes, ready for the saved values."""
    from lmshrink.models.structure import apply_structure, signature, structure_diff

    def block():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 8, bias=False))

    changed = block()
    before = signature(changed)
    changed[2] = torch.nn.Sequential(torch.nn.Linear(6, 2, bias=False), torch.nn.Linear(2, 8))
    changed[0].weight = torch.nn.Parameter(changed[0].weight[:5].clone())
    changed[0].bias = torch.nn.Parameter(changed[0].bias[:5].clone())
    changed[0].out_features = 5
    changed[2][0].weight = torch.nn.Parameter(torch.randn(2, 5))
    changed[2][0].in_features = 5
    diff = structure_diff(before, signature(changed))
    assert diff["modules"].keys() == {"2", "2.0", "2.1"}
    fresh = block()
    made = apply_structure(fresh, json.loads(json.dumps(diff)))
    assert signature(fresh) == signature(changed)
    with torch.no_grad():
        for name in made:
            fresh.get_parameter(name).copy_(changed.get_parameter(name))
    x = torch.randn(3, 8)
    assert torch.equal(fresh(x), changed(x))


def test_recovery_after_removing_blocks_matches_hidden_states_of_the_kept_blocks(tiny_dir, tmp_path):
    from helpers import write_word_paragraphs

    text = write_word_paragraphs(tmp_path / "text.txt", "the quick brown fox jumps over lazy dog pruning sets some "
                                 "weights to zero model quality grid a language keeps most of their")
    recover = {"method": "recover", "steps": 4, "seqlen": 32, "batch": 2, "lr": 3e-3, "eval_windows": 2, "rank": 4,
               "alpha": 8, "eval_every": 2, "patience": 0, "loss": "kl+mse"}
    model = load_model(str(tiny_dir), progress=False)
    record = compress(model, [{"method": "prune-depth", "remove": [1]}, recover], output=tmp_path / "out",
                      calibration=f"file:{text}", nsamples=4, seqlen=32, progress=False)
    assert record["structure"]["blocks_kept"] == [0, 2]
    assert record["recover"][0]["steps_run"] == 4
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(_logits(plain), _logits(model.model))


def test_full_recovery_trains_the_weights_and_keeps_pruned_zeros(tiny_dir, tmp_path):
    from helpers import write_word_paragraphs

    text = write_word_paragraphs(tmp_path / "text.txt", "the quick brown fox jumps over lazy dog pruning sets some "
                                 "weights to zero model quality grid a language keeps most of their")
    recover = {"method": "recover", "adapter": "full", "steps": 8, "seqlen": 32, "batch": 4, "lr": 1e-3,
               "eval_windows": 4, "eval_every": 4, "patience": 0}
    model = load_model(str(tiny_dir), progress=False)
    record = compress(model, [{"method": "sparsegpt", "sparsity": 0.5}, recover], output=tmp_path / "out",
                      calibration=f"file:{text}", nsamples=4, seqlen=32, progress=False)
    stage = record["recover"][0]
    assert stage["held_out_after_merge"]["kl"] < stage["held_out_before"]["kl"]
    assert stage["merge"]["mode"] == "full" and stage["merge"]["mean_rel_weight_change"] > 0
    for name, result in record["results"].items():
        weight = model.model.get_submodule(name).weight
        assert torch.equal(weight, result.weight) and bool((weight[result.mask] == 0).all())
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")), _logits(model.model))
    with pytest.raises(LmshrinkError, match="quantized"):
        compress(load_model(str(tiny_dir), progress=False), [{"method": "rtn", "bits": 8, "group_size": -1,
                                                              "symmetric": True}, recover],
                 calibration=f"file:{text}", nsamples=4, seqlen=32, progress=False)


def test_pruned_folder_quantizes_and_exports_to_gguf(calib_file, tmp_path):
    import gguf

    from lmshrink.formats.gguf_export import export_gguf

    source = save_tiny_llama(tmp_path / "dense", hidden_size=64, intermediate_size=256)
    compress(load_model(str(source), progress=False), [{"method": "prune-width", "ratio": 0.25, "multiple": 32}],
             output=tmp_path / "pruned", calibration=f"file:{calib_file}", nsamples=4, seqlen=32, progress=False)
    compress(str(tmp_path / "pruned"), "rtn-w4g32", output=tmp_path / "quantized", calibration=f"file:{calib_file}",
             nsamples=4, seqlen=32, progress=False)
    width = json.loads((tmp_path / "pruned" / "config.json").read_text())["intermediate_size"]
    assert width % 32 == 0 and width < 256
    export_gguf(tmp_path / "quantized", tmp_path / "model.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    field = reader.fields["llama.feed_forward_length"]
    assert int(field.parts[field.data[0]][0]) == width
