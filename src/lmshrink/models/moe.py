"""Mixture-of-experts blocks with their experts as separate linear layers.

transformers keeps the experts of a sparse MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE) as fused 3-D tensors
(``gate_up_proj`` ``[experts, 2 * intermediate, hidden]`` and ``down_proj``); checkpoints store one linear per
expert and projection, and that is what gets compressed. ``linearize_experts`` replaces each fused experts module
by ``LinearExperts``: one ``ExpertMLP`` per expert with its gate, up and down projections as ``nn.Linear`` under the
checkpoint's names, computing the same thing. Every projection of every expert is then a linear like any other for
the engine, the writer and the packed runtime.

``LinearExperts`` runs all experts' gate and up projections before any down projection (the order the adapter's
layout lists them in, so the engine can collect each step's statistics in one pass), and can route every token
through chosen experts for calibration only (``route_all``): their linears then see every token, while the
block's output still counts only the tokens the router chose.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, its linears registered under ``names`` (gate, up, down)."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, names: tuple[str, str, str], act):
        super().__init__()
        self.names = names
        for name, module in zip(names, (gate, up, down)):
            self.add_module(name, module)
        self.act_fn = act

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, _ = self.names
        return self.act_fn(getattr(self, gate)(x)) * getattr(self, up)(x)

    def down(self, h: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.names[2])(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.inner(x))


class LinearExperts(nn.ModuleList):
    """The experts of one sparse MoE block as ``ExpertMLP`` modules; called as transformers' fused experts module
    is: ``(hidden_states [tokens, hidden], top_k_index [tokens, k], top_k_weights [tokens, k])``."""

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)
        self.route_all: frozenset[int] = frozenset()  # calibration only: experts that see every token

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # [experts + 1, k, tokens]: index == experts marks "no expert" in some routers
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=len(self) + 1).permute(2, 1, 0)
        staged = []
        for index, expert in enumerate(self):
            top_k_pos, token_idx = torch.where(expert_mask[index])
            if index in self.route_all:
                staged.append((index, top_k_pos, token_idx, expert.inner(hidden_states), True))
            elif token_idx.numel():
                staged.append((index, top_k_pos, token_idx, expert.inner(hidden_states[token_idx]), False))
        for index, top_k_pos, token_idx, inner, every_token in staged:
            out = self[index].down(inner)
            if every_token:
                out = out[token_idx]
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    @contextmanager
    def routing_all(self, experts: set[int]) -> Iterator[None]:
        """Route every token through ``experts`` (for their statistics only) while the context is open."""
        before = self.route_all
        self.route_all = frozenset(experts)
        try:
            yield
        finally:
            self.route_all = before


def _is_fused(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3
            and down.dim() == 3 and not isinstance(module, LinearExperts))


def _linear(weight: torch.Tensor) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=False, device="meta", dtype=weight.dtype)
    if weight.device.type != "meta":
        layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    return layer


def linear_experts(fused: nn.Module, names: tuple[str, str, str]) -> LinearExperts:
    """``LinearExperts`` holding the weights of a fused experts module (meta tensors stay on the meta device)."""
    gate_up, down = fused.gate_up_proj, fused.down_proj
    if getattr(fused, "has_bias", False) or getattr(fused, "gate_up_proj_bias", None) is not None:
        raise NotImplementedError("experts with biases are not supported")
    intermediate = gate_up.shape[1] // 2
    experts = [ExpertMLP(_linear(gate_up[e, :intermediate]), _linear(gate_up[e, intermediate:]), _linear(down[e]),
                         names, fused.act_fn) for e in range(gate_up.shape[0])]
    return LinearExperts(experts)


def linearize_experts(model: nn.Module, blocks: nn.ModuleList, experts_path: str,
                      names: tuple[str, str, str]) -> int:
    """Replace every block's fused experts module at ``experts_path`` (block-relative) by ``LinearExperts`` with
    the projections named ``names``; returns how many were replaced (0 when already done)."""
    replaced = 0
    for block in blocks:
        parent_path, _, leaf = experts_path.rpartition(".")
        parent = block.get_submodule(parent_path) if parent_path else block
        fused = getattr(parent, leaf, None)
        if fused is None or not _is_fused(fused):
            continue
        setattr(parent, leaf, linear_experts(fused, names))
        replaced += 1
    return replaced
