import copy

import pytest
import torch
from helpers import assert_same_run, tiny_llama
from tiny_families import FAMILIES, tiny_model

from lmshrink.core.errors import LmshrinkError
from lmshrink.core.grids import dequantize
from lmshrink.engine.capture import capture_block_inputs, run_block
from lmshrink.engine.checkpoint import Checkpoint
from lmshrink.engine.loop import Engine
from lmshrink.models.adapters import get_adapter
from lmshrink.pipeline.recipe import parse_recipe


def _calib(n=4, seqlen=48, seed=0):
    return torch.randint(0, 300, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_inputs_reproduce_the_model_forward(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    ids = _calib(n=2)
    store = capture_block_inputs(model, adapter.blocks(model), ids, torch.device("cpu"))
    seen = []
    norm = adapter.final_norm(model)
    hook = norm.register_forward_pre_hook(lambda m, args: seen.append(args[0])) if norm is not None else None
    with torch.no_grad():
        model(input_ids=ids[1:2], use_cache=False)
        hidden = store.hidden[1]
        for i, block in enumerate(adapter.blocks(model)):
            hidden = run_block(block, hidden, store.args[i], store.kwargs[i])
    if hook is not None:
        hook.remove()
        torch.testing.assert_close(hidden, seen[0], rtol=1e-5, atol=1e-5)


def _engine(model, recipe, checkpoint=None, resume=False, on_block_done=None, calib=None):
    return Engine(model, get_adapter(model), parse_recipe(recipe), _calib() if calib is None else calib,
                  checkpoint=checkpoint, resume=resume, progress=False, on_block_done=on_block_done).run()


GPTQ = [{"method": "gptq", "bits": 3, "group_size": 32}]


def test_engine_compresses_every_block_linear_onto_the_grid():
    model = tiny_llama(num_hidden_layers=3)
    result = _engine(model, GPTQ)
    assert len(result.results) == 3 * 7
    for name, r in result.results.items():
        weight = model.get_submodule(name).weight
        assert torch.equal(weight, r.weight)  # the model now holds the dequantized grid weights
        assert r.weight.data_ptr() == weight.data_ptr()  # float32 in memory: a view of the parameter, not a copy
        assert torch.equal(r.weight, dequantize(r.codes, r.scale, r.zero, r.group_index()))
        assert r.codes.max() <= 7 and r.rel_output_error is not None
    assert all(layer["tokens"] == 4 * 48 for layer in result.layers)


def test_gptq_beats_rtn_on_output_error():
    base = tiny_llama(num_hidden_layers=2, hidden_size=128, intermediate_size=256)
    gptq = _engine(copy.deepcopy(base), GPTQ)
    rtn = _engine(copy.deepcopy(base), [{"method": "rtn", "bits": 3, "group_size": 32}])
    mean = lambda r: sum(x["rel_output_error"] for x in r.layers) / len(r.layers)  # noqa: E731
    assert mean(gptq) < 0.8 * mean(rtn)


def test_true_sequential_changes_later_groups_only():
    base = tiny_llama(num_hidden_layers=1)
    seq = _engine(copy.deepcopy(base), [{"method": "gptq", "bits": 3, "group_size": 32, "true_sequential": True}])
    par = _engine(copy.deepcopy(base), [{"method": "gptq", "bits": 3, "group_size": 32, "true_sequential": False}])
    q = "model.layers.0.self_attn.q_proj"
    down = "model.layers.0.mlp.down_proj"
    assert torch.equal(seq.results[q].codes, par.results[q].codes)  # first group sees the same inputs
    assert not torch.equal(seq.results[down].codes, par.results[down].codes)


def test_targets_limit_the_layers():
    model = tiny_llama(num_hidden_layers=2)
    result = _engine(model, [{"method": "rtn", "bits": 4, "group_size": 32, "targets": ["*mlp*"]}])
    assert sorted({n.rsplit(".", 1)[-1] for n in result.results}) == ["down_proj", "gate_proj", "up_proj"]


class _Killed(Exception):
    pass


def test_resume_after_kill_is_bit_identical(tmp_path):
    base = tiny_llama(num_hidden_layers=3)
    full_model = copy.deepcopy(base)
    full = _engine(full_model, GPTQ)

    def kill_after_second_block(index):
        if index == 1:
            raise _Killed

    killed_model = copy.deepcopy(base)
    with pytest.raises(_Killed):
        _engine(killed_model, GPTQ, checkpoint=Checkpoint(tmp_path / "ck", "key"),
                on_block_done=kill_after_second_block)
    resumed_model = copy.deepcopy(base)  # a fresh process loads the untouched input model again
    resumed = _engine(resumed_model, GPTQ, checkpoint=Checkpoint(tmp_path / "ck", "key"), resume=True)
    assert resumed.resumed_from_block == 2
    assert_same_run(full, resumed, full_model, resumed_model)


def test_a_kill_between_the_hidden_states_and_the_state_file_still_resumes_bit_identically(tmp_path, monkeypatch):
    from lmshrink.engine import checkpoint as checkpoint_module

    base = tiny_llama(num_hidden_layers=3)
    full_model = copy.deepcopy(base)
    full = _engine(full_model, GPTQ)
    write_state = checkpoint_module.atomic_write_text
    calls = []

    def killed_on_the_second_state(path, text):  # block 1's hidden states are on disk, its state.json is not
        calls.append(path)
        if len(calls) == 2:
            raise _Killed
        return write_state(path, text)

    monkeypatch.setattr(checkpoint_module, "atomic_write_text", killed_on_the_second_state)
    with pytest.raises(_Killed):
        _engine(copy.deepcopy(base), GPTQ, checkpoint=Checkpoint(tmp_path / "ck", "key"))
    monkeypatch.setattr(checkpoint_module, "atomic_write_text", write_state)
    resumed_model = copy.deepcopy(base)
    resumed = _engine(resumed_model, GPTQ, checkpoint=Checkpoint(tmp_path / "ck", "key"), resume=True)
    assert resumed.resumed_from_block == 1
    assert_same_run(full, resumed, full_model, resumed_model)
    assert not (tmp_path / "ck").exists() or [p.name for p in (tmp_path / "ck").glob("hidden*")] == \
        ["hidden_0003.safetensors"]


def test_unreadable_saved_progress_fails_with_a_fix(tmp_path):
    base = tiny_llama(num_hidden_layers=3)
    with pytest.raises(_Killed):
        _engine(copy.deepcopy(base), GPTQ, checkpoint=Checkpoint(tmp_path / "ck", "key"),
                on_block_done=lambda index: (_ for _ in ()).throw(_Killed()) if index == 1 else None)
    (tmp_path / "ck" / "block_0001.safetensors").write_bytes(b"truncated")
    with pytest.raises(LmshrinkError, match="block_0001.safetensors from the saved progress cannot be read") as info:
        _engine(copy.deepcopy(base), GPTQ, checkpoint=Checkpoint(tmp_path / "ck", "key"), resume=True)
    assert "--restart" in info.value.fix


@pytest.mark.parametrize("stage", [{"method": "rtn", "bits": 4, "group_size": 32},
                                   {"method": "wanda", "sparsity": 0.5},
                                   {"method": "gptq", "bits": 4, "group_size": 32, "true_sequential": False}])
def test_a_stage_that_selects_nothing_in_some_blocks_skips_them(stage):
    model = tiny_llama(num_hidden_layers=2)
    result = _engine(model, [{**stage, "targets": ["model.layers.0.*"]}])
    assert sorted({name.split(".")[2] for name in result.results}) == ["0"] and len(result.results) == 7


def test_refit_scales_runs_on_pruned_layers_and_keeps_their_zeros():
    model = tiny_llama(num_hidden_layers=2)
    result = _engine(model, [{"method": "magnitude", "sparsity": 0.5, "targets": ["*mlp*"]},
                             {"method": "gptq", "bits": 3, "group_size": 32, "refit_scales": True}])
    mlp = [layer for layer in result.layers if layer["method"] == "gptq" and ".mlp." in layer["name"]]
    assert len(mlp) == 6 and all("refit_rows" in layer for layer in mlp)
    assert sum(layer["refit_rows"] for layer in mlp) > 0
    for layer in mlp:
        weight = model.get_submodule(layer["name"]).weight
        assert float((weight == 0).float().mean()) >= 0.5


def test_resume_refuses_progress_of_another_run(tmp_path):
    model = tiny_llama(num_hidden_layers=2)
    _engine(copy.deepcopy(model), GPTQ, checkpoint=Checkpoint(tmp_path / "ck", "run-a"))
    with pytest.raises(Exception, match="different run"):
        _engine(copy.deepcopy(model), GPTQ, checkpoint=Checkpoint(tmp_path / "ck", "run-b"), resume=True)


# -- stage order vs group order (the recipe's `order`) --------------------------------------------------------------

PRUNE = {"method": "sparsegpt", "sparsity": 0.5}
QUANT = {"method": "gptq", "bits": 4, "group_size": 16}
LLAMA_GROUPS = [["*q_proj", "*k_proj", "*v_proj"], ["*o_proj"], ["*gate_proj", "*up_proj"], ["*down_proj"]]


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _count_passes(monkeypatch):
    from lmshrink.engine import loop
    calls = []
    original = loop.collect

    def counting(*args, **kwargs):
        calls.append(sorted(args[1]))
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "collect", counting)
    return calls


def test_group_order_runs_every_stage_on_a_group_before_the_next_group(monkeypatch):
    """Two stages in group order equal the same stages split per group in stage order, with half the passes."""
    base = tiny_model("llama")
    grouped, split = copy.deepcopy(base), copy.deepcopy(base)
    calls = _count_passes(monkeypatch)
    _engine(grouped, {"order": "group", "stages": [PRUNE, QUANT]})
    assert len(calls) == 2 * 4  # 2 blocks x 4 groups: the GPTQ stage reuses the SparseGPT stage's pass
    calls.clear()
    per_group = [dict(stage, targets=targets) for targets in LLAMA_GROUPS for stage in (PRUNE, QUANT)]
    _engine(split, {"stages": per_group})  # order: stage is the default
    assert len(calls) == 2 * 4  # consecutive stages on the same group share the pass in any order
    expected = _weights(split)
    for name, value in _weights(grouped).items():
        assert torch.equal(value, expected[name]), name


def test_stage_order_prunes_the_whole_block_before_quantizing_it(monkeypatch):
    base = tiny_model("llama")
    grouped, staged = copy.deepcopy(base), copy.deepcopy(base)
    calls = _count_passes(monkeypatch)
    _engine(staged, {"stages": [PRUNE, QUANT]})  # order: stage is the default
    assert len(calls) == 2 * 8
    _engine(grouped, {"order": "group", "stages": [PRUNE, QUANT]})
    staged_w, grouped_w = _weights(staged), _weights(grouped)
    # the first group of block 0 sees the same inputs in both orders; later groups are pruned on other inputs
    for name in ("q_proj", "k_proj", "v_proj"):
        key = f"model.layers.0.self_attn.{name}.weight"
        assert torch.equal(staged_w[key], grouped_w[key]), key
    assert not torch.equal(staged_w["model.layers.0.mlp.down_proj.weight"],
                           grouped_w["model.layers.0.mlp.down_proj.weight"])
    for weights in (staged_w, grouped_w):  # both orders prune half of every layer
        w = weights["model.layers.1.mlp.down_proj.weight"]
        assert int((w == 0).sum()) >= w.numel() // 2


def test_group_order_falls_back_to_stage_order_for_a_stage_collecting_the_whole_block_at_once():
    base = tiny_model("llama")
    grouped, staged = copy.deepcopy(base), copy.deepcopy(base)
    wanda = {"method": "wanda", "sparsity": 0.5}  # true_sequential: false by default: one pass per block
    _engine(grouped, {"order": "group", "stages": [wanda, QUANT]})
    _engine(staged, {"stages": [wanda, QUANT]})
    expected = _weights(staged)
    for name, value in _weights(grouped).items():
        assert torch.equal(value, expected[name]), name


def test_free_heap_is_released_after_every_pass_and_every_block(monkeypatch):
    """The engine hands freed heap pages back after each pass's solves and after each block (glibc ``malloc_trim``,
    a no-op elsewhere): one call per task (4 true-sequential groups) and one per block, here 2 blocks."""
    from lmshrink.engine import loop

    calls = []
    monkeypatch.setattr(loop, "release_free_heap", lambda: calls.append(1))
    model = tiny_llama(num_hidden_layers=2)
    _engine(model, [{"method": "gptq", "bits": 4, "group_size": 32}])
    assert len(calls) == 2 * 4 + 2
    from lmshrink.core import process

    process._malloc_trim.cache_clear()
    monkeypatch.undo()
    process.release_free_heap()  # the real one: callable on this platform (None where there is no malloc_trim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hidden_streams_are_written_batch_by_batch_as_a_plain_safetensors_file(tmp_path, dtype):
    """The checkpoint writes each stream of hidden states from its batches' own memory (no concatenated copy); the
    file is a plain safetensors file: safetensors reads both streams back as the concatenated batches."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lmshrink.engine.checkpoint import _atomic_safetensors_batches

    gen = torch.Generator().manual_seed(0)
    hidden = [torch.randn(n, 5, 7, generator=gen).to(dtype) for n in (2, 2, 1)]
    reference = [torch.randn(n, 5, 7, generator=gen).to(dtype) for n in (2, 2, 1)]
    path = tmp_path / "hidden.safetensors"
    _atomic_safetensors_batches(path, {"hidden": hidden, "reference_hidden": reference})
    loaded = load_file(str(path))
    assert torch.equal(loaded["hidden"], torch.cat(hidden)) and loaded["hidden"].dtype == dtype
    assert torch.equal(loaded["reference_hidden"], torch.cat(reference))
    with safe_open(str(path), "pt") as handle:
        assert sorted(handle.keys()) == ["hidden", "reference_hidden"]
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="share a float dtype"):
        _atomic_safetensors_batches(path, {"hidden": [hidden[0], hidden[1].float().double()]})


def test_engine_times_statistics_apart_from_forwards():
    """The record's seconds by part split the collection passes: the hooks' statistics under "statistics", the rest
    of the forwards under "forwards"; a recipe without statistics spends nothing on them."""
    model = tiny_llama(num_hidden_layers=2)
    parts = Engine(model, get_adapter(model), parse_recipe([{"method": "gptq", "bits": 4, "group_size": 32}]),
                   _calib(), progress=False, batch_size=2).run().parts
    assert parts["statistics"] > 0 and parts["forwards"] > 0 and parts["solves"] > 0
    model = tiny_llama(num_hidden_layers=2)
    parts = Engine(model, get_adapter(model), parse_recipe([{"method": "magnitude", "sparsity": 0.5}]),
                   _calib(), progress=False, batch_size=2).run().parts
    assert parts.get("statistics", 0.0) == 0.0
