"""Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): experts become linears like any other, routers stay as they
are, an expert the router starves is calibrated on every token and recorded, never NaN and never skipped."""

import json

import pytest
import torch
from helpers import folder_digest, tiny_tokenizer, write_calibration_text
from safetensors import safe_open
from tiny_families import MOE_FAMILIES, tiny_moe

from lmshrink import compress, load_model
from lmshrink.core.errors import LmshrinkError
from lmshrink.models.adapters import get_adapter, is_linear
from lmshrink.models.moe import LinearExperts

GPTQ = [{"method": "gptq", "bits": 4, "group_size": 16, "clip_search": False}]
SILENT = 3


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return f"file:{write_calibration_text(tmp_path_factory.mktemp('text') / 'calib.txt')}"


def _compress(model, calib, out=None, **kwargs):
    return compress(model, kwargs.pop("recipe", GPTQ), tokenizer=tiny_tokenizer(), output=out, calibration=calib,
                    nsamples=16, seqlen=32, progress=False, **kwargs)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_linear_experts_compute_what_the_fused_experts_do_under_the_checkpoint_names(family, tmp_path):
    model = tiny_moe(family)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused = model(ids).logits
    model.save_pretrained(tmp_path)  # transformers writes the checkpoint layout: one tensor per expert and projection
    adapter = get_adapter(model)
    assert adapter.linearize(model) == 2 and adapter.linearize(model) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fused, rtol=1e-5, atol=1e-5)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        stored = set(handle.keys())
    assert {adapter.checkpoint_name(n) for n in model.state_dict()} == stored
    block = adapter.blocks(model)[0]
    groups = adapter.linear_groups(block)
    kept = {n for n, m in block.named_modules() if is_linear(m)} - {n for g in groups for n in g}
    assert kept == set(adapter.spec.moe.kept)  # only gates; the routers are no linears at all
    assert not is_linear(block.mlp.gate)
    experts = adapter.expert_groups(block)
    assert sorted(set(experts.values())) == [0, 1, 2, 3]
    # every expert's gate and up in one step, every down in the next: one collection pass each
    steps = adapter.independent_steps(block)
    assert len(set(steps)) == len(steps) - 2 * 3


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_an_expert_with_no_token_is_calibrated_on_every_token_and_recorded(family, calib, tmp_path):
    model = tiny_moe(family, silent_expert=SILENT)
    record = _compress(model, calib, tmp_path / "out")
    adapter = get_adapter(model)
    linears = [name for name, _ in adapter.iter_linears(model)]
    assert set(record["results"]) == set(linears)  # every expert compressed, none skipped
    for name, result in record["results"].items():
        assert torch.isfinite(result.weight).all() and torch.isfinite(result.scale).all(), name
    tokens = 16 * 32
    for block, entry in record["experts"]["blocks"].items():
        assert entry["tokens"][str(SILENT)] == 0
        assert sum(entry["tokens"].values()) == 2 * tokens  # two experts per token
        assert SILENT in entry["fallback"]["gate_up"] and SILENT in entry["fallback"]["down"]
    silent = [layer for layer in record["layers"] if layer.get("expert") == SILENT]
    assert len(silent) == 2 * 3  # gate, up and down in both blocks
    for layer in silent:
        assert layer["routed_tokens"] == 0 and layer["fallback"] == "all-tokens"
        assert layer["fallback_tokens"] == tokens == layer["tokens"]
        assert layer["rel_output_error"] == layer["rel_output_error"]  # not NaN
    saved = json.loads((tmp_path / "out" / "lmshrink.json").read_text())
    assert saved["experts"]["blocks"] == record["experts"]["blocks"]
    # the folder reads back (decoded, and packed) with the silent expert's compressed weights
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    dense = load_model(str(tmp_path / "out"), progress=False)
    packed = load_model(str(tmp_path / "out"), progress=False, runtime="packed")
    name = f"{adapter.block_path(model)}.0.{adapter.spec.moe.experts}.{SILENT}.{adapter.spec.moe.projections[0]}"
    assert torch.equal(dense.model.get_submodule(name).weight, record["results"][name].weight)
    with torch.no_grad():
        logits = dense.model(ids).logits
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(packed.model(ids).logits, logits, rtol=1e-4, atol=1e-4)


