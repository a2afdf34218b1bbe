"""The engine on an accelerator: only the block being compressed moves there; results come back to CPU."""

import copy

import pytest
import torch
from tiny_families import tiny_model

from lmshrink.engine.loop import Engine
from lmshrink.models.adapters import get_adapter
from lmshrink.pipeline.recipe import parse_recipe

RECIPE = {"stages": [{"method": "gptq", "bits": 4, "group_size": 16}]}

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


@cuda
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cuda_engine_matches_cpu(family):
    ids = torch.randint(0, 300, (4, 40), generator=torch.Generator().manual_seed(0))
    base = tiny_model(family)
    on_cpu, on_gpu = copy.deepcopy(base), copy.deepcopy(base)
    expected = Engine(on_cpu, get_adapter(on_cpu), parse_recipe(RECIPE), ids, progress=False).run()
    got = Engine(on_gpu, get_adapter(on_gpu), parse_recipe(RECIPE), ids, device="cuda", progress=False).run()
    assert all(p.device.type == "cpu" for p in on_gpu.parameters())
    for name, result in got.results.items():
        assert result.codes.device.type == "cpu" and result.weight.device.type == "cpu"
        reference = expected.results[name]
        # float arithmetic differs between devices: nearly all codes agree and the errors are close
        assert (result.codes == reference.codes).float().mean() > 0.97, name
        assert result.rel_output_error == pytest.approx(reference.rel_output_error, rel=0.1, abs=1e-4), name


def test_capture_runs_where_the_embeddings_are():
    """Asking for another device does not move the windows away from the model's (CPU) embeddings."""
    from lmshrink.engine.capture import capture_block_inputs

    model = tiny_model("llama")
    adapter = get_adapter(model)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    store = capture_block_inputs(model, adapter.blocks(model), ids, torch.device("meta"))
    assert len(store.hidden) == 2 and store.hidden[0].device.type == "cpu"
