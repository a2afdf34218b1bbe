"""Architecture adapters: blocks, linear groups in execution order, embeddings/norm/head, Conv1D handling."""

from __future__ import annotations

import pytest
import torch
from tiny_families import FAMILIES, VOCAB, tiny_config, tiny_model
from torch import nn
from transformers import GPTNeoXConfig
from transformers.pytorch_utils import Conv1D

from lmshrink.core.errors import LmshrinkError, UnsupportedArchitectureError
from lmshrink.models.adapters import (
    SUPPORTED_MODEL_TYPES,
    get_adapter,
    is_linear,
    iter_linears,
    linear_dims,
    linear_weight,
    set_linear_weight,
)

EXPECTED_BLOCK_PATH = {"opt": "model.decoder.layers", "gpt2": "transformer.h"}


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, tiny_model(request.param)


def _block_linears(block: nn.Module) -> set[str]:
    return {name for name, module in block.named_modules() if name and is_linear(module)}


def test_supported_types_cover_every_family():
    for family in FAMILIES:
        assert tiny_config(family).model_type in SUPPORTED_MODEL_TYPES
    assert "gemma3" in SUPPORTED_MODEL_TYPES and "gemma3_text" in SUPPORTED_MODEL_TYPES


def test_blocks_and_paths(family_model):
    family, model = family_model
    adapter = get_adapter(model)
    assert adapter.family == family
    assert adapter.block_path(model) == EXPECTED_BLOCK_PATH.get(family, "model.layers")
    blocks = adapter.blocks(model)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == 2
    assert blocks is model.get_submodule(adapter.block_path(model))
    # dispatch from the config alone gives the same family
    assert get_adapter(model.config).family == family


def test_groups_exist_are_linear_and_cover_each_linear_once(family_model):
    family, model = family_model
    adapter = get_adapter(model)
    for block in adapter.blocks(model):
        groups = adapter.linear_groups(block)
        names = [name for group in groups for name in group]
        assert len(names) == len(set(names)), f"{family}: a linear appears in two groups"
        assert set(names) == _block_linears(block), f"{family}: groups do not cover the block's linears"
        for name in names:
            assert is_linear(block.get_submodule(name))
        assert [n for n, _ in adapter.linears(block)] == names


def test_expected_group_shapes():
    llama = get_adapter("llama").linear_groups(tiny_model("llama").model.layers[0])
    assert llama == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                     ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    phi3 = get_adapter("phi3").linear_groups(tiny_model("phi3").model.layers[0])
    assert phi3 == [["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj"], ["mlp.down_proj"]]
    opt = get_adapter("opt").linear_groups(tiny_model("opt").model.decoder.layers[0])
    assert opt == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"],
                   ["fc2"]]
    gpt2 = get_adapter("gpt2").linear_groups(tiny_model("gpt2").transformer.h[0])
    assert gpt2 == [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]


def test_execution_order_and_shared_group_inputs(family_model):
    """Forward hooks: every block linear fires once, groups fire in listed order, a group shares one input."""
    family, model = family_model
    adapter = get_adapter(model)
    expected = list(adapter.iter_linears(model))
    position = {}  # full name -> (block index, group index)
    prefix = adapter.block_path(model)
    for index, block in enumerate(adapter.blocks(model)):
        for group_index, group in enumerate(adapter.linear_groups(block)):
            for name in group:
                position[f"{prefix}.{index}.{name}"] = (index, group_index)

    fired: list[tuple[str, torch.Tensor]] = []
    handles = [module.register_forward_pre_hook(lambda mod, args, name=name: fired.append((name, args[0].clone())))
               for name, module in model.named_modules() if name.startswith(prefix + ".") and is_linear(module)]
    try:
        with torch.no_grad():
            model(torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1)))
    finally:
        for handle in handles:
            handle.remove()

    fired_names = [name for name, _ in fired]
    assert sorted(fired_names) == sorted(name for name, _ in expected), f"{family}: each linear fires exactly once"
    order = [position[name] for name in fired_names]
    assert order == sorted(order), f"{family}: linears fired out of group order: {fired_names}"
    inputs = dict(fired)
    for index, block in enumerate(adapter.blocks(model)):
        for group in adapter.linear_groups(block):
            first = inputs[f"{prefix}.{index}.{group[0]}"]
            assert first.shape[-1] == linear_dims(block.get_submodule(group[0]))[1]
            for name in group[1:]:
                assert torch.equal(inputs[f"{prefix}.{index}.{name}"], first), f"{family}: {name} input differs"


