"""Per-family architecture adapters: where a causal LM keeps its decoder blocks, linears, embeddings and head.

One small table (``FamilySpec`` per family) instead of a class per family. Every lookup is checked against the
modules actually present, so a model whose layout differs from its family's table fails with a message naming
what is missing, never silently skips a layer.

Linear layers: ``torch.nn.Linear`` and GPT-2's ``transformers.pytorch_utils.Conv1D`` (same maths, weight stored
transposed as [in, out]). ``is_linear``/``linear_weight``/``set_linear_weight``/``linear_dims`` hide the difference:
callers always see weights shaped [out_features, in_features].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lmshrink.core.errors import UnsupportedArchitectureError

# ---------------------------------------------------------------------------------------------------------------
# Linear helpers (nn.Linear and GPT-2 Conv1D)
# ---------------------------------------------------------------------------------------------------------------


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` (and subclasses) and for GPT-2's ``Conv1D``."""
    return isinstance(module, (nn.Linear, Conv1D))


def _is_layer(module: nn.Module | None) -> bool:
    """A linear layer, or a module that stands in for one (``replaces_linear``: a factorized layer built of
    smaller linears, whose inner linears are not layers of the block)."""
    return module is not None and (is_linear(module) or bool(getattr(module, "replaces_linear", False)))


def _check_linear(module: nn.Module) -> None:
    if not is_linear(module):
        raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a Linear or Conv1D."""
    _check_linear(module)
    if isinstance(module, Conv1D):
        return int(module.weight.shape[1]), int(module.weight.shape[0])
    return int(module.weight.shape[0]), int(module.weight.shape[1])


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features]: a detached VIEW sharing storage with the parameter (no copy).

    For Conv1D the view is the transpose (non-contiguous). In-place writes to the view change the module;
    call ``.clone()`` first to work on a copy, and use ``set_linear_weight`` to write a result back.
    """
    _check_linear(module)
    weight = module.weight.detach()
    return weight.t() if isinstance(module, Conv1D) else weight


@torch.no_grad()
def set_linear_weight(module: nn.Module, weight_out_in: torch.Tensor) -> None:
    """Write a [out_features, in_features] weight into the module in its own layout (Conv1D: transposed).

    Copies in place into the existing parameter (keeps its identity, dtype and device, so ties and hooks survive).
    """
    _check_linear(module)
    expected = linear_dims(module)
    if tuple(weight_out_in.shape) != expected:
        raise ValueError(f"weight shape {tuple(weight_out_in.shape)} does not match the layer's "
                         f"[out_features, in_features] = {list(expected)}")
    target = module.weight.data
    source = weight_out_in.t() if isinstance(module, Conv1D) else weight_out_in
    target.copy_(source.to(device=target.device, dtype=target.dtype))


# ---------------------------------------------------------------------------------------------------------------
# Family table
# ---------------------------------------------------------------------------------------------------------------

Layout = tuple[tuple[str, ...], ...]

