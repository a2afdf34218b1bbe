"""Structural changes of a model: the shapes of its parameters and the integer attributes of its modules.

A method that removes attention heads, FFN channels or whole decoder blocks (or replaces a layer by a smaller one)
changes the model's structure, not only its values. This module holds what every such method and the engine share:

* ``signature(module)``: every parameter's shape and every module's integer attributes (``in_features``,
  ``num_key_value_groups``, ``split_size``, ...), the things that define a module's structure;
* ``structure_diff(before, after)``: what changed, as JSON (new or reshaped parameters, removed ones, attributes),
  and ``apply_structure(module, diff)``, which gives a freshly built module that structure (parameters empty or on
  the meta device, to be filled from saved tensors): how a resumed run and a reloaded folder rebuild it;
* ``drop_blocks``: remove decoder blocks, renumbering the kept blocks' ``layer_idx`` and slicing the config's
  per-layer lists;
* ``sync_config``: write the widths the blocks now have into the model's config in its family's own keys
  (``num_attention_heads``, ``intermediate_size``, ``ffn_dim``, bias flags, ...), when every block agrees;
  ``config_structure`` then gives what the config still cannot express (per-layer widths, heads of families whose
  config derives the head size from the head count), which lmshrink's loader re-applies and plain transformers
  cannot;
* ``WidthLayout``: where a family keeps the rows and columns of each head and FFN channel (the width pruning
  method's map of a block), and ``slice_linear`` to keep some rows or columns of a linear.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lmshrink.core.errors import LmshrinkError, UnsupportedArchitectureError
from lmshrink.models.adapters import ModelAdapter, _text_config, get_adapter, linear_dims

# the key of config.json that holds what the config cannot express (read back by lmshrink's loader only)
STRUCTURE_KEY = "lmshrink_structure"


class MetaParameters:
    """While active, every parameter a module registers is moved to the meta device (buffers stay real, so
    non-persistent ones such as rotary ``inv_freq`` are computed as usual)."""

    def __enter__(self):
        self._original = torch.nn.Module.register_parameter
        original = self._original

        def register(module, name, param):
            if param is not None and param.device.type != "meta":
                param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            original(module, name, param)

        torch.nn.Module.register_parameter = register
        return self

    def __exit__(self, *exc):
        torch.nn.Module.register_parameter = self._original
        return False


# ---------------------------------------------------------------------------------------------------------------
# signatures and diffs
# ---------------------------------------------------------------------------------------------------------------


def _type_name(module: nn.Module) -> str:
    # a class that only changes what a module computes, not its parameters (e.g. an input quantizer recorded in
    # lmshrink-runtime.json), names the class whose structure it keeps: it is no structural change
    cls = getattr(type(module), "structure_class", None) or type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def signature(module: nn.Module) -> dict[str, dict]:
    """``{"parameters": {name: shape}, "attributes": {module: {attribute: int}}, "types": {module: class}}`` of
    ``module`` and its submodules: the structure, without the values (works on the meta device)."""
    parameters = {name: list(p.shape) for name, p in module.named_parameters()}
    attributes, types = {}, {}
    for name, sub in module.named_modules():
        types[name] = _type_name(sub)
        ints = {k: v for k, v in vars(sub).items() if type(v) is int and not k.startswith("_")}
        if ints:
            attributes[name] = ints
    return {"parameters": parameters, "attributes": attributes, "types": types}


def structure_diff(before: dict, after: dict) -> dict[str, Any]:
    """What turns structure ``before`` into ``after`` (both from ``signature``): ``modules`` new or of another
    class (name -> class), ``removed_modules``, ``parameters`` new or reshaped (name -> shape), ``removed``
    parameters, ``attributes`` set (module -> {attribute: value}); empty dict when nothing changed."""
    old_types, new_types = before.get("types", {}), after.get("types", {})
    modules = {n: t for n, t in new_types.items() if old_types.get(n) != t}
    removed_modules = sorted(n for n in old_types if n not in new_types)
    parameters = {n: s for n, s in after["parameters"].items()
                  if before["parameters"].get(n) != s or any(n.startswith(m + ".") for m in modules)}
    removed = sorted(n for n in before["parameters"] if n not in after["parameters"])
    attributes = {}
    for name, values in after["attributes"].items():
        old = {} if name in modules else before["attributes"].get(name, {})
        changed = {k: v for k, v in values.items() if old.get(k) != v}
        if changed:
            attributes[name] = changed
    diff: dict[str, Any] = {}
    for key, value in (("modules", modules), ("removed_modules", removed_modules), ("parameters", parameters),
                       ("removed", removed), ("attributes", attributes)):
        if value:
            diff[key] = value
    return diff


def prefixed(diff: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``diff`` with every name under ``prefix`` (e.g. a block's diff as names from the model's root)."""
    join = (lambda n: f"{prefix}.{n}" if n else prefix) if prefix else (lambda n: n)
    out: dict[str, Any] = {}
    for key, value in diff.items():
        out[key] = {join(n): v for n, v in value.items()} if isinstance(value, dict) else [join(n) for n in value]
    return out


