"""GGUF export (llama.cpp) of a compressed folder: our codes mapped onto Q4_0 / Q4_1 / Q8_0 blocks.

Block formats (ggml, 32 weights per block, scales in float16):

* ``Q4_0``: ``d``, 16 bytes of nibbles; weight = ``(q - 8) * d``. Our symmetric grids of up to 4 bits
  (``(code - 2**(b-1)) * scale``) map to it code for code (``q = code - 2**(b-1) + 8``, ``d = scale``).
* ``Q4_1``: ``d``, ``m``, 16 bytes; weight = ``q * d + m``. Asymmetric grids of up to 4 bits:
  ``q = code``, ``d = scale``, ``m = -zero * scale``.
* ``Q8_0``: ``d``, 32 int8; weight = ``q * d``. Symmetric 8-bit grids: ``q = code - 128``.

Byte ``j`` of a 4-bit block holds weight ``j`` in its low nibble and weight ``j + 16`` in its high one. The codes map
exactly whenever groups are contiguous and every group boundary falls on a block boundary (group size a multiple of
32, input width a multiple of 32); the scales (and Q4_1's ``m``) are rounded to float16, which is exact for grids
fitted with ``scale_dtype='float16'`` (Q4_0, Q8_0) and otherwise changes the weights by at most a float16 rounding
of the scale: the export reports it per layer. Anything else (grouped 8-bit with a zero point, act-order groups,
group sizes that are not a multiple of 32) is re-quantized by the ``gguf`` package's quantizer with a printed
warning stating the extra error. Tensors the recipe left dense are written as float16 (2-D) and float32 (1-D);
pruned layers stored as bitmask + values (``--sparse-format bitmask``) are decoded and written as dense tensors.

Llama-family names and layout follow llama.cpp's converter: ``gguf.TensorNameMap`` names, and the rows of
``q_proj``/``k_proj`` (and their biases, with ``attention_bias``) permuted per head (llama.cpp's rotary embedding
pairs dimensions ``(i, i + d/2)`` the other way).
Metadata and tokenizer are copied from the GGUF file the model came from when there is one (the packaged SmolLM2 was
one); otherwise they are built from config.json and a byte-level BPE tokenizer.json.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmshrink.core.atomic import is_within
from lmshrink.core.errors import LmshrinkError
from lmshrink.core.results import QuantResult
from lmshrink.formats.compressed_tensors import (
    ALTERNATIVE,
    is_compressed_tensors_folder,
    load_quantized_results,
    refuse_outlier_columns,
)
from lmshrink.formats.sparse_bitmask import decoded_bitmask_weights, dense_tensor_keys
from lmshrink.models.loader import SafetensorsWeights

BLOCK = 32
LLAMA_FAMILY = {"llama": "llama", "mistral": "llama"}
_SKIPPED_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")


@dataclass
class LayerExport:
    """How one quantized layer was written."""

    name: str
    gguf_name: str
    qtype: str
    exact_codes: bool
    max_abs_change: float  # max |exported weight - our weight|
    rel_error: float  # ||exported - ours|| / ||ours||
    note: str = ""


def _gguf():
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise LmshrinkError("the gguf package is not installed", fix="pip install gguf") from exc
    return gguf


# ---------------------------------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------------------------------


def _half_bytes(values: np.ndarray) -> np.ndarray:
    """float16 values ``[..., B]`` -> their bytes ``[..., B, 2]`` (little-endian)."""
    return values.astype("<f2").view(np.uint8).reshape(*values.shape, 2)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes ``[N, B, 32]`` (0..15) -> ``[N, B, 16]`` bytes: weight j low nibble, weight j+16 high."""
    return (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)


