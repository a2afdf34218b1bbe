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
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
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
