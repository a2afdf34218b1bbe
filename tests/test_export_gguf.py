"""GGUF export: blocks decode (with the gguf package's own dequantizer) to our weights; llama.cpp names/metadata."""

from __future__ import annotations

import importlib.util

import gguf
import numpy as np
import pytest
import torch
from helpers import tiny_llama, tiny_tokenizer

from lmshrink.core.errors import LmshrinkError
from lmshrink.core.grids import GridSpec
from lmshrink.formats.gguf_export import _row_permutation, export_gguf, read_gguf_weight
from lmshrink.formats.save import save_quantized
from lmshrink.methods.quant.gptq import gptq_quantize
from lmshrink.methods.quant.rtn import rtn_quantize
from lmshrink.models.adapters import iter_linears, linear_weight, set_linear_weight

HEADS, KV_HEADS = 4, 2


def _compressed(tmp_path, spec, name="ct", **overrides):
    model = tiny_llama(**{"num_hidden_layers": 2, **overrides})
    results = {}
    for layer, module in iter_linears(model):
        result = rtn_quantize(linear_weight(module).float().clone(), spec)
        set_linear_weight(module, result.weight)
        results[layer] = result
    folder = save_quantized(model, tiny_tokenizer(), results, tmp_path / name)
    return model, results, folder


def _gguf_name(layer: str) -> str:
    block = layer.split(".")[2]
    leaf = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[layer.rsplit(".", 1)[1]]
    return f"blk.{block}.{leaf}.weight"


def _ours_in_llama_cpp_order(layer: str, weight: torch.Tensor) -> np.ndarray:
    if layer.endswith("q_proj"):
        weight = weight[_row_permutation(weight.shape[0], HEADS)]
    elif layer.endswith("k_proj"):
        weight = weight[_row_permutation(weight.shape[0], KV_HEADS)]
    return weight.numpy()


def _types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("spec,qtype", [
    (GridSpec(bits=4, group_size=32, symmetric=True, scale_dtype="float16"), "Q4_0"),
    (GridSpec(bits=4, group_size=64, symmetric=True, scale_dtype="float16"), "Q4_0"),  # each scale on 2 blocks
    (GridSpec(bits=3, group_size=32, symmetric=True, scale_dtype="float16"), "Q4_0"),  # 3-bit codes shifted
    (GridSpec(bits=8, group_size=-1, symmetric=True, scale_dtype="float16"), "Q8_0"),
], ids=["q4_0-g32", "q4_0-g64", "q4_0-3bit", "q8_0-channel"])
def test_symmetric_grids_decode_exactly_with_gguf_dequantizer(tmp_path, spec, qtype):
    _, results, folder = _compressed(tmp_path, spec)
    report = export_gguf(folder, tmp_path / "m.gguf")
    assert report["exact_layers"] == len(results) and report["requantized_layers"] == 0
    assert report["max_abs_change_exact"] == 0.0
    types = _types(tmp_path / "m.gguf")
    for layer, result in results.items():
        name = _gguf_name(layer)
        assert types[name] == qtype
        decoded = read_gguf_weight(tmp_path / "m.gguf", name)
        assert np.array_equal(decoded, _ours_in_llama_cpp_order(layer, result.weight)), layer


def test_asymmetric_grid_maps_codes_to_q4_1(tmp_path):
    spec = GridSpec(bits=4, group_size=32, symmetric=False, scale_dtype="float16")
    _, results, folder = _compressed(tmp_path, spec)
    report = export_gguf(folder, tmp_path / "m.gguf")
    assert report["types"] == {"Q4_1": len(results)} and report["exact_layers"] == len(results)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    for layer, result in results.items():
        tensor = tensors[_gguf_name(layer)]
        rows, cols = result.codes.shape
        blocks = np.asarray(tensor.data).reshape(rows, cols // 32, 20)
        nibbles = blocks[..., 4:]
        codes = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).reshape(rows, cols)
        ours = result.codes
        if layer.endswith(("q_proj", "k_proj")):
            ours = ours[_row_permutation(rows, HEADS if layer.endswith("q_proj") else KV_HEADS)]
        assert np.array_equal(codes, ours.numpy()), layer  # the codes themselves, bit for bit
        decoded = read_gguf_weight(tmp_path / "m.gguf", tensor.name)
        expected = _ours_in_llama_cpp_order(layer, result.weight)
        # m = -zero * scale rounded to float16: at most half a float16 ulp of |m| per weight
        m = np.abs(blocks[..., 2:4].copy().view(np.float16).astype(np.float32)).reshape(rows, -1).repeat(32, axis=1)
        assert (np.abs(decoded - expected) <= m * 2.0**-11 + 1e-6 * np.abs(expected) + 1e-9).all(), layer


def test_grids_off_the_block_size_are_requantized_with_a_warning(tmp_path, capsys):
    spec = GridSpec(bits=4, group_size=16, symmetric=False)
    _, results, folder = _compressed(tmp_path, spec)
    report = export_gguf(folder, tmp_path / "m.gguf")
    assert report["requantized_layers"] == len(results) and report["exact_layers"] == 0
    assert 0 < report["max_rel_error_requantized"] < 0.2
    assert "re-quantized to Q4_1" in capsys.readouterr().err