def merge_diffs(diffs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for diff in diffs:
        for key, value in diff.items():
            if isinstance(value, dict):
                out.setdefault(key, {}).update(value)
            else:
                out[key] = sorted(set(out.get(key, [])) | set(value))
    return out


# builders of the module classes a structural change may introduce: class name -> build(attributes) giving an
# empty module of that class (its parameters are then made from the recorded shapes)
MODULE_BUILDERS: dict[str, Callable[[dict[str, int]], nn.Module]] = {
    _type_name(nn.Linear(1, 1)): lambda a: nn.Linear(a["in_features"], a["out_features"], bias=False, device="meta"),
    _type_name(Conv1D(1, 1)): lambda a: Conv1D(a["nf"], a["nx"]).to("meta"),
    _type_name(nn.Sequential()): lambda a: nn.Sequential(),
    _type_name(nn.Identity()): lambda a: nn.Identity(),
}


def register_module_builder(cls: type, build: Callable[[dict[str, int]], nn.Module]) -> None:
    """Let ``apply_structure`` rebuild modules of ``cls`` (a method that replaces layers by a module of its own
    registers it): ``build(attributes)`` gets the module's recorded integer attributes."""
    MODULE_BUILDERS[f"{cls.__module__}.{cls.__qualname__}"] = build


def _set_module(root: nn.Module, name: str, module: nn.Module | None) -> None:
    owner, _, leaf = name.rpartition(".")
    parent = root.get_submodule(owner) if owner else root
    if module is None:
        delattr(parent, leaf)
    else:
        parent.add_module(leaf, module)


def apply_structure(module: nn.Module, diff: dict[str, Any], device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> list[str]:
    """Give ``module`` the structure ``diff`` describes: new modules built (``MODULE_BUILDERS``) and removed ones
    dropped, each listed parameter made uninitialised with the recorded shape (on ``device``, default the device of
    the module's first parameter; in ``dtype``, default its first floating parameter's), removed parameters
    dropped, attributes set. Returns the names of the parameters it made (their values must be filled in)."""
    first = next(iter(module.parameters()), None)
    device = device if device is not None else (first.device if first is not None else "cpu")
    dtype = dtype or next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    for name in sorted(diff.get("removed_modules", []), key=lambda n: -n.count(".")):
        _set_module(module, name, None)
    for name, type_name in sorted(diff.get("modules", {}).items(), key=lambda item: item[0].count(".")):
        build = MODULE_BUILDERS.get(type_name)
        if build is None:
            raise LmshrinkError(f"the recorded structure has a module {name} of class {type_name}, which no loaded "
                                "method knows how to build",
                                fix="import the package that registers it (register_module_builder)")
        _set_module(module, name, build(diff.get("attributes", {}).get(name, {})))
    for name in diff.get("removed", []):
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner)
        sub._parameters.pop(leaf, None)
        setattr(sub, leaf, None)
    made = []
    for name, shape in diff.get("parameters", {}).items():
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner)
        old = sub._parameters.get(leaf)
        value = torch.empty(shape, dtype=old.dtype if old is not None else dtype, device=device)
        sub._parameters.pop(leaf, None)
        if leaf in vars(sub):
            delattr(sub, leaf)
        sub.register_parameter(leaf, nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True))
        made.append(name)
    for name, values in diff.get("attributes", {}).items():
        sub = module.get_submodule(name) if name else module
        for key, value in values.items():
            setattr(sub, key, value)
    return made


