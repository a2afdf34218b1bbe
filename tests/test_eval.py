import copy
import math

import torch
import torch.nn.functional as F
from helpers import tiny_llama, tiny_tokenizer

from lmshrink import evaluate
from lmshrink.data.windows import Windows
from lmshrink.eval.kl import kl_divergence
from lmshrink.eval.perplexity import perplexity
from lmshrink.eval.size import model_size


def _windows(n=3, seqlen=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Windows(torch.randint(0, 300, (n, seqlen), generator=g), {"seqlen": seqlen})


def test_perplexity_matches_direct_computation_and_batching():
    model = tiny_llama()
    w = _windows()
    with torch.no_grad():
        per_window = [F.cross_entropy(model(x[None]).logits[0, :-1], x[1:]).item() for x in w.input_ids]
    expected = math.exp(sum(per_window) / len(per_window))
    r1 = perplexity(model, w, batch_size=1, progress=False)
    r2 = perplexity(model, w, batch_size=3, progress=False)
    assert abs(r1["ppl"] - expected) < 1e-4 * expected
    assert abs(r2["ppl"] - r1["ppl"]) < 1e-4 * expected
    assert r1["tokens"] == 72 and len(r1["window_nll"]) == 3


def test_kl_zero_for_same_model_and_positive_for_perturbed():
    model = tiny_llama()
    w = _windows()
    same = kl_divergence(model, copy.deepcopy(model), w, progress=False)
    assert same["kl_mean"] < 1e-6 and same["top1_agreement"] == 1.0
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    diff = kl_divergence(other, model, w, progress=False)
    assert diff["kl_mean"] > 1e-3 and diff["top1_agreement"] < 1.0
    assert diff["positions"] == 3 * 23
    assert abs(diff["base_ppl"] - perplexity(model, w, progress=False)["ppl"]) < 1e-3


def test_model_size_counts_tied_weights_once():
    untied = tiny_llama()
    tied = tiny_llama(tie_word_embeddings=True)
    s1, s2 = model_size(untied), model_size(tied)
    assert s1["parameters"] == sum(p.numel() for p in untied.parameters())
    assert s1["parameters"] - s2["parameters"] == 300 * 64
    assert s2["weight_bytes"] == 4 * s2["parameters"]
    assert s1["body_bytes"] == s2["body_bytes"]


def test_model_size_counts_the_weights_of_packed_layers_not_their_stored_elements():
    from tiny_families import tiny_model

    from lmshrink.core.grids import GridSpec
    from lmshrink.methods.quant.rtn import rtn_quantize
    from lmshrink.models.adapters import iter_linears, linear_weight
    from lmshrink.runtime.packed import replace_linears
    from lmshrink.runtime.qlinear import QuantLinear

    model = tiny_model("qwen2")  # its q/k/v projections have a bias: counted as weights too
    dense = model_size(model)
    results = {name: rtn_quantize(linear_weight(module).float().clone(), GridSpec(bits=4, group_size=32))
               for name, module in iter_linears(model)}
    replace_linears(model, results, kernels=False)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == len(results) == 14
    packed = model_size(model)
    assert packed["parameters"] == dense["parameters"] == sum(p.numel() for p in tiny_model("qwen2").parameters())
    assert packed["body_parameters"] == dense["body_parameters"]
    # the bytes stay those of the stored tensors: codes, scales and zero points instead of float32 weights
    assert packed["weight_bytes"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert packed["body_bytes"] < dense["body_bytes"] / 2
    assert packed["embedding_and_head_bytes"] == dense["embedding_and_head_bytes"]


def test_evaluate_in_memory_model_with_file_text(tmp_path):
    (tmp_path / "t.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    record = evaluate(tiny_llama(), tokenizer=tiny_tokenizer(), ppl=f"file:{tmp_path / 't.txt'}", seqlen=32,
                      limit=2, kl_base=None, progress=False)
    (entry,) = record["perplexity"]
    assert entry["protocol"]["windows"] == 2 and entry["protocol"]["seqlen"] == 32
    assert entry["ppl"] > 1 and record["environment"]["torch"].startswith("2.13")
