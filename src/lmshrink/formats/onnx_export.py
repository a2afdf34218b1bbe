"""ONNX export of a compressed folder: every quantized Linear becomes one ONNX Runtime ``com.microsoft`` MatMulNBits.

MatMulNBits (ONNX Runtime contrib op, domain ``com.microsoft``, version 1) computes ``Y = A @ W^T`` for a weight
``W [N, K]`` (``N`` outputs, ``K`` inputs) quantized in blocks of ``block_size`` consecutive input columns:
``W[n, k] = (code - zero_point) * scale`` with one scale and zero point per (row, block). Its inputs, as written here:

* ``B`` uint8 ``[N, k_blocks, blob]`` with ``k_blocks = ceil(K / block_size)``, ``blob = block_size * bits / 8``: the
  codes of each block, packed low bits first (4 bits: code ``2j`` in the low nibble of byte ``j``, ``2j + 1`` in the
  high one). A last, partial block is padded with its zero point (a weight of 0; those columns have no input anyway);
* ``scales`` float32 ``[N, k_blocks]``;
* ``zero_points`` uint8 ``[N, ceil(k_blocks * bits / 8)]``, packed along the blocks like ``B``; left out when every
  zero point is ``2**(bits-1)`` (our symmetric grids), the op's default.

The attributes are ``K``, ``N``, ``bits`` and ``block_size`` (a power of two, at least 16). ``accuracy_level`` is left
unset: ONNX Runtime then neither quantizes nor down-casts the activations, so the product is computed in float32 from
the dequantized weights, as lmshrink's own dense model does.

Grids map code for code whenever a block never straddles two groups: the block size is the largest power of two
(at most 128, at least 16) that divides the group size; a group of 128 gives blocks of 128, a group of 96 blocks of 32
with each group's scale repeated. Per-channel grids use blocks of ``min(128, next power of two >= K)``. Group sizes
that are not a multiple of 16 are refused, and so are 3-bit grids (the op takes 2, 4 and 8 bits). Act-order layers
(a ``g_idx`` that is not contiguous) whose columns, sorted by group, make contiguous full groups are written with
their columns in that order and a ``Gather`` of the input before the MatMulNBits (exact); other ``g_idx`` are refused.
A Linear with a bias gets an ``Add`` after the node.

The graph is the model's forward from ``input_ids [batch, sequence]`` (int64) to ``logits [batch, sequence, vocab]``
(float32), without a key/value cache, exported by torch's ``torch.export``-based ONNX exporter with both dimensions
dynamic: a stand-in module holding the packed tensors calls a torch custom op (``lmshrink::matmul_nbits``: the
MatMulNBits arithmetic in torch) that the exporter translates into the MatMulNBits node. Everything else (embeddings,
norms, attention, the head) is exported in float32 as the model computes it. Needs ``onnx`` and ``onnxscript`` (and
``onnxruntime`` for the check after the export): ``pip install -e '.[onnx]' in the lmshrink checkout``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from lmshrink.core.atomic import atomic_directory, check_output_dir
from lmshrink.core.errors import LmshrinkError
from lmshrink.core.results import QuantResult
from lmshrink.formats.compressed_tensors import (
    ALTERNATIVE,
    is_compressed_tensors_folder,
    iter_quantized_results,
    refuse_outlier_columns,
)
from lmshrink.formats.loading import load_model, load_packed

DOMAIN = "com.microsoft"
OP_TYPE = "MatMulNBits"
SUPPORTED_BITS = (2, 4, 8)  # MatMulNBits' bits attribute (ONNX Runtime's schema: 2, 4 and 8)
MAX_BLOCK = 128
MIN_BLOCK = 16
MODEL_FILE = "model.onnx"
_SINGLE_FILE_LIMIT = 1_800_000_000  # protobuf messages stop at 2 GB: larger weights go to model.onnx.data
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
           "lmshrink.json")
_INSTALL_FIX = "pip install -e '.[onnx]' in the lmshrink checkout  (onnx, onnxscript and onnxruntime)"


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise LmshrinkError(f"ONNX export needs the {module} package, which is not installed",
                            fix=_INSTALL_FIX) from exc


# ---------------------------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------------------------


def block_size_for(result: QuantResult, name: str = "layer") -> int:
    """The MatMulNBits block size that holds ``result``'s grid exactly, or an error naming the layer."""
    in_features = result.codes.shape[1]
    width = result.spec.group_width(in_features)
    if result.spec.num_groups(in_features) == 1:  # one scale per row: any block size holds it
        block = MIN_BLOCK
        while block < min(MAX_BLOCK, in_features):
            block *= 2
        return block
    block = MAX_BLOCK
    while block >= MIN_BLOCK and width % block:
        block //= 2
    if block < MIN_BLOCK:
        raise LmshrinkError(f"layer {name}: group size {width} is not a multiple of {MIN_BLOCK}, and MatMulNBits "
                            f"blocks are powers of two of at least {MIN_BLOCK} columns",
                            fix="compress with a group size that is a multiple of 16 (e.g. 32, 64 or 128)")
    return block