def test_act_order_groups_are_requantized(tmp_path, capsys):
    model = tiny_llama(num_hidden_layers=1)
    results = {}
    generator = torch.Generator().manual_seed(0)
    for layer, module in iter_linears(model):
        weight = linear_weight(module).float().clone()
        inputs = torch.randn(256, weight.shape[1], generator=generator) * torch.linspace(0.1, 3, weight.shape[1])
        result = gptq_quantize(weight, inputs.T @ inputs, GridSpec(bits=4, group_size=32, symmetric=True),
                               act_order=True, static_groups=False)
        results[layer] = result
    # compressed-tensors refuses permuted groups, so exercise the encoder directly
    from lmshrink.formats.gguf_export import encode_layer

    qtype, data, exact = encode_layer(next(iter(results.values())))
    assert qtype == "Q4_0" and not exact


def test_transformers_reads_the_gguf_as_the_same_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = GridSpec(bits=4, group_size=32, symmetric=True, scale_dtype="float16")
    model, _, folder = _compressed(tmp_path, spec)
    export_gguf(folder, tmp_path / "gguf" / "m.gguf", dense_type="f32")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "gguf"), gguf_file="m.gguf", dtype=torch.float32)
    ids = torch.randint(0, 300, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "gguf"), gguf_file="m.gguf")
    text = "The quick brown fox jumps over the lazy dog."
    assert tokenizer(text).input_ids == tiny_tokenizer()(text).input_ids


def test_metadata_and_tokenizer_copied_from_a_source_gguf(tmp_path):
    spec = GridSpec(bits=4, group_size=32, symmetric=True, scale_dtype="float16")
    _, _, folder = _compressed(tmp_path, spec)
    export_gguf(folder, tmp_path / "first.gguf")
    source = gguf.GGUFReader(str(tmp_path / "first.gguf"))
    report = export_gguf(folder, tmp_path / "second.gguf", source_gguf=tmp_path / "first.gguf")
    assert report["metadata_from"] == str(tmp_path / "first.gguf")
    copied = gguf.GGUFReader(str(tmp_path / "second.gguf"))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "llama.block_count",
                "llama.rope.freq_base", "general.name"):
        assert copied.fields[key].contents() == source.fields[key].contents(), key
    # a source GGUF of another shape is refused when named explicitly
    _, _, other = _compressed(tmp_path, spec, name="other", num_hidden_layers=1)
    with pytest.raises(LmshrinkError, match="does not describe this model"):
        export_gguf(other, tmp_path / "third.gguf", source_gguf=tmp_path / "first.gguf")


def test_refusals(tmp_path):
    spec = GridSpec(bits=4, group_size=32, symmetric=True)
    _, _, folder = _compressed(tmp_path, spec)
    export_gguf(folder, tmp_path / "m.gguf")
    with pytest.raises(LmshrinkError, match="exists"):
        export_gguf(folder, tmp_path / "m.gguf")
    with pytest.raises(LmshrinkError, match="not a compressed checkpoint"):
        export_gguf(tmp_path, tmp_path / "x.gguf")


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (optional; it compiles for about 9 minutes)")
def test_llama_cpp_logits_match(tmp_path):
    import llama_cpp

    spec = GridSpec(bits=4, group_size=32, symmetric=True, scale_dtype="float16")
    model, _, folder = _compressed(tmp_path, spec)
    export_gguf(folder, tmp_path / "m.gguf", dense_type="f32")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), logits_all=True, verbose=False, n_ctx=64)
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    llm.eval(ids[0].tolist())
    theirs = torch.tensor(np.array(llm.scores[: ids.shape[1]]))
    with torch.no_grad():
        ours = model(ids).logits[0]
    assert (theirs - ours).abs().max().item() < 0.05 * ours.abs().max().item()


def test_cli_export_gguf_and_gptq(tmp_path, capsys):
    from lmshrink.cli import main

    spec = GridSpec(bits=4, group_size=32, symmetric=True, scale_dtype="float16")
    _, results, folder = _compressed(tmp_path, spec)
    assert main(["export", str(folder), "--to", "gguf", "-o", str(tmp_path / "m.gguf")]) == 0
    assert f"{len(results)} Q4_0" in capsys.readouterr().out
    assert main(["export", str(folder), "--to", "gptq", "-o", str(tmp_path / "gptq"), "--json"]) == 0
    assert '"bits": 4' in capsys.readouterr().out
    assert main(["export", str(folder), "--to", "gguf", "-o", str(tmp_path / "m.gguf")]) == 2
    assert "exists" in capsys.readouterr().err


