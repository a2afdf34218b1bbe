"""GPTQ v1 export: qweight / qzeros (zero - 1) / scales fp16 / g_idx read back exactly; quantize_config.json."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_llama, tiny_tokenizer
from safetensors import safe_open

from lmshrink.core.errors import LmshrinkError
from lmshrink.core.grids import GridSpec
from lmshrink.formats.gptq_export import export_gptq, load_gptq_results
from lmshrink.formats.save import save_quantized
from lmshrink.methods.quant.rtn import rtn_quantize
from lmshrink.models.adapters import iter_linears, linear_weight, set_linear_weight


def _compressed(tmp_path, spec_of, **overrides):
    model = tiny_llama(**{"num_hidden_layers": 1, **overrides})
    results = {}
    for layer, module in iter_linears(model):
        result = rtn_quantize(linear_weight(module).float().clone(), spec_of(layer))
        set_linear_weight(module, result.weight)
        results[layer] = result
    return results, save_quantized(model, tiny_tokenizer(), results, tmp_path / "ct")


@pytest.mark.parametrize("spec", [
    GridSpec(bits=4, group_size=32, symmetric=True, scale_dtype="float16"),
    GridSpec(bits=4, group_size=32, symmetric=False, scale_dtype="float16"),
    GridSpec(bits=3, group_size=64, symmetric=True, scale_dtype="float16"),
    GridSpec(bits=8, group_size=-1, symmetric=True, scale_dtype="float16"),
], ids=["w4g32-sym", "w4g32-asym", "w3g64-sym", "w8-channel"])
def test_gptq_export_round_trips_exactly(tmp_path, spec):
    results, folder = _compressed(tmp_path, lambda name: spec)
    if not spec.symmetric and any(int(r.zero.min()) == 0 for r in results.values()):
        pytest.skip("random weights gave a zero point of 0, which v1 refuses (tested separately)")
    report = export_gptq(folder, tmp_path / "gptq")
    assert report["max_relative_scale_change_fp16"] == 0.0
    config = json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())
    assert config["bits"] == spec.bits and config["group_size"] == spec.group_size
    assert config["sym"] == spec.symmetric and config["desc_act"] is False and config["checkpoint_format"] == "gptq"
    assert json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    with safe_open(str(tmp_path / "gptq" / "model.safetensors"), framework="pt") as handle:
        name = "model.layers.0.mlp.down_proj"
        qweight, qzeros = handle.get_tensor(f"{name}.qweight"), handle.get_tensor(f"{name}.qzeros")
        out_features, in_features = results[name].codes.shape
        assert qweight.dtype == torch.int32 and qweight.shape == (in_features * spec.bits // 32, out_features)
        assert handle.get_tensor(f"{name}.scales").dtype == torch.float16
        if spec.symmetric and spec.bits == 4:
            # v1 stores zero - 1: 7 in every nibble for the symmetric 4-bit zero 8
            assert bool((qzeros == 0x77777777).all())
        assert f"{name}.weight" not in handle.keys()
        assert handle.get_tensor("model.embed_tokens.weight").dtype == torch.float16
    back = load_gptq_results(tmp_path / "gptq")
    assert set(back) == set(results)
    for name, result in results.items():
        for field in ("codes", "scale", "zero", "weight"):
            assert torch.equal(getattr(back[name], field), getattr(result, field)), (name, field)
        assert back[name].g_idx is None


def test_mixed_grids_and_other_folders_are_refused(tmp_path):
    from lmshrink.formats.gptq_export import _common_spec

    results, folder = _compressed(tmp_path, lambda name: GridSpec(bits=4, group_size=32, symmetric=False))
    layer = next(iter(results))
    assert _common_spec(results) == (4, 32, False, False)
    mixed = dict(results)
    spec8 = GridSpec(bits=8, group_size=-1, symmetric=True)
    mixed[layer] = rtn_quantize(results[layer].weight, spec8)
    with pytest.raises(LmshrinkError, match="one grid for all layers"):
        _common_spec(mixed)
    with pytest.raises(LmshrinkError, match="not a compressed checkpoint"):
        export_gptq(tmp_path, tmp_path / "out")


def test_zero_point_zero_in_a_saved_folder_is_refused(tmp_path):
    def spec_of(name):
        return GridSpec(bits=4, group_size=32, symmetric=False)

    model = tiny_llama(num_hidden_layers=1)
    results = {}
    for layer, module in iter_linears(model):
        weight = linear_weight(module).float().clone().abs()  # all-positive groups: zero point 0
        result = rtn_quantize(weight, spec_of(layer))
        set_linear_weight(module, result.weight)
        results[layer] = result
    folder = save_quantized(model, tiny_tokenizer(), results, tmp_path / "ct")
    with pytest.raises(LmshrinkError, match="zero point of 0"):
        export_gptq(folder, tmp_path / "gptq")
    assert not (tmp_path / "gptq").exists()


def _pruned_down_proj_and_quantized(model, spec):
    """Results for ``model``: every ``down_proj`` pruned to 50% (magnitude, not quantized), the rest quantized."""
    from lmshrink.core.results import PruneResult

    results = {}
    for layer, module in iter_linears(model):
        weight = linear_weight(module).float().clone()
        if layer.endswith("down_proj"):
            threshold = weight.abs().median(dim=1, keepdim=True).values
            result = PruneResult.from_weight(weight, weight.abs() <= threshold, target_sparsity=0.5)
            set_linear_weight(module, result.weight)
        else:
            result = rtn_quantize(weight, spec)
            set_linear_weight(module, result.weight)
        results[layer] = result
    return results


def test_bitmask_stored_pruned_layers_are_exported_as_dense_weights(tmp_path):
    spec = GridSpec(bits=4, group_size=32, symmetric=True, scale_dtype="float16")
    model = tiny_llama(num_hidden_layers=1)
    results = _pruned_down_proj_and_quantized(model, spec)
    folder = save_quantized(model, tiny_tokenizer(), results, tmp_path / "ct", sparse_format="bitmask")
    name = "model.layers.0.mlp.down_proj"
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        assert f"{name}.bitmask" in handle.keys() and f"{name}.weight" not in handle.keys()  # the case tested

    export_gptq(folder, tmp_path / "gptq")
    with safe_open(str(tmp_path / "gptq" / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        assert not [k for k in keys if k.endswith((".bitmask", ".compressed", ".row_offsets", ".shape"))]
        assert f"{name}.weight" in keys
        exported = handle.get_tensor(f"{name}.weight")
    assert exported.dtype == torch.float16
    assert torch.equal(exported, results[name].weight.to(torch.float16))  # zeros where pruned, the rest as kept
    assert "sparsity_config" not in json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert set(load_gptq_results(tmp_path / "gptq")) == set(results) - {name}
