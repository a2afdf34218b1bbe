"""Tiny random 2-block causal LMs of every supported family, built from configs (no download)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

VOCAB = 300  # matches helpers.tiny_tokenizer()

# Llama-style families share one small shape; ids stay inside the vocabulary so configs do not warn.
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=False)

_CONFIGS = {
    "llama": lambda: LlamaConfig(**_DECODER),
    "mistral": lambda: MistralConfig(**_DECODER, sliding_window=16),
    "qwen2": lambda: Qwen2Config(**_DECODER),
    "qwen3": lambda: Qwen3Config(**_DECODER, head_dim=8),
    "gemma": lambda: GemmaConfig(**_DECODER, head_dim=8),
    "gemma2": lambda: Gemma2Config(**_DECODER, head_dim=8, sliding_window=16),
    "gemma3": lambda: Gemma3TextConfig(**_DECODER, head_dim=8, sliding_window=16),
    "phi3": lambda: Phi3Config(**_DECODER),
    "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1,
                             eos_token_id=2),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1,
                               eos_token_id=2),
}

FAMILIES: tuple[str, ...] = tuple(_CONFIGS)


def tiny_config(family: str):
    """The transformers config of the tiny model for ``family`` (one of ``FAMILIES``)."""
    return _CONFIGS[family]()


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-block, hidden-32, float32 causal LM of ``family`` with random weights, in eval mode."""
    torch.manual_seed(seed)
    config = tiny_config(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_config(config).eval()


# mixture of experts: 4 experts, 2 per token; built with transformers' fused experts (compress makes them linears)
_MOE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False, num_experts_per_tok=2)
_MOE_CONFIGS = {
    "mixtral": lambda: MixtralConfig(**_MOE, num_local_experts=4),
    "qwen2_moe": lambda: Qwen2MoeConfig(**_MOE, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                        num_experts=4),
    "qwen3_moe": lambda: Qwen3MoeConfig(**_MOE, moe_intermediate_size=32, num_experts=4, head_dim=8),
}
MOE_FAMILIES: tuple[str, ...] = tuple(_MOE_CONFIGS)


def tiny_moe(family: str, seed: int = 0, silent_expert: int | None = None) -> torch.nn.Module:
    """A 2-block, hidden-32 mixture-of-experts LM of ``family`` (one of ``MOE_FAMILIES``) with random weights and
    random routing. ``silent_expert``: that expert never receives a token, in any block, through the model's own
    weights: hidden dimension 0 is held at a constant positive value (the embeddings set it; attention and the
    experts never write it) and the expert's router row is a large negative weight on it alone."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_MOE_CONFIGS[family]()).eval()
    with torch.no_grad():
        for block in model.model.layers:
            router = block.mlp.gate
            router.weight.normal_(0, 0.5)
            if silent_expert is not None:
                router.weight[:, 0] = 0  # the others route on the varying dimensions only
                router.weight[silent_expert] = 0
                router.weight[silent_expert, 0] = -100
            for parameter in (block.mlp.experts.gate_up_proj, block.mlp.experts.down_proj):
                parameter.normal_(0, 0.2)
        if silent_expert is not None:
            model.model.embed_tokens.weight[:, 0] = 1.0
            for block in model.model.layers:
                block.self_attn.o_proj.weight[0] = 0
                block.mlp.experts.down_proj[:, 0] = 0
                if getattr(block.mlp, "shared_expert", None) is not None:
                    block.mlp.shared_expert.down_proj.weight[0] = 0
    return model
