"""Stable fingerprints of a run's inputs, for resume keys and caches."""

from __future__ import annotations

import hashlib
import json

import torch


def fingerprint(*parts) -> str:
    """A stable hash of the run's inputs (recipe, calibration tokens, model, options)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(part.cpu().contiguous().numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()