def test_experts_below_a_given_threshold_fall_back_and_none_above(calib):
    model = tiny_moe("qwen3_moe", silent_expert=SILENT)
    every = _compress(tiny_moe("qwen3_moe", silent_expert=SILENT), calib, expert_min_tokens=10**6)
    for entry in every["experts"]["blocks"].values():
        assert entry["fallback"]["gate_up"] == [0, 1, 2, 3] and entry["min_tokens"] == 10**6
    only_silent = _compress(model, calib, expert_min_tokens=1)
    for entry in only_silent["experts"]["blocks"].values():
        assert entry["fallback"] == {"gate_up": [SILENT], "down": [SILENT]}
    with pytest.raises(LmshrinkError, match="at least 1"):
        _compress(tiny_moe("qwen3_moe"), calib, expert_min_tokens=0)


def test_fp_target_stages_solve_routed_experts_plainly_and_say_so(calib):
    # a router may send a token to different experts in the uncompressed and the compressed model: no paired inputs
    record = _compress(tiny_moe("mixtral", silent_expert=SILENT), calib, recipe=[{**GPTQ[0], "fp_target": True}])
    assert len(record["results"]) == 2 * (4 + 4 * 3)
    for layer in record["layers"]:
        if ".experts." in layer["name"]:
            assert layer["fp_target"].startswith("not applied")
            assert record["results"][layer["name"]].info["fp_target"].startswith("not applied")
        else:
            assert "fp_target" not in layer and record["results"][layer["name"]].info["fp_target"] is True
    assert all(SILENT in entry["fallback"]["down"] for entry in record["experts"]["blocks"].values())


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])  # renamed tensors; attention biases, shared expert
def test_streamed_runs_read_and_write_the_checkpoint_names(family, calib, tmp_path):
    model = tiny_moe(family)
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    in_memory = _compress(load_model(str(tmp_path / "model"), progress=False), calib, tmp_path / "memory")
    streamed = _compress(str(tmp_path / "model"), calib, tmp_path / "streamed", offload="disk")
    assert folder_digest(tmp_path / "streamed") == folder_digest(tmp_path / "memory")
    assert in_memory["experts"] == streamed["experts"]
    with safe_open(str(tmp_path / "streamed" / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    if family == "mixtral":
        assert "model.layers.1.block_sparse_moe.experts.2.w2.weight_packed" in keys
        assert "model.layers.1.block_sparse_moe.gate.weight" in keys and not any(".mlp." in k for k in keys)
    else:
        assert {"model.layers.1.mlp.experts.2.down_proj.weight_packed", "model.layers.1.self_attn.q_proj.bias",
                "model.layers.1.mlp.shared_expert_gate.weight"} <= keys
    assert isinstance(load_model(str(tmp_path / "streamed"), progress=False).model.model.layers[1].mlp.experts,
                      LinearExperts)


def test_a_low_rank_correction_of_routed_experts_solves_without_paired_inputs(calib, tmp_path):
    """fp_target stages get no paired inputs for routed experts: a lowrank-correction after GPTQ solves them on the
    local objective and says so; a folder with low-rank layers of a MoE model is refused by the loader, clearly."""
    recipe = {"order": "group", "stages": [{"method": "gptq", "bits": 3, "group_size": 32, "fp_target": True},
                                           {"method": "lowrank-correction", "rank": 4}]}
    record = _compress(tiny_moe("mixtral"), calib, tmp_path / "out", recipe=recipe)
    experts = [line for line in record["layers"]
               if ".experts." in line["name"] and line["method"] == "lowrank-correction"]
    assert experts and all(line["fp_target"].startswith("not applied") for line in experts)
    with pytest.raises(LmshrinkError, match="low-rank layers of a mixture-of-experts model") as err:
        load_model(str(tmp_path / "out"), progress=False)
    assert "without low-rank stages" in err.value.fix
