"""What a linear layer does to its input before its weight multiplies it: an online transform (e.g. a Hadamard
rotation whose inverse is folded into the weight) and then an activation quantizer (``core.actquant.ActSpec``,
with its static ``input_scale`` / ``input_zero_point`` buffers, compressed-tensors' names).

A plain ``nn.Linear`` gets these by becoming an ``InputLinear`` in place (``__class__`` is changed, so the module
object, its parameters and any hooks stay the same); lmshrink's packed modules (``QuantLinear``, ``Int8Linear``)
carry the same attributes and apply them in their own forward. The engine takes a layer's statistics on the input
its weight multiplies before quantization (``weight_input``): after the transform, before the quantizer.
``describe_inputs`` and ``apply_inputs`` write and rebuild all of it, so a saved folder reloads to the same model.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmshrink.core.actquant import ActSpec, fake_quantize_activations
from lmshrink.core.errors import LmshrinkError

SCALE = "input_scale"
ZERO = "input_zero_point"
CLUSTER = "input_cluster"  # the cluster of each input channel (RPTQ: per-cluster static ranges)
# rebuilds an online transform from its description (``transform.describe()``): registered by the module that
# defines the transform type, e.g. the Hadamard rotations
TRANSFORMS: dict[str, Callable[[dict], Any]] = {}


def register_transform(kind: str, build: Callable[[dict], Any]) -> None:
    TRANSFORMS[kind] = build


def build_transform(description: dict) -> Any:
    kind = description.get("kind")
    if kind not in TRANSFORMS:
        raise LmshrinkError(f"online input transform {kind!r} is not known to this lmshrink",
                            fix="load the folder with the lmshrink version that wrote it")
    return TRANSFORMS[kind](description)


class HadamardTransform:
    """``x -> x @ (H / sqrt(n))`` along the last dimension (``core.hadamard``: a fixed construction, so a saved model
    rebuilds it exactly)."""

    def __init__(self, size: int):
        from lmshrink.core.hadamard import check_hadamard_size

        check_hadamard_size(size, "an online Hadamard transform's size")
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from lmshrink.core.hadamard import hadamard_transform

        return hadamard_transform(x)

    def matrix(self) -> torch.Tensor:
        """``H / sqrt(n)`` in float64 (what a weight multiplies offline so the product is unchanged)."""
        from lmshrink.core.hadamard import orthogonal_hadamard

        return orthogonal_hadamard(self.size)

    def describe(self) -> dict:
        return {"kind": "hadamard", "size": self.size}


def weight_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input ``module``'s weight multiplies, before activation quantization (its online transform applied)."""
    transform = getattr(module, "input_transform", None)
    return x if transform is None else transform(x)


def prepare_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input as ``module`` computes with it: the online transform, then the activation quantizer."""
    x = weight_input(module, x)
    spec = getattr(module, "input_spec", None)
    if spec is None:
        return x
    return fake_quantize_activations(x, spec, getattr(module, SCALE, None), getattr(module, ZERO, None),
                                     getattr(module, CLUSTER, None))


class InputLinear(nn.Linear):
    """An ``nn.Linear`` whose input goes through ``prepare_input`` first (built in place by ``upgrade``)."""

    input_spec: ActSpec | None = None
    input_transform: Any = None
    structure_class = nn.Linear  # same parameters as the Linear it was; lmshrink-runtime.json records the rest

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(prepare_input(self, x), self.weight, self.bias)


def upgrade(module: nn.Module) -> nn.Module:
    """Make a plain ``nn.Linear`` an ``InputLinear`` in place; lmshrink's packed modules are left as they are."""
    if type(module) is nn.Linear:
        module.__class__ = InputLinear
    elif not hasattr(type(module), "input_spec"):
        raise LmshrinkError(f"a {type(module).__name__} layer cannot take an activation quantizer or an online "
                            "transform (lmshrink does this for torch nn.Linear layers and its packed modules)",
                            fix="leave this layer out of the stage (targets/ignore); GPT-2 Conv1D layers are not "
                                "supported")
    return module