def encode_q4_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q4_0 blocks ``[N, K/32*18]`` from codes ``[N, K]`` in 0..15 (weight ``(q-8)*d``) and ``d [N, K/32]``."""
    n, k = codes.shape
    blocks = codes.reshape(n, k // BLOCK, BLOCK)
    return np.concatenate([_half_bytes(d), _nibbles(blocks)], axis=-1).reshape(n, -1)


def encode_q4_1(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_1 blocks ``[N, K/32*20]`` (weight ``q*d + m``)."""
    n, k = codes.shape
    blocks = codes.reshape(n, k // BLOCK, BLOCK)
    return np.concatenate([_half_bytes(d), _half_bytes(m), _nibbles(blocks)], axis=-1).reshape(n, -1)


def encode_q8_0(values: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q8_0 blocks ``[N, K/32*34]`` from int8 values ``[N, K]`` (weight ``q*d``)."""
    n, k = values.shape
    blocks = values.astype(np.int8).view(np.uint8).reshape(n, k // BLOCK, BLOCK)
    return np.concatenate([_half_bytes(d), blocks], axis=-1).reshape(n, -1)


def _block_params(result: QuantResult, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scale and zero of each 32-column block ``[N, K/32]`` (groups contiguous, boundaries on blocks)."""
    first_columns = torch.arange(0, in_features, BLOCK)
    group_of_block = result.group_index()[first_columns].long()
    return result.scale[:, group_of_block].float(), result.zero[:, group_of_block].float()


def _maps_exactly(result: QuantResult, in_features: int) -> bool:
    width = result.spec.group_width(in_features)
    return in_features % BLOCK == 0 and width % BLOCK == 0 and result.contiguous_groups()


def _decode(qtype_name: str, data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    gguf = _gguf()
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype_name]).reshape(rows, cols)


def encode_layer(result: QuantResult) -> tuple[str, np.ndarray, bool]:
    """(GGML type name, block bytes ``[N, bytes per row]``, whether the codes mapped exactly) for one layer."""
    out_features, in_features = result.codes.shape
    spec = result.spec
    if _maps_exactly(result, in_features):
        scale, zero = _block_params(result, in_features)
        d = scale.numpy().astype(np.float16)
        codes = result.codes.numpy().astype(np.int16)
        if spec.symmetric and spec.bits <= 4:
            q = (codes - (1 << (spec.bits - 1)) + 8).astype(np.uint8)
            return "Q4_0", encode_q4_0(q, d), True
        if spec.symmetric and spec.bits == 8:
            return "Q8_0", encode_q8_0(codes - 128, d), True
        if not spec.symmetric and spec.bits <= 4:
            m = (-zero * scale).numpy().astype(np.float16)
            return "Q4_1", encode_q4_1(codes.astype(np.uint8), d, m), True
    if in_features % BLOCK:
        return "F16", result.weight.numpy().astype(np.float16), False
    gguf = _gguf()
    qtype = "Q8_0" if spec.bits > 4 else ("Q4_0" if spec.symmetric else "Q4_1")
    data = gguf.quants.quantize(result.weight.numpy().astype(np.float32), gguf.GGMLQuantizationType[qtype])
    return qtype, data, False


# ---------------------------------------------------------------------------------------------------------------
# llama family: names, layout, metadata
# ---------------------------------------------------------------------------------------------------------------


def _row_permutation(rows: int, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order: per head, rows ``(0, d/2, 1, d/2+1, ...)`` of the HF layout."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _permute_result(result: QuantResult, perm: torch.Tensor) -> QuantResult:
    return QuantResult(codes=result.codes[perm], scale=result.scale[perm], zero=result.zero[perm], g_idx=result.g_idx,
                       weight=result.weight[perm], spec=result.spec, info=result.info)


def _head_counts(config: dict[str, Any]) -> tuple[int, int]:
    heads = int(config["num_attention_heads"])
    return heads, int(config.get("num_key_value_heads") or heads)


def _rope_theta(config: dict[str, Any]) -> float:
    if "rope_theta" in config:
        return float(config["rope_theta"])
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", 10000.0))


def _config_metadata(writer, config: dict[str, Any]) -> None:
    heads, kv_heads = _head_counts(config)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(int(config["vocab_size"]))
    if head_dim * heads != hidden:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _tokenizer_metadata(writer, folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json as llama.cpp's ``gpt2`` tokenizer model."""
    gguf = _gguf()
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise LmshrinkError(f"{folder} has no tokenizer.json to build the GGUF tokenizer from",
                            fix="pass source_gguf= (CLI --source-gguf) with the GGUF the model came from")
    data = json.loads(path.read_text())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise LmshrinkError(f"{path}: a {model.get('type')} tokenizer; lmshrink builds GGUF tokenizers for "
                            "byte-level BPE only", fix="pass source_gguf= with a GGUF of the same model, or convert "
                                                       "the dense model with llama.cpp's convert_hf_to_gguf.py")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, token in added.items():
        vocab[content] = token["id"]
    size = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for content, index in vocab.items():
        tokens[index] = content
        token = added.get(content)
        if token is None:
            types[index] = gguf.TokenType.NORMAL
        else:
            types[index] = gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    config = {}
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value in vocab:
            add(vocab[value])
    if isinstance(config.get("chat_template"), str):
        writer.add_chat_template(config["chat_template"])


def _copy_metadata(writer, reader) -> None:
    gguf = _gguf()
    for key, field in reader.fields.items():
        if key.startswith(_SKIPPED_KEYS):
            continue
        vtype = field.types[0]
        value = field.contents()
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, vtype)


def _source_matches(reader, config: dict[str, Any], arch: str) -> str | None:
    """None when the source GGUF describes this model's shape, else the first difference."""
    checks = {f"{arch}.block_count": config["num_hidden_layers"], f"{arch}.embedding_length": config["hidden_size"],
              f"{arch}.feed_forward_length": config["intermediate_size"],
              f"{arch}.attention.head_count": config["num_attention_heads"]}
    for key, expected in checks.items():
        field = reader.fields.get(key)
        if field is None or int(field.contents()) != int(expected):
            return f"{key} = {None if field is None else field.contents()}, the model has {expected}"
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        return "it has no tokenizer"
    return None


def _find_source_gguf(folder: Path) -> Path | None:
    record = folder / "lmshrink.json"
    if not record.is_file():
        return None
    try:
        extra = json.loads(record.read_text()).get("model", {}).get("extra", {})
    except ValueError:
        return None
    path = extra.get("gguf")
    return Path(path) if path and Path(path).is_file() else None


# ---------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------


def _check_output_file(output: Path, folder: Path, *, overwrite: bool) -> None:
    """Refuse an ``output`` .gguf path that could destroy data or cannot be written: inside the input ``folder``
    (e.g. its model.safetensors), an existing folder, below a file, or an existing file without ``overwrite``."""

    path, source = output.resolve(), folder.resolve()
    if is_within(path, source):
        beside = source.parent / f"{source.name}.gguf"
        where = "is the input folder" if path == source else f"is inside the input folder {folder}"
        raise LmshrinkError(f"output {output} {where}; the input is never modified",
                            fix=f"write the .gguf outside the input folder, e.g. {beside}")
    if path.is_dir():
        raise LmshrinkError(f"output {output} is a folder; GGUF export writes one .gguf file",
                            fix=f"name the file to write, e.g. {output / (source.name + '.gguf')}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise LmshrinkError(f"output {output}: {parent} is a file, not a folder",
                                    fix="choose an output path in a folder")
            break
    if path.exists() and not overwrite:
        raise LmshrinkError(f"{output} exists",
                            fix="choose another output file, or pass overwrite=True (CLI: --overwrite) to replace it")


def export_gguf(folder: str | os.PathLike, output: str | os.PathLike, *, source_gguf: str | os.PathLike | None = None,
                dense_type: str = "f16", overwrite: bool = False) -> dict[str, Any]:
    """Write the compressed folder ``folder`` as one GGUF file for llama.cpp; returns a JSON-ready report.

    source_gguf: the GGUF the model was converted from, for its metadata and tokenizer (default: the one named in
    the folder's lmshrink.json, when it exists). dense_type: ``f16``, ``f32`` or ``q8_0`` for 2-D tensors the recipe
    left dense (embeddings, an untied head).
    """
    gguf = _gguf()

    folder, output = Path(folder), Path(output)
    if not is_compressed_tensors_folder(folder):
        raise LmshrinkError(f"{folder} is not a compressed checkpoint folder",
                            fix="export a folder written by lmshrink compress")
    refuse_outlier_columns(folder, "GGUF", ALTERNATIVE.format(target="GGUF"))
    _check_output_file(output, folder, overwrite=overwrite)
    if dense_type not in ("f16", "f32", "q8_0"):
        raise LmshrinkError(f"dense_type={dense_type!r} is not supported", fix="use f16, f32 or q8_0")
    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type")
    arch = LLAMA_FAMILY.get(model_type)
    if arch is None:
        raise LmshrinkError(f"GGUF export supports the llama family ({', '.join(LLAMA_FAMILY)}), not {model_type!r}",
                            fix="export with --to gptq, or convert the dense model with llama.cpp's "
                                "convert_hf_to_gguf.py")
    results = load_quantized_results(folder)
    weights = SafetensorsWeights(folder)
    blocks = int(config["num_hidden_layers"])
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, blocks)
    heads, kv_heads = _head_counts(config)

    source = Path(source_gguf) if source_gguf else _find_source_gguf(folder)
    reader, source_note = None, None
    if source is not None:
        if not source.is_file():
            raise LmshrinkError(f"source GGUF {source} does not exist", fix="check the path")
        if source.resolve() == output.resolve():
            raise LmshrinkError(f"output {output} is the source GGUF the metadata is read from; it is never modified",
                                fix="choose another output file")
        reader = gguf.GGUFReader(str(source))
        mismatch = _source_matches(reader, config, arch)
        if mismatch:
            if source_gguf:
                raise LmshrinkError(f"source GGUF {source} does not describe this model: {mismatch}",
                                    fix="pass the GGUF the model came from, or none")
            source_note = f"ignored {source} ({mismatch})"
            reader = None

    def gguf_name(hf_name: str) -> str:
        base, _, suffix = hf_name.rpartition(".")
        mapped = names.get_name(base)
        if mapped is None:
            raise LmshrinkError(f"tensor {hf_name} has no llama.cpp name", fix="this model's layout is not plain "
                                "llama; convert the dense model with convert_hf_to_gguf.py")
        return f"{mapped}.{suffix}"

    def permutation(hf_name: str, rows: int) -> torch.Tensor | None:
        if hf_name.endswith("self_attn.q_proj"):
            return _row_permutation(rows, heads)
        if hf_name.endswith("self_attn.k_proj"):
            return _row_permutation(rows, kv_heads)
        return None

    tensors: list[tuple[str, np.ndarray, str]] = []  # gguf name, data, type name
    layers: list[LayerExport] = []
    for name, result in results.items():
        perm = permutation(name, result.codes.shape[0])
        if perm is not None:
            result = _permute_result(result, perm)
        qtype, data, exact = encode_layer(result)
        decoded = torch.from_numpy(_decode(qtype, data, *result.codes.shape).astype(np.float32))
        diff = decoded - result.weight
        rel = float(diff.norm() / result.weight.norm().clamp(min=1e-30))
        layers.append(LayerExport(name, gguf_name(f"{name}.weight"), qtype, exact, float(diff.abs().max()), rel,
                                  "" if exact else "re-quantized"))
        tensors.append((gguf_name(f"{name}.weight"), data, qtype))
    quantized_keys = {f"{name}.weight" for name in results}
    tied = bool(config.get("tie_word_embeddings"))
    decoded = decoded_bitmask_weights(folder)  # pruned layers stored as bitmask + values: written as dense weights
    for key in dense_tensor_keys(weights.keys(), decoded):
        if key in quantized_keys or key.endswith(("weight_packed", "weight_scale", "weight_zero_point",
                                                  "weight_shape", "weight_g_idx")):
            continue
        if tied and key == "lm_head.weight":
            continue
        tensor = (decoded[key] if key in decoded else weights.get(key)).float()
        module, _, leaf = key.rpartition(".")
        perm = None
        if (leaf, tensor.ndim) in (("weight", 2), ("bias", 1)):  # a q/k bias follows its weight's rows
            perm = permutation(module, tensor.shape[0])
        if perm is not None:
            tensor = tensor[perm]
        array = tensor.numpy()
        if tensor.ndim == 1 or dense_type == "f32":
            tensors.append((gguf_name(key), array.astype(np.float32), "F32"))
        elif dense_type == "f16":
            tensors.append((gguf_name(key), array.astype(np.float16), "F16"))
        else:
            tensors.append((gguf_name(key), gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), "Q8_0"))

    counts = Counter(layer.qtype for layer in layers)
    main_type = counts.most_common(1)[0][0] if counts else "F16"
    file_type = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
                 "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "F16": gguf.LlamaFileType.MOSTLY_F16}[main_type]

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.parent / f".{output.name}.partial-{os.getpid()}"
    try:
        writer = gguf.GGUFWriter(str(partial), arch)
        if reader is not None:
            _copy_metadata(writer, reader)
        else:
            _config_metadata(writer, config)
            writer.add_name(str(config.get("_name_or_path") or folder.name))
            _tokenizer_metadata(writer, folder, int(config["vocab_size"]))
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, data, type_name in tensors:
            if type_name in ("F32", "F16"):
                writer.add_tensor(name, data)
            else:
                writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[type_name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, output)
    except BaseException:
        if partial.exists():
            partial.unlink()
        raise

    requantized = [layer for layer in layers if not layer.exact_codes]
    if requantized:
        worst = max(requantized, key=lambda layer: layer.rel_error)
        print(f"lmshrink: warning: {len(requantized)} of {len(layers)} layers do not map onto GGUF blocks of 32 "
              f"(grid {results[worst.name].spec.bits}-bit, group {results[worst.name].spec.group_size}) and were "
              f"re-quantized to {worst.qtype}: extra relative weight error up to {worst.rel_error:.2e} "
              f"({worst.name}); use group sizes that are multiples of 32 for an exact export", file=sys.stderr)
    exact = [layer for layer in layers if layer.exact_codes]
    return {
        "output": str(output), "bytes": output.stat().st_size, "architecture": arch,
        "metadata_from": str(source) if reader is not None else "config.json and tokenizer.json",
        "source_note": source_note, "types": dict(counts), "dense_type": dense_type,
        "exact_layers": len(exact), "requantized_layers": len(requantized),
        "max_abs_change_exact": max((layer.max_abs_change for layer in exact), default=0.0),
        "max_rel_error_requantized": max((layer.rel_error for layer in requantized), default=0.0),
        "notes": _layout_notes(folder),
        "layers": [layer.__dict__ for layer in layers],
    }


def _layout_notes(folder: Path) -> list[str]:
    """The facts about the stored layout that the compression recorded (``notes`` in ``lmshrink.json``, e.g. a
    group size that does not divide a width), stated once here, where they matter."""
    try:
        notes = json.loads((folder / "lmshrink.json").read_text()).get("notes") or []
    except (OSError, ValueError, AttributeError):
        return []
    return [str(note) for note in notes]


def read_gguf_weight(path: str | os.PathLike, name: str) -> np.ndarray:
    """The float32 weight ``name`` of a GGUF file, decoded by the gguf package's own dequantizer (``[rows, cols]``)."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    for tensor in reader.tensors:
        if tensor.name == name:
            return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    raise KeyError(name)