def _pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 values ``[..., L]`` (``L * bits`` a multiple of 8) -> bytes ``[..., L * bits / 8]``, low bits first."""
    per_byte = 8 // bits
    grouped = values.to(torch.int32).reshape(*values.shape[:-1], values.shape[-1] // per_byte, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    return (grouped << shifts).sum(dim=-1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``_pack_bits``: bytes ``[..., B]`` -> the first ``count`` values ``[..., count]`` (int32)."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    values = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)[..., :count]


def _column_order(result: QuantResult, name: str) -> torch.Tensor | None:
    """For an act-order layer, the column order that makes its groups contiguous (None when they already are)."""
    if result.g_idx is None:
        return None
    in_features = result.codes.shape[1]
    width = result.spec.group_width(in_features)
    g_idx = result.g_idx.to(torch.int64)
    contiguous = torch.arange(in_features, dtype=torch.int64) // width
    if torch.equal(g_idx, contiguous):
        return None
    order = torch.sort(g_idx, stable=True).indices
    if not torch.equal(g_idx[order], contiguous):
        raise LmshrinkError(f"layer {name}: its g_idx does not split the columns into groups of {width} (act-order "
                            "groups of unequal sizes), which MatMulNBits blocks cannot hold",
                            fix="quantize with act-order and static groups, or without act-order")
    return order


def pack_matmul_nbits(result: QuantResult, name: str = "layer") -> dict[str, Any]:
    """The MatMulNBits tensors and attributes of one quantized layer (see the module doc for the layouts).

    Returns ``B`` (uint8 ``[N, k_blocks, blob]``), ``scales`` (float32 ``[N, k_blocks]``), ``zero_points`` (uint8
    ``[N, ceil(k_blocks * bits / 8)]``, or None for the default ``2**(bits-1)``), ``order`` (int64 ``[K]``: the input
    columns to gather first, or None), and ``K``, ``N``, ``bits``, ``block_size``.
    """
    bits = result.spec.bits
    if bits not in SUPPORTED_BITS:
        raise LmshrinkError(f"layer {name} is quantized to {bits} bits; MatMulNBits takes "
                            f"{', '.join(map(str, SUPPORTED_BITS))} bits",
                            fix="compress with 2-, 4- or 8-bit grids to export ONNX")
    out_features, in_features = result.codes.shape
    block = block_size_for(result, name)
    order = _column_order(result, name)
    codes = result.codes if order is None else result.codes[:, order]
    groups = result.group_index().to(torch.int64)
    if order is not None:
        groups = groups[order]
    n_blocks = -(-in_features // block)
    # the group of each block: its first column's (a block never straddles two groups)
    block_groups = groups[torch.arange(n_blocks) * block]
    scales = result.scale.float()[:, block_groups].contiguous()
    zeros = result.zero.to(torch.uint8)[:, block_groups].contiguous()
    padded = torch.repeat_interleave(zeros, block, dim=1)  # the zero point: padding decodes to 0.0
    padded[:, :in_features] = codes.to(torch.uint8)
    packed = _pack_bits(padded.reshape(out_features, n_blocks, block), bits)
    zero_points = None
    if not bool((zeros == (1 << (bits - 1))).all()):
        per_byte = 8 // bits
        width = -(-n_blocks // per_byte) * per_byte
        spare = torch.zeros(out_features, width - n_blocks, dtype=torch.uint8)
        zero_points = _pack_bits(torch.cat([zeros, spare], dim=1), bits)
    return {"B": packed.contiguous(), "scales": scales, "zero_points": zero_points, "order": order,
            "K": in_features, "N": out_features, "bits": bits, "block_size": block}


def dequantize_matmul_nbits(B: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, K: int,
                            bits: int, block_size: int) -> torch.Tensor:
    """The float32 weight ``[N, K]`` that MatMulNBits' inputs stand for (the reading of the layout above)."""
    out_features, n_blocks, _ = B.shape
    codes = _unpack_bits(B, bits, block_size).float()  # [N, k_blocks, block]
    if zero_points is None:
        zeros = torch.full((out_features, n_blocks), float(1 << (bits - 1)))
    else:
        zeros = _unpack_bits(zero_points, bits, n_blocks).float()
    weight = (codes - zeros.unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return weight.reshape(out_features, n_blocks * block_size)[:, :K]


# ---------------------------------------------------------------------------------------------------------------
# the torch stand-in and its translation
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("lmshrink::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, B: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, K: int,
                 N: int, bits: int, block_size: int) -> torch.Tensor:
    """``x @ W^T`` for the MatMulNBits weight ``W`` (torch reference; exported as the ONNX Runtime op)."""
    weight = dequantize_matmul_nbits(B, scales, zero_points, K, bits, block_size)
    return x @ weight.to(x.dtype).t()


@matmul_nbits.register_fake
def _matmul_nbits_fake(x, B, scales, zero_points, K, N, bits, block_size):
    return x.new_empty((*x.shape[:-1], N))


class MatMulNBitsLinear(nn.Module):
    """A quantized Linear as MatMulNBits' tensors; its forward is the op's arithmetic (exported as the op)."""

    def __init__(self, packed: dict[str, Any], bias: torch.Tensor | None):
        super().__init__()
        self.K, self.N, self.bits, self.block_size = (int(packed[k]) for k in ("K", "N", "bits", "block_size"))
        self.in_features, self.out_features = self.K, self.N
        self.register_buffer("B", packed["B"])
        self.register_buffer("scales", packed["scales"])
        self.register_buffer("zero_points", packed["zero_points"])
        self.register_buffer("order", packed["order"])
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.order is not None:
            x = x.index_select(-1, self.order)
        y = matmul_nbits(x, self.B, self.scales, self.zero_points, self.K, self.N, self.bits, self.block_size)
        return y if self.bias is None else y + self.bias


def _op_schema():
    """An onnx OpSchema for com.microsoft MatMulNBits (ONNX Runtime's; onnx itself does not define it)."""
    import onnx

    defs = onnx.defs
    single, optional = (defs.OpSchema.FormalParameterOption.Single, defs.OpSchema.FormalParameterOption.Optional)
    param = defs.OpSchema.FormalParameter
    attribute = defs.OpSchema.Attribute
    ints = defs.OpSchema.AttrType.INT
    return defs.OpSchema(
        OP_TYPE, DOMAIN, 1, "ONNX Runtime contrib op: A @ dequantize(B)^T, B quantized in blocks along K",
        inputs=[param("A", "T1", "input", param_option=single), param("B", "T2", "packed codes", param_option=single),
                param("scales", "T1", "block scales", param_option=single),
                param("zero_points", "T3", "block zero points", param_option=optional),
                param("g_idx", "T4", "deprecated", param_option=optional),
                param("bias", "T1", "bias", param_option=optional)],
        outputs=[param("Y", "T1", "output", param_option=single)],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("T4", ["tensor(int32)"], "")],
        attributes=[attribute("K", ints, "input features"), attribute("N", ints, "output features"),
                    attribute("bits", ints, "bits per code"), attribute("block_size", ints, "block size"),
                    attribute("accuracy_level", ints, "0: unset", required=False)])


