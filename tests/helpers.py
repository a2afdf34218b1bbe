"""Tiny random models and a tiny tokenizer, built offline, for fast tests."""

from __future__ import annotations

import functools
import hashlib
import json
import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Compression of language models after training keeps most of their quality.",
    "A model that fits on a cheaper machine is a model people can use.",
    "Quantization rounds weights to a grid; pruning sets some of them to zero.",
    "= Valkyria Chronicles III = \n Senjou no Valkyria 3 : Unrecorded Chronicles is a tactical role playing game .",
]


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences (vocab 300), with bos/eos."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama(seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-block Llama with random weights and the tiny tokenizer's vocabulary."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    cfg.update(overrides)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**cfg))
    return model.eval()


def save_tiny_llama(path, seed: int = 0, save_kwargs: dict | None = None, **overrides):
    """Save ``tiny_llama(seed, **overrides)`` and the tiny tokenizer as a Hugging Face folder at ``path``."""
    tiny_llama(seed=seed, **overrides).save_pretrained(path, **(save_kwargs or {}))
    tiny_tokenizer().save_pretrained(path)
    return path


def write_calibration_text(path, sentence: str = "Quantization rounds weights to a grid."):
    """A small plain-text calibration file (six paragraphs of a repeated sentence) at ``path``."""
    path.write_text((f"The quick brown fox jumps over the lazy dog. {sentence} " * 12 + "\n\n") * 6)
    return path


def write_word_paragraphs(path, words: str, paragraphs: int = 30, length: int = 80, seed: int = 0):
    """``paragraphs`` documents of ``length`` words drawn at random (seeded) from ``words`` at ``path``: enough
    distinct documents for training and held-out splits."""
    rng = random.Random(seed)
    vocabulary = words.split()
    path.write_text("\n\n".join(" ".join(rng.choice(vocabulary) for _ in range(length)) for _ in range(paragraphs)))
    return path



def assert_same_run(full, resumed, full_model, resumed_model) -> None:
    """Two engine runs gave bit-identical results (codes, grids, weights) and left bit-identical models."""
    assert full.results.keys() == resumed.results.keys()
    for name, r in full.results.items():
        other = resumed.results[name]
        assert torch.equal(r.codes, other.codes) and torch.equal(r.scale, other.scale)
        assert torch.equal(r.zero, other.zero) and torch.equal(r.weight, other.weight)
    for (n1, p1), (n2, p2) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def correlated_layer(rows: int = 48, cols: int = 64, tokens: int = 512, seed: int = 0):
    """A random weight and correlated inputs ``X = Z A`` (a few strong directions, per-column scales): returns
    ``(weight [rows, cols], x [tokens, cols], hessian X^T X)``, the Hessian accumulated as the engine does."""
    from lmshrink.engine.statistics import HessianAccumulator

    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    mixing = torch.randn(cols, cols, generator=gen) * 0.3 + torch.eye(cols)
    scales = torch.rand(cols, generator=gen) * 3 + 0.1
    x = (torch.randn(tokens, cols, generator=gen) @ mixing) * scales
    acc = HessianAccumulator(cols)
    acc.add_batch(x.reshape(4, tokens // 4, cols))
    return weight, x, acc.hessian


def folder_digest(folder) -> str:
    """A digest of a saved folder's tensors and their safetensors metadata (whose keys come in no fixed order)."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            digest.update(json.dumps(handle.metadata(), sort_keys=True).encode())
            for key in sorted(handle.keys()):
                digest.update(key.encode() + handle.get_tensor(key).numpy().tobytes())
    return digest.hexdigest()


def assert_resume_and_streaming_identical(tmp_path, run) -> None:
    """A run killed after block 1 and resumed, and a run streamed from disk, save the same folder as a plain run.

    ``run(output, streamed=False, **kwargs)`` compresses into ``output`` (a model source string and
    ``offload="disk"`` when ``streamed``) and returns the record; ``kwargs`` go to ``compress``.
    """
    import pytest

    class Kill(Exception):
        pass

    def killer(index):
        if index == 0:
            raise Kill

    full, resumed, streamed = tmp_path / "full", tmp_path / "resumed", tmp_path / "streamed"
    run(full)
    with pytest.raises(Kill):
        run(resumed, on_block_done=killer)
    assert run(resumed, resume=True)["summary"]["resumed_from_block"] == 1
    assert folder_digest(resumed) == folder_digest(full)
    run(streamed, streamed=True)
    assert folder_digest(streamed) == folder_digest(full)
