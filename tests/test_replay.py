"""Reusing work between the passes of a block (engine/replay.py) changes nothing but the work done."""

import copy

import pytest
import torch
from tiny_families import FAMILIES, tiny_model

from lmshrink.engine import replay
from lmshrink.engine.loop import Engine
from lmshrink.models.adapters import get_adapter
from lmshrink.pipeline.recipe import parse_recipe

GPTQ = {"stages": [{"method": "gptq", "bits": 4, "group_size": 16}]}
TWO_STAGES = {"stages": [{"method": "rtn", "bits": 8, "group_size": -1},
                         {"method": "gptq", "bits": 4, "group_size": 16, "act_order": False}]}
# true-sequential stages in group order: the GPTQ stage reuses the SparseGPT stage's pass over the same group
PRUNE_THEN_GPTQ = {"order": "group", "stages": [{"method": "sparsegpt", "sparsity": 0.5},
                              {"method": "gptq", "bits": 4, "group_size": 16}]}
PARTIAL = {"stages": [{"method": "gptq", "bits": 3, "group_size": 16, "targets": ["*o_proj", "*down_proj",
                                                                                   "*out_proj", "*fc2", "*c_proj"]}]}


def _calib(n=6, seqlen=40, seed=1):
    return torch.randint(0, 300, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _run(model, recipe, reuse):
    return Engine(model, get_adapter(model), parse_recipe(recipe), _calib(), progress=False, batch_size=2,
                  reuse_passes=reuse).run()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recipe", [GPTQ, TWO_STAGES, PRUNE_THEN_GPTQ, PARTIAL],
                         ids=["gptq", "rtn-then-gptq", "prune-then-gptq", "partial-targets"])
def test_reuse_gives_bit_identical_results(family, recipe):
    base = tiny_model(family)
    plain, reused = copy.deepcopy(base), copy.deepcopy(base)
    expected = _run(plain, recipe, reuse=False)
    got = _run(reused, recipe, reuse=True)
    assert expected.results.keys() == got.results.keys()
    for name, result in expected.results.items():
        assert torch.equal(result.codes, got.results[name].codes), name
        assert torch.equal(result.weight, got.results[name].weight), name
    for (name, a), b in zip(plain.state_dict().items(), reused.state_dict().values()):
        assert torch.equal(a, b), name
    # the containers' forwards are restored
    for module in reused.modules():
        assert "forward" not in vars(module)


def test_reuse_skips_attention_and_mlp_recomputation(monkeypatch):
    """On a llama block with true-sequential GPTQ: attention runs in full only in the passes that need it."""
    memos = []
    original = replay.PassMemo.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        memos.append(self)

    monkeypatch.setattr(replay.PassMemo, "__init__", spy)
    model = tiny_model("llama")
    calls = {"q": 0, "gate": 0}

    def count(key):
        return lambda *a: calls.__setitem__(key, calls[key] + 1)

    for block in get_adapter(model).blocks(model):  # q_proj / gate_proj run only when attention / mlp really run
        block.self_attn.q_proj.register_forward_pre_hook(count("q"))
        block.mlp.gate_proj.register_forward_pre_hook(count("gate"))
    _run(model, GPTQ, reuse=True)
    assert [c.name for c in memos[0].containers] == ["self_attn", "mlp"]
    batches, blocks = 3, 2
    # without reuse attention runs in all 5 passes (q,k,v / o / gate,up / down / final); with it, in the passes
    # collecting q,k,v and o, plus one run in the first block that checks the o_proj shortcut
    assert calls["q"] == 2 * batches * blocks + 1
    # mlp: the passes collecting gate,up and down, plus one checking run of the down_proj shortcut
    assert calls["gate"] == 2 * batches * blocks + 1
    assert sum(m.shortcut_runs for m in memos) > 0 and sum(m.skipped_runs for m in memos) > 0
