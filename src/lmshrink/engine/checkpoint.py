"""Progress on disk after every block, so a killed run resumes where it stopped, bit-identically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import LmshrinkError
from ..formats.atomic import atomic_write_text
from ..quant.sparse import PruneResult
from ..quant.grids import QuantResult, dequantize

_STATE = "state.json"


def fingerprint(*parts) -> str:
    """A stable hash of the run's inputs (recipe, calibration tokens, model, options)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(part.cpu().contiguous().numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _atomic_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


class Checkpoint:
    """A work folder: ``state.json`` (fingerprint, finished blocks, layer records), ``block_NNNN.safetensors``
    (the quantized layers of each finished block) and ``hidden.safetensors`` (the next block's inputs, and with
    ``fp_target`` stages their uncompressed-model counterparts)."""

    def __init__(self, folder: Path, key: str):
        self.folder = folder
        self.key = key

    def load(self) -> dict | None:
        """The saved state if this folder holds progress of the same run; None if it holds nothing."""
        state_path = self.folder / _STATE
        if not state_path.is_file():
            return None
        state = json.loads(state_path.read_text())
        if state.get("fingerprint") != self.key:
            raise LmshrinkError(
                f"{self.folder} holds progress of a different run (other model, recipe, calibration or options)",
                fix=f"run again without --resume to start over, or delete {self.folder}")
        return state

    def start(self) -> None:
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)

    def save_block(self, index: int, results: dict[str, QuantResult | PruneResult], hidden: list[torch.Tensor],
                   state: dict, reference_hidden: list[torch.Tensor] | None = None) -> None:
        """Save block ``index``'s layers, the next block's inputs and the state. ``reference_hidden``: the next
        block's inputs in the uncompressed model (asymmetric calibration, ``fp_target``), kept beside them."""
        tensors, meta = {}, {}
        for name, r in results.items():
            if isinstance(r, PruneResult):  # the compact form: mask and kept values
                tensors[f"{name}.mask"] = r.mask
                tensors[f"{name}.values"] = r.values
                meta[name] = {"kind": "prune", "pattern": r.pattern, "target_sparsity": r.target_sparsity,
                              "rel_output_error": r.rel_output_error, "info": r.info}
                continue
            tensors[f"{name}.codes"] = r.codes
            tensors[f"{name}.scale"] = r.scale
            tensors[f"{name}.zero"] = r.zero
            if r.g_idx is not None:
                tensors[f"{name}.g_idx"] = r.g_idx
            meta[name] = {"spec": r.spec.__dict__, "rel_output_error": r.rel_output_error, "info": r.info}
        _atomic_safetensors(self.folder / f"block_{index:04d}.safetensors", tensors,
                            {"layers": json.dumps(meta, default=str)})
        streams = {"hidden": torch.cat(hidden)}
        if reference_hidden is not None:
            streams["reference_hidden"] = torch.cat(reference_hidden)
        _atomic_safetensors(self.folder / "hidden.safetensors", streams)
        atomic_write_text(self.folder / _STATE,
                          json.dumps({**state, "fingerprint": self.key, "finished_blocks": index + 1}, indent=1))

    def load_block(self, index: int) -> dict[str, QuantResult | PruneResult]:
        from safetensors import safe_open

        from ..quant.grids import GridSpec

        path = self.folder / f"block_{index:04d}.safetensors"
        with safe_open(str(path), "pt") as handle:
            meta = json.loads(handle.metadata()["layers"])
        tensors = load_file(str(path))
        results = {}
        for name, m in meta.items():
            if m.get("kind") == "prune":
                result = PruneResult(mask=tensors[f"{name}.mask"], values=tensors[f"{name}.values"],
                                     weight=torch.empty(0), pattern=m["pattern"], target_sparsity=m["target_sparsity"],
                                     rel_output_error=m["rel_output_error"], info=m["info"])
                result.weight = result.dense()
                results[name] = result
                continue
            spec = GridSpec(**m["spec"])
            g_idx = tensors.get(f"{name}.g_idx")
            codes, scale, zero = tensors[f"{name}.codes"], tensors[f"{name}.scale"], tensors[f"{name}.zero"]
            result = QuantResult(codes=codes, scale=scale, zero=zero, g_idx=g_idx, weight=torch.empty(0), spec=spec,
                                 rel_output_error=m["rel_output_error"], info=m["info"])
            result.weight = dequantize(codes, scale, zero, result.group_index())
            results[name] = result
        return results

    def load_hidden(self) -> torch.Tensor:
        """The saved inputs of the next block, ``[windows, seqlen, hidden]``."""
        return load_file(str(self.folder / "hidden.safetensors"))["hidden"]

    def load_reference_hidden(self) -> torch.Tensor:
        """The saved inputs of the next block in the uncompressed model (``fp_target`` runs)."""
        streams = load_file(str(self.folder / "hidden.safetensors"))
        if "reference_hidden" not in streams:
            raise LmshrinkError(f"{self.folder} holds no uncompressed-model hidden states (fp_target)",
                                fix=f"run again without --resume to start over, or delete {self.folder}")
        return streams["reference_hidden"]

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