# Groups run in this order inside a block; layers in one group read the same input tensor.
_SPLIT_ATTN_GATED_MLP: Layout = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_FUSED_ATTN_GATED_MLP: Layout = (
    ("self_attn.qkv_proj",),
    ("self_attn.o_proj",),
    ("mlp.gate_up_proj",),
    ("mlp.down_proj",),
)
_OPT: Layout = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.out_proj",),
    ("fc1",),
    ("fc2",),
)
_GPT2: Layout = (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",))


@dataclass(frozen=True)
class ScaleLink:
    """A module whose output channels feed a group of linears only, so that a per-channel scale ``s`` of those
    linears' input can move into it: dividing its output channel ``j`` by ``s_j`` and multiplying the linears' input
    column ``j`` by ``s_j`` leaves the block's function unchanged (AWQ and SmoothQuant fold their scales this way).

    producer: the module (relative to the block): an RMSNorm/LayerNorm (weight, and bias where it has one) or a
    Linear (its output rows and bias). rows: ``all`` (the producer's outputs are the consumers' inputs) or ``tail``
    (its last rows are: the value part of a fused q/k/v, the up half of a fused gate/up). requires: what must hold
    for the fold to be exact, checked on the block's config: ``kv_heads`` (value heads = query heads, so each value
    channel feeds one input of the output projection; grouped-query attention repeats it), ``relu`` (the activation
    between producer and consumer is ReLU, which commutes with a positive scale), ``pre_norm`` (the norm is applied
    before the linears, not after the residual sum).
    """

    producer: str
    consumers: tuple[str, ...]
    rows: str = "all"
    requires: str | None = None


# the producer -> consumers links of each layout above (same order as the family's ``layouts``)
_SPLIT_LINKS = (
    ScaleLink("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleLink("self_attn.v_proj", ("self_attn.o_proj",), requires="kv_heads"),
    ScaleLink("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScaleLink("mlp.up_proj", ("mlp.down_proj",)),
)
# gemma 2/3 normalise the attention output after o_proj, and the MLP input with a norm of its own
_SANDWICH_LINKS = (_SPLIT_LINKS[0], _SPLIT_LINKS[1],
                   ScaleLink("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")), _SPLIT_LINKS[3])
_FUSED_LINKS = (
    ScaleLink("input_layernorm", ("self_attn.qkv_proj",)),
    ScaleLink("self_attn.qkv_proj", ("self_attn.o_proj",), rows="tail", requires="kv_heads"),
    ScaleLink("post_attention_layernorm", ("mlp.gate_up_proj",)),
    ScaleLink("mlp.gate_up_proj", ("mlp.down_proj",), rows="tail"),
)
_OPT_LINKS = (
    ScaleLink("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              requires="pre_norm"),
    ScaleLink("self_attn.v_proj", ("self_attn.out_proj",), requires="kv_heads"),
    ScaleLink("final_layer_norm", ("fc1",), requires="pre_norm"),
    ScaleLink("fc1", ("fc2",), requires="relu"),
)
_GPT2_LINKS = (
    ScaleLink("ln_1", ("attn.c_attn",)),
    ScaleLink("attn.c_attn", ("attn.c_proj",), rows="tail", requires="kv_heads"),
    ScaleLink("ln_2", ("mlp.c_fc",)),
    ScaleLink("mlp.c_fc", ("mlp.c_proj",), requires="relu"),
)


@dataclass(frozen=True)
class MoeSpec:
    """Where a mixture-of-experts family keeps its experts (paths relative to a block; see ``models.moe``)."""

    experts: str  # the experts module, e.g. "mlp.experts"
    projections: tuple[str, str, str]  # the gate, up and down linears of one expert, as checkpoints name them
    shared: str | None = None  # an expert every token goes through (Qwen2-MoE), an MLP with gate, up and down
    kept: tuple[str, ...] = ()  # linears left as they are: routers and gates (not quantized)


@dataclass(frozen=True)
class FamilySpec:
    """Where one family keeps its parts. Paths under the decoder are relative to it; ``head`` is from the root."""

    family: str
    model_types: tuple[str, ...]
    decoder_paths: tuple[str, ...]  # candidates, first one holding ``blocks`` wins
    blocks: str
    layouts: tuple[Layout, ...]  # candidates, first one matching the block's linears wins
    embeddings: tuple[str, ...]  # required, under the decoder
    optional_embeddings: tuple[str, ...] = ()  # taken when present (e.g. OPT project_in/out)
    final_norm: str = "norm"
    rotary: str | None = "rotary_emb"
    head: str = "lm_head"
    scale_links: tuple[tuple[ScaleLink, ...], ...] = ()  # per layout: where an input scale can be folded
    norm_offset: float = 0.0  # the norms compute x_hat * (offset + weight): gemma stores weight - 1
    moe: MoeSpec | None = None
    # (model name part, checkpoint name part): tensors the checkpoints name differently than the module tree
    checkpoint_renames: tuple[tuple[str, str], ...] = ()


def _llama_like(family: str, *model_types: str, decoder_paths: tuple[str, ...] = ("model",),
                layouts: tuple[Layout, ...] = (_SPLIT_ATTN_GATED_MLP,),
                scale_links: tuple[tuple[ScaleLink, ...], ...] = (_SPLIT_LINKS,), **extra) -> FamilySpec:
    return FamilySpec(family=family, model_types=model_types or (family,), decoder_paths=decoder_paths,
                      blocks="layers", layouts=layouts, embeddings=("embed_tokens",), scale_links=scale_links,
                      **extra)


_QWEN_EXPERTS = ("gate_proj", "up_proj", "down_proj")


_SPECS: tuple[FamilySpec, ...] = (
    _llama_like("llama"),
    _llama_like("mistral"),
    _llama_like("qwen2"),
    _llama_like("qwen3"),
    _llama_like("gemma", norm_offset=1.0),
    _llama_like("gemma2", scale_links=(_SANDWICH_LINKS,), norm_offset=1.0),
    # gemma3 (multimodal) keeps the text decoder inside; Gemma3ForCausalLM ("gemma3_text") has it at "model".
    _llama_like("gemma3", "gemma3_text", "gemma3",
                decoder_paths=("model", "model.language_model", "language_model.model", "language_model"),
                scale_links=(_SANDWICH_LINKS,), norm_offset=1.0),
    _llama_like("phi3", layouts=(_FUSED_ATTN_GATED_MLP, _SPLIT_ATTN_GATED_MLP),
                scale_links=(_FUSED_LINKS, _SPLIT_LINKS)),
    # mixture of experts: the experts become linears (models.moe); the routers are not linears and stay as they are
    _llama_like("mixtral", moe=MoeSpec(experts="mlp.experts", projections=("w1", "w3", "w2")),
                checkpoint_renames=((".mlp.", ".block_sparse_moe."),)),
    # Qwen2-MoE: dense MLP blocks (mlp_only_layers) keep the plain layout
    _llama_like("qwen2_moe", moe=MoeSpec(experts="mlp.experts", projections=_QWEN_EXPERTS, shared="mlp.shared_expert",
                                         kept=("mlp.shared_expert_gate",))),
    _llama_like("qwen3_moe", moe=MoeSpec(experts="mlp.experts", projections=_QWEN_EXPERTS)),
    FamilySpec(family="opt", model_types=("opt",), decoder_paths=("model.decoder",), blocks="layers",
               layouts=(_OPT,), embeddings=("embed_tokens", "embed_positions"),
               optional_embeddings=("project_in", "project_out"), final_norm="final_layer_norm", rotary=None,
               scale_links=(_OPT_LINKS,)),
    FamilySpec(family="gpt2", model_types=("gpt2",), decoder_paths=("transformer",), blocks="h",
               layouts=(_GPT2,), embeddings=("wte", "wpe"), final_norm="ln_f", rotary=None,
               scale_links=(_GPT2_LINKS,)),
)
_BY_MODEL_TYPE: dict[str, FamilySpec] = {t: spec for spec in _SPECS for t in spec.model_types}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_BY_MODEL_TYPE)


def _find(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at a dotted path, or None when absent (or set to None, as OPT does for optional parts)."""
    module: Any = root
    for part in path.split(".") if path else ():
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if isinstance(module, nn.Module) else None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------------------------
# Adapter
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelAdapter:
    """Finds a family's parts in a loaded HF causal LM. Stateless: every method takes the model (or a block)."""

    spec: FamilySpec
    model_type: str

    @property
    def family(self) -> str:
        return self.spec.family

    def _missing(self, what: str, model: nn.Module, tried: list[str]) -> UnsupportedArchitectureError:
        return UnsupportedArchitectureError(
            f"{type(model).__name__} (model_type {self.model_type!r}) has no {what}; looked for "
            + ", ".join(repr(t) for t in tried),
            fix="load the model with AutoModelForCausalLM, or add its layout to lmshrink/models/adapters.py",
        )

    # -- paths ----------------------------------------------------------------------------------------------
    def decoder_path(self, model: nn.Module) -> str:
        """Dotted path of the module holding embeddings, blocks and final norm (e.g. "model", "transformer")."""
        for path in self.spec.decoder_paths:
            if isinstance(_find(model, _join(path, self.spec.blocks)), nn.ModuleList):
                return path
        raise self._missing("decoder block list", model,
                            [_join(p, self.spec.blocks) for p in self.spec.decoder_paths])

    def decoder(self, model: nn.Module) -> nn.Module:
        """The inner decoder module (e.g. ``LlamaModel``, ``OPTDecoder``, ``GPT2Model``)."""
        return model.get_submodule(self.decoder_path(model))

    def block_path(self, model: nn.Module) -> str:
        """Dotted path of the block list from the root, e.g. "model.layers", "transformer.h", "model.decoder.layers"."""
        return _join(self.decoder_path(model), self.spec.blocks)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks, in execution order."""
        return model.get_submodule(self.block_path(model))

    # -- inside a block ---------------------------------------------------------------------------------------
    def linear_groups(self, block: nn.Module) -> list[list[str]]:
        """Names (relative to the block) of its linears in execution order, grouped by shared input.

        Picks the first layout of the family whose names all exist as linears and cover every linear in the block
        exactly once; otherwise raises ``UnsupportedArchitectureError`` naming the missing and uncovered layers.
        """
        return [list(group) for group in self._layout(block)[1]]

    def _layout(self, block: nn.Module) -> tuple[int | None, Layout]:
        """The block's layout and its index in the family's ``layouts`` (None: the mixture-of-experts layout)."""
        kept = set(self.spec.moe.kept) if self.spec.moe else set()
        layers = [name for name, module in block.named_modules() if name and _is_layer(module) and name not in kept]
        present = [name for name in layers if not any(name.startswith(outer + ".") for outer in layers)]
        problems = []
        moe = self._moe_layout(block)
        for index, layout in ([(None, moe)] if moe else []) + list(enumerate(self.spec.layouts)):
            names = [n for group in layout for n in group]
            missing = [n for n in names if not _is_layer(_find(block, n))]
            uncovered = [n for n in present if n not in names]
            if not missing and not uncovered:
                return index, layout
            problems.append(f"missing {missing}, not in layout {uncovered}")
        raise UnsupportedArchitectureError(
            f"a {type(block).__name__} block (model_type {self.model_type!r}) does not match the "
            f"{self.family} layout(s): " + "; ".join(problems) + f"; its linears are {present}",
            fix="add this block layout to lmshrink/models/adapters.py",
        )

    def scale_links(self, block: nn.Module) -> list["FoldableLink"]:
        """The block's producer -> consumers links (``ScaleLink``) in execution order, each with the rows of the
        producer that feed the consumers and, where an input scale cannot be folded exactly, why not."""
        index, layout = self._layout(block)
        if index is None:  # mixture of experts: only links whose consumers are all in the block (the attention's)
            names = {n for group in layout for n in group}
            links = tuple(link for link in (self.spec.scale_links[0] if self.spec.scale_links else ())
                          if all(c in names for c in link.consumers))
        else:
            links = self.spec.scale_links[index] if self.spec.scale_links else ()
        config = _block_config(block)
        return [_resolve(block, link, config) for link in links]

    def fold_input_scale(self, block: nn.Module, link: "FoldableLink", scale: torch.Tensor) -> list[str]:
        """Multiply the consumers' input columns by ``scale`` (``[in]``, positive) and divide the producer's output
        channels by it, in place: the block computes the same function (up to float rounding). Returns the names
        (relative to the block) of the tensors changed."""
        if link.reason is not None:
            raise ValueError(f"{link.link.producer} cannot absorb an input scale: {link.reason}")
        producer = block.get_submodule(link.link.producer)
        changed = []
        with torch.no_grad():
            if is_linear(producer):
                weight = linear_weight(producer)
                rows = weight[link.rows]
                rows.copy_((rows.float() / scale[:, None]).to(rows.dtype))
                changed.append(f"{link.link.producer}.weight")
            else:
                weight = producer.weight
                offset = self.spec.norm_offset
                weight.copy_(((weight.float() + offset) / scale - offset).to(weight.dtype))
                changed.append(f"{link.link.producer}.weight")
            bias = getattr(producer, "bias", None)
            if isinstance(bias, torch.Tensor):
                part = bias[link.rows] if is_linear(producer) else bias
                part.copy_((part.float() / scale).to(part.dtype))
                changed.append(f"{link.link.producer}.bias")
            for name in link.link.consumers:
                weight = linear_weight(block.get_submodule(name))
                weight.copy_((weight.float() * scale[None, :]).to(weight.dtype))
                changed.append(f"{name}.weight")
        return changed

    # -- mixtures of experts -------------------------------------------------------------------------------------
    def _experts(self, block: nn.Module):
        """The block's ``LinearExperts`` module, or None (no MoE family, a dense block, or not linearized)."""
        from lmshrink.models.moe import LinearExperts

        if self.spec.moe is None:
            return None
        module = _find(block, self.spec.moe.experts)
        return module if isinstance(module, LinearExperts) else None

    def _moe_layout(self, block: nn.Module) -> Layout | None:
        """Attention, then the shared expert (it runs first), then every expert's gate and up, then every down."""
        experts = self._experts(block)
        if experts is None:
            return None
        moe = self.spec.moe
        gate, up, down = moe.projections
        layout = list(_SPLIT_ATTN_GATED_MLP[:2])
        if moe.shared and _find(block, moe.shared) is not None:
            layout += [(f"{moe.shared}.gate_proj", f"{moe.shared}.up_proj"), (f"{moe.shared}.down_proj",)]
        layout += [(f"{moe.experts}.{e}.{gate}", f"{moe.experts}.{e}.{up}") for e in range(len(experts))]
        layout += [(f"{moe.experts}.{e}.{down}",) for e in range(len(experts))]
        return tuple(layout)

    def linearize(self, model: nn.Module) -> int:
        """Turn fused expert tensors into one linear per expert and projection (``models.moe``); the number of
        blocks changed (0 for families without experts, or when already done)."""
        if self.spec.moe is None:
            return 0
        from lmshrink.models.moe import linearize_experts

        return linearize_experts(model, self.blocks(model), self.spec.moe.experts, self.spec.moe.projections)

    def expert_groups(self, block: nn.Module) -> dict[str, int]:
        """First linear of each routed expert's group (relative name) -> the expert's index; empty without experts.
        (A shared expert sees every token and is not listed.)"""
        experts = self._experts(block)
        if experts is None:
            return {}
        gate, _, down = self.spec.moe.projections
        return {f"{self.spec.moe.experts}.{e}.{p}": e for e in range(len(experts)) for p in (gate, down)}

    def experts_module(self, block: nn.Module):
        """The block's ``LinearExperts`` (None without experts)."""
        return self._experts(block)

    def independent_steps(self, block: nn.Module) -> list[int]:
        """A step number for each linear group: consecutive groups of one step read inputs that do not depend on
        each other's weights (every expert's gate and up; every expert's down), so one pass can collect them all."""
        groups = self.linear_groups(block)
        experts = self.expert_groups(block)
        gate = self.spec.moe.projections[0] if self.spec.moe else None
        kinds = [("gate" if g[0].endswith("." + gate) else "down") if g[0] in experts else None for g in groups]
        steps: list[int] = []
        for index, kind in enumerate(kinds):
            same = index > 0 and kind is not None and kind == kinds[index - 1]
            steps.append(steps[-1] if same else (steps[-1] + 1 if steps else 0))
        return steps

    # -- checkpoint names -----------------------------------------------------------------------------------------
    def checkpoint_name(self, name: str) -> str:
        """A tensor's name in the family's checkpoints (e.g. Mixtral's ``block_sparse_moe`` for ``mlp``)."""
        for model_part, stored_part in self.spec.checkpoint_renames:
            name = name.replace(model_part, stored_part)
        return name

    def model_name(self, stored: str) -> str:
        """The module-tree name of a checkpoint tensor (``checkpoint_name`` undone)."""
        for model_part, stored_part in self.spec.checkpoint_renames:
            stored = stored.replace(stored_part, model_part)
        return stored

    def linears(self, block: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of the block's linears, flattened in execution order."""
        return [(name, block.get_submodule(name)) for group in self.linear_groups(block) for name in group]

    def iter_linears(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """``(full dotted name from the root, module)`` of every block linear, block by block in execution order."""
        prefix = self.block_path(model)
        for index, block in enumerate(self.blocks(model)):
            for name, module in self.linears(block):
                yield f"{prefix}.{index}.{name}", module

    # -- outside the blocks -----------------------------------------------------------------------------------
    def embeddings(self, model: nn.Module) -> list[nn.Module]:
        """Token embeddings, then learned position embeddings (OPT, GPT-2), then OPT's project_in/out if present."""
        decoder = self.decoder(model)
        found = []
        for name in self.spec.embeddings:
            module = _find(decoder, name)
            if module is None:
                raise self._missing("embedding", model, [_join(self.decoder_path(model), name)])
            found.append(module)
        found.extend(m for m in (_find(decoder, n) for n in self.spec.optional_embeddings) if m is not None)
        return found

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        """The norm after the last block, or None where the model has none (OPT-350m style post-norm)."""
        return _find(self.decoder(model), self.spec.final_norm)

    def head(self, model: nn.Module) -> nn.Module:
        """The LM head (``lm_head``)."""
        module = _find(model, self.spec.head)
        if module is None:
            raise self._missing("LM head", model, [self.spec.head])
        return module

    def head_is_tied(self, model: nn.Module) -> bool:
        """True when the LM head shares its weight tensor with the token embedding."""
        return self.head(model).weight is self.embeddings(model)[0].weight

    def rotary(self, model: nn.Module) -> nn.Module | None:
        """The model-level rotary embedding module (computes cos/sin for the blocks), or None."""
        return _find(self.decoder(model), self.spec.rotary) if self.spec.rotary else None

    def describe(self, model: nn.Module) -> dict[str, Any]:
        """Summary for reports: model_type, family, block_path, num_blocks, linears_per_block, linear_groups,
        hidden_size, tied_head."""
        blocks = self.blocks(model)
        groups = self.linear_groups(blocks[0])
        described = {
            "model_type": self.model_type,
            "family": self.family,
            "block_path": self.block_path(model),
            "num_blocks": len(blocks),
            "linears_per_block": sum(len(g) for g in groups),
            "linear_groups": groups,
            "hidden_size": _hidden_size(model),
            "tied_head": self.head_is_tied(model),
        }
        experts = [len(e) for e in map(self._experts, blocks) if e is not None]
        if self.spec.moe is not None:
            config = _text_config(getattr(model, "config", None))
            described["experts"] = {"moe_blocks": len(experts), "experts_per_block": max(experts, default=0),
                                    "experts_per_token": getattr(config, "num_experts_per_tok", None),
                                    "kept": list(self.spec.moe.kept)}
        return described


@dataclass(frozen=True)
class FoldableLink:
    """A ``ScaleLink`` of one block: ``rows`` of the producer's outputs feed the consumers (``width`` inputs each);
    ``reason`` says why an input scale cannot be folded through it (None: it can)."""

    link: ScaleLink
    rows: slice
    width: int
    reason: str | None = None


def _block_config(block: nn.Module) -> Any:
    """The model config a block's modules carry (transformers gives each attention module its config)."""
    for module in block.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "num_attention_heads"):
            return config
    return None


def _resolve(block: nn.Module, link: ScaleLink, config: Any) -> FoldableLink:
    producer = _find(block, link.producer)
    consumers = [_find(block, name) for name in link.consumers]
    width = linear_dims(consumers[0])[1] if consumers and all(is_linear(c) for c in consumers) else 0

    def refuse(reason: str) -> FoldableLink:
        return FoldableLink(link, slice(0, 0), width, reason)

    if producer is None or not consumers or not all(is_linear(c) for c in consumers):
        return refuse(f"the block has no {link.producer} feeding linears {', '.join(link.consumers)}")
    if any(linear_dims(c)[1] != width for c in consumers):
        return refuse(f"{', '.join(link.consumers)} differ in input width")
    if is_linear(producer):
        outputs = linear_dims(producer)[0]
    else:
        weight = getattr(producer, "weight", None)
        if not isinstance(weight, torch.Tensor):
            return refuse(f"{link.producer} ({type(producer).__name__}) has no weight to absorb a scale")
        outputs = weight.numel()
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if link.requires == "kv_heads" and heads != kv_heads:
        return refuse(f"grouped-query attention ({heads} query heads, {kv_heads} value heads): each value channel "
                      f"of {link.producer} feeds {heads // max(kv_heads, 1)} inputs of {link.consumers[0]}, which "
                      "would need one scale")
    activation = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
    if link.requires == "relu" and activation != "relu":
        return refuse(f"the activation between {link.producer} and {link.consumers[0]} is {activation}, which does "
                      "not commute with a scale (ReLU would)")
    if link.requires == "pre_norm" and not getattr(config, "do_layer_norm_before", True):
        return refuse(f"{link.producer} normalises after the residual sum (post-norm), not the linears' input")
    if link.rows == "tail" and outputs >= width:
        return FoldableLink(link, slice(outputs - width, outputs), width)
    if link.rows == "all" and outputs == width:
        return FoldableLink(link, slice(0, outputs), width)
    return refuse(f"{link.producer} has {outputs} outputs for the {width} inputs of {link.consumers[0]}")


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _hidden_size(model: nn.Module) -> int | None:
    config = _text_config(getattr(model, "config", None))
    size = getattr(config, "hidden_size", None)
    return int(size) if size is not None else None


def get_adapter(model_or_config: Any) -> ModelAdapter:
    """The adapter for a model, a transformers config, or a ``model_type`` string, dispatched on ``model_type``.

    Raises ``UnsupportedArchitectureError`` naming the model type and the supported ones.
    """
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
        if not model_type:
            raise UnsupportedArchitectureError(
                f"cannot tell the architecture of {type(model_or_config).__name__}: it has no config.model_type",
                fix="pass a transformers PreTrainedModel or its config",
            )
    spec = _BY_MODEL_TYPE.get(model_type)
    if spec is None:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}",
            fix="use a model of a supported family, or add a FamilySpec for it in lmshrink/models/adapters.py",
        )
    return ModelAdapter(spec=spec, model_type=model_type)


def iter_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(full dotted name, module)`` of every decoder-block linear of ``model``, in execution order."""
    return get_adapter(model).iter_linears(model)
