"""What kind of model source a string names (packaged name, folder, .gguf file, hub id), without loading anything:
torch-free, so the command line checks a source before it imports the numerical libraries."""

from __future__ import annotations

import os
import re
from pathlib import Path

from lmshrink.core.errors import LmshrinkError, ModelSourceError
from lmshrink.core.hub import hub_unavailable_reason
from lmshrink.models.registry import PACKAGED_MODELS

# the dtype names a model can be loaded in, and torch's name of each
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_path_like(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith(".gguf") or os.sep in source and not _HUB_ID.match(source)


def resolve(source: str) -> tuple[str, Path | str]:
    """Classify ``source``; return (kind, path or hub id). Never touches the network."""
    if source in PACKAGED_MODELS:
        return "packaged", source
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").is_file():
                ggufs = sorted(path.glob("*.gguf"))
                if len(ggufs) == 1:
                    return "gguf", ggufs[0]
                raise ModelSourceError(
                    f"{source} is a folder but holds no config.json (not a Hugging Face model folder)",
                    fix="point at the folder that holds config.json and the *.safetensors weights, or at a .gguf file",
                )
            return "hf-folder", path
        if path.suffix == ".gguf":
            return "gguf", path
        raise ModelSourceError(f"{source} is a file but not a .gguf file",
                               fix="pass a .gguf file, a Hugging Face model folder, a packaged name or a hub id")
    if _is_path_like(source):
        raise ModelSourceError(f"model path {source} does not exist",
                               fix="check the path, or use a packaged name (`lmshrink models` lists them)")
    if _HUB_ID.match(source):
        return "hub", source
    raise ModelSourceError(
        f"{source!r} is neither an existing path, a packaged model name nor a hub id (owner/name)",
        fix=f"use one of the packaged models ({', '.join(PACKAGED_MODELS)}), a local folder, a .gguf file or a hub id",
    )


def hub_unreachable_error(repo_id: str, reason: str) -> ModelSourceError:
    """The error for a hub id that cannot be loaded because the hub cannot be asked (``reason``) and the local hub
    cache does not hold it."""
    return ModelSourceError(
        f"{repo_id!r} looks like a Hugging Face hub id, but the hub cannot be asked ({reason}) and the local hub "
        "cache does not hold it",
        fix=f"pass a local model folder or .gguf file, or a packaged name ({', '.join(PACKAGED_MODELS)}; "
            "`lmshrink models`); or download it where the hub is reachable, then load it with HF_HUB_OFFLINE=1 "
            "from the cache")


def check_source(source: str) -> str:
    """The kind of ``source`` (as ``resolve``), after refusing at once what cannot load: a path that does not exist,
    an unknown name, or a hub id that is neither reachable nor in the local hub cache (transformers would retry an
    unreachable hub for about a minute before failing)."""
    kind, where = resolve(source)
    if kind == "hub":
        reason = hub_unavailable_reason(variables=("HF_HUB_OFFLINE",))
        if reason is not None and not _in_hub_cache(str(where)):
            raise hub_unreachable_error(str(where), reason)
    return kind


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def check_dtype(dtype: str) -> None:
    """Refuse a dtype name ``load_model`` does not know."""
    if dtype not in DTYPE_NAMES:
        raise LmshrinkError(f"--dtype {dtype}: unknown dtype {dtype!r}", fix=f"use one of {', '.join(DTYPE_NAMES)}")