def _set_buffer(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    if value is None:
        module._buffers.pop(name, None)
        if name in module.__dict__:
            del module.__dict__[name]
        return
    device = next((p.device for p in module.parameters() if p.device.type != "meta"), value.device)
    module.register_buffer(name, value.detach().to(device=device, dtype=torch.float32).clone())


def install_quantizer(module: nn.Module, spec: ActSpec, scale: torch.Tensor | None = None,
                      zero: torch.Tensor | None = None, cluster: torch.Tensor | None = None) -> None:
    """Quantize ``module``'s input with ``spec`` from now on (static specs: with the calibrated ``scale`` and, for
    asymmetric grids, ``zero``; per cluster also each channel's ``cluster``)."""
    if not spec.dynamic and scale is None:
        raise LmshrinkError("a static activation quantizer needs its calibrated scale",
                            fix="calibrate it first (core.actquant.static_params)")
    upgrade(module)
    module.input_spec = spec
    _set_buffer(module, SCALE, None if spec.dynamic else scale)
    _set_buffer(module, ZERO, None if spec.dynamic or spec.symmetric else zero)
    if spec.granularity == "cluster":
        if cluster is None:
            raise LmshrinkError("a quantizer of channel clusters needs each channel's cluster",
                                fix="calibrate it first (core.actquant.cluster_channels)")
        device = next((p.device for p in module.parameters() if p.device.type != "meta"), cluster.device)
        module.register_buffer(CLUSTER, cluster.detach().to(device=device, dtype=torch.int64).clone())
    else:
        module._buffers.pop(CLUSTER, None)


def install_transform(module: nn.Module, transform: Any) -> None:
    """Apply ``transform`` (a callable with ``describe()``) to ``module``'s input from now on."""
    upgrade(module)
    module.input_transform = transform


def input_quantizer(module: nn.Module) -> tuple[ActSpec, torch.Tensor | None, torch.Tensor | None] | None:
    spec = getattr(module, "input_spec", None)
    if spec is None:
        return None
    return spec, getattr(module, SCALE, None), getattr(module, ZERO, None)


def describe_inputs(model: nn.Module) -> dict[str, dict]:
    """Every layer with an input transform or quantizer: name -> ``{"activations": spec, "transform": ...}``
    (static scales are tensors of the model's state, saved with it)."""
    out = {}
    for name, module in model.named_modules():
        spec = getattr(module, "input_spec", None)
        transform = getattr(module, "input_transform", None)
        if spec is None and transform is None:
            continue
        entry = {}
        if transform is not None:
            entry["transform"] = transform.describe()
        if spec is not None:
            entry["activations"] = spec.to_dict()
        out[name] = entry
    return out


def apply_inputs(model: nn.Module, described: dict[str, dict], tensors: Callable[[str], torch.Tensor | None]) -> None:
    """Rebuild ``describe_inputs``' layers on ``model``; ``tensors(name)`` gives a stored tensor (None: absent)."""
    for name, entry in described.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise LmshrinkError(f"the folder quantizes the input of {name}, which the model does not have",
                                fix="the folder's lmshrink-runtime.json does not match its config.json") from exc
        if "transform" in entry:
            install_transform(module, build_transform(entry["transform"]))
        if "activations" in entry:
            spec = ActSpec(**entry["activations"])
            scale = None if spec.dynamic else tensors(f"{name}.{SCALE}")
            zero = None if spec.dynamic or spec.symmetric else tensors(f"{name}.{ZERO}")
            cluster = tensors(f"{name}.{CLUSTER}") if spec.granularity == "cluster" else None
            if spec.granularity == "cluster" and cluster is None:
                raise LmshrinkError(f"layer {name} records activation clusters but the folder lacks its {CLUSTER}",
                                    fix="the checkpoint is incomplete; compress again")
            if not spec.dynamic and (scale is None or (not spec.symmetric and zero is None)):
                raise LmshrinkError(f"layer {name} records static activation quantization ({spec.describe()}) but "
                                    f"the folder lacks its {SCALE}" + ("" if spec.symmetric else f"/{ZERO}"),
                                    fix="the checkpoint is incomplete; compress again")
            install_quantizer(module, spec, scale, zero, cluster)


register_transform("hadamard", lambda description: HadamardTransform(int(description["size"])))

__all__ = ["InputLinear", "HadamardTransform", "upgrade", "install_quantizer", "install_transform", "input_quantizer", "prepare_input",
           "weight_input", "describe_inputs", "apply_inputs", "register_transform", "build_transform", "SCALE",
           "ZERO", "CLUSTER"]
