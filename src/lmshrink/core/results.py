"""Layer results as methods return them, the engine checkpoints them and writers consume them: a weight quantized
onto a grid (``QuantResult``), one quantized except a few input columns kept in 16 bits (``OutlierQuantResult``),
a pruned weight (``PruneResult``), a weight factorized into two low-rank factors (``LowRankResult``) and an
earlier result plus a low-rank correction (``CorrectedResult``).

Every result kind has ``weight`` (float32 dense ``[out, in]``, or empty once dropped to save memory),
``rel_output_error`` and ``info``, and converts to and from its checkpoint form (``to_state`` / ``from_state``:
named tensors plus JSON-friendly metadata). ``RESULT_KINDS`` maps each kind's name to its class, so the engine's
checkpoint reads back any kind a method registers (``register_result_kind``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from lmshrink.core.grids import GridSpec, dequantize, group_index


@dataclass
class QuantResult:
    """A weight quantized onto a grid.

    codes: uint8 ``[out, in]`` in the original column order. scale: float32 ``[out, n_groups]``.
    zero: uint8 ``[out, n_groups]`` (``2**(bits-1)`` everywhere when symmetric). g_idx: int32 ``[in]`` group of each
    input column, or None when groups are contiguous in the original order (``group_index`` gives it then).
    weight: float32 ``[out, in]`` dequantized weights, exactly ``dequantize(codes, scale, zero, group_index())``.
    rel_output_error: ``||(W-Q)X||^2 / ||WX||^2`` when a Hessian was available. info: JSON-friendly solver record.
    pruned: bool ``[out, in]``, True where the weight was pruned (its code is the zero point), for layers that are
    pruned and quantized; None otherwise. Kept weights may round to 0 too: only this mask tells them apart.
    """

    kind = "quant"

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor | None
    weight: torch.Tensor
    spec: GridSpec
    rel_output_error: float | None = None
    info: dict | None = None
    pruned: torch.Tensor | None = None

    def group_index(self) -> torch.Tensor:
        """``g_idx`` for every column (the stored one, or the contiguous one when it is None)."""
        if self.g_idx is not None:
            return self.g_idx
        return group_index(self.codes.shape[1], self.spec.group_width(self.codes.shape[1]), self.codes.device)

    def contiguous_groups(self) -> bool:
        """Whether each group is a contiguous run of columns in the original order (no act-order permutation)."""
        if self.g_idx is None:
            return True
        in_features = self.codes.shape[1]
        expected = torch.arange(in_features, dtype=torch.int32) // self.spec.group_width(in_features)
        return torch.equal(self.g_idx.to(torch.int32).cpu(), expected)

    def dense(self) -> torch.Tensor:
        """float32 ``[out, in]`` dequantized weights."""
        if self.weight.numel():
            return self.weight
        return dequantize(self.codes, self.scale, self.zero, self.group_index())

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from compressed_tensors.utils import pack_bitmasks

        tensors = {"codes": self.codes, "scale": self.scale, "zero": self.zero}
        if self.g_idx is not None:
            tensors["g_idx"] = self.g_idx
        if self.pruned is not None:  # one bit per weight, packed as the bitmask storage packs its masks
            tensors["pruned_bitmask"] = pack_bitmasks(self.pruned.cpu().contiguous())
        return tensors, {"spec": self.spec.__dict__, "rel_output_error": self.rel_output_error, "info": self.info}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "QuantResult":
        from compressed_tensors.utils import unpack_bitmasks

        codes = tensors["codes"]
        pruned = (unpack_bitmasks(tensors["pruned_bitmask"], list(codes.shape)) if "pruned_bitmask" in tensors
                  else None)
        result = cls(codes=codes, scale=tensors["scale"], zero=tensors["zero"], g_idx=tensors.get("g_idx"),
                     weight=torch.empty(0), spec=GridSpec(**meta["spec"]),
                     rel_output_error=meta["rel_output_error"], info=meta["info"], pruned=pruned)
        result.weight = result.dense()
        return result


@dataclass
class PruneResult:
    """A pruned linear layer: a dense weight with zeros where the mask is set.

    mask: bool ``[out, in]``, True where the weight was pruned. values: float32 kept weights (``~mask``, row-major),
    the compact form (it survives when ``weight`` is dropped to save memory in streamed mode). weight: float32
    ``[out, in]`` dense weights with zeros (may be empty: ``dense()`` rebuilds it). pattern: ``"unstructured"`` or
    ``"N:M"``. target_sparsity: what was asked for this layer. rel_output_error: ``||(W-P)X||^2 / ||WX||^2`` when a
    Hessian was available. info: JSON-friendly record.
    """

    kind = "prune"

    mask: torch.Tensor
    values: torch.Tensor
    weight: torch.Tensor
    pattern: str = "unstructured"
    target_sparsity: float = 0.0
    rel_output_error: float | None = None
    info: dict = field(default_factory=dict)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, mask: torch.Tensor, **kw) -> "PruneResult":
        """Build from dense pruned weights (zeros where ``mask``); zeroes masked entries to be sure."""
        weight = weight.float().masked_fill(mask, 0.0)
        result = cls(mask=mask, values=weight[~mask].contiguous(), weight=weight, **kw)
        result.info = {"sparsity": result.sparsity, "pattern": result.pattern,
                       "target_sparsity": result.target_sparsity, **result.info}
        return result

    def dense(self) -> torch.Tensor:
        """float32 ``[out, in]`` weights with zeros where pruned."""
        if self.weight.numel():
            return self.weight
        weight = torch.zeros(self.mask.shape, dtype=torch.float32, device=self.values.device)
        weight[~self.mask] = self.values
        return weight

    @property
    def sparsity(self) -> float:
        """Measured: the fraction of pruned weights (the mask) in the layer."""
        return float(self.mask.sum()) / self.mask.numel()

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return ({"mask": self.mask, "values": self.values},
                {"pattern": self.pattern, "target_sparsity": self.target_sparsity,
                 "rel_output_error": self.rel_output_error, "info": self.info})

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "PruneResult":
        result = cls(mask=tensors["mask"], values=tensors["values"], weight=torch.empty(0), pattern=meta["pattern"],
                     target_sparsity=meta["target_sparsity"], rel_output_error=meta["rel_output_error"],
                     info=meta["info"])
        result.weight = result.dense()
        return result


@dataclass
class OutlierQuantResult(QuantResult):
    """A weight quantized onto a grid except a few input columns kept in 16 bits (OWQ).

    The grid fields are those of ``QuantResult``; the codes of the kept columns are their zero points, so the grid
    alone decodes them to exactly 0. columns: int64 ``[k]`` sorted indices of the kept input columns. values:
    ``[out, k]`` their weights in a 16-bit dtype (float16, or bfloat16 for bfloat16 models). weight: float32
    ``[out, in]``: the grid's weights with the kept columns replaced by ``values`` (exactly; see ``dense``).
    """

    kind = "quant-outlier"

    columns: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        if self.weight.numel():
            return self.weight
        weight = dequantize(self.codes, self.scale, self.zero, self.group_index())
        weight[:, self.columns.long()] = self.values.float()
        return weight

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().to_state()
        return {**tensors, "columns": self.columns, "values": self.values}, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "OutlierQuantResult":
        base = QuantResult.from_state({k: v for k, v in tensors.items() if k not in ("columns", "values")}, meta)
        result = cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(QuantResult)},
                     columns=tensors["columns"], values=tensors["values"])
        result.weight = torch.empty(0)
        result.weight = result.dense()
        return result


def _round_to(tensor: torch.Tensor, dtype: str | None) -> torch.Tensor:
    """``tensor`` as float32 holding values exact in ``dtype`` (None: unchanged)."""
    if dtype is None:
        return tensor.float()
    return tensor.to(getattr(torch, dtype)).float()


def _quant_to_state(result, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Add a low-rank result's quantized factors (if any) to its checkpoint form."""
    for side in ("left_quant", "right_quant"):
        quant = getattr(result, side)
        if quant is not None:
            parts, meta[side] = quant.to_state()
            tensors.update({f"{side}.{key}": value for key, value in parts.items()})