def test_bitmask_stored_pruned_layers_are_exported_as_dense_weights(tmp_path):
    from safetensors import safe_open

    from lmshrink.core.results import PruneResult

    spec = GridSpec(bits=4, group_size=32, symmetric=True, scale_dtype="float16")
    model = tiny_llama(num_hidden_layers=2)
    results = {}
    for layer, module in iter_linears(model):
        weight = linear_weight(module).float().clone()
        if layer.endswith(("down_proj", "k_proj")):  # k_proj: its rows are permuted for llama.cpp too
            threshold = weight.abs().median(dim=1, keepdim=True).values
            result = PruneResult.from_weight(weight, weight.abs() <= threshold, target_sparsity=0.5)
        else:
            result = rtn_quantize(weight, spec)
        set_linear_weight(module, result.weight)
        results[layer] = result
    folder = save_quantized(model, tiny_tokenizer(), results, tmp_path / "ct", sparse_format="bitmask")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        assert "model.layers.0.mlp.down_proj.bitmask" in handle.keys()  # the case tested

    export_gguf(folder, tmp_path / "m.gguf", dense_type="f32")
    types = _types(tmp_path / "m.gguf")
    assert not [name for name in types if not name.endswith(".weight")]  # no bitmask tensors copied through
    for layer, result in results.items():
        name = _gguf_name(layer)
        decoded = read_gguf_weight(tmp_path / "m.gguf", name)
        assert types[name] == ("F32" if layer.endswith(("down_proj", "k_proj")) else "Q4_0"), layer
        assert np.array_equal(decoded, _ours_in_llama_cpp_order(layer, result.weight)), layer


def test_q_and_k_biases_are_permuted_like_their_weight_rows(tmp_path):
    from transformers import AutoModelForCausalLM

    spec = GridSpec(bits=4, group_size=32, symmetric=True, scale_dtype="float16")
    model = tiny_llama(num_hidden_layers=1, attention_bias=True)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    results = {}
    for layer, module in iter_linears(model):
        result = rtn_quantize(linear_weight(module).float().clone(), spec)
        set_linear_weight(module, result.weight)
        results[layer] = result
    folder = save_quantized(model, tiny_tokenizer(), results, tmp_path / "ct")
    export_gguf(folder, tmp_path / "gguf" / "m.gguf", dense_type="f32")
    attention = model.model.layers[0].self_attn
    for proj, leaf, heads in ((attention.q_proj, "attn_q", HEADS), (attention.k_proj, "attn_k", KV_HEADS)):
        bias = proj.bias.detach()
        exported = read_gguf_weight(tmp_path / "gguf" / "m.gguf", f"blk.0.{leaf}.bias").reshape(-1)
        assert np.array_equal(exported, bias[_row_permutation(bias.shape[0], heads)].numpy()), leaf
    # transformers undoes llama.cpp's q/k layout (weights and biases) and gets the same model back; its GGUF config
    # has no attention_bias (llama.cpp uses bias tensors when they are present), so it is passed
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "gguf"), gguf_file="m.gguf", dtype=torch.float32,
                                                  attention_bias=True)
    assert loaded.model.layers[0].self_attn.q_proj.bias is not None
    ids = torch.randint(0, 300, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_outputs_that_would_destroy_the_input_or_cannot_be_written_are_refused(tmp_path, capsys):
    import hashlib

    from lmshrink.cli import main

    spec = GridSpec(bits=4, group_size=32, symmetric=True, scale_dtype="float16")
    _, _, folder = _compressed(tmp_path, spec)
    weights = folder / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    for output in (weights, folder, folder / "sub" / "m.gguf"):  # the input's weights, its folder, inside it
        with pytest.raises(LmshrinkError, match="(is|inside) the input folder") as info:
            export_gguf(folder, output, overwrite=True)
        assert str(folder.parent / f"{folder.name}.gguf") in info.value.fix
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest and not (folder / "sub").exists()
    (tmp_path / "somedir").mkdir()
    for overwrite in (False, True):  # an existing folder is never the .gguf file, --overwrite or not
        with pytest.raises(LmshrinkError, match="is a folder") as info:
            export_gguf(folder, tmp_path / "somedir", overwrite=overwrite)
        assert "overwrite" not in info.value.fix and str(tmp_path / "somedir" / "ct.gguf") in info.value.fix
    export_gguf(folder, tmp_path / "m.gguf")
    with pytest.raises(LmshrinkError, match="is a file, not a folder"):
        export_gguf(folder, tmp_path / "m.gguf" / "x.gguf")
    with pytest.raises(LmshrinkError, match="the source GGUF"):  # the file its metadata would be read from
        export_gguf(folder, tmp_path / "m.gguf", source_gguf=tmp_path / "m.gguf", overwrite=True)
    assert gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors
    assert not [p for p in tmp_path.rglob("*partial*")]
    # the CLI reports them as user errors (exit code 2) and leaves the input as it was
    capsys.readouterr()
    assert main(["export", str(folder), "--to", "gguf", "-o", str(weights), "--overwrite"]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert main(["export", str(folder), "--to", "gguf", "-o", str(tmp_path / "somedir"), "--overwrite"]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest
