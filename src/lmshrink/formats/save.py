"""Writing a compressed model: quantized layers packed in the compressed-tensors layout, pruned layers dense or as
bitmask + values, everything else as it is, into one Hugging Face folder (see ``compressed_tensors`` and
``sparse_bitmask`` for the layouts)."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmshrink.core.atomic import atomic_directory
from lmshrink.core.errors import LmshrinkError
from lmshrink.core.results import CorrectedResult, LowRankResult, PruneResult, QuantResult
from lmshrink.formats.compressed_tensors import (
    OUTLIER_FORMAT,
    QUANT_METHOD,
    SPECS_KEY,
    StoredScheme,
    build_sparsity_config,
    check_result,
    ct_version,
    describe_scheme,
    pack_layer,
    quantization_config,
    stored_group_sizes,
)
from lmshrink.formats.hf_folder import (
    config_json,
    dense_state_dict,
    is_conv1d,
    natural_key,
    protected_folders,
    write_weights,
)
from lmshrink.formats.lowrank import LOWRANK_KEY, factor_tensors, merged_weight
from lmshrink.formats.runtime_scheme import RUNTIME_FILE, runtime_json
from lmshrink.formats.sparse_bitmask import LAYERS_KEY, check_sparse_format, encode
from lmshrink.models.structure import config_structure


def save_quantized(model: nn.Module, tokenizer, results: dict[str, QuantResult], out_dir: str | os.PathLike, *,
                   ignore: list[str] | tuple[str, ...] = (), extra_files: dict[str, Any] | None = None,
                   overwrite: bool = False, input_dir: str | os.PathLike | None = None,
                   max_shard_size: int = 4 * 1024**3, transformers_compatible: bool = True,
                   source_tensors=None, sparse_format: str = "dense", rename=None) -> Path:
    """Write ``model`` with the layers in ``results`` packed, as an HF folder in compressed-tensors ``pack-quantized``.

    results: full module names (``model.named_modules()``) -> QuantResult; the packed tensors come from the results
    only (the module's current weight is not read for those layers). ignore: extra module names for the config's
    ``ignore`` list; ``lm_head`` and every Linear not in ``results`` are always added. extra_files: file name ->
    content written beside the weights (e.g. ``lmshrink.json``), or a function of the folder being written that
    returns the content, called once the weights are in it. Other tensors are saved as they are in the model
    (tied weights once). Weights go to ``model.safetensors``, or to shards of at most ``max_shard_size`` bytes with
    an index. The folder is built beside ``out_dir`` and renamed into place at the end, so an interrupted call
    leaves nothing. Returns the folder's path.

    Raises ``LmshrinkError`` when ``out_dir`` is a non-empty folder (unless ``overwrite``), when it overlaps the
    input model's folder (``input_dir``, or the folder the model was loaded from), when scales are not exact in the
    model's dtype, for act-order without static groups, and for group sizes that cannot be stored (see module doc).
    With ``transformers_compatible`` (the default) it also refuses what transformers cannot load but vLLM and
    ``load_quantized_results`` can: asymmetric grids mixed with other grids (several config groups).

    source_tensors: ``name -> tensor`` (e.g. ``SafetensorsWeights.get`` of the input folder) for a model whose
    tensors are partly on the meta device (streamed compression): those not replaced by packed layers are read from
    it, one shard at a time, and written in the model's dtype. Results may then carry an empty ``weight``.

    sparse_format: how pruned layers that are not quantized (``PruneResult``) are stored: ``"dense"`` (default: the
    weight with its zeros, which plain transformers loads) or ``"bitmask"`` (compressed-tensors ``sparse-bitmask``:
    bitmask + kept values, about half the bytes at 50% sparsity, read back exactly by lmshrink's ``load_model`` and
    ``load_sparse_results`` but not by plain transformers; see ``formats.sparse_bitmask``). Layers pruned and
    quantized are stored ``pack-quantized`` either way.

    rename: ``module name -> stored name`` for a family whose checkpoints name tensors differently from the module
    tree (the adapter's ``checkpoint_name``): applied to the tensors and to the names in the configs and metadata.
    """
    check_sparse_format(sparse_format)
    modules = dict(model.named_modules())
    missing = [name for name in results if name not in modules]
    if missing:
        raise ValueError(f"results name modules the model does not have: {missing[:5]}")
    state = dense_state_dict(model, allow_meta=source_tensors is not None)
    kept_names = set(state)
    # results read from disk layer by layer (a streamed run's ``StoredResults``): the stored tensors of each layer are
    # made again when its shard is written, so memory holds one layer's, not the model's
    lazy = not isinstance(results, dict)

    replaced: dict[str, dict[str, torch.Tensor]] = {}
    dense_conv1d: list[str] = []
    linear_layers: dict[str, tuple[int, Any]] = {}
    sparse: dict[str, tuple[str, float]] = {}  # pruned layers: name -> (pattern, zeros)
    bitmask: dict[str, dict[str, Any]] = {}  # pruned layers stored as bitmask + values: name -> record
    # low-rank layers: the factors (formats.lowrank), beside a corrected layer's base stored as its kind
    factors, lowrank_records = factor_tensors(results, modules)
    merged: list[str] = []
    for name in results:
        result = results[name]
        module = modules[name]
        if f"{name}.weight" not in kept_names:
            raise LmshrinkError(f"layer {name} shares its weight with another tensor (tied), so it cannot be packed",
                                fix=f"leave {name} out of the quantized layers (ignore it in the recipe)")
        if isinstance(result, LowRankResult):
            if result.merge:
                replaced[name] = {"weight": merged_weight(result, module)}
                merged.append(name)
            else:
                replaced[name] = dict(factors[name])
            continue
        if isinstance(result, CorrectedResult):
            result = result.base
        if isinstance(result, PruneResult):  # pruned, not quantized: dense weights with zeros, or bitmask + values
            if sparse_format == "bitmask":
                bitmask[name] = {"pattern": result.pattern, "target_sparsity": result.target_sparsity,
                                 "conv1d": is_conv1d(module)}
            sparse[name] = (result.pattern, float(result.mask.sum()))
            tensors = _layer_tensors(name, module, result, sparse_format, None)
            replaced[name] = _placeholders(tensors) if lazy else tensors
            continue
        if (result.info or {}).get("pattern"):  # pruned and quantized (joint SparseGPT, or prune then GPTQ)
            sparse[name] = (result.info["pattern"], result.info["sparsity"] * result.codes.numel())
        if is_conv1d(module):
            # Conv1D stores [in, out]; the loader only packs nn.Linear, so keep the exact dequantized weight
            tensors = _layer_tensors(name, module, result, sparse_format, None)
            replaced[name] = _placeholders(tensors) if lazy else tensors
            dense_conv1d.append(name)
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"layer {name} is a {type(module).__name__}, not a Linear")
        check_result(name, result, module.out_features, module.in_features)
        linear_layers[name] = (module.in_features, result if not lazy else _Grid(result))

    groups: dict[StoredScheme, list[str]] = {}
    specs: dict[str, dict[str, Any]] = {}
    stored_groups = stored_group_sizes(linear_layers)
    for name, stored_group in stored_groups.items():
        result = results[name] if lazy else linear_layers[name][1]
        if isinstance(result, CorrectedResult):  # read again from disk: the correction's base is what is packed
            result = result.base
        scheme, tensors = pack_layer(name, modules[name], result, stored_group)
        groups.setdefault(scheme, []).append(name)
        replaced[name] = _placeholders(tensors) if lazy else tensors
        specs[name] = asdict(result.spec)
        del result, tensors
    # a folder with outlier columns is refused by transformers anyway (its config group's format names them)
    outliers = any(scheme.outliers for scheme in groups)
    if outliers:
        kept = sorted((n for scheme, names in groups.items() if scheme.outliers for n in names), key=natural_key)
        warnings.warn(f"{len(kept)} layers (e.g. {kept[0]}) keep input columns in 16 bits (OWQ), which "
                      f"compressed-tensors cannot hold: their config group's format {OUTLIER_FORMAT!r} makes plain "
                      "transformers refuse the folder; lmshrink.load_model reads it (also runtime='packed'). For a "
                      "folder transformers loads, compress without outlier columns (e.g. w4g128, w3g128)", stacklevel=2)
    if transformers_compatible and not outliers and len(groups) > 1 and any(not s.symmetric for s in groups):
        raise LmshrinkError(
            "asymmetric grids mixed with other grids (" + "; ".join(describe_scheme(s) for s in groups) + ") give several "
            "compressed-tensors config groups, and transformers loads asymmetric checkpoints with one group only",
            fix="use one grid (bits, group size, symmetry) for every layer, or symmetric grids, or save with "
                "transformers_compatible=False (vLLM and lmshrink still read it)")
    for name, parts in factors.items():  # a correction's factors beside its base's tensors
        if isinstance(results[name], CorrectedResult):
            replaced[name].update(parts)
    runtime = runtime_json(model)  # activation quantizers, online transforms, cache quantization
    # no result at all (a structural or transform-only run) is meant to give a dense checkpoint: no warning then
    if dense_conv1d or (results and not (groups or sparse or factors or merged or runtime)):
        conv1d = (f"{len(dense_conv1d)} Conv1D layers (e.g. {dense_conv1d[0]}) are saved dequantized: "
                  "compressed-tensors packs only nn.Linear layers") if dense_conv1d else ""
        dense = "no layer is packed, so the folder is a plain dense checkpoint" if not groups and results else ""
        warnings.warn("; ".join(m for m in (conv1d, dense) if m), stacklevel=2)

    packed = set(specs)
    linears = [n for n, m in modules.items() if n and isinstance(m, nn.Linear) and n not in packed]
    ignore_list = sorted(set(ignore) | set(linears) | set(dense_conv1d)
                         | ({"lm_head"} if "lm_head" in modules and "lm_head" not in packed else set()),
                         key=natural_key)

    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module_name, _, leaf = key.rpartition(".")
        if module_name in replaced and leaf == "weight":
            for sub, value in replaced[module_name].items():
                tensors[f"{module_name}.{sub}"] = value
        else:
            tensors[key] = tensor.contiguous()
    # nothing packed (e.g. GPT-2, whose layers are all Conv1D): a plain dense checkpoint, no quantization_config
    quant_config = quantization_config(groups, ignore_list) if groups else None
    if sparse:
        sparsity_config = build_sparsity_config(sparse, modules, state, sorted(bitmask))
        quant_config = quant_config or {"version": ct_version(), "quant_method": QUANT_METHOD}
        quant_config["sparsity_config"] = sparsity_config

    if rename is not None:
        quant_config = _renamed(quant_config, rename)
        specs = {rename(name): spec for name, spec in specs.items()}
        bitmask = {rename(name): record for name, record in bitmask.items()}
    with atomic_directory(out_dir, overwrite=overwrite, protected=protected_folders(model, input_dir)) as staging:
        metadata = {SPECS_KEY: json.dumps(specs, sort_keys=True)}
        if bitmask:
            metadata[LAYERS_KEY] = json.dumps(bitmask, sort_keys=True)
        if lowrank_records:
            metadata[LOWRANK_KEY] = json.dumps(lowrank_records, sort_keys=True)
        if lazy:
            made = {f"{name}.{sub}" for name, parts in replaced.items() for sub in parts}
            source_tensors = _LayerSource(results, modules, sparse_format, stored_groups, made, source_tensors)
        write_weights(staging, tensors, metadata, max_shard_size, source_tensors, rename)
        (staging / "config.json").write_text(config_json(model, quant_config, config_structure(model)))
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and model.can_generate():
            generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if runtime is not None:
            (staging / RUNTIME_FILE).write_text(runtime)
        for filename, content in (extra_files or {}).items():
            if Path(filename).name != filename or filename in ("", ".", ".."):
                raise ValueError(f"extra file name {filename!r} must be a plain file name")
            if callable(content):  # built once the weights are on disk (e.g. a record stating their bytes)
                content = content(staging)
            data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
            (staging / filename).write_bytes(data)
    return Path(out_dir).expanduser().resolve()


class _Grid:
    """What ``stored_group_sizes`` reads of a quantized result (grid, solver record, group index), without its
    codes."""

    def __init__(self, result):
        self.spec, self.info, self.g_idx = result.spec, result.info, result.g_idx


def _placeholders(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: torch.empty(t.shape, dtype=t.dtype, device="meta") for key, t in tensors.items()}


def _layer_tensors(name: str, module: nn.Module, result, sparse_format: str, stored_group: int | None
                   ) -> dict[str, torch.Tensor]:
    """The tensors stored for one layer's result (keys relative to the module; a correction's base's, its factors
    are stored apart)."""
    if isinstance(result, CorrectedResult):
        result = result.base
    if isinstance(result, PruneResult):
        weight, kept = result.dense(), ~result.mask
        if is_conv1d(module):
            weight, kept = weight.t(), kept.t()
        weight = weight.to(module.weight.dtype).contiguous()
        return encode(weight, kept) if sparse_format == "bitmask" else {"weight": weight}
    if is_conv1d(module):
        return {"weight": result.dense().t().to(module.weight.dtype).contiguous()}
    return pack_layer(name, module, result, stored_group)[1]


class _LayerSource:
    """``source_tensors`` for a shard of a lazily read model: a replaced layer's tensors are made again from its
    result (one layer kept at a time: a shard lists a layer's tensors together), other tensors come from
    ``source`` (the input model's files)."""

    def __init__(self, results, modules, sparse_format, stored_groups, made, source):
        self.results, self.modules, self.sparse_format = results, modules, sparse_format
        self.stored_groups, self.made, self.source = stored_groups, made, source  # made: the layers' tensor names
        self._name, self._tensors = None, {}

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.made:  # a tensor of the input model (a packed layer's bias among them)
            return self.source(key)
        name, _, sub = key.rpartition(".")
        if name != self._name:
            self._name, self._tensors = None, {}
            self._tensors = _layer_tensors(name, self.modules[name], self.results[name], self.sparse_format,
                                           self.stored_groups.get(name))
            self._name = name
        return self._tensors[sub]


def _renamed(config: dict | None, rename) -> dict | None:
    """The quantization config with the module names of its ``targets`` and ``ignore`` lists stored-named."""
    if config is None:
        return None
    out = json.loads(json.dumps(config))
    for section in [out, out.get("sparsity_config") or {}, *(out.get("config_groups") or {}).values()]:
        for key in ("targets", "ignore"):
            if isinstance(section.get(key), list):
                section[key] = [rename(name) for name in section[key]]
    return out