# ---------------------------------------------------------------------------------------------------------------
# depth
# ---------------------------------------------------------------------------------------------------------------


def drop_blocks(model: nn.Module, remove: list[int], adapter: ModelAdapter | None = None) -> list[int]:
    """Remove the decoder blocks ``remove`` (indices) from ``model`` in place; returns the kept blocks' old indices.

    The kept blocks are renumbered (every integer ``layer_idx`` attribute in them, which indexes the KV cache), the
    config's layer count is set and every config list with one entry per layer (``layer_types``) keeps the kept
    blocks' entries, so the config builds the same model."""
    adapter = adapter or get_adapter(model)
    blocks = adapter.blocks(model)
    count = len(blocks)
    remove = sorted(set(remove))
    bad = [i for i in remove if not 0 <= i < count]
    if bad:
        raise LmshrinkError(f"blocks {bad} do not exist: the model has {count} decoder blocks (0..{count - 1})",
                            fix="name existing block indices")
    if len(remove) >= count:
        raise LmshrinkError(f"removing {len(remove)} of the model's {count} decoder blocks leaves none",
                            fix="remove fewer blocks (at most all but one)")
    config = _text_config(model.config)
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise UnsupportedArchitectureError(
            "this GPT-2 scales attention by its block index (scale_attn_by_inverse_layer_idx), which changes when "
            "blocks are removed", fix="remove no blocks from this model (width pruning still works)")
    kept = [i for i in range(count) if i not in remove]
    for new, old in enumerate(kept):
        for sub in blocks[old].modules():
            if type(vars(sub).get("layer_idx")) is int:
                sub.layer_idx = new
    parent_path, _, leaf = adapter.block_path(model).rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, nn.ModuleList([blocks[i] for i in kept]))
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == count and not key.startswith("_"):
            setattr(config, key, [value[i] for i in kept])
    config.num_hidden_layers = len(kept)
    return kept


# ---------------------------------------------------------------------------------------------------------------
# widths: where a family keeps each head and FFN channel
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WidthLayout:
    """Where one family's block keeps its heads and FFN channels (names relative to the block).

    Attention: ``q``, ``k``, ``v`` are separate linears (``fused`` None) or one fused linear ``fused`` whose rows
    are [q | k | v]; ``o`` reads the heads. FFN: ``ffn_in`` produce the channels (``fused_ffn``: one linear whose
    rows are [gate | up]), ``ffn_out`` reads them. ``head_keys``: the config can state the head counts (else heads
    are recorded beside the config); ``per_layer_heads``: the modelling code reads head counts from the module, not
    the shared config (blocks may differ)."""

    attention: str
    o: str
    ffn_out: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    fused: str | None = None
    ffn_in: tuple[str, ...] = ()
    fused_ffn: str | None = None
    head_keys: bool = True
    per_layer_heads: bool = True
    ffn_key: str = "intermediate_size"
    heads_attribute: str | None = None  # module attribute holding the query head count (OPT, GPT-2)
    split_attribute: str | None = None  # GPT-2: width of each of q, k, v in the fused output

    def producers_of_heads(self) -> list[str]:
        return [self.fused] if self.fused else [self.q, self.k, self.v]

    def producers_of_channels(self) -> list[str]:
        return [self.fused_ffn] if self.fused_ffn else list(self.ffn_in)


_LLAMA = WidthLayout(attention="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                     o="self_attn.o_proj", ffn_in=("mlp.gate_proj", "mlp.up_proj"), ffn_out="mlp.down_proj")
_PHI3 = WidthLayout(attention="self_attn", fused="self_attn.qkv_proj", o="self_attn.o_proj",
                    fused_ffn="mlp.gate_up_proj", ffn_out="mlp.down_proj", per_layer_heads=False)
_OPT = WidthLayout(attention="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                   o="self_attn.out_proj", ffn_in=("fc1",), ffn_out="fc2", head_keys=False, ffn_key="ffn_dim",
                   heads_attribute="num_heads")
_GPT2 = WidthLayout(attention="attn", fused="attn.c_attn", o="attn.c_proj", ffn_in=("mlp.c_fc",),
                    ffn_out="mlp.c_proj", head_keys=False, ffn_key="n_inner", heads_attribute="num_heads",
                    split_attribute="split_size")
_LAYOUTS = {"opt": _OPT, "gpt2": _GPT2, "phi3": _PHI3}


def width_layout(adapter: ModelAdapter, block: nn.Module) -> WidthLayout:
    """The family's width layout, checked against the block's linears (a family whose block has another layout,
    e.g. phi3 with split projections, gets the layout its linears match)."""
    layout = _LAYOUTS.get(adapter.family, _LLAMA)
    names = [n for n in (layout.q, layout.k, layout.v, layout.fused, layout.o, *layout.ffn_in, layout.fused_ffn,
                         layout.ffn_out) if n]
    present = {name for group in adapter.linear_groups(block) for name in group}
    if not set(names) <= present and layout is _PHI3 and set(_split_phi3_names()) <= present:
        return WidthLayout(attention="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                           o="self_attn.o_proj", ffn_in=("mlp.gate_proj", "mlp.up_proj"), ffn_out="mlp.down_proj",
                           per_layer_heads=False)
    if not set(names) <= present:
        raise UnsupportedArchitectureError(
            f"a {type(block).__name__} block ({adapter.family}) does not have the linears width pruning expects "
            f"({', '.join(n for n in names if n not in present)} missing)",
            fix="prune this model's depth only (method: prune-depth), or add its width layout to "
                "lmshrink/models/structure.py")
    return layout


def _split_phi3_names() -> tuple[str, ...]:
    return ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")


def head_dim(block: nn.Module, layout: WidthLayout) -> int:
    value = getattr(block.get_submodule(layout.attention), "head_dim", None)
    if not isinstance(value, int):
        raise UnsupportedArchitectureError(f"the attention module {layout.attention} has no integer head_dim",
                                           fix="prune this model's depth only (method: prune-depth)")
    return value


def head_counts(block: nn.Module, layout: WidthLayout) -> tuple[int, int]:
    """``(query heads, key/value heads)`` of a block, read from its projections' shapes."""
    dim = head_dim(block, layout)
    attention = block.get_submodule(layout.attention)
    if layout.fused and layout.split_attribute:  # GPT-2: [q | k | v], each split_size wide
        heads = getattr(attention, layout.split_attribute) // dim
        return heads, heads
    if layout.fused:  # phi3: [q | k | v], kv heads in the module
        kv = int(attention.num_key_value_heads)
        total = linear_dims(block.get_submodule(layout.fused))[0] // dim
        return total - 2 * kv, kv
    return (linear_dims(block.get_submodule(layout.q))[0] // dim, linear_dims(block.get_submodule(layout.k))[0] // dim)


def ffn_width(block: nn.Module, layout: WidthLayout) -> int:
    rows = linear_dims(block.get_submodule(layout.ffn_out))[1]
    return rows


def slice_linear(module: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
    """Keep output ``rows`` and input ``cols`` (index tensors; None keeps all) of a Linear or Conv1D in place, as
    new parameters; ``weight`` (``[out, in]`` after slicing) and ``bias`` replace the kept values when given (a
    bias is added to a layer that had none)."""
    is_conv = isinstance(module, Conv1D)
    w = module.weight.detach()
    w = w.t() if is_conv else w
    if weight is None:
        weight = w
        if rows is not None:
            weight = weight.index_select(0, rows.to(weight.device))
        if cols is not None:
            weight = weight.index_select(1, cols.to(weight.device))
    if bias is None and module.bias is not None:
        bias = module.bias.detach()
        if rows is not None:
            bias = bias.index_select(0, rows.to(bias.device))
    dtype = module.weight.dtype
    stored = (weight.t() if is_conv else weight).to(dtype).contiguous().clone()
    module.weight = nn.Parameter(stored, requires_grad=module.weight.requires_grad)
    if bias is not None:
        module.bias = nn.Parameter(bias.to(dtype).contiguous().clone(), requires_grad=module.weight.requires_grad)
    out_f, in_f = weight.shape
    if is_conv:
        module.nf = int(out_f)
        if hasattr(module, "nx"):
            module.nx = int(in_f)
    else:
        module.out_features, module.in_features = int(out_f), int(in_f)


def set_ffn_width(block: nn.Module, layout: WidthLayout, width: int) -> None:
    """The FFN module's own width attribute (e.g. ``LlamaMLP.intermediate_size``) after its linears were sliced to
    ``width`` channels."""
    owner = block.get_submodule(layout.ffn_out.rpartition(".")[0]) if "." in layout.ffn_out else block
    for key in ("intermediate_size", "ffn_dim", "n_inner"):
        if type(vars(owner).get(key)) is int:
            setattr(owner, key, width)


def set_head_counts(block: nn.Module, layout: WidthLayout, heads: int, kv_heads: int) -> None:
    """The attention module's own head counts after its projections were sliced to ``heads`` query and
    ``kv_heads`` key/value heads."""
    attention = block.get_submodule(layout.attention)
    if hasattr(attention, "num_key_value_groups"):
        attention.num_key_value_groups = heads // kv_heads
    if hasattr(attention, "num_key_value_heads") and type(attention.num_key_value_heads) is int:
        attention.num_key_value_heads = kv_heads
    if layout.heads_attribute and hasattr(attention, layout.heads_attribute):
        setattr(attention, layout.heads_attribute, heads)
    if layout.split_attribute:
        setattr(attention, layout.split_attribute, heads * head_dim(block, layout))


# ---------------------------------------------------------------------------------------------------------------
# the config follows the blocks
# ---------------------------------------------------------------------------------------------------------------

# the config flags that give every projection of a group a bias, and the projections they cover
_BIAS_FLAGS = {"attention_bias": ("q", "k", "v", "o"), "mlp_bias": ("ffn_in", "ffn_out")}


def _flag_modules(layout: WidthLayout, flag: str) -> list[str]:
    names = []
    for part in _BIAS_FLAGS[flag]:
        value = getattr(layout, part)
        names.extend(value if isinstance(value, tuple) else [value])
    return [n for n in names if n]


@functools.lru_cache(maxsize=64)
def _flag_works(config_class: type, model_type: str, flag: str) -> bool:
    """Whether setting ``flag`` in this family's config builds biases on the projections it names."""
    from transformers import AutoModelForCausalLM

    try:
        config = config_class(num_hidden_layers=1, **{flag: True})
        with MetaParameters():
            model = AutoModelForCausalLM.from_config(config)
    except (TypeError, ValueError):
        return False
    adapter = get_adapter(model)
    block = adapter.blocks(model)[0]
    try:
        layout = width_layout(adapter, block)
    except UnsupportedArchitectureError:
        return False
    return all(block.get_submodule(n).bias is not None for n in _flag_modules(layout, flag))


def bias_companions(model: nn.Module, block: nn.Module, name: str) -> list[str] | None:
    """The projections (block-relative) that must also get a (zero) bias when ``name`` gets one, for the config to
    state it with one of its family's flags; None when no flag of the config covers ``name``."""
    adapter = get_adapter(model)
    layout = width_layout(adapter, block)
    config = _text_config(model.config)
    for flag in _BIAS_FLAGS:
        if name in _flag_modules(layout, flag) and hasattr(config, flag) and _flag_works(type(config),
                                                                                        adapter.model_type, flag):
            return [n for n in _flag_modules(layout, flag) if n != name]
    return None


def block_widths(model: nn.Module) -> list[dict[str, int]]:
    """Per decoder block: ``heads``, ``kv_heads``, ``head_dim`` and ``ffn`` (channels), read from the shapes
    (empty dicts for a family without a width layout)."""
    adapter = get_adapter(model)
    out = []
    for block in adapter.blocks(model):
        try:
            layout = width_layout(adapter, block)
            heads, kv = head_counts(block, layout)
            out.append({"heads": heads, "kv_heads": kv, "head_dim": head_dim(block, layout),
                        "ffn": ffn_width(block, layout)})
        except UnsupportedArchitectureError:
            out.append({})
    return out


def sync_config(model: nn.Module) -> None:
    """Write the blocks' widths into the model's config in its family's keys where every block agrees (and differs
    from the config): head counts (with ``head_dim`` stated, since the default divides the hidden size by the head
    count), FFN width, and the bias flags every block's projections now satisfy. What the config cannot express
    stays for ``config_structure``."""
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    config = _text_config(model.config)
    widths = block_widths(model)
    if not widths or not all(widths):
        return
    layout = width_layout(adapter, blocks[0])
    first = widths[0]
    if all(w == first for w in widths):
        if layout.head_keys and (config.num_attention_heads, getattr(config, "num_key_value_heads", None)) != (
                first["heads"], first["kv_heads"]):
            config.head_dim = first["head_dim"]
            config.num_attention_heads = first["heads"]
            config.num_key_value_heads = first["kv_heads"]
        if getattr(config, layout.ffn_key, None) != first["ffn"]:
            setattr(config, layout.ffn_key, first["ffn"])
    for flag in _BIAS_FLAGS:
        if hasattr(config, flag) and not getattr(config, flag) and _flag_works(type(config), adapter.model_type, flag):
            names = _flag_modules(layout, flag)
            if all(block.get_submodule(n).bias is not None for block in blocks for n in names):
                setattr(config, flag, True)


def config_structure(model: nn.Module) -> dict[str, Any]:
    """What ``model``'s decoder blocks have that a model built from its config would not (``structure_diff`` from
    the config's model to this one, names from the root); empty when the config states it all, and then plain
    ``AutoModelForCausalLM.from_pretrained`` builds this model."""
    from transformers import AutoModelForCausalLM

    adapter = get_adapter(model)
    config = copy.deepcopy(model.config)
    if hasattr(config, STRUCTURE_KEY):
        delattr(config, STRUCTURE_KEY)
    with MetaParameters():
        built = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    adapter.linearize(built)  # fused experts as the loaders build them (one linear per expert): no structure
    path = adapter.block_path(model)
    ours, theirs = adapter.blocks(model), adapter.blocks(built)
    if len(ours) != len(theirs):
        raise ValueError(f"the config builds {len(theirs)} blocks, the model has {len(ours)}")
    diffs = [prefixed(structure_diff(signature(b), signature(a)), f"{path}.{i}")
             for i, (a, b) in enumerate(zip(ours, theirs))]
    return merge_diffs(diffs)


def apply_config_structure(model: nn.Module, structure: dict[str, Any]) -> list[str]:
    """Give a model built from its config the recorded ``structure`` (``config_structure`` of the saved model); its
    new parameters are on the meta device, to be read from the weights. Returns their names."""
    return apply_structure(model, structure, device="meta")