def _quant_from_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, QuantResult]:
    """The quantized factors of a low-rank result's checkpoint form (``{}`` for float factors)."""
    quant = {}
    for side in ("left_quant", "right_quant"):
        if meta.get(side) is not None:
            parts = {key[len(side) + 1:]: value for key, value in tensors.items() if key.startswith(side + ".")}
            quant[side] = QuantResult.from_state(parts, meta[side])
            quant[side].weight = torch.empty(0)
    return quant


@dataclass
class LowRankResult:
    """A linear layer factorized as ``W ~ left @ right``, run as two matmuls (``x -> right x -> left (right x)``).

    left: float32 ``[out, rank]``; right: float32 ``[rank, in]``. weight: float32 ``[out, in]``, exactly ``dense()``
    (``left @ right``), what the engine writes into the layer; may be empty (``dense()`` rebuilds it). basis: the
    key of a right factor shared by several layers (Basis Sharing: the same tensor in every layer of the group,
    stored once), or None. merge: the writer stores the dense product instead of the factors. storage_dtype: the
    dtype the factors are stored in (their values are exact in it), or None for the layer's dtype. left_quant,
    right_quant: the factors quantized onto grids (``QuantResult``; ``left``/``right`` are then their dequantized
    values), or None.
    """

    kind = "lowrank"

    left: torch.Tensor
    right: torch.Tensor
    weight: torch.Tensor
    basis: str | None = None
    merge: bool = False
    storage_dtype: str | None = None
    rel_output_error: float | None = None
    info: dict = field(default_factory=dict)
    left_quant: QuantResult | None = None
    right_quant: QuantResult | None = None

    @classmethod
    def from_quantized(cls, left: QuantResult, right: QuantResult, **kw) -> "LowRankResult":
        """Factors quantized onto grids: ``left``/``right`` hold their dequantized values."""
        result = cls(left=left.dense().float().contiguous(), right=right.dense().float().contiguous(),
                     weight=torch.empty(0), left_quant=left, right_quant=right, **kw)
        left.weight = right.weight = torch.empty(0)  # the factors above hold these values
        result.weight = result.dense()
        return result

    @property
    def quantized(self) -> bool:
        return self.left_quant is not None

    @classmethod
    def from_factors(cls, left: torch.Tensor, right: torch.Tensor, **kw) -> "LowRankResult":
        result = cls(left=left.float().contiguous(), right=right.float().contiguous(), weight=torch.empty(0), **kw)
        result.left = _round_to(result.left, result.storage_dtype)
        result.right = _round_to(result.right, result.storage_dtype)
        result.weight = result.dense()
        return result

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    def dense(self) -> torch.Tensor:
        """float32 ``[out, in]``: ``left @ right``."""
        if self.weight.numel():
            return self.weight
        return self.left @ self.right

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"left": self.left, "right": self.right}
        meta = {"basis": self.basis, "merge": self.merge, "storage_dtype": self.storage_dtype,
                "rel_output_error": self.rel_output_error, "info": self.info}
        _quant_to_state(self, tensors, meta)
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "LowRankResult":
        result = cls(left=tensors["left"], right=tensors["right"], weight=torch.empty(0), basis=meta["basis"],
                     merge=meta["merge"], storage_dtype=meta["storage_dtype"],
                     rel_output_error=meta["rel_output_error"], info=meta["info"], **_quant_from_state(tensors, meta))
        result.weight = result.dense()
        return result