@contextlib.contextmanager
def _schema_registered() -> Iterator[None]:
    """onnxscript builds nodes from onnx schemas: register MatMulNBits' for the export, and remove it after."""
    import onnx

    if onnx.defs.has(OP_TYPE, DOMAIN):
        yield
        return
    onnx.defs.register_schema(_op_schema())
    try:
        yield
    finally:
        onnx.defs.deregister_schema(OP_TYPE, 1, DOMAIN)


@contextlib.contextmanager
def _quiet_registration() -> Iterator[None]:
    """Silence the exporter's start-up notes about optional packages (torchvision ops it skips)."""
    import logging

    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _translate_matmul_nbits(x, B, scales, zero_points, K: int, N: int, bits: int, block_size: int):
    from onnxscript.values import Opset

    msft = Opset(DOMAIN, 1)
    inputs = (x, B, scales) if zero_points is None else (x, B, scales, zero_points)
    return msft.MatMulNBits(*inputs, K=K, N=N, bits=bits, block_size=block_size)


class _Logits(nn.Module):
    """``input_ids -> logits`` without a key/value cache (the exported graph)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


# ---------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------


def _check_tokens(model: nn.Module) -> torch.Tensor:
    vocab = int(getattr(model.config, "vocab_size", 0) or 0) or model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (2, 9), generator=generator)


def export_onnx(folder: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool = False,
                check: bool = True, opset: int = 18) -> dict[str, Any]:
    """Write the compressed folder ``folder`` as an ONNX model folder ``output``; returns a JSON-ready report.

    ``output`` gets ``model.onnx`` (with ``model.onnx.data`` beside it when the weights pass 2 GB), and the source's
    config, tokenizer and lmshrink.json files. The graph maps ``input_ids`` to ``logits`` without a key/value cache.
    With ``check`` (and onnxruntime installed) the exported model is run on CPU on two random 9-token sequences
    and the report gives its largest absolute logit difference from lmshrink's dense model of the same folder.
    """
    _require("onnx")
    _require("onnxscript")

    folder, output = Path(folder), Path(output)
    if not is_compressed_tensors_folder(folder):
        raise LmshrinkError(f"{folder} is not a compressed checkpoint folder (config.json has no compressed-tensors "
                            "quantization_config)", fix="export a folder written by lmshrink compress with a "
                                                        "quantizing recipe")
    refuse_outlier_columns(folder, "ONNX's MatMulNBits", ALTERNATIVE.format(target="ONNX"))
    check_output_dir(output, overwrite=overwrite, protected=[folder])
    # every layer is packed (and refused) before any model is loaded
    packed_layers = {name: pack_matmul_nbits(result, name)
                     for name, result in iter_quantized_results(folder, decode=False)}
    if not packed_layers:
        raise LmshrinkError(f"{folder} has no quantized layer to export", fix="compress it with a quantizing recipe")
    layers = {name: {"bits": p["bits"], "block_size": p["block_size"], "zero_points": p["zero_points"] is not None,
                     "act_order": p["order"] is not None} for name, p in packed_layers.items()}
    reference = tokens = None
    if check:  # lmshrink's dense model of the folder (weights decoded in float32), for the check after the export
        dense = load_model(str(folder), dtype="float32", progress=False).model.eval()
        tokens = _check_tokens(dense)
        with torch.no_grad():
            reference = dense(input_ids=tokens, use_cache=False).logits.float()
        del dense
    # the model to export: built from config.json and the stored tensors, each quantized Linear a stand-in holding
    # its MatMulNBits tensors (no dense copy of a quantized weight is made)
    model, _, _ = load_packed(folder, dtype=torch.float32, kernels=False)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    if tokens is None:
        tokens = _check_tokens(model)
    for name, packed in packed_layers.items():
        _set_submodule(model, name, MatMulNBitsLinear(packed, model.get_submodule(name).bias))
    del packed_layers
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with _schema_registered(), _quiet_registration(), torch.no_grad():
        try:
            program = torch.onnx.export(
                _Logits(model).eval(), (tokens,), dynamo=True, opset_version=opset, input_names=["input_ids"],
                output_names=["logits"], dynamic_shapes={"input_ids": {0: batch, 1: sequence}},
                custom_translation_table={torch.ops.lmshrink.matmul_nbits.default: _translate_matmul_nbits},
                optimize=True, verbose=False)
        except Exception as exc:  # the exporter's errors are long; keep the cause attached
            raise LmshrinkError(f"torch.onnx.export failed for {folder} ({model.config.model_type}): "
                                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                                fix="the ONNX export is tested on llama-family models; see the chained error "
                                    "for the operator that failed") from exc
    graph = program.model.graph
    nodes = sum(1 for node in graph.all_nodes() if node.op_type == OP_TYPE and node.domain == DOMAIN)
    if nodes != len(layers):
        raise LmshrinkError(f"the exported graph has {nodes} MatMulNBits nodes for {len(layers)} quantized layers",
                            fix="report this: a quantized layer was not exported as MatMulNBits")
    report: dict[str, Any] = {"output": str(output), "model_file": MODEL_FILE, "matmul_nbits_nodes": nodes,
                              "layers": len(layers), "bits": sorted({v["bits"] for v in layers.values()}),
                              "block_sizes": sorted({v["block_size"] for v in layers.values()}),
                              "asymmetric_layers": sum(v["zero_points"] for v in layers.values()),
                              "act_order_layers": sum(v["act_order"] for v in layers.values()),
                              "opset": opset, "inputs": "input_ids [batch, sequence] int64",
                              "outputs": "logits [batch, sequence, vocab] float32", "kv_cache": False}
    program.model.metadata_props.update({"lmshrink.source": str(folder),
                                         "lmshrink.matmul_nbits_layers": str(len(layers)),
                                         "lmshrink.graph": "input_ids -> logits, no key/value cache"})
    weight_bytes = sum(value.const_value.nbytes for value in graph.initializers.values()
                       if value.const_value is not None)
    external = weight_bytes > _SINGLE_FILE_LIMIT
    with atomic_directory(output, overwrite=overwrite, protected=[folder]) as staging:
        program.save(str(staging / MODEL_FILE), external_data=external)
        for name in _COPIED:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, staging / name)
        if (staging / "config.json").is_file():  # the graph holds the quantization; the config describes the model
            config = json.loads((staging / "config.json").read_text())
            config.pop("quantization_config", None)
            (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if check:
            report.update(_check(staging / MODEL_FILE, tokens, reference))
    report["external_data"] = external
    report["bytes"] = sum(p.stat().st_size for p in output.iterdir() if p.name.startswith(MODEL_FILE))
    return report


def _check(path: Path, tokens: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    """Run the written model in onnxruntime (CPU) on ``tokens``; the largest logit difference from ``reference``."""
    try:
        import onnxruntime
    except ImportError:
        return {"check": f"skipped: onnxruntime is not installed ({_INSTALL_FIX})"}
    try:
        logits = run_onnx(path, tokens, onnxruntime=onnxruntime)
    except Exception as exc:  # onnxruntime's own errors (a graph it cannot load or run)
        raise LmshrinkError(f"onnxruntime {onnxruntime.__version__} could not run the exported model: "
                            f"{type(exc).__name__}: {exc}",
                            fix="report this; --no-check (check=False) writes the model without running it") from exc
    diff = (logits - reference).abs().max().item()
    return {"check": f"onnxruntime {onnxruntime.__version__} CPU, {tuple(tokens.shape)} tokens",
            "max_abs_logit_diff": diff, "max_abs_logit": reference.abs().max().item()}


def run_onnx(path: str | os.PathLike, input_ids: torch.Tensor, *, onnxruntime=None, threads: int = 1) -> torch.Tensor:
    """Logits of the exported model at ``path`` for ``input_ids`` (onnxruntime on CPU, ``threads`` threads)."""
    if onnxruntime is None:
        onnxruntime = _require("onnxruntime")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input_ids": input_ids.to(torch.int64).numpy()})
    return torch.from_numpy(logits)