def test_embeddings_norm_head_rotary(family_model):
    family, model = family_model
    adapter = get_adapter(model)
    embeddings = adapter.embeddings(model)
    assert isinstance(embeddings[0], nn.Embedding) and embeddings[0].num_embeddings == VOCAB
    if family in ("opt", "gpt2"):
        assert len(embeddings) == 2 and isinstance(embeddings[1], nn.Embedding)
        assert embeddings[1].num_embeddings >= model.config.max_position_embeddings
    else:
        assert len(embeddings) == 1
    norm = adapter.final_norm(model)
    assert norm is not None and "Norm" in type(norm).__name__
    head = adapter.head(model)
    assert is_linear(head) and linear_dims(head)[0] == VOCAB
    rotary = adapter.rotary(model)
    if family in ("opt", "gpt2"):
        assert rotary is None
    else:
        assert "Rotary" in type(rotary).__name__
    summary = adapter.describe(model)
    assert summary["num_blocks"] == 2 and summary["hidden_size"] == 32
    assert summary["model_type"] == model.config.model_type
    assert summary["linears_per_block"] == len(_block_linears(adapter.blocks(model)[0]))


def test_opt_projections_are_listed_with_embeddings():
    model = tiny_model("opt", word_embed_proj_dim=16)
    embeddings = get_adapter(model).embeddings(model)
    assert embeddings[2] is model.model.decoder.project_in and embeddings[3] is model.model.decoder.project_out


def test_tied_head_detected():
    assert get_adapter("llama").head_is_tied(tiny_model("llama", tie_word_embeddings=True))
    assert not get_adapter("llama").head_is_tied(tiny_model("llama", tie_word_embeddings=False))


def test_iter_linears_names_resolve_in_order():
    model = tiny_model("qwen3")
    listed = list(iter_linears(model))
    assert len(listed) == 2 * 7
    assert listed[0][0] == "model.layers.0.self_attn.q_proj" and listed[-1][0] == "model.layers.1.mlp.down_proj"
    for name, module in listed:
        assert model.get_submodule(name) is module


def test_conv1d_weight_round_trip():
    model = tiny_model("gpt2")
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, Conv1D)
    assert linear_dims(c_attn) == (96, 32)
    weight = linear_weight(c_attn)
    assert weight.shape == (96, 32)
    assert weight.data_ptr() == c_attn.weight.data_ptr(), "documented as a view, not a copy"
    x = torch.randn(5, 32)
    torch.testing.assert_close(c_attn(x), x @ weight.T + c_attn.bias, rtol=1e-5, atol=1e-6)

    new = torch.randn(96, 32)
    set_linear_weight(c_attn, new)
    assert c_attn.weight.shape == (32, 96)
    torch.testing.assert_close(linear_weight(c_attn), new)
    torch.testing.assert_close(c_attn(x), x @ new.T + c_attn.bias, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[96, 32\]"):
        set_linear_weight(c_attn, new.T)


def test_linear_weight_write_keeps_dtype_and_parameter():
    layer = nn.Linear(8, 4).to(torch.bfloat16)
    parameter = layer.weight
    new = torch.randn(4, 8, dtype=torch.float32)
    set_linear_weight(layer, new)
    assert layer.weight is parameter and layer.weight.dtype == torch.bfloat16
    torch.testing.assert_close(linear_weight(layer).float(), new, rtol=1e-2, atol=1e-2)
    with pytest.raises(TypeError):
        linear_dims(nn.LayerNorm(8))


def test_unknown_architecture_names_type_and_supported():
    with pytest.raises(UnsupportedArchitectureError) as info:
        get_adapter(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64))
    message = str(info.value)
    assert "gpt_neox" in message and "llama" in message and "gpt2" in message and "fix:" in message
    assert isinstance(info.value, LmshrinkError)
    with pytest.raises(UnsupportedArchitectureError, match="no config.model_type"):
        get_adapter(nn.Linear(2, 2))


def test_layout_mismatch_names_missing_and_extra_linears():
    model = tiny_model("llama")
    block = model.model.layers[0]
    block.self_attn.k_proj = nn.Identity()
    with pytest.raises(UnsupportedArchitectureError, match="self_attn.k_proj"):
        get_adapter(model).linear_groups(block)
    other = model.model.layers[1]
    other.mlp.extra_proj = nn.Linear(32, 32)
    with pytest.raises(UnsupportedArchitectureError, match="mlp.extra_proj"):
        get_adapter(model).linear_groups(other)


def test_missing_block_list_is_a_clear_error():
    model = tiny_model("llama")
    with pytest.raises(UnsupportedArchitectureError, match="model.layers"):
        get_adapter("llama").blocks(model.lm_head)


def test_gemma3_multimodal_finds_text_decoder():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    config = Gemma3Config(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4,
    )
    model = Gemma3ForConditionalGeneration(config).eval()
    adapter = get_adapter(model)
    assert adapter.model_type == "gemma3"
    assert adapter.block_path(model) == "model.language_model.layers"
    assert len(adapter.blocks(model)) == 2
    assert adapter.describe(model)["hidden_size"] == 32
    assert all(".vision" not in name for name, _ in adapter.iter_linears(model))
    assert "Rotary" in type(adapter.rotary(model)).__name__