@dataclass
class CorrectedResult:
    """An earlier stage's result (``base``: quantized or pruned) plus a low-rank correction ``left @ right``.

    left: float32 ``[out, rank]``, right: float32 ``[rank, in]``, both exact in ``storage_dtype``. weight: float32
    ``base.dense() + left @ right`` (may be empty). The writer stores the base as its kind is stored and the two
    factors beside it.
    """

    kind = "corrected"

    base: Any
    left: torch.Tensor
    right: torch.Tensor
    weight: torch.Tensor
    storage_dtype: str | None = "float16"
    rel_output_error: float | None = None
    info: dict = field(default_factory=dict)
    left_quant: QuantResult | None = None
    right_quant: QuantResult | None = None

    @classmethod
    def from_quantized(cls, base, left: QuantResult, right: QuantResult, **kw) -> "CorrectedResult":
        """A correction whose factors are quantized onto grids (``left``/``right`` hold their dequantized values)."""
        result = cls(base=base, left=left.dense().float().contiguous(), right=right.dense().float().contiguous(),
                     weight=torch.empty(0), left_quant=left, right_quant=right, storage_dtype=None, **kw)
        left.weight = right.weight = torch.empty(0)
        result.weight = result.dense()
        base.weight = torch.empty(0)
        return result

    @property
    def quantized(self) -> bool:
        return self.left_quant is not None

    @classmethod
    def from_factors(cls, base, left: torch.Tensor, right: torch.Tensor, **kw) -> "CorrectedResult":
        result = cls(base=base, left=left, right=right, weight=torch.empty(0), **kw)
        result.left = _round_to(left, result.storage_dtype).contiguous()
        result.right = _round_to(right, result.storage_dtype).contiguous()
        result.weight = result.dense()
        base.weight = torch.empty(0)  # the base's compact form rebuilds it; one dense copy per layer is enough
        return result

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    def dense(self) -> torch.Tensor:
        """float32 ``[out, in]``: the base's weight plus ``left @ right``."""
        if self.weight.numel():
            return self.weight
        return self.base.dense() + self.left @ self.right

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        base_tensors, base_meta = self.base.to_state()
        tensors = {f"base.{key}": value for key, value in base_tensors.items()}
        tensors.update(left=self.left, right=self.right)
        meta = {"base_kind": self.base.kind, "base": base_meta, "storage_dtype": self.storage_dtype,
                "rel_output_error": self.rel_output_error, "info": self.info}
        _quant_to_state(self, tensors, meta)
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "CorrectedResult":
        base_tensors = {key[len("base."):]: value for key, value in tensors.items() if key.startswith("base.")}
        base = RESULT_KINDS[meta["base_kind"]].from_state(base_tensors, meta["base"])
        base.weight = torch.empty(0)
        result = cls(base=base, left=tensors["left"], right=tensors["right"], weight=torch.empty(0),
                     storage_dtype=meta["storage_dtype"], rel_output_error=meta["rel_output_error"],
                     info=meta["info"], **_quant_from_state(tensors, meta))
        result.weight = result.dense()
        return result


RESULT_KINDS: dict[str, type] = {QuantResult.kind: QuantResult, PruneResult.kind: PruneResult,
                                 OutlierQuantResult.kind: OutlierQuantResult,
                                 LowRankResult.kind: LowRankResult, CorrectedResult.kind: CorrectedResult}


def register_result_kind(cls: type) -> type:
    """Class decorator for a method's own result kind (a ``kind`` name, ``weight``, ``rel_output_error``, ``info``,
    ``dense``, ``to_state`` and ``from_state``), so checkpoints can hold it."""
    RESULT_KINDS[cls.kind] = cls
    return cls
