"""ONNX export: quantized Linears as ONNX Runtime MatMulNBits nodes, run in onnxruntime against lmshrink's model.

Tolerances. MatMulNBits without ``accuracy_level`` multiplies float32 activations by the dequantized weights in
float32, so the exported graph and lmshrink's dense model compute the same sums in a different order (ONNX Runtime's
MLAS kernels vs torch's). One float32 dot product of length K then differs from the exact one by at most
``K * 2**-24 * sum|x_k w_k|`` (the classical worst-case bound), which the single-node tests assert elementwise. For
whole models the same reordering, carried through norms, attention and softmax, gives logit differences of a few
1e-7 relative to the largest logit (measured); the tests allow 1e-5 of the largest logit, and check that quantization
itself moves the logits by far more than that, so a wrong code, scale or zero point could not pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys

import pytest
import torch

for _module in ("onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(_module, reason=f"ONNX export tests need {_module}: pip install lmshrink[onnx]")

import onnx  # noqa: E402
import onnxruntime  # noqa: E402
from helpers import save_tiny_llama, tiny_llama, tiny_tokenizer, write_calibration_text  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lmshrink import load_model
from lmshrink.api import export
from lmshrink.cli import main
from lmshrink.core.errors import LmshrinkError
from lmshrink.core.grids import GridSpec, dequantize
from lmshrink.core.results import QuantResult
from lmshrink.formats.compressed_tensors import load_quantized_results
from lmshrink.formats.onnx_export import dequantize_matmul_nbits, pack_matmul_nbits, run_onnx
from lmshrink.formats.save import save_quantized
from lmshrink.methods.quant.rtn import rtn_quantize
from lmshrink.models.adapters import iter_linears, linear_weight, set_linear_weight

LOGIT_TOLERANCE = 1e-5  # of the largest |logit|; see the module doc


def _digest(folder):
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# one layer: layouts
# ---------------------------------------------------------------------------------------------------------------


def _single_node(packed):
    """An onnxruntime session X [M, K] -> Y [M, N]: (Gather of the columns ->) MatMulNBits."""
    inits = [numpy_helper.from_array(packed["B"].numpy(), "B"),
             numpy_helper.from_array(packed["scales"].numpy(), "scales")]
    inputs = ["A", "B", "scales"]
    if packed["zero_points"] is not None:
        inits.append(numpy_helper.from_array(packed["zero_points"].numpy(), "zero_points"))
        inputs.append("zero_points")
    if packed["order"] is not None:
        inits.append(numpy_helper.from_array(packed["order"].numpy(), "order"))
        nodes = [helper.make_node("Gather", ["X", "order"], ["A"], axis=-1)]
    else:
        nodes = [helper.make_node("Identity", ["X"], ["A"])]
    nodes.append(helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=packed["K"],
                                  N=packed["N"], bits=packed["bits"], block_size=packed["block_size"]))
    graph = helper.make_graph(nodes, "layer",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, packed["K"]])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, packed["N"]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _assert_within_dot_product_bound(y, x, weight):
    exact = x.double() @ weight.double().t()
    bound = x.shape[1] * 2.0**-24 * (x.double().abs() @ weight.double().abs().t())
    assert bool(((y.double() - exact).abs() <= bound).all()), ((y.double() - exact).abs() / bound).max().item()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size,in_features,block", [(32, 96, 32), (128, 256, 128), (-1, 80, 128), (96, 192, 32),
                                                          (64, 100, 64), (16, 48, 16)],
                         ids=["g32", "g128", "channel", "g96", "g64-partial-block", "g16"])
def test_layer_decodes_code_for_code_and_runs_in_onnxruntime(bits, symmetric, group_size, in_features, block):
    torch.manual_seed(bits * 100 + in_features)
    result = rtn_quantize(torch.randn(24, in_features), GridSpec(bits=bits, group_size=group_size,
                                                                 symmetric=symmetric))
    packed = pack_matmul_nbits(result, "layer")
    assert packed["block_size"] == block and packed["B"].shape == (24, -(-in_features // block), block * bits // 8)
    assert (packed["zero_points"] is None) == symmetric  # symmetric zeros are the op's default 2**(bits-1)
    weight = dequantize_matmul_nbits(packed["B"], packed["scales"], packed["zero_points"], packed["K"], bits, block)
    assert torch.equal(weight, result.weight)
    x = torch.randn(5, in_features)
    (y,) = _single_node(packed).run(["Y"], {"X": x.numpy()})
    _assert_within_dot_product_bound(torch.from_numpy(y), x, result.weight)


def test_act_order_layer_gathers_its_columns():
    torch.manual_seed(0)
    in_features = 128
    plain = rtn_quantize(torch.randn(16, in_features), GridSpec(bits=4, group_size=32))
    order = torch.randperm(in_features)
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[order] = (torch.arange(in_features) // 32).to(torch.int32)  # column order[i] is in group i // 32
    result = QuantResult(codes=plain.codes, scale=plain.scale, zero=plain.zero, g_idx=g_idx,
                         weight=dequantize(plain.codes, plain.scale, plain.zero, g_idx), spec=plain.spec)
    packed = pack_matmul_nbits(result, "layer")
    assert packed["order"] is not None
    weight = dequantize_matmul_nbits(packed["B"], packed["scales"], packed["zero_points"], in_features, 4, 32)
    assert torch.equal(weight, result.weight[:, packed["order"]])
    x = torch.randn(3, in_features)
    (y,) = _single_node(packed).run(["Y"], {"X": x.numpy()})
    _assert_within_dot_product_bound(torch.from_numpy(y), x, result.weight)

    uneven = g_idx.clone()
    uneven[order[0]] = 1  # group 0 has 31 columns, group 1 has 33
    bad = QuantResult(codes=plain.codes, scale=plain.scale, zero=plain.zero, g_idx=uneven, weight=result.weight,
                      spec=plain.spec)
    with pytest.raises(LmshrinkError, match="groups of 32"):
        pack_matmul_nbits(bad, "model.layers.0.mlp.up_proj")


def test_layers_the_op_cannot_hold_are_refused():
    weight = torch.randn(8, 64)
    with pytest.raises(LmshrinkError, match="3 bits; MatMulNBits takes 2, 4, 8 bits") as err:
        pack_matmul_nbits(rtn_quantize(weight, GridSpec(bits=3, group_size=32)), "model.layers.0.mlp.up_proj")
    assert "model.layers.0.mlp.up_proj" in str(err.value) and "fix:" in str(err.value)
    with pytest.raises(LmshrinkError, match="group size 8 is not a multiple of 16"):
        pack_matmul_nbits(rtn_quantize(weight, GridSpec(bits=4, group_size=8)), "layer")


# ---------------------------------------------------------------------------------------------------------------
# whole models
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gptq_w4g32(tmp_path_factory):
    """A tiny Llama compressed with the w4g32 recipe (GPTQ, asymmetric) through the CLI, exported through the CLI."""
    root = tmp_path_factory.mktemp("onnx-w4g32")
    base = save_tiny_llama(root / "base", num_hidden_layers=2, hidden_size=128, intermediate_size=256)
    calib = write_calibration_text(root / "calib.txt")
    folder = root / "ct"
    assert main(["compress", str(base), "--recipe", "w4g32", "--calib", f"file:{calib}", "--nsamples", "4",
                 "--seqlen", "64", "-o", str(folder), "--quiet"]) == 0
    before = _digest(folder)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["export", str(folder), "--to", "onnx", "-o", str(root / "onnx"), "--json"])
    assert code == 0
    assert _digest(folder) == before  # the input is never modified
    return {"base": base, "folder": folder, "output": root / "onnx", "report": json.loads(stdout.getvalue())}


@pytest.fixture(scope="module")
def rtn_w8_bias_tied(tmp_path_factory):
    """Symmetric 8-bit per-channel grids (no zero points stored), Linear biases and tied embeddings; Python API."""
    root = tmp_path_factory.mktemp("onnx-w8")
    model = tiny_llama(num_hidden_layers=1, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)
    with torch.no_grad():  # biases start at 0 (and identical zero tensors would be merged into one initializer)
        for _, module in iter_linears(model):
            module.bias.normal_(std=0.1)
    base = root / "base"
    model.save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    results = {}
    spec = GridSpec(bits=8, group_size=-1, symmetric=True, scale_dtype="float16")
    for name, module in iter_linears(model):
        results[name] = rtn_quantize(linear_weight(module).float().clone(), spec)
        set_linear_weight(module, results[name].weight)
    folder = save_quantized(model, tiny_tokenizer(), results, root / "ct")
    report = export(folder, "onnx", root / "onnx")
    return {"base": base, "folder": folder, "output": root / "onnx", "report": report}


CASES = ["gptq_w4g32", "rtn_w8_bias_tied"]


def _nodes(path):
    model = onnx.load(str(path), load_external_data=True)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return model, [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.domain == "com.microsoft"], inits


@pytest.mark.parametrize("case", CASES)
def test_every_quantized_linear_is_one_matmulnbits_holding_its_codes(case, request):
    exported = request.getfixturevalue(case)
    results = load_quantized_results(exported["folder"])
    model, nodes, inits = _nodes(exported["output"] / "model.onnx")
    assert len(nodes) == len(results) == exported["report"]["matmul_nbits_nodes"] == exported["report"]["layers"]
    assert {"com.microsoft"} <= {o.domain for o in model.opset_import}
    seen = set()
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        (layer,) = [name for name in results if node.input[1].endswith(f"{name}.B")]
        seen.add(layer)
        result = results[layer]
        assert (attrs["N"], attrs["K"]) == tuple(result.codes.shape) and attrs["bits"] == result.spec.bits
        assert "accuracy_level" not in attrs  # float32 activations, not quantized
        zero_points = torch.tensor(inits[node.input[3]]) if len(node.input) > 3 and node.input[3] else None
        weight = dequantize_matmul_nbits(torch.tensor(inits[node.input[1]]), torch.tensor(inits[node.input[2]]),
                                         zero_points, attrs["K"], attrs["bits"], attrs["block_size"])
        assert torch.equal(weight, result.weight), layer
        assert not any(name.endswith(f"{layer}.weight") for name in inits)  # no dense copy
    assert seen == set(results)
    if case == "rtn_w8_bias_tied":
        assert all(len(node.input) == 3 for node in nodes)  # symmetric: default zero points
        assert exported["report"]["asymmetric_layers"] == 0
        assert sum(name.endswith("proj.bias") for name in inits) == len(results)
        embeddings = [name for name, value in inits.items() if value.shape == (300, 64)]
        assert len(embeddings) == 1  # tied: one copy for the embedding and the head
    else:
        assert exported["report"]["asymmetric_layers"] == len(results)


@pytest.mark.parametrize("case", CASES)
def test_onnxruntime_logits_match_lmshrink(case, request):
    exported = request.getfixturevalue(case)
    report = exported["report"]
    assert report["max_abs_logit_diff"] <= LOGIT_TOLERANCE * max(1.0, report["max_abs_logit"])
    ours = load_model(str(exported["folder"]), progress=False).model
    base = load_model(str(exported["base"]), progress=False).model
    generator = torch.Generator().manual_seed(3)
    for shape in [(1, 1), (1, 17), (3, 40)]:  # other shapes than the export's example: dynamic batch and length
        ids = torch.randint(0, 300, shape, generator=generator)
        got = run_onnx(exported["output"] / "model.onnx", ids)
        with torch.no_grad():
            want = ours(input_ids=ids, use_cache=False).logits
            unquantized = base(input_ids=ids, use_cache=False).logits
        tolerance = LOGIT_TOLERANCE * max(1.0, want.abs().max().item())
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= tolerance, shape
        # the comparison resolves quantization: the unquantized model is far outside the tolerance
        assert (unquantized - want).abs().max().item() > 20 * tolerance


def test_output_folder_contents(gptq_w4g32):
    output = gptq_w4g32["output"]
    names = {path.name for path in output.iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json", "lmshrink.json"} <= names
    assert "quantization_config" not in json.loads((output / "config.json").read_text())
    assert not list(output.parent.glob(".onnx.partial-*"))
    model = onnx.load(str(output / "model.onnx"), load_external_data=False)
    assert [i.name for i in model.graph.input] == ["input_ids"] and [o.name for o in model.graph.output] == ["logits"]
    assert {p.key: p.value for p in model.metadata_props}["lmshrink.graph"].endswith("no key/value cache")
    report = gptq_w4g32["report"]
    assert report["kv_cache"] is False and report["bits"] == [4] and report["block_sizes"] == [32]
    # an existing output is refused unless --overwrite
    code = main(["export", str(gptq_w4g32["folder"]), "--to", "onnx", "-o", str(output), "--no-check"])
    assert code == 2


def test_bad_inputs_give_clear_errors(tmp_path, capsys, monkeypatch):
    plain = save_tiny_llama(tmp_path / "plain", num_hidden_layers=1)
    code = main(["export", str(plain), "--to", "onnx", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "not a compressed checkpoint folder" in err and "fix:" in err and "Traceback" not in err

    model = tiny_llama(num_hidden_layers=1)
    results = {}
    for name, module in iter_linears(model):
        results[name] = rtn_quantize(linear_weight(module).float().clone(), GridSpec(bits=3, group_size=32))
        set_linear_weight(module, results[name].weight)
    folder = save_quantized(model, tiny_tokenizer(), results, tmp_path / "w3")
    with pytest.raises(LmshrinkError, match="3 bits; MatMulNBits takes 2, 4, 8 bits"):
        export(folder, "onnx", tmp_path / "out3")
    assert not (tmp_path / "out3").exists()

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    with pytest.raises(LmshrinkError, match="onnxscript") as err:
        export(folder, "onnx", tmp_path / "out4")
    assert "pip install -e '.[onnx]'" in str(err.value)
