"""Progress on disk after every block, so a killed run resumes where it stopped, bit-identically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lmshrink.core.atomic import atomic_write_text, with_umask_permissions
from lmshrink.core.errors import LmshrinkError
from lmshrink.core.results import RESULT_KINDS

_STATE = "state.json"
_TENSOR = "tensor:"  # prefix of the changed block tensors in a block file


def weights_digest(model: torch.nn.Module, weights=None, samples: int = 4096) -> str:
    """A digest of the model's weights for the resume key, so that progress made on other weights is refused.

    Every parameter and buffer held in memory contributes its name, shape, dtype and ``samples`` evenly spaced
    values; tensors left on disk (streamed blocks: ``weights`` is the model's ``SafetensorsWeights``) contribute
    their first and last rows, read without loading the rest. Cheap even for large models; two models that differ
    only where no sample looks are not told apart.
    """
    digest = hashlib.sha256()

    def add(name: str, tensor: torch.Tensor) -> None:
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        values = flat[::step][:samples].to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(values.numpy().tobytes())

    seen: set[int] = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type == "meta" or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        add(name, tensor)
    if weights is not None:
        for name in sorted(weights.keys()):
            add(name, weights.edge_rows(name))
    return digest.hexdigest()


def _publish(tmp: Path, path: Path) -> None:
    """Put the finished file ``tmp`` in place as ``path``: on disk before the rename, as state.json is."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    with_umask_permissions(tmp)
    os.replace(tmp, path)


def _atomic_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    _publish(tmp, path)


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def _atomic_safetensors_batches(path: Path, streams: dict[str, list[torch.Tensor]]) -> None:
    """Write each stream (a list of batches, concatenated along dim 0) as one tensor of a safetensors file, batch by
    batch from the batches' own memory: ``save_file`` would need the streams concatenated and then copied to bytes,
    two transient copies of the calibration's hidden states at every block. The file is a plain safetensors file
    (8-byte little-endian header size, JSON header padded to 8 bytes, the tensors' bytes in header order)."""
    header, offset = {}, 0
    for name, batches in streams.items():
        if not batches:
            raise ValueError(f"stream {name!r} has no batches")
        first = batches[0]
        if first.dtype not in _DTYPES or any(b.dtype != first.dtype or b.shape[1:] != first.shape[1:] for b in batches):
            raise ValueError(f"stream {name!r}: batches must share a float dtype and their shape after dim 0")
        size = sum(b.numel() for b in batches) * first.element_size()
        header[name] = {"dtype": _DTYPES[first.dtype], "shape": [sum(b.shape[0] for b in batches), *first.shape[1:]],
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for batches in streams.values():
            for batch in batches:
                batch = batch.detach().to("cpu").contiguous()
                handle.write(memoryview(batch.view(torch.uint8).reshape(-1).numpy()))
    _publish(tmp, path)


def _hidden_name(finished_blocks: int) -> str:
    return f"hidden_{finished_blocks:04d}.safetensors"


class Checkpoint:
    """A work folder: ``state.json`` (fingerprint, finished blocks, layer records), ``block_NNNN.safetensors``
    (the quantized layers of each finished block) and ``hidden_NNNN.safetensors`` (the inputs of block NNNN, that
    is the next block's after NNNN finished blocks, and with ``fp_target`` stages their uncompressed-model
    counterparts). The hidden states are written under a new name before ``state.json`` names them, and the older
    file is removed after, so a run killed at any point leaves a state whose files match it."""

    def __init__(self, folder: Path, key: str):
        self.folder = folder
        self.key = key
        self.finished_blocks = 0

    @property
    def start_over_fix(self) -> str:
        return f"run again with --restart to discard it and start over, or delete {self.folder}"

    def load(self) -> dict | None:
        """The saved state if this folder holds progress of the same run; None if it holds nothing."""
        state_path = self.folder / _STATE
        if not state_path.is_file():
            return None
        state = json.loads(state_path.read_text())
        if state.get("fingerprint") != self.key:
            raise LmshrinkError(
                f"{self.folder} holds progress of a different run (other model, recipe, calibration or options)",
                fix=self.start_over_fix)
        self.finished_blocks = int(state["finished_blocks"])
        return state

    def start(self) -> None:
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)

    def save_block(self, index: int, results: dict[str, Any], hidden: list[torch.Tensor], state: dict,
                   reference_hidden: list[torch.Tensor] | None = None,
                   tensors: dict[str, torch.Tensor] | None = None, structure: dict | None = None) -> None:
        """Save block ``index``'s layer results (each kind in its checkpoint form), the other block tensors stages
        changed (``tensors``, full names), the next block's inputs and the state. ``reference_hidden``: the next
        block's inputs in the uncompressed model (asymmetric calibration, ``fp_target``), kept beside them.
        ``structure``: how the stages changed the block's structure (``models.structure.structure_diff``), re-applied
        on resume before the tensors are restored."""
        stored, meta = {}, {}
        for name, result in results.items():
            parts, layer_meta = result.to_state()
            stored.update({f"{name}.{key}": value for key, value in parts.items()})
            meta[name] = {"kind": result.kind, **layer_meta}
        stored.update({f"{_TENSOR}{name}": value for name, value in (tensors or {}).items()})
        metadata = {"layers": json.dumps(meta, default=str)}
        if structure:
            metadata["structure"] = json.dumps(structure)
        _atomic_safetensors(self.folder / f"block_{index:04d}.safetensors", stored, metadata)
        streams = {"hidden": hidden}
        if reference_hidden is not None:
            streams["reference_hidden"] = reference_hidden
        _atomic_safetensors_batches(self.folder / _hidden_name(index + 1), streams)
        atomic_write_text(self.folder / _STATE,
                          json.dumps({**state, "fingerprint": self.key, "finished_blocks": index + 1}, indent=1))
        self.finished_blocks = index + 1
        for old in self.folder.glob("hidden*.safetensors"):
            if old.name != _hidden_name(index + 1):
                old.unlink(missing_ok=True)

    def block_path(self, index: int) -> Path:
        return self.folder / f"block_{index:04d}.safetensors"

    def load_block(self, index: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Block ``index``'s layer results and the other block tensors its stages changed (full names)."""
        path = self.folder / f"block_{index:04d}.safetensors"
        stored = self._read(path)
        with safe_open(str(path), "pt") as handle:
            meta = json.loads(handle.metadata()["layers"])
        results = {}
        for name, layer_meta in meta.items():
            kind = layer_meta.pop("kind")
            if kind not in RESULT_KINDS:
                raise LmshrinkError(f"{path} holds a layer result of kind {kind!r}, which no loaded method provides",
                                    fix=self.start_over_fix)
            parts = {key[len(name) + 1:]: value for key, value in stored.items() if key.startswith(name + ".")}
            results[name] = RESULT_KINDS[kind].from_state(parts, layer_meta)
        tensors = {key[len(_TENSOR):]: value for key, value in stored.items() if key.startswith(_TENSOR)}
        return results, tensors

    def load_structure(self, index: int) -> dict:
        """How the stages changed block ``index``'s structure (empty when they did not)."""
        path = self.block_path(index)
        self._read_header(path)
        with safe_open(str(path), "pt") as handle:
            return json.loads((handle.metadata() or {}).get("structure", "{}"))

    def load_block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Only the other block tensors block ``index``'s stages changed (full names), not its layer results."""
        path = self.block_path(index)
        self._read_header(path)
        with safe_open(str(path), "pt") as handle:
            return {key[len(_TENSOR):]: handle.get_tensor(key) for key in handle.keys() if key.startswith(_TENSOR)}

    def _read_header(self, path: Path) -> None:
        try:
            with safe_open(str(path), "pt"):
                pass
        except (OSError, SafetensorError) as exc:
            raise LmshrinkError(f"{path} from the saved progress cannot be read ({type(exc).__name__}: {exc})",
                                fix=self.start_over_fix) from exc

    def _read(self, path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(path))
        except (OSError, SafetensorError) as exc:  # missing, truncated or not safetensors (not e.g. out of memory)
            raise LmshrinkError(f"{path} from the saved progress cannot be read ({type(exc).__name__}: {exc})",
                                fix=self.start_over_fix) from exc

    def _hidden_path(self) -> Path:
        if not self.finished_blocks:  # not loaded yet: the state names the blocks finished
            self.load()
        return self.folder / _hidden_name(self.finished_blocks)

    def load_hidden(self) -> torch.Tensor:
        """The saved inputs of the next block, ``[windows, seqlen, hidden]``."""
        return self._read(self._hidden_path())["hidden"]

    def load_reference_hidden(self) -> torch.Tensor:
        """The saved inputs of the next block in the uncompressed model (``fp_target`` runs)."""
        streams = self._read(self._hidden_path())
        if "reference_hidden" not in streams:
            raise LmshrinkError(f"{self.folder} holds no uncompressed-model hidden states (fp_target)",
                                fix=self.start_over_fix)
        return streams["reference_hidden"]

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class StoredResults(Mapping):
    """Layer results kept in a run's block files instead of in memory (streamed runs): ``name -> result``, each read
    from disk when asked for, so memory holds one layer's result at a time, not the whole model's codes.

    ``kind(name)`` tells a result's kind without reading it. ``relocate(folder)`` moves the files out of the work
    folder (which is removed when the run ends) into a private folder that lives as long as this mapping.
    """

    def __init__(self):
        self._where: dict[str, tuple[Path, str]] = {}  # name -> (block file, kind)
        self._files: list[Path] = []

    def add_block(self, path: Path) -> None:
        """Take the layer results of one block file (``Checkpoint.save_block``'s)."""
        with safe_open(str(path), "pt") as handle:
            meta = json.loads(handle.metadata()["layers"])
        self._files.append(path)
        for name, layer_meta in meta.items():
            self._where[name] = (path, layer_meta["kind"])

    def kind(self, name: str) -> str:
        return self._where[name][1]

    def __getitem__(self, name: str):
        path, kind = self._where[name]
        with safe_open(str(path), "pt") as handle:
            meta = json.loads(handle.metadata()["layers"])[name]
            parts = {key[len(name) + 1:]: handle.get_tensor(key) for key in handle.keys()
                     if key.startswith(name + ".")}
        meta.pop("kind")
        result = RESULT_KINDS[kind].from_state(parts, meta)
        result.weight = torch.empty(0)  # as a streamed run's results: the compact form only (dense() decodes it)
        return result

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def relocate(self, near: Path) -> None:
        """Move the block files into a new hidden folder beside ``near``, removed when this mapping is."""
        folder = Path(tempfile.mkdtemp(prefix=".lmshrink-results-", dir=near))
        weakref.finalize(self, shutil.rmtree, str(folder), True)
        moved = {}
        for path in self._files:
            moved[path] = folder / path.name
            os.replace(path, moved[path])
        self._files = list(moved.values())
        self._where = {name: (moved[path], kind) for name, (path, kind) in self._where.items()}
