"""The options a plan chooses from, one per linear layer, and what each costs in stored bytes.

An option is what one layer becomes: left dense, quantized on a grid (``w4g64-sym``: 4 bits, groups of 64,
symmetric; ``w8-sym``: per channel), pruned (``sp50``, ``2:4``) or pruned then quantized (``sp50+w4g64-sym``).
Each kind of option is a class registered by its ``kind`` with a parser for its written form, so a new kind (a
rank, activation bits) plugs in with its own parser, stored size and recipe stages, and the planner, the proxy
and the writer of plans need no change. Torch-free: plans parse and are written without the numerical libraries.

Stored bytes are those of the tensors the checkpoint holds for the layer's weight (``formats.compressed_tensors``):
``weight_packed`` int32 ``[out, ceil(in*bits/32)]``, ``weight_scale`` ``[out, groups]`` in the model's dtype,
``weight_zero_point`` int32 ``[ceil(out*bits/32), groups]`` when asymmetric, ``weight_shape`` int64 ``[2]``; a
dense (or pruned, stored dense) layer holds its weight in the model's dtype. A grid is offered to a layer only when
its group size divides the layer's width: then every stored group is the grid's own group and a layer's bytes do
not depend on which other layers share its grid (the writer stores one ``gcd`` for all layers of a grid).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lmshrink.core.errors import LmshrinkError

_OPTION_KINDS: dict[str, type["Option"]] = {}


def register_option_kind(cls: type["Option"]) -> type["Option"]:
    """Class decorator: a kind of option the planner can choose (parsed by ``cls.parse``)."""
    _OPTION_KINDS[cls.kind] = cls
    return cls


def option_kinds() -> dict[str, type["Option"]]:
    return dict(_OPTION_KINDS)


@dataclass(frozen=True)
class Option:
    """One thing a layer can become. Subclasses say how it is written, stored and expressed as recipe stages."""

    kind: ClassVar[str] = ""
    # which --allow family it belongs to ("quant" options are always allowed)
    family: ClassVar[str] = "quant"

    @property
    def key(self) -> str:
        raise NotImplementedError

    @classmethod
    def parse(cls, text: str) -> "Option | None":
        raise NotImplementedError

    def applies(self, out_features: int, in_features: int) -> bool:
        """Whether the layer can take this option and be saved."""
        return True

    def stored_bytes(self, out_features: int, in_features: int, element_size: int) -> int:
        raise NotImplementedError

    def scheme(self) -> tuple[int, int, bool] | None:
        """The compressed-tensors grid (bits, group size, symmetric) the layer is packed with, or None."""
        return None

    def stages(self, template: "Template") -> list[dict[str, Any]]:
        """The recipe stages (without targets) that give a layer this option; none for a dense layer."""
        return []

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class Template:
    """How a plan's stages run: the quantization method and its options, the pruning method and its options."""

    quant_method: str = "gptq"
    quant_options: dict[str, Any] = field(default_factory=lambda: {"fp_target": True, "refit_scales": True})
    prune_method: str = "sparsegpt"
    prune_options: dict[str, Any] = field(default_factory=lambda: {"refit_iterations": 20})
    # the quantization stage after pruning: plain GPTQ, as sparse50-then-w4g128 (fp_target measured worse there)
    after_prune_options: dict[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash(repr(self))

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": self.quant_method, "quant_options": dict(self.quant_options),
                "prune_method": self.prune_method, "prune_options": dict(self.prune_options),
                "after_prune_options": dict(self.after_prune_options)}


@register_option_kind
@dataclass(frozen=True)
class DenseOption(Option):
    kind: ClassVar[str] = "dense"

    @property
    def key(self) -> str:
        return "dense"

    @classmethod
    def parse(cls, text: str) -> "DenseOption | None":
        return cls() if text == "dense" else None

    def stored_bytes(self, out_features: int, in_features: int, element_size: int) -> int:
        return out_features * in_features * element_size


_GRID = re.compile(r"^w(?P<bits>[2348])(?:g(?P<group>\d+))?(?P<sym>-sym)?$")


@register_option_kind
@dataclass(frozen=True)
class QuantOption(Option):
    """A grid: ``bits``, ``group_size`` (-1 per channel), ``symmetric``."""

    kind: ClassVar[str] = "quant"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    @property
    def key(self) -> str:
        group = "" if self.group_size == -1 else f"g{self.group_size}"
        return f"w{self.bits}{group}{'-sym' if self.symmetric else ''}"

    @classmethod
    def parse(cls, text: str) -> "QuantOption | None":
        found = _GRID.match(text)
        if found is None:
            return None
        group = int(found["group"]) if found["group"] else -1
        if group == 0:
            return None
        return cls(bits=int(found["bits"]), group_size=group, symmetric=bool(found["sym"]))

    def applies(self, out_features: int, in_features: int) -> bool:
        return self.group_size == -1 or in_features % self.group_size == 0

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def stored_bytes(self, out_features: int, in_features: int, element_size: int) -> int:
        groups = self.groups(in_features)
        packed = out_features * (-(-in_features * self.bits // 32)) * 4
        scales = out_features * groups * element_size
        zeros = 0 if self.symmetric else (-(-out_features * self.bits // 32)) * groups * 4
        return packed + scales + zeros + 16  # weight_shape: int64 [2]

    def scheme(self) -> tuple[int, int, bool]:
        return (self.bits, self.group_size, self.symmetric)

    def stages(self, template: Template, after_prune: bool = False) -> list[dict[str, Any]]:
        extra = template.after_prune_options if after_prune else template.quant_options
        return [{"method": template.quant_method, "bits": self.bits, "group_size": self.group_size,
                 "symmetric": self.symmetric, **extra}]


_PRUNE = re.compile(r"^(?:sp(?P<percent>\d{1,2})|(?P<n>\d+):(?P<m>\d+))(?:\+(?P<grid>.+))?$")


@register_option_kind
@dataclass(frozen=True)
class PruneOption(Option):
    """Pruned (``sp50``: 50% unstructured; ``2:4``), then optionally quantized on a grid (``sp50+w4g64-sym``).
    Stored as the grid when quantized (the zeros are codes), else dense with its zeros."""

    kind: ClassVar[str] = "prune"
    family: ClassVar[str] = "prune"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    grid: QuantOption | None = None

    @property
    def key(self) -> str:
        base = f"sp{round(100 * self.sparsity)}" if self.pattern == "unstructured" else self.pattern
        return base if self.grid is None else f"{base}+{self.grid.key}"

    @classmethod
    def parse(cls, text: str) -> "PruneOption | None":
        found = _PRUNE.match(text)
        if found is None:
            return None
        grid = None
        if found["grid"]:
            grid = QuantOption.parse(found["grid"])
            if grid is None:
                return None
        if found["percent"]:
            percent = int(found["percent"])
            if not 0 < percent < 96:
                return None
            return cls(sparsity=percent / 100, grid=grid)
        n, m = int(found["n"]), int(found["m"])
        if not 0 < n < m:
            return None
        return cls(sparsity=n / m, pattern=f"{n}:{m}", grid=grid)

    def applies(self, out_features: int, in_features: int) -> bool:
        if self.pattern != "unstructured" and in_features % int(self.pattern.split(":")[1]):
            return False
        return self.grid is None or self.grid.applies(out_features, in_features)

    def stored_bytes(self, out_features: int, in_features: int, element_size: int) -> int:
        if self.grid is not None:
            return self.grid.stored_bytes(out_features, in_features, element_size)
        return out_features * in_features * element_size

    def scheme(self) -> tuple[int, int, bool] | None:
        return None if self.grid is None else self.grid.scheme()

    def stages(self, template: Template) -> list[dict[str, Any]]:
        prune = {"method": template.prune_method, **template.prune_options}
        if self.pattern == "unstructured":
            prune["sparsity"] = self.sparsity
        else:
            prune["pattern"] = self.pattern
        return [prune] + ([] if self.grid is None else self.grid.stages(template, after_prune=True))


def parse_option(text: str) -> Option:
    """One option from its written form (``dense``, ``w4g64-sym``, ``w8-sym``, ``sp50``, ``2:4+w4g64-sym``)."""
    text = text.strip()
    for cls in _OPTION_KINDS.values():
        option = cls.parse(text)
        if option is not None:
            return option
    raise LmshrinkError(f"option {text!r} is not one the planner knows",
                        fix="write options as dense, wBITS[gGROUP][-sym] (w4g64-sym, w3g128, w8-sym: bits 2/3/4/8, "
                            "no group = per channel), spPERCENT or N:M (sp50, 2:4), or PRUNE+GRID (sp50+w4g64-sym)")


def parse_options(text: str | list[str]) -> list[Option]:
    items = text.split(",") if isinstance(text, str) else list(text)
    options = list(dict.fromkeys(parse_option(t) for t in items if t.strip()))
    if not options:
        raise LmshrinkError("no options given", fix="e.g. --options w3g64-sym,w4g64-sym,w8-sym")
    return options


# symmetric grids mix freely in one checkpoint; an asymmetric grid must be the only grid (see
# pipeline.checks._check_saving and formats.save: transformers loads asymmetric checkpoints with one config group)
DEFAULT_OPTIONS = "w3g128-sym,w4g128-sym,w3g64-sym,w4g64-sym,w8-sym,dense"
PRUNE_OPTIONS = "sp50+w3g64-sym,sp50+w4g64-sym,2:4+w4g64-sym"


def saveable_families(options: list[Option]) -> list[list[Option]]:
    """The largest subsets of ``options`` that one checkpoint can hold together and plain transformers loads: every
    unpacked option with every symmetric grid, and every unpacked option with each asymmetric grid alone."""
    unpacked = [o for o in options if o.scheme() is None]
    symmetric = [o for o in options if o.scheme() is not None and o.scheme()[2]]
    asymmetric: dict[tuple, list[Option]] = {}
    for option in options:
        if option.scheme() is not None and not option.scheme()[2]:
            asymmetric.setdefault(option.scheme(), []).append(option)
    families = [unpacked + symmetric] if symmetric or not asymmetric else []
    families += [unpacked + group for group in asymmetric.values()]
    return [f for f in families if f]
